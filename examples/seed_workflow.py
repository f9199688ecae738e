#!/usr/bin/env python
"""The seed's complete workflow, end to end, as one runnable script.

    connectome -> circuit -> task -> training -> evaluation -> export (NIR) -> verify

Defaults are the seed's (100 episodes x 5000 steps, hours on a CPU); shrink them
for a smoke run, e.g.::

    python examples/seed_workflow.py --config examples/configs/tiny.yaml \\
        --episodes 2 --steps 60 --batch-size 2 --out seed_out

Writes into ``--out``: ``connectome.json`` (layer sizes and projection
sparsity), ``metrics.jsonl`` (one line per training episode),
``checkpoints/{untrained,last}``, ``evaluation.json`` (TrajectoryAnalyzer metrics
before and after training), ``model.nir`` and ``verification.json``; prints a
summary table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Run from a checkout, the example uses the packages of that checkout (not another
# installed copy, e.g. an editable install of a different worktree).
_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "dmn_neuro" / "__init__.py").is_file() and str(_CHECKOUT) not in sys.path:
    sys.path.insert(0, str(_CHECKOUT))

from connectome.adjacency_matrix import AdjacencyMatrixGenerator
from connectome.fetch_data import FlyWireConnectome
from dmn_neuro.environment.arena import OdorArena
from dmn_neuro.simulation.mechanism import CIRCUIT_PROJECTIONS, POPULATION_ORDER, DifferentiableOlfactoryCircuit
from dmn_neuro.training.config import TrainingConfig
from dmn_neuro.errors import DMNError
from dmn_neuro.analysis.recording import run_open_loop
from dmn_neuro.training.loss_functions import CombinedLoss, TrajectoryAnalyzer
from dmn_neuro.environment.odors import OdorEncoder
from dmn_neuro.training.optimizer import EVAL_STREAM, DMNTrainer, default_current_per_hz
from dmn_neuro.analysis.recording import default_odors, verification_input
from exporters.nir_export import export_nir
from exporters.verify import verify_nir

logger = logging.getLogger("seed_workflow")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="TrainingConfig YAML (default: the seed's settings)")
    p.add_argument("--episodes", type=int, default=None, help="training episodes (seed: 100)")
    p.add_argument("--steps", type=int, default=None, help="steps per episode (seed: 5000)")
    p.add_argument("--batch-size", type=int, default=None, help="arena episodes per optimiser step")
    p.add_argument("--seed", type=int, default=None, help="training seed")
    p.add_argument("--eval-episodes", type=int, default=8, help="held-out episodes before/after training")
    p.add_argument("--verify-steps", type=int, default=1000, help="open-loop steps compared in the NIR check (>= 1000 to pass)")
    p.add_argument("--verify-odors", type=int, default=4, help="how many Hallem odors drive the NIR check")
    p.add_argument("--cache-dir", type=Path, default=None, help="connectome cache (default $DMN_NEURO_CACHE or ~/.cache/dmn-neuro)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a small shared CPU)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    return p.parse_args(argv)


def step_connectome(cfg: TrainingConfig, cache_dir, out: Path):
    """1. Connectome: fetch the olfactory circuit and report projection sparsity."""
    fetcher = FlyWireConnectome(cache_dir=cache_dir)
    cc = cfg.connectome
    data = fetcher.fetch_olfactory_circuit(include_layers=list(POPULATION_ORDER), source=cc.source,
                                           **cc.resolved_source_options())
    adj = AdjacencyMatrixGenerator()
    sizes = {k: int(v) for k, v in data.layer_sizes.items() if k in POPULATION_ORDER}
    print(f"[connectome] {data.source} {data.version}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    sparsity = {}
    for pre, post in CIRCUIT_PROJECTIONS:
        if pre in sizes and post in sizes:
            _w, mask = adj.create_weight_matrix(data, pre, post, learnable=False)
            sparsity[f"{pre}->{post}"] = adj.sparsity(mask)
            print(f"[connectome] {pre}->{post} connectivity: {100 * sparsity[f'{pre}->{post}']:.1f}% sparse "
                  f"({int(mask.sum())} synapses-bearing pairs)")
    (out / "connectome.json").write_text(json.dumps(
        {"source": str(data.source), "version": str(data.version), "layer_sizes": sizes, "sparsity": sparsity}, indent=1))
    return data


def step_circuit(cfg: TrainingConfig, data) -> DifferentiableOlfactoryCircuit:
    """2. Circuit: masked, sign-constrained LIF circuit from the connectome."""
    c = cfg.circuit
    circuit = DifferentiableOlfactoryCircuit(
        data, dt_ms=c.dt_ms, learnable_tau=c.learnable_tau, learnable_threshold=c.learnable_threshold,
        surrogate=c.surrogate, surrogate_slope=c.surrogate_slope, projection_gains=c.projection_gains,
        engine=c.engine, bias=c.bias,
    )
    n_params = sum(p.numel() for p in circuit.parameters() if p.requires_grad)
    print(f"[circuit] populations {circuit.population_names}, {n_params} learnable parameters")
    return circuit


def step_task(cfg: TrainingConfig, circuit):
    """3. Task: odor encoder (Hallem & Carlson), arena, and the four-term loss."""
    env, dt_ms = cfg.environment, cfg.circuit.dt_ms
    encoder = OdorEncoder(circuit.orn_glomeruli, odors=list(env.odors) or None, dt_ms=dt_ms, encoding=env.encoding,
                          hill_k=env.hill_k, current_per_hz=env.current_per_hz or default_current_per_hz(circuit))
    arena = OdorArena(env.arena_config(), dt_ms=dt_ms, encoder=encoder)
    lc = cfg.loss
    loss_fn = CombinedLoss(
        navigation_weight=lc.navigation_weight, energy_weight=lc.energy_weight, sparsity_weight=lc.sparsity_weight,
        activity_weight=lc.activity_weight, goal_position=tuple(arena.config.goal_mm),
        kc_sparsity_target=lc.kc_sparsity_target, dt_ms=dt_ms,
    )
    print(f"[task] odors {list(arena.config.odors)}, goal {arena.config.goal_mm} mm, "
          f"success radius {arena.success_radius:.2f} mm")
    return encoder, arena, loss_fn


def evaluate(trainer: DMNTrainer, n_episodes: int, seed: int) -> dict:
    """5. Evaluation: TrajectoryAnalyzer metrics on held-out sources and start poses."""
    ro = trainer.rollout_episode(batch_size=n_episodes, seed=seed, episode=0, stream=EVAL_STREAM)
    m = TrajectoryAnalyzer().compute_trajectory_metrics(
        ro.positions, ro.velocities, ro.source, success_radius_mm=trainer.environment.success_radius,
        dt_ms=trainer.config.circuit.dt_ms)
    keys = ("success_rate", "final_distance_to_goal_mean", "mean_distance_to_goal_mean", "exploration_area_mean",
            "path_length_mean", "success_radius_mm")
    out = {k: float(m[k]) for k in keys}
    out["kc_sparsity"] = float(trainer.loss_fn.kc_population_sparsity(ro.activations["KC"]))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, args.threads))
    cfg = TrainingConfig.from_yaml(args.config) if args.config else TrainingConfig()
    cfg = cfg.replace(num_episodes=args.episodes, episode_length_steps=args.steps, batch_size=args.batch_size,
                      seed=args.seed, device="cpu")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    data = step_connectome(cfg, args.cache_dir, out)
    circuit = step_circuit(cfg, data)
    encoder, arena, loss_fn = step_task(cfg, circuit)

    # 4. Training: BPTT through the closed loop, one optimiser step per episode.
    trainer = DMNTrainer(circuit, loss_fn, cfg, environment=arena, encoder=encoder)
    trainer.save_checkpoint(out / "checkpoints" / "untrained")
    before = evaluate(trainer, args.eval_episodes, seed=cfg.seed + 777)
    t0 = time.perf_counter()
    with open(out / "metrics.jsonl", "w") as fh:
        for _ in range(cfg.num_episodes):
            rec = trainer.train_episode(1)[0]
            fh.write(json.dumps(rec) + "\n")
            print(f"[train] episode {rec['episode']:4d}  loss {rec['total']:.4f}  "
                  f"final distance {rec['final_distance_mm']:.1f} mm  KC sparsity {rec['kc_sparsity']:.3f}")
    ckpt = trainer.save_checkpoint(out / "checkpoints" / "last", metrics={"seconds": time.perf_counter() - t0})
    print(f"[train] {cfg.num_episodes} episodes in {time.perf_counter() - t0:.1f} s -> {ckpt}")

    after = evaluate(trainer, args.eval_episodes, seed=cfg.seed + 777)
    (out / "evaluation.json").write_text(json.dumps({"before": before, "after": after}, indent=1))
    for name, m in (("before", before), ("after", after)):
        print(f"[evaluate] {name:6s} success {m['success_rate']:.2f}  final distance "
              f"{m['final_distance_to_goal_mean']:.1f} mm  KC sparsity {m['kc_sparsity']:.3f}")

    # 6. Export: the trained circuit as a NIR graph.
    circuit.eval()
    spec = circuit.to_spec(metadata={"checkpoint": str(ckpt), "episode": trainer.episode})
    nir_path = export_nir(spec, out / "model.nir")
    print(f"[export] {nir_path}")

    # 7. Verify: the NIR graph, run by an independent executor, against the trained model.
    x = verification_input(circuit, cfg, default_odors(cfg)[: max(1, args.verify_odors)], args.verify_steps)
    reference = run_open_loop(circuit, x)
    result, _, _ = verify_nir(spec, x, nir_path=nir_path, reference=reference)
    (out / "verification.json").write_text(result.to_json(indent=1))
    worst = max(result.mismatch_fraction.values())
    print(f"[verify] NIR {'PASSED' if result.passed else 'FAILED'}: {result.steps} steps x {x.shape[1]} inputs, "
          f"worst mismatch fraction {worst:.3g}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DMNError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(1)
