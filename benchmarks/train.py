"""Closed-loop training benchmark: per-step loop vs blocked loop (``python benchmarks/train.py --json``).

Trains ``--episodes`` optimiser steps of a training config (default
examples/configs/quick.yaml: B=12 arena episodes of T=500 steps each, both
hemispheres, fused engine) from the same seed twice per round, once with the
circuit stepped once per time step (``closed_loop="stepped"``: one
:meth:`DifferentiableOlfactoryCircuit.step` per step, autograd through every
step) and once advanced in skewed blocks on the engine between arena updates
(``closed_loop="blocked"``, :mod:`dmn_neuro.simulation.engine.closed_loop`).

* seconds per training episode (rollout + loss + backward + optimiser step, as
  :meth:`DMNTrainer.train_episode` reports it), median over every episode of
  every round but each trainer's first (warm-up), and the ratio;
* the loss history of both variants, asserted equal (bit for bit) in every round;
* the share of the loss alone (forward + backward of :class:`CombinedLoss` on a
  detached rollout), which neither loop changes;
* evaluation of ``--eval-episodes`` episodes (no gradient) on both loops, once each,
  with the same weights (those of the blocked run: the two runs' weights differ
  by the rounding of their gradients, although their loss histories agree);
* the machine's load average before and after.

Rounds alternate the order of the variants. Timings on a shared machine are
noisy: use ``--threads 1`` and read the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dmn_neuro.training.config import TrainingConfig  # noqa: E402
from dmn_neuro.training.optimizer import (  # noqa: E402
    TRAIN_STREAM, DMNTrainer, build_components, episode_generator, evaluate_agent,
)

MODES = ("stepped", "blocked")


def make_trainer(cfg: TrainingConfig, mode: str) -> DMNTrainer:
    torch.manual_seed(cfg.seed)  # as `dmn-neuro train` does
    circuit, encoder, arena, _agent, loss_fn = build_components(cfg)
    tr = DMNTrainer(circuit, loss_fn, cfg, environment=arena, encoder=encoder)
    tr.agent.closed_loop = mode
    return tr


def train_run(cfg: TrainingConfig, mode: str, episodes: int):
    tr = make_trainer(cfg, mode)
    t0 = time.perf_counter()
    recs = tr.train_episode(episodes)
    wall = time.perf_counter() - t0
    return [r["seconds"] for r in recs], [r["total"] for r in recs], wall, tr


def loss_share(tr: DMNTrainer, runs: int = 3) -> float:
    """Median seconds of the loss's forward + backward on a detached rollout."""
    with torch.no_grad():
        ro = tr.agent.rollout(tr.config.batch_size, tr.config.episode_length_steps,
                              episode_generator(tr.config.seed, 0, TRAIN_STREAM))
    ts = []
    for _ in range(runs):
        act = {k: v.detach().clone().requires_grad_() for k, v in ro.activations.items()}
        pos = ro.positions.detach().clone().requires_grad_()
        vel = ro.velocities.detach().clone().requires_grad_()
        t0 = time.perf_counter()
        tr.loss_fn(pos[1:], vel, act, goal=ro.source, start_positions=ro.start)["total"].backward()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "examples" / "configs" / "quick.yaml"))
    ap.add_argument("--episodes", type=int, default=3, help="training episodes per variant and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (variant order alternates)")
    ap.add_argument("--eval-episodes", type=int, default=50, help="evaluation episodes per variant (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared box)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (and nothing else on stdout)")
    args = ap.parse_args(argv)
    if args.episodes < 2 or args.rounds < 1:
        ap.error("--episodes must be >= 2 (the first of each run is a warm-up) and --rounds >= 1")
    torch.set_num_threads(args.threads)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    cfg = TrainingConfig.from_yaml(args.config).with_values(device="cpu", eval_episodes=0)
    load_before = os.getloadavg()
    secs = {m: [] for m in MODES}
    walls = {m: [] for m in MODES}
    history = {}
    trainers = {}
    for r in range(args.rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for mode in order:
            s, losses, wall, trainers[mode] = train_run(cfg, mode, args.episodes)
            secs[mode].extend(s[1:])
            walls[mode].append(wall)
            if mode in history:
                assert history[mode] == losses, f"{mode}: loss history differs between rounds"
            history[mode] = losses
            log(f"round {r} {mode:8s} s/episode {[round(x, 3) for x in s]}")
        assert history["stepped"] == history["blocked"], (
            f"loss histories differ: stepped {history['stepped']} vs blocked {history['blocked']}")
    med = {m: statistics.median(secs[m]) for m in MODES}
    out = {
        "config": os.path.relpath(args.config, REPO) if args.config.startswith(str(REPO)) else args.config,
        "batch_size": cfg.batch_size, "episode_length_steps": cfg.episode_length_steps,
        "episodes_per_run": args.episodes, "rounds": args.rounds, "threads": args.threads,
        "seconds_per_episode": {m: {"median": med[m], "min": min(secs[m]), "max": max(secs[m]), "n": len(secs[m])}
                                for m in MODES},
        "ratio_stepped_over_blocked": med["stepped"] / med["blocked"],
        "loss_history": history["blocked"], "loss_history_equal": True,
        "loss_fwd_bwd_s": loss_share(trainers["blocked"]),
    }
    if args.eval_episodes:
        ev = {}
        tr = trainers["blocked"]  # one set of weights: the two trained ones differ by gradient rounding
        for mode in MODES:
            tr.agent.closed_loop = mode
            t0 = time.perf_counter()
            res = evaluate_agent(tr.agent, cfg, n_episodes=args.eval_episodes)
            ev[mode] = {"seconds": time.perf_counter() - t0, "success_rate": res["success_rate"],
                        "final_distance_to_goal_mean": res["final_distance_to_goal_mean"]}
        assert ev["stepped"]["final_distance_to_goal_mean"] == ev["blocked"]["final_distance_to_goal_mean"]
        assert ev["stepped"]["success_rate"] == ev["blocked"]["success_rate"]
        out["evaluation"] = {"episodes": args.eval_episodes, **ev,
                             "ratio": ev["stepped"]["seconds"] / ev["blocked"]["seconds"]}
    out["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    out["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
