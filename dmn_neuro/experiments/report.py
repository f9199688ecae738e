"""Statistics of an experiment directory: per condition n, mean and 95 % CI over seeds,
pairwise Mann-Whitney U tests with rank-biserial effect sizes (Holm-corrected per
metric), learning curves with bands.

Methods (also written into report.md):

* each seed (cell) is one observation; a metric's value for a cell is the mean
  over its held-out evaluation episodes (``learning_curve_area``: the mean
  training-batch success rate over the training episodes, i.e. the area under
  the success curve divided by the number of episodes, in [0, 1]);
* 95 % CI: Student-t, mean +- t(0.975, n-1) * sd / sqrt(n) (sd with n-1); none for n < 2;
* pairwise: two-sided Mann-Whitney U (``scipy.stats.mannwhitneyu``, exact for
  small samples without ties) between every two conditions, effect size the
  rank-biserial correlation r = 2U/(n1 n2) - 1 (U of the first condition;
  r > 0: the first tends higher), p-values Holm-corrected over the pairs of each metric;
* the learning-curve band is the same t-CI across seeds at each episode.

Stores (under the experiment directory): report.json, report.md,
learning_curves.png, metrics.png -- each written atomically.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from connectome.atomic import write_text
from dmn_neuro.errors import ConfigError

#: (key, label, where in the result, higher is better?) -- the report's metrics.
METRICS = [
    ("success_rate", "success rate", ("evaluation", "success_rate")),
    ("final_distance_mm", "final distance (mm)", ("evaluation", "final_distance_to_goal_mean")),
    ("kc_sparsity", "KC sparsity", ("evaluation", "kc_sparsity")),
    ("learning_curve_area", "learning-curve area", None),
    ("mean_speed_mm_s", "mean speed (mm/s)", ("evaluation", "mean_speed_mm_s")),
    ("path_length_mm", "path length (mm)", ("evaluation", "path_length_mm")),
    ("turning_rate_rad_s", "turning rate (rad/s)", ("evaluation", "turning_rate_rad_s")),
    ("time_to_goal_ms", "time to goal (ms)", ("evaluation", "time_to_goal_ms")),
    ("odor_removed_success_rate", "success, odor removed", ("odor_removed", "success_rate")),
]
#: Metrics the pairwise tests cover.
TESTED = ("success_rate", "final_distance_mm", "kc_sparsity", "learning_curve_area")


def load_results(directory) -> List[Dict[str, Any]]:
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"experiment directory not found: {d}")
    out = []
    for p in sorted((d / "results").glob("*.json")):
        try:
            out.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read result {p}: {exc}") from None
    if not out:
        raise ConfigError(f"{d} holds no finished cells (no results/*.json); run 'dmn-neuro experiment run' first")
    return out


def _value(res: Dict[str, Any], key: str, where) -> Optional[float]:
    if key == "learning_curve_area":
        s = [v for v in (res.get("learning_curve") or {}).get("success_rate", []) if v is not None]
        return float(np.mean(s)) if s else None
    node: Any = res
    for k in where:
        node = node.get(k) if isinstance(node, dict) else None
    return float(node) if isinstance(node, (int, float)) and math.isfinite(node) else None


def t_ci(values) -> Dict[str, Any]:
    from scipy import stats

    a = np.asarray([v for v in values if v is not None], dtype=float)
    n = int(a.size)
    out: Dict[str, Any] = {"n": n, "mean": float(a.mean()) if n else None,
                           "sd": float(a.std(ddof=1)) if n > 1 else None, "ci95": None}
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1) * a.std(ddof=1) / math.sqrt(n))
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


def holm(pvalues: List[float]) -> List[float]:
    """Holm-Bonferroni adjusted p-values (monotone, capped at 1)."""
    m = len(pvalues)
    order = np.argsort(pvalues)
    adj = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adj[i] = running
    return adj


def pairwise(values: Dict[str, List[Optional[float]]]) -> List[Dict[str, Any]]:
    from scipy import stats

    rows = []
    for a, b in itertools.combinations(values, 2):
        x = [v for v in values[a] if v is not None]
        y = [v for v in values[b] if v is not None]
        if not x or not y:
            continue
        if len(set(x) | set(y)) == 1:  # all equal: no evidence of a difference
            u, p = len(x) * len(y) / 2.0, 1.0
        else:
            r = stats.mannwhitneyu(x, y, alternative="two-sided")
            u, p = float(r.statistic), float(r.pvalue)
        rows.append({"a": a, "b": b, "n_a": len(x), "n_b": len(y), "U": u, "p": p,
                     "rank_biserial": 2.0 * u / (len(x) * len(y)) - 1.0})
    for row, adj in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = adj
    return rows


def summarize(results: List[Dict[str, Any]], order: Optional[List[str]] = None) -> Dict[str, Any]:
    conds = list(order or [])
    for r in results:
        if r["condition"] not in conds:
            conds.append(r["condition"])
    conds = [c for c in conds if any(r["condition"] == c for r in results)]
    by = {c: sorted((r for r in results if r["condition"] == c), key=lambda r: r["seed"]) for c in conds}
    per: Dict[str, Dict[str, Any]] = {}
    tests: Dict[str, List[Dict[str, Any]]] = {}
    for key, label, where in METRICS:
        vals = {c: [_value(r, key, where) for r in by[c]] for c in conds}
        if all(v is None for vs in vals.values() for v in vs):
            continue
        for c in conds:
            per.setdefault(c, {"seeds": [r["seed"] for r in by[c]]})[key] = {**t_ci(vals[c]), "values": vals[c]}
        if key in TESTED:
            tests[key] = pairwise(vals)
    curves = {}
    for c in conds:
        series = [r.get("learning_curve", {}).get("success_rate") or [] for r in by[c]]
        L = min((len(s) for s in series), default=0)
        rows = [t_ci([s[i] for s in series]) for i in range(L)]
        curves[c] = {"episode": list(range(L)), "mean": [r["mean"] for r in rows],
                     "ci95": [r["ci95"] for r in rows]}
    return {"conditions": conds, "n_cells": len(results), "metrics": {k: lbl for k, lbl, _ in METRICS},
            "per_condition": per, "pairwise": tests, "learning_curves": curves,
            "methods": {"ci": "Student-t 95% CI over seeds", "test": "two-sided Mann-Whitney U (scipy.stats)",
                        "effect_size": "rank-biserial r = 2U/(n1*n2) - 1", "correction": "Holm, per metric",
                        "learning_curve_area": "mean training-batch success rate over training episodes"}}


def _fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def markdown(rep: Dict[str, Any], name: str) -> str:
    lines = [f"# Experiment report: {name}", "",
             f"{rep['n_cells']} finished cells; conditions: {', '.join(rep['conditions'])}.", "",
             "Each seed is one observation. 95 % CI: Student-t over seeds. Pairwise: two-sided Mann-Whitney U, "
             "effect size rank-biserial r (r > 0: the first condition higher), Holm-corrected per metric. "
             "Learning-curve area: mean training-batch success rate over training episodes.", "",
             "## Per condition", "", "| metric | condition | n | mean | 95 % CI |", "|---|---|---|---|---|"]
    for key, label in rep["metrics"].items():
        for c in rep["conditions"]:
            s = rep["per_condition"].get(c, {}).get(key)
            if s is None:
                continue
            ci = "-" if s["ci95"] is None else f"[{_fmt(s['ci95'][0])}, {_fmt(s['ci95'][1])}]"
            lines.append(f"| {label} | {c} | {s['n']} | {_fmt(s['mean'])} | {ci} |")
    lines += ["", "## Pairwise comparisons", "", "| metric | a | b | U | p | p (Holm) | r (rank-biserial) |",
              "|---|---|---|---|---|---|---|"]
    for key, rows in rep["pairwise"].items():
        for r in rows:
            lines.append(f"| {rep['metrics'][key]} | {r['a']} | {r['b']} | {_fmt(r['U'])} | {_fmt(r['p'])} | "
                         f"{_fmt(r['p_holm'])} | {_fmt(r['rank_biserial'])} |")
    lines += ["", "Figures: learning_curves.png (training success, mean and 95 % CI band over seeds), "
              "metrics.png (each seed, mean and CI).", ""]
    return "\n".join(lines)


def write_figures(rep: Dict[str, Any], d: Path) -> List[str]:
    from dmn_neuro.analysis.plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (c, cur) in enumerate(rep["learning_curves"].items()):
        if not cur["episode"]:
            continue
        ep = np.asarray(cur["episode"])
        m = np.asarray([np.nan if v is None else v for v in cur["mean"]], dtype=float)
        ax.plot(ep, m, color=f"C{i}", label=c)
        lo = np.asarray([np.nan if b is None else b[0] for b in cur["ci95"]], dtype=float)
        hi = np.asarray([np.nan if b is None else b[1] for b in cur["ci95"]], dtype=float)
        ax.fill_between(ep, lo, hi, color=f"C{i}", alpha=0.2, linewidth=0)
    ax.set_xlabel("training episode")
    ax.set_ylabel("training success rate")
    ax.set_title("learning curves (mean, 95 % CI over seeds)")
    ax.legend(fontsize=7)
    _save(fig, d / "learning_curves.png")
    keys = [k for k in rep["metrics"] if any(k in rep["per_condition"][c] for c in rep["conditions"])]
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 3.4), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for i, c in enumerate(rep["conditions"]):
            s = rep["per_condition"][c].get(k)
            if not s:
                continue
            v = [x for x in s["values"] if x is not None]
            ax.scatter(np.full(len(v), i) + np.linspace(-0.1, 0.1, len(v)), v, s=10, color=f"C{i}")
            if s["mean"] is not None:
                lo, hi = s["ci95"] or (s["mean"], s["mean"])
                ax.errorbar(i + 0.25, s["mean"], yerr=[[s["mean"] - lo], [hi - s["mean"]]], fmt="o", color="k",
                            capsize=3, markersize=3)
        ax.set_xticks(range(len(rep["conditions"])))
        ax.set_xticklabels(rep["conditions"], rotation=45, ha="right", fontsize=7)
        ax.set_title(rep["metrics"][k], fontsize=8)
    _save(fig, d / "metrics.png")
    return ["learning_curves.png", "metrics.png"]


def write_report(directory, figures: bool = True) -> Dict[str, Any]:
    """Read DIRECTORY/results, write report.json, report.md and (``figures``) the figures; returns the report."""
    d = Path(directory)
    results = load_results(d)
    order, name = None, d.name
    spec_path = d / "experiment.json"
    if spec_path.exists():
        try:
            spec = json.loads(spec_path.read_text(encoding="utf-8"))
            order, name = list(spec.get("conditions") or []), spec.get("name") or name
        except (OSError, ValueError):
            pass
    rep = summarize(results, order)
    rep["name"] = name
    if figures:
        rep["figures"] = write_figures(rep, d)
    write_text(d / "report.json", json.dumps(rep, indent=1, default=float))
    write_text(d / "report.md", markdown(rep, name))
    return rep


__all__ = ["write_report", "summarize", "load_results", "pairwise", "holm", "t_ci", "METRICS"]
