"""``dmn-neuro train`` / ``evaluate`` / ``run``."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import click

from dmn_neuro.errors import ConfigError

logger = logging.getLogger(__name__)

#: Seeds torch accepts.
SEED = click.IntRange(0, 2**63 - 1)


def _load_config(config_path: Optional[str], **overrides):
    from dmn_neuro.training.config import TrainingConfig

    cfg = TrainingConfig.from_yaml(config_path) if config_path else TrainingConfig()
    return cfg.replace(**overrides)


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML training config (sections connectome, circuit, environment, loss, optimisation + run settings; see TrainingConfig). Old flat configs are read too.")
@click.option("--source", default=None, help="Connectome source (flywire_v783_mb, hemibrain_v1.2.1_mb, codex:DIR, cave, synthetic); without source_options in the config it gets that source's training defaults.")
@click.option("--episodes", type=click.IntRange(0, 10_000_000), default=None, help="Training episodes (optimiser steps); 0 writes the untrained checkpoint.")
@click.option("--steps", type=click.IntRange(1, 1_000_000), default=None, help="Override episode_length_steps.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=None)
@click.option("--seed", type=SEED, default=None)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--engine", type=click.Choice(["fused", "snntorch"]), default=None)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/last if it exists (the config must be the run's, except --episodes and --device).")
@click.option("--allow-config-change", is_flag=True, help="With --resume: continue even though the config differs from the run's.")
@click.option("--init-from", type=click.Path(), default=None, help="Fine-tune: start this run from a checkpoint's weights, optimiser state and episode count (fresh best-checkpoint tracking).")
@click.option("--figure-episodes", "--eval-episodes", "figure_episodes", type=click.IntRange(0, 10_000), default=20, show_default=True, help="Episodes for the before/after trajectory figure and summary (0: none).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run directory (locked while training).")
def train(config_path, source, episodes, steps, batch_size, seed, device, engine, resume, allow_config_change, init_from,
          figure_episodes, out_dir):
    """Train the circuit by BPTT in the odor arena.

    Writes OUT/metrics.jsonl, OUT/checkpoints/{untrained,last,best}, OUT/config.yaml,
    OUT/before.json, OUT/loss_curves.png, OUT/trajectories_before_after.png and
    OUT/summary.json (see dmn_neuro.experiments.run).
    """
    from tqdm import tqdm

    from dmn_neuro.experiments.run import train_run

    cfg = _load_config(config_path, source=source, num_episodes=episodes, episode_length_steps=steps,
                       batch_size=batch_size, seed=seed, device=device, engine=engine)
    bar = []

    def progress(total, rec):
        if not bar:
            bar.append(tqdm(total=total, desc="training", file=sys.stderr, disable=total == 0, unit="episode"))
        if rec is not None:
            bar[0].update(1)
            bar[0].set_postfix(loss=f"{rec['total']:.3f}", succ=f"{rec['success_rate']:.2f}")

    try:
        summary = train_run(cfg, out_dir, resume=resume, init_from=init_from, allow_config_change=allow_config_change,
                            figure_episodes=figure_episodes, progress=progress,
                            notice=lambda msg: click.echo(msg, err=True))
    finally:
        if bar:
            bar[0].close()
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "config"}))


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--episodes", type=click.IntRange(1, 100_000), default=50, show_default=True, help="Held-out episodes.")
@click.option("--seed", type=SEED, default=12345, show_default=True, help="Seed of the held-out source positions and start poses.")
@click.option("--steps", type=click.IntRange(1, 1_000_000), default=None, help="Episode length (default: the checkpoint's training length).")
@click.option("--odor-removed", is_flag=True, help="Control: concentration forced to zero.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Where to write the figure and JSON (default CHECKPOINT_eval).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(checkpoint, episodes, seed, steps, odor_removed, device, out_dir, as_json):
    """Success rate and trajectory metrics of a checkpoint on held-out episodes."""
    from dmn_neuro.analysis import plots
    from dmn_neuro.training.checkpoint import load_circuit
    from dmn_neuro.training.config import TrainingConfig, resolve_device
    from dmn_neuro.training.optimizer import build_components, evaluate_agent

    dev = resolve_device(device)
    circuit, ck = load_circuit(checkpoint, device=dev)
    cfg = TrainingConfig.from_dict(ck["meta"]["config"]).replace(device=device)
    _, _, arena, agent, _ = build_components(cfg, circuit=circuit, device=dev)
    res = evaluate_agent(agent, cfg, episodes, seed=seed, odor_removed=odor_removed, episode_length=steps,
                         device=dev, return_rollouts=True)
    rollouts = res.pop("rollouts")
    res["checkpoint"] = str(checkpoint)
    ck_path = Path(str(checkpoint).rstrip("/"))
    if ck_path.suffix == ".pt":  # single-file checkpoint: best_model.pt -> best_model_eval
        ck_path = ck_path.with_suffix("")
    out = Path(out_dir) if out_dir else Path(str(ck_path) + "_eval")
    out.mkdir(parents=True, exist_ok=True)
    tag = "odor_removed" if odor_removed else "evaluation"
    plots.trajectories(rollouts, arena, out / f"{tag}_trajectories.png",
                       title=f"{Path(checkpoint).name}: success {res['success_rate']:.0%} ({episodes} held-out episodes)")
    plots.write_json(out / f"{tag}.json", res)
    if as_json:
        click.echo(json.dumps(res))
    else:
        for k, v in res.items():
            click.echo(f"{k:32s} {v}")


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False), help="ORN input .npy [T, batch, n_orn].")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Output .npz (keys = population names).")
@click.option("--dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True)
def run(checkpoint, input_path, out_path, dtype):
    """Run the trained circuit open loop on an ORN input array; write every population's spikes."""
    import torch

    from dmn_neuro.training.checkpoint import load_circuit
    from dmn_neuro.analysis.recording import load_input_array, run_open_loop, save_spikes

    circuit, _ = load_circuit(checkpoint)
    x = load_input_array(input_path, circuit.n_orn)
    spikes = run_open_loop(circuit, x, dtype=getattr(torch, dtype))
    save_spikes(out_path, spikes)
    click.echo(json.dumps({k: int(v.sum()) for k, v in spikes.items()}))
