"""Figures and JSON written next to results (atomic writes, Agg backend)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

from connectome.atomic import atomic_file, write_text


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    try:
        with atomic_file(path, "wb") as fh:
            fig.savefig(fh, format=Path(path).suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    finally:
        _plt().close(fig)
    return Path(path)


def write_json(path: os.PathLike, obj: Dict[str, Any]) -> Path:
    return write_text(path, json.dumps(obj, indent=1, default=float))


def loss_curves(metrics_jsonl: os.PathLike, path: os.PathLike) -> Path:
    recs = [json.loads(l) for l in Path(metrics_jsonl).read_text().splitlines() if l.strip()]
    plt = _plt()
    keys = [k for k in ("total", "navigation", "energy", "sparsity", "activity") if recs and k in recs[0]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ep = [r["episode"] for r in recs]
    for k in keys:
        axes[0].plot(ep, [r[k] for r in recs], label=k)
    axes[0].set_yscale("symlog", linthresh=1e-3)
    axes[0].set_xlabel("training episode")
    axes[0].set_title("loss terms")
    axes[0].legend(fontsize=7)
    axes[1].plot(ep, [r.get("final_distance_mm", np.nan) for r in recs], color="C3")
    axes[1].set_xlabel("training episode")
    axes[1].set_ylabel("mm")
    axes[1].set_title("final distance to source (training batch)")
    axes[2].plot(ep, [r.get("success_rate", np.nan) for r in recs], label="success rate")
    axes[2].plot(ep, [r.get("kc_sparsity", np.nan) for r in recs], label="KC sparsity")
    axes[2].set_ylim(-0.02, 1.02)
    axes[2].set_xlabel("training episode")
    axes[2].legend(fontsize=7)
    return _save(fig, Path(path))


def _draw(ax, ro, arena, title: str, max_episodes: int = 25) -> None:
    pos = ro.positions.detach().cpu().numpy()
    src = ro.source.detach().cpu().numpy()
    r = float(arena.success_radius)
    w, h = arena.config.arena_size_mm
    for b in range(min(pos.shape[1], max_episodes)):
        d = np.linalg.norm(pos[-1, b, :2] - src[b, :2])
        color = "C2" if d <= r else "C3"
        ax.plot(pos[:, b, 0], pos[:, b, 1], color=color, lw=0.8, alpha=0.8)
        ax.plot(pos[0, b, 0], pos[0, b, 1], "o", color="k", ms=2)
        ax.add_patch(_plt().Circle(src[b, :2], r, fill=False, color="C0", lw=0.6))
        ax.plot([pos[0, b, 0], src[b, 0]], [pos[0, b, 1], src[b, 1]], ":", color="0.7", lw=0.4)
    ax.set_xlim(0, w)
    ax.set_ylim(0, h)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("x (mm)")
    ax.set_ylabel("y (mm)")


def trajectories(rollouts: Sequence, arena, path: os.PathLike, title: str = "") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 6))
    _draw(ax, rollouts[0], arena, title or "trajectories (green: success, blue circle: success radius)")
    return _save(fig, Path(path))


def trajectories_before_after(before: List, after: List, arena, path: os.PathLike) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    _draw(axes[0], before[0], arena, "before training (untrained circuit)")
    _draw(axes[1], after[0], arena, "after training")
    return _save(fig, Path(path))


def choice_gradient(result: Dict[str, Any], path: os.PathLike) -> Path:
    """Choice task: correct rate (left) and accuracy among episodes that chose (right) against the
    distractor's similarity to the target; held-out distractors filled, training ones open, the
    similarity threshold dashed (``result`` from :func:`dmn_neuro.experiments.choice_gradient.choice_gradient`)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    rows, thr = result["distractors"], float(result["similarity_threshold"])
    for ax, key, label in ((axes[0], "correct_rate", "correct rate (all episodes)"),
                           (axes[1], "accuracy_among_chosen", "accuracy among episodes that chose")):
        for held, style in ((False, dict(facecolors="none", edgecolors="0.45", label="training distractor")),
                            (True, dict(color="C3", label="held-out distractor"))):
            pts = [(r["similarity"], r[key]) for r in rows if r["held_out"] == held and r[key] is not None]
            if pts:
                ax.scatter(*zip(*pts), s=28, **style)
        ax.axvline(thr, ls="--", color="k", lw=0.8, label=f"similarity {thr:g}")
        ax.axhline(0.5, ls=":", color="0.6", lw=0.8)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("similarity to the target (Pearson r of Hallem & Carlson responses)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="lower left")
    head = result["acceptance"]["mean_correct_rate"]
    axes[0].set_title(f"target {result['target_odor']}: held-out distractors below {thr:g}: mean correct "
                      f"{'n/a' if head is None else f'{head:.0%}'} ({result['episodes_per_distractor']} episodes each)",
                      fontsize=9)
    axes[1].set_title("generalisation gradient (dotted: chance among chosen)", fontsize=9)
    return _save(fig, Path(path))


def condition_table(table: Dict[str, Any], path: os.PathLike, title: str = "") -> Path:
    """One bar per condition (success at the end of the episode) with a tick for "reached"
    (within the radius at any time); dashed 70 %, dotted 80 % (``table`` from
    :func:`dmn_neuro.experiments.conditions.condition_table`)."""
    plt = _plt()
    rows = table["rows"]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1.2))
    colours = {"training": "C0", "held-out odor": "C1", "concentration": "C2", "plume": "C3", "wind": "C4",
               "control": "0.5"}
    y = np.arange(len(rows))[::-1]
    ax.barh(y, [r["success_rate"] for r in rows], color=[colours.get(r["group"], "C5") for r in rows],
            label="success (at the source at the end)")
    ax.scatter([r.get("reached_rate", np.nan) for r in rows], y, marker="|", s=60, color="k",
               label="reached (within the radius at any time)")
    ax.legend(loc="lower right", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels([r["condition"] for r in rows], fontsize=7)
    ax.axvline(0.7, color="k", lw=0.6, ls="--")
    ax.axvline(0.8, color="k", lw=0.6, ls=":")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"success ({table['episodes_per_condition']} held-out episodes each)")
    ck = Path(str(table["checkpoint"]))
    ax.set_title(title or (f"{ck.parent.parent.name}/{ck.name}" if ck.parent.name == "checkpoints" else ck.name),
                 fontsize=9)
    return _save(fig, Path(path))
