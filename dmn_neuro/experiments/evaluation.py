"""A finished cell's evaluations: held-out episodes (and the odor-removed control) with
locomotion metrics, and its learning curve from ``metrics.jsonl``.

Locomotion metrics, per episode then averaged over episodes:

* ``mean_speed_mm_s``: mean |velocity|;
* ``path_length_mm``: summed distance between consecutive positions;
* ``turning_rate_rad_s``: mean |change of heading| per second, heading = direction
  of the velocity (steps where the fly stands still are skipped);
* ``time_to_goal_ms``: first time within the success radius, averaged over the
  episodes that got there (``null`` when none did; ``reached_goal_fraction`` says how many).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

import numpy as np


def locomotion_metrics(rollouts, radius_mm: float, dt_ms: float) -> Dict[str, Any]:
    from dmn_neuro.training.loss_functions import TrajectoryAnalyzer

    speed, path, turn, ttg = [], [], [], []
    for ro in rollouts:
        m = TrajectoryAnalyzer().compute_trajectory_metrics(ro.positions, ro.velocities, ro.source,
                                                            success_radius_mm=radius_mm, dt_ms=dt_ms)
        speed.append(np.atleast_1d(m["mean_speed"]))
        path.append(np.atleast_1d(m["path_length"]))
        ttg.append(np.atleast_1d(m["time_to_goal"]))
        vel = ro.velocities.detach().cpu().double().numpy()[..., :2]  # [T, B, 2]
        heading = np.arctan2(vel[..., 1], vel[..., 0])
        moving = np.linalg.norm(vel, axis=-1) > 1e-9
        d = np.angle(np.exp(1j * np.diff(heading, axis=0)))  # wrapped to (-pi, pi]
        ok = moving[1:] & moving[:-1]
        n = ok.sum(axis=0)
        rate = np.where(n > 0, np.abs(np.where(ok, d, 0.0)).sum(axis=0) / np.maximum(n, 1) / (dt_ms * 1e-3), np.nan)
        turn.append(rate)
    speed_a, path_a, turn_a, ttg_a = (np.concatenate(x) for x in (speed, path, turn, ttg))
    reached = np.isfinite(ttg_a)

    def mean(a):
        a = a[np.isfinite(a)]
        return float(a.mean()) if a.size else None

    return {"mean_speed_mm_s": mean(speed_a), "path_length_mm": mean(path_a), "turning_rate_rad_s": mean(turn_a),
            "time_to_goal_ms": mean(ttg_a), "reached_goal_fraction": float(reached.mean()) if reached.size else None}


def evaluate_cell(checkpoint, cfg, episodes: int, seed: int, odor_removed: bool) -> Dict[str, Any]:
    """``{"evaluation": {...}, "odor_removed": {...}}`` of a checkpoint (loaded, hence validated)."""
    from dmn_neuro.training.checkpoint import load_circuit
    from dmn_neuro.training.config import resolve_device
    from dmn_neuro.training.optimizer import build_components, evaluate_agent

    if not episodes:
        return {}
    dev = resolve_device(cfg.device)
    circuit, _ = load_circuit(checkpoint, device=dev)
    _, _, arena, agent, _ = build_components(cfg, circuit=circuit, device=dev)
    out: Dict[str, Any] = {}
    for name, removed in (("evaluation", False), ("odor_removed", True)):
        if removed and not odor_removed:
            continue
        res = evaluate_agent(agent, cfg, episodes, seed=seed, odor_removed=removed, device=dev, return_rollouts=True)
        rollouts = res.pop("rollouts")
        res.update(locomotion_metrics(rollouts, arena.success_radius, cfg.circuit.dt_ms))
        out[name] = res
    return out


def learning_curve(metrics_jsonl) -> Dict[str, List[Any]]:
    """Per training episode: success rate, final distance, loss, KC sparsity of the training batch."""
    from dmn_neuro.experiments.run import read_metrics

    recs = {}
    for r in read_metrics(Path(metrics_jsonl)):
        recs.setdefault(r["episode"], r)
    eps = sorted(recs)

    def col(k):
        vals = [recs[e].get(k) for e in eps]
        return [float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None for v in vals]

    return {"episode": eps, "success_rate": col("success_rate"), "final_distance_mm": col("final_distance_mm"),
            "total_loss": col("total"), "kc_sparsity": col("kc_sparsity")}


__all__ = ["locomotion_metrics", "evaluate_cell", "learning_curve"]
