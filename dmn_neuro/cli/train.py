"""``dmn-neuro train`` / ``evaluate`` / ``run``."""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import click

from dmn_neuro.cli.params import SEED, FiniteRange

from dmn_neuro.errors import ConfigError

logger = logging.getLogger(__name__)



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


#: Ranges of the evaluation conditions (concentration relative to the Hallem 10^-2 dilution).
MAX_CONCENTRATION = 100.0
MAX_PLUME_LENGTH_MM = 500.0
MAX_WIND_MM_S = 500.0
MAX_START_DISTANCE_MM = 500.0
MAX_MIXTURE_ODORS = 8


def _check_odors(ctx, param, value):
    """``--odor`` names: known Hallem & Carlson odors, no repeats, at most MAX_MIXTURE_ODORS."""
    from dmn_neuro.environment.odors import OdorEncoder, load_hallem_carlson

    if not value:
        return ()
    if len(value) > MAX_MIXTURE_ODORS:
        raise click.BadParameter(f"a mixture takes 1 to {MAX_MIXTURE_ODORS} odors, got {len(value)}", ctx, param)
    names = load_hallem_carlson().odors
    out = []
    for v in value:
        try:
            out.append(names[OdorEncoder._lookup(v, names)])
        except Exception as exc:  # DataError: unknown odor, with close matches
            raise click.BadParameter(" ".join(str(exc).split()), ctx, param) from None
    if len(set(out)) != len(out):
        raise click.BadParameter(f"an odor is named twice: {', '.join(out)}", ctx, param)
    return tuple(out)


def _check_distractor(ctx, param, value):
    """``--distractor`` name: one known Hallem & Carlson odor (its canonical name)."""
    return _check_odors(ctx, param, (value,))[0] if value else None


def _check_start_distance(ctx, param, value):
    if value is None:
        return None
    lo, hi = value
    if not lo <= hi:
        raise click.BadParameter(f"MIN must be <= MAX (each in 0 < x <= {MAX_START_DISTANCE_MM:g} mm), got {lo} {hi}",
                                 ctx, param)
    return (lo, hi)


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def condition_tag(odors=(), concentration=None, plume=None, plume_length=None, wind=None, start_distance=None,
                  steps=None, odor_removed=False, distractor=None, start_heading=None, stop_at_source=None) -> str:
    """Short name of the evaluation conditions ("default" when none is changed)."""
    parts = []
    if odors:
        parts.append("odor-" + "+".join(odors))
    if distractor:
        parts.append("distractor-" + distractor)
    if concentration is not None:
        parts.append(f"conc-{concentration:g}")
    if plume:
        parts.append(plume)
    if plume_length is not None:
        parts.append(f"length-{plume_length:g}mm")
    if wind is not None:
        parts.append(f"wind-{wind:g}")
    if start_distance is not None:
        parts.append(f"start-{start_distance[0]:g}-{start_distance[1]:g}mm")
    if start_heading is not None:
        parts.append(f"heading-{start_heading:g}deg")
    if stop_at_source is not None:
        parts.append("stop_at_source" if stop_at_source else "no_stop_at_source")
    if steps is not None:
        parts.append(f"steps-{steps}")
    if odor_removed:
        parts.append("odor_removed")
    return _slug("_".join(parts)) or "default"


def checkpoint_name(checkpoint) -> str:
    """``run/checkpoints/best`` -> ``run_best``; ``model.pt`` -> ``model``; else the folder name."""
    p = Path(str(checkpoint).rstrip("/")).resolve()
    name = p.stem if p.suffix == ".pt" else p.name
    if p.parent.name == "checkpoints" and p.parent.parent.name:
        name = f"{p.parent.parent.name}_{name}"
    return _slug(name) or "checkpoint"


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--episodes", type=click.IntRange(1, 100_000), default=50, show_default=True, help="Held-out episodes.")
@click.option("--seed", type=SEED, default=12345, show_default=True, help="Seed of the held-out source positions and start poses.")
@click.option("--steps", type=click.IntRange(1, 1_000_000), default=None, help="Episode length (default: the checkpoint's training length).")
@click.option("--odor", "odors", multiple=True, callback=_check_odors, metavar="NAME",
              help=f"Odor of every episode (any Hallem & Carlson 2006 odor; aliases such as 'isoamyl acetate' accepted). "
                   f"Repeat for a mixture (up to {MAX_MIXTURE_ODORS}): the components' ORN response changes add. "
                   "Default: the checkpoint's training odors.")
@click.option("--concentration", type=FiniteRange(0.0, MAX_CONCENTRATION), default=None, metavar="X",
              help="Peak concentration at the source relative to the reference (1 = the Hallem 10^-2 dilution, "
                   "the shipped models' training concentration); 0 is odor removed. Default: the checkpoint's.")
@click.option("--plume", type=click.Choice(["exponential", "gaussian", "inverse_square"]), default=None,
              help="Plume shape of every episode. Default: the checkpoint's.")
@click.option("--plume-length", type=FiniteRange(0.0, MAX_PLUME_LENGTH_MM, min_open=True), default=None, metavar="MM",
              help="Plume length scale (sigma of a gaussian, d0 otherwise). Default: the checkpoint's.")
@click.option("--wind", type=FiniteRange(0.0, MAX_WIND_MM_S), default=None, metavar="MM_PER_S",
              help="Wind speed, blowing along +x (stretches the plume downwind). Default: the checkpoint's.")
@click.option("--start-distance", type=(FiniteRange(0.0, MAX_START_DISTANCE_MM, min_open=True),
                                        FiniteRange(0.0, MAX_START_DISTANCE_MM, min_open=True)),
              default=None, callback=_check_start_distance, metavar="MIN MAX",
              help="Start distance range (mm) from the source; the success radius stays the checkpoint's.")
@click.option("--start-heading", type=FiniteRange(0.0, 180.0), default=None, metavar="DEG",
              help="Start headings uniform within +-DEG of the bearing to the source (180: any direction). "
                   "Default: the checkpoint's.")
@click.option("--stop-at-source/--no-stop-at-source", default=None,
              help="Whether a fly stops once within the success radius (of either source in the choice task: "
                   "the trap-assay rule), so that success is reaching; without it success is being within the "
                   "radius at the end. Default: the checkpoint's.")
@click.option("--odor-removed", is_flag=True, help="Control: concentration forced to zero.")
@click.option("--distractor", default=None, callback=_check_distractor, metavar="NAME",
              help="Choice-task checkpoints: the distractor odor of every episode (any Hallem & Carlson odor but "
                   "the target). Default: the checkpoint's training distractors.")
@click.option("--choice-gradient", is_flag=True,
              help="Choice-task checkpoints: run --episodes episodes per declared distractor (held-out and "
                   "training) and write choice_gradient.json and choice_gradient.png: correct/wrong/none rates "
                   "against the distractor's similarity to the target (Pearson r of their Hallem & Carlson "
                   "response vectors), and the mean correct rate over held-out distractors with similarity < 0.8.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to write the figure and JSON (default ./evaluation/CHECKPOINTNAME_CONDITIONS in the current "
                   "directory; never inside the checkpoint).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--table", is_flag=True,
              help="Every standard condition instead (training conditions, each held-out odor, concentration "
                   "x0.25/x0.5/x2/x4, each plume, wind, odor removed, untrained), --episodes each: "
                   "conditions.json/.md/.png in --out (default ./evaluation/CHECKPOINTNAME_table).")
def evaluate(checkpoint, episodes, seed, steps, odors, concentration, plume, plume_length, wind, start_distance,
             start_heading, stop_at_source, odor_removed, distractor, choice_gradient, device, out_dir, as_json, table):
    """Success rate and trajectory metrics of a checkpoint on held-out episodes.

    Without condition flags the episodes are the checkpoint's training
    conditions; each flag fixes one condition for every episode (overriding a
    training range). The JSON also reports the checkpoint's train_odors and
    held_out_odors and the conditions used. For a choice-task checkpoint
    success is a correct choice, and the JSON's ``choice`` holds the correct,
    wrong and none rates.
    """
    from dmn_neuro.analysis import plots
    from dmn_neuro.experiments.conditions import evaluation_config
    from dmn_neuro.training.checkpoint import load_circuit
    from dmn_neuro.training.config import TrainingConfig, resolve_device
    from dmn_neuro.training.optimizer import build_components, evaluate_agent

    if table:
        given = [f for f, v in (("--odor", odors), ("--concentration", concentration), ("--plume", plume),
                                ("--plume-length", plume_length), ("--wind", wind), ("--steps", steps),
                                ("--start-distance", start_distance), ("--start-heading", start_heading is not None),
                                ("--stop-at-source", stop_at_source is not None), ("--odor-removed", odor_removed),
                                ("--distractor", distractor), ("--choice-gradient", choice_gradient)) if v]
        if given:
            raise click.UsageError(f"--table evaluates the standard conditions; it cannot be combined with {given[0]}")
        from dmn_neuro.experiments.conditions import condition_table, markdown, write_condition_table

        from tqdm import tqdm

        with tqdm(desc="conditions", unit="condition", file=sys.stderr, disable=as_json) as bar:
            result = condition_table(checkpoint, episodes, seed, device=device, progress=lambda row: bar.update())
        out = Path(out_dir) if out_dir else Path.cwd() / "evaluation" / f"{checkpoint_name(checkpoint)}_table"
        write_condition_table(result, out)
        click.echo(json.dumps(result) if as_json else markdown(result))
        return
    dev = resolve_device(device)
    circuit, ck = load_circuit(checkpoint, device=dev)
    cfg = TrainingConfig.from_dict(ck["meta"]["config"]).replace(device=device)
    declared = {"train_odors": list(cfg.environment.train_odors), "held_out_odors": list(cfg.environment.held_out_odors)}
    _check_task_flags(cfg, odors, distractor, choice_gradient)
    cfg, mixture = evaluation_config(cfg, odors=odors, concentration=concentration, plume=plume,
                                     plume_length=plume_length, wind=wind, start_distance=start_distance,
                                     start_heading=start_heading, stop_at_source=stop_at_source,
                                     distractor=distractor)
    _, encoder, arena, agent, _ = build_components(cfg, circuit=circuit, device=dev)
    tag = condition_tag(odors, concentration, plume, plume_length, wind, start_distance, steps, odor_removed,
                        distractor, start_heading, stop_at_source)
    if choice_gradient:
        out = Path(out_dir) if out_dir else Path.cwd() / "evaluation" / f"{checkpoint_name(checkpoint)}_choice_gradient"
        return _choice_gradient(checkpoint, cfg, agent, episodes, seed, steps, dev, tag, out, as_json)
    if mixture:
        from dmn_neuro.environment.arena import OdorArena

        name = encoder.add_mixture(mixture)
        arena = OdorArena(dataclasses.replace(arena.config, odors=(name,)), dt_ms=arena.dt_ms, encoder=encoder)
        agent.arena = arena
    res = evaluate_agent(agent, cfg, episodes, seed=seed, odor_removed=odor_removed, episode_length=steps,
                         device=dev, return_rollouts=True)
    rollouts = res.pop("rollouts")
    res["checkpoint"] = str(checkpoint)
    res.update(declared)
    res["conditions"] = {**arena.config.conditions(), "odor_removed": bool(odor_removed or arena.config.odor_removed),
                         "episode_length_steps": res["episode_length_steps"]}
    if cfg.environment.task == "choice":  # the arena's own odor list is not used
        res["conditions"].pop("odors")
        res["conditions"].update(arena.choice.conditions())
    out = Path(out_dir) if out_dir else Path.cwd() / "evaluation" / f"{checkpoint_name(checkpoint)}_{tag}"
    out.mkdir(parents=True, exist_ok=True)
    kind = "odor_removed" if odor_removed else "evaluation"
    plots.trajectories(rollouts, arena, out / f"{kind}_trajectories.png",
                       title=f"{Path(checkpoint).name}: success {res['success_rate']:.0%} ({episodes} held-out episodes)")
    plots.write_json(out / f"{kind}.json", res)
    if as_json:
        click.echo(json.dumps(res))
    else:
        for k, v in res.items():
            click.echo(f"{k:32s} {v}")


def _check_task_flags(cfg, odors, distractor, choice_gradient) -> None:
    """Flags that belong to one task: one-line errors for the other."""
    from dmn_neuro.errors import ConfigError

    env = cfg.environment
    if env.task != "choice":
        for flag, given in (("--distractor", distractor), ("--choice-gradient", choice_gradient)):
            if given:
                raise ConfigError(f"{flag} needs a choice-task checkpoint; this one's task is {env.task!r}")
        return
    if odors:
        raise ConfigError("--odor sets the odor of an approach-task checkpoint; for this choice-task checkpoint "
                          "use --distractor (its target is fixed)")
    if distractor and distractor == env.choice.target_odor:
        raise ConfigError(f"--distractor {distractor!r} is the checkpoint's target odor")
    if distractor and choice_gradient:
        raise ConfigError("--choice-gradient runs every declared distractor; leave out --distractor")


def _choice_gradient(checkpoint, cfg, agent, episodes, seed, steps, dev, tag, out, as_json) -> None:
    from dmn_neuro.analysis import plots
    from dmn_neuro.experiments.choice_gradient import choice_gradient

    def progress(odor, row):
        if not as_json:
            click.echo(f"{odor:28s} similarity {row['similarity']:+.2f} {'held-out' if row['held_out'] else 'training'}"
                       f"  correct {row['correct_rate']:.2f} wrong {row['wrong_rate']:.2f} none {row['none_rate']:.2f}",
                       err=True)

    res = {"checkpoint": str(checkpoint), "conditions": tag,
           **choice_gradient(agent, cfg, episodes, seed=seed, episode_length=steps, device=dev, progress=progress)}
    out.mkdir(parents=True, exist_ok=True)
    plots.write_json(out / "choice_gradient.json", res)
    plots.choice_gradient(res, out / "choice_gradient.png")
    head = res["acceptance"]
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo(f"{head['criterion']}: {head['mean_correct_rate']} ({'passed' if head['passed'] else 'not passed'});"
                   f" wrote {out / 'choice_gradient.json'} and {out / 'choice_gradient.png'}")


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
