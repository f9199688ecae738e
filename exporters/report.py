"""Verification report: ``verification.json``, ``verification.png`` and a terminal table."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import numpy as np

from exporters.verify import VerificationResult

logger = logging.getLogger(__name__)

#: Populations shown in the raster figure, in order of preference.
RASTER_PREFERENCE = ("PN", "KC", "MBON", "DN", "APL", "ORN")
#: Most populations and steps drawn in the rasters.
MAX_RASTER_POPULATIONS = 4
MAX_RASTER_STEPS = 500


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def format_table(result: VerificationResult) -> str:
    """Plain-text table of the per-population comparison, for the terminal."""
    d = result.to_dict()
    tol = result.tolerance
    head = ["population", "mismatch", "n_mism", "spk_ref", "spk_exp", "d_spk", "t_first", "rate_r", "limit", "gate"]
    rows: List[List[str]] = []
    for name, st in d["populations"].items():
        limit = tol.limit(name) if tol is not None else None
        if limit is None:
            gate = "info"
        elif limit == 0.0:
            gate = "ok" if st["n_mismatched"] == 0 else "FAIL"
        else:
            gate = "ok" if st["mismatch_fraction"] <= limit else "FAIL"
        rows.append([
            name,
            f"{100 * st['mismatch_fraction']:.3f}%",
            str(st["n_mismatched"]),
            str(st["spike_count_reference"]),
            str(st["spike_count_candidate"]),
            f"{st['spike_count_difference']:+d}",
            _fmt(st["first_spike_timing_error_steps"], ".2f"),
            _fmt(st["rate_correlation"], ".3f"),
            "-" if limit is None else ("exact" if limit == 0.0 else f"{100 * limit:g}%"),
            gate,
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [
        f"verification target={d['target']} steps={d['steps']} batch={d.get('batch', 1)} lag={d['lag']}: "
        + ("PASSED" if d["passed"] else "FAILED"),
        line(head),
        line(["-" * w for w in widths]),
    ]
    out += [line(r) for r in rows]
    if "success_rate_reference" in d and "success_rate_candidate" in d:
        out.append(
            f"navigation success: reference {100 * d['success_rate_reference']:.1f}%, "
            f"exported {100 * d['success_rate_candidate']:.1f}%"
        )
    out += [f"FAIL: {r}" for r in d["reasons"]]
    return "\n".join(out)


def _pick_populations(names: Sequence[str]) -> List[str]:
    chosen = [p for p in RASTER_PREFERENCE if p in names]
    chosen += [p for p in names if p not in chosen]
    return chosen[:MAX_RASTER_POPULATIONS]


def write_report(
    result: VerificationResult,
    reference_spikes: Mapping[str, np.ndarray],
    candidate_spikes: Mapping[str, np.ndarray],
    out_dir: os.PathLike,
    batch_index: int = 0,
) -> Dict[str, Path]:
    """Write ``verification.json`` (``result.to_json()``) and ``verification.png``
    (rasters reference vs exported for up to four populations, batch element
    ``batch_index``, lag-aligned, mismatches in red; and per-population mismatch
    bars with their limits) into ``out_dir``, each atomically.

    Stores: ``out_dir/verification.json``, ``out_dir/verification.png``.
    Returns ``{"json": path, "figure": path}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "verification.json"
    _atomic_write_text(json_path, result.to_json(indent=2) + "\n")

    lag = result.lag
    names = [p for p in result.mismatch_fraction if p in reference_spikes and p in candidate_spikes]
    shown = _pick_populations(names)
    fig = plt.figure(figsize=(11, 2.2 * max(len(shown), 1) + 2.6))
    grid = fig.add_gridspec(len(shown) + 1, 2, height_ratios=[2.0] * len(shown) + [1.6])
    for row, name in enumerate(shown):
        ref = np.asarray(reference_spikes[name])
        cand = np.asarray(candidate_spikes[name])
        if ref.ndim == 2:
            ref, cand = ref[:, None, :], cand[:, None, :]
        b = min(batch_index, ref.shape[1] - 1)
        T = ref.shape[0] - lag
        steps = min(T, MAX_RASTER_STEPS)
        r = ref[:steps, b].astype(bool)
        c = cand[lag : lag + steps, b].astype(bool)
        diff = r != c
        for col, (arr, title) in enumerate(((r, "reference"), (c, f"exported (shifted by {lag})"))):
            ax = fig.add_subplot(grid[row, col])
            t, n = np.nonzero(arr)
            ax.scatter(t, n, s=1.5, c="k", marker="|", linewidths=0.6)
            td, nd = np.nonzero(diff & arr)
            if td.size:
                ax.scatter(td, nd, s=6, c="red", marker="|", linewidths=1.0)
            ax.set_xlim(0, steps)
            ax.set_ylim(-0.5, arr.shape[1] - 0.5)
            ax.set_ylabel(f"{name}\nneuron")
            ax.set_title(f"{name}: {title}", fontsize=9)
            if row == len(shown) - 1:
                ax.set_xlabel("step")
    ax = fig.add_subplot(grid[len(shown), :])
    fr = result.mismatch_fraction
    pops = list(fr)
    vals = [100 * fr[p] for p in pops]
    colors = []
    for p, v in zip(pops, vals):
        lim = result.tolerance.limit(p) if result.tolerance is not None else None
        if v == 0:
            colors.append("tab:green")
        elif lim is not None and (lim == 0.0 or fr[p] > lim):
            colors.append("tab:red")
        else:
            colors.append("tab:orange")
    ax.bar(range(len(pops)), vals, color=colors)
    if result.tolerance is not None:
        for i, p in enumerate(pops):
            lim = result.tolerance.limit(p)
            if lim is not None:
                ax.hlines(100 * lim, i - 0.4, i + 0.4, colors="k", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(pops)), pops)
    ax.set_ylabel("mismatched spikes (%)")
    ax.set_title(
        f"target {result.target}: {'PASSED' if result.passed else 'FAILED'} "
        f"({result.steps} steps, lag {lag}; dashed = limit)", fontsize=10,
    )
    fig.tight_layout()
    fig_path = out / "verification.png"
    tmp = fig_path.with_name(fig_path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    os.replace(tmp, fig_path)
    logger.info("wrote verification report to %s", out)
    return {"json": json_path, "figure": fig_path}
