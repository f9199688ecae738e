"""Where does an approach-task navigator fail? Success against each episode's drawn conditions.

Runs CKPT on ``--episodes`` evaluation-stream episodes of its own training distribution
(seed ``--seed``; the evaluation stream is never used for training or model selection)
and writes ``failures.json`` (one row per episode: plume, length, peak concentration,
wind, start distance, start heading offset, concentration at the start, reached,
closest and final distance) and ``failures.png`` (success by plume type and plume
length; closest approach of the failed episodes) into ``--out``::

    python examples/experiments/generalisation_attempts/failures.py CKPT --out DIR [--episodes 200] [--seed 999]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from connectome.errors import ConfigError
from dmn_neuro.analysis.plots import _plt, _save, write_json
from dmn_neuro.environment.arena import PLUMES
from dmn_neuro.errors import DMNError
from dmn_neuro.training.checkpoint import load_circuit
from dmn_neuro.training.config import TrainingConfig
from dmn_neuro.training.optimizer import build_components, evaluate_agent

LENGTH_BINS = (10.0, 15.0, 20.0, 25.0001)


def episode_rows(checkpoint, episodes: int, seed: int):
    circuit, ck = load_circuit(checkpoint, device="cpu")
    cfg = TrainingConfig.from_dict(ck["meta"]["config"]).replace(device="cpu")
    if not cfg.environment.arena_config().randomised:
        raise ConfigError(f"{checkpoint}: its arena draws no conditions (fixed plume and concentration)")
    cpu = torch.device("cpu")
    _, _, arena, agent, _ = build_components(cfg, circuit=circuit.float(), device=cpu)
    res = evaluate_agent(agent, cfg, episodes, seed=seed, device=cpu, return_rollouts=True,
                         return_start_states=True)
    rows = []
    for ro, env in zip(res["rollouts"], res["start_states"]):
        d = torch.linalg.vector_norm(ro.positions[:, :, :2] - ro.source[None, :, :2], dim=-1)  # [T+1, B]
        c0 = arena.concentration(env)
        bearing = torch.atan2(env.source[:, 1] - env.pos[:, 1], env.source[:, 0] - env.pos[:, 0])
        offset = torch.remainder(env.heading - bearing + math.pi, 2 * math.pi) - math.pi
        cond = env.conditions
        for i in range(d.shape[1]):
            rows.append({
                "plume": PLUMES[int(cond.plume[i])], "length_mm": float(cond.length[i]), "peak": float(cond.peak[i]),
                "wind_mm_s": float(cond.wind[i].norm()), "start_distance_mm": float(d[0, i]),
                "start_heading_offset_deg": math.degrees(float(offset[i])),
                "start_concentration": float(c0[i].mean()),
                "reached": bool((d[:, i] <= arena.success_radius).any()),
                "closest_mm": float(d[:, i].min()), "final_mm": float(d[-1, i]),
            })
    return rows, float(arena.success_radius)


def summary(rows):
    def rate(sel):
        s = [r["reached"] for r in rows if sel(r)]
        return {"success_rate": float(np.mean(s)) if s else None, "n": len(s)}

    out = {"all": rate(lambda r: True), "by_plume": {}, "by_plume_and_length": {}}
    for p in PLUMES:
        out["by_plume"][p] = rate(lambda r: r["plume"] == p)
        out["by_plume_and_length"][p] = {
            f"{lo:g}-{hi:.0f} mm": rate(lambda r, lo=lo, hi=hi: r["plume"] == p and lo <= r["length_mm"] < hi)
            for lo, hi in zip(LENGTH_BINS[:-1], LENGTH_BINS[1:])}
    failed = np.array([r["closest_mm"] for r in rows if not r["reached"]])
    out["failed_closest_mm_quartiles"] = np.percentile(failed, [25, 50, 75]).tolist() if failed.size else None
    out["failed_closest_within_6mm"] = float((failed < 6.0).mean()) if failed.size else None
    return out


def figure(rows, radius, path):
    plt = _plt()
    s = summary(rows)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.25
    for k, p in enumerate(PLUMES):
        cells = s["by_plume_and_length"][p]
        vals = [c["success_rate"] if c["success_rate"] is not None else 0.0 for c in cells.values()]
        x = np.arange(len(cells)) + (k - 1) * width
        ax[0].bar(x, vals, width, label=f"{p} ({s['by_plume'][p]['success_rate']:.0%})")
        for xi, c in zip(x, cells.values()):
            ax[0].text(xi, 0.02, str(c["n"]), ha="center", fontsize=7, color="white")
    ax[0].set_xticks(range(len(LENGTH_BINS) - 1), list(s["by_plume_and_length"][PLUMES[0]]))
    ax[0].set_xlabel("plume length (d0 or sigma)")
    ax[0].set_ylabel("reached the source")
    ax[0].set_ylim(0, 1)
    ax[0].legend(fontsize=8)
    ax[0].set_title(f"{s['all']['n']} held-out episodes, {s['all']['success_rate']:.0%} reached", fontsize=9)
    failed = [r["closest_mm"] for r in rows if not r["reached"]]
    ax[1].hist(failed, bins=np.arange(0, 32, 1.0), color="grey")
    ax[1].axvline(radius, color="k", ls="--", lw=1, label=f"success radius {radius:g} mm")
    ax[1].set_xlabel("closest approach of failed episodes (mm)")
    ax[1].set_ylabel("episodes")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--out", required=True)
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=999)
    args = ap.parse_args(argv)
    if args.episodes < 1:
        ap.error("--episodes must be >= 1")
    torch.set_num_threads(1)
    rows, radius = episode_rows(args.checkpoint, args.episodes, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(args.checkpoint), "seed": args.seed, "stream": "evaluation",
              "success_radius_mm": radius, "summary": summary(rows), "episodes": rows}
    write_json(out / "failures.json", result)
    figure(rows, radius, out / "failures.png")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DMNError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(1)
