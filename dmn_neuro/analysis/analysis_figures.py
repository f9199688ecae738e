"""Figures of ``dmn-neuro analyze`` (Agg backend, written atomically through :mod:`dmn_neuro.analysis.plots`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from dmn_neuro.analysis.plots import _plt, _save


def weights_vs_counts(circuit, ref, comparison: Dict[str, Any], path: Path) -> Path:
    """Per projection: learned |w| against synapse count (top) and the log10 ratio learned/initial (bottom)."""
    plt = _plt()
    pairs = list(circuit.projection_pairs)
    fig, axes = plt.subplots(2, len(pairs), figsize=(3.2 * len(pairs), 6.4), squeeze=False)
    rng = np.random.default_rng(0)
    for j, (a, b) in enumerate(pairs):
        key = f"{a}->{b}"
        w = circuit.weight(a, b)
        with torch.no_grad():
            mask = w.mask.cpu().numpy()
            mag = w.magnitude().detach().double().cpu().numpy()[mask]
            mag0 = ref.initial.weight(a, b).magnitude().detach().double().cpu().numpy()[mask]
        cnt = ref.counts[key][mask]
        sel = rng.permutation(mag.size)[:5000]
        jitter = rng.uniform(-0.2, 0.2, sel.size)
        ax = axes[0, j]
        ax.scatter(cnt[sel] + jitter, mag[sel], s=2, alpha=0.3)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_yscale("log")
        rho = comparison[key]["spearman_learned_vs_count"]
        ax.set_title(f"{key} ({comparison[key]['provenance']})\nSpearman {rho:.2f}" if rho is not None
                     else f"{key}\nSpearman n/a", fontsize=8)
        ax.set_xlabel("synapse count")
        ax.set_ylabel("learned |w|")
        ratio = np.log10(np.maximum(mag, 1e-12) / np.maximum(mag0, 1e-12))
        axes[1, j].hist(ratio, bins=40, color="C1")
        axes[1, j].set_xlabel("log10(|w| learned / initial)")
        axes[1, j].set_title(f"unchanged {comparison[key]['fraction_unchanged']:.1%}", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def kc_coding(coding: Dict[str, Any], path: Path) -> Path:
    plt = _plt()
    m = coding["matrices"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    frac = np.array([coding["fraction_responding"][o] for o in m["odors"]])
    axes[0].hist(frac, bins=30, color="C0")
    axes[0].axvline(coding["fraction_responding_blank"], color="C3", ls="--", label="blank")
    axes[0].set_xlabel("fraction of KCs responding")
    axes[0].set_ylabel("odors")
    axes[0].legend(fontsize=7)
    im = axes[1].imshow(m["jaccard"], vmin=0, vmax=1, cmap="viridis")
    axes[1].set_title("pairwise overlap of responding KCs (Jaccard)", fontsize=9)
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    iu = np.triu_indices(len(m["odors"]), k=1)
    axes[2].scatter(m["corr_pn"][iu], m["corr_kc"][iu], s=3, alpha=0.4)
    axes[2].plot([-1, 1], [-1, 1], ":", color="0.5")
    axes[2].set_xlabel("PN pattern correlation (odor pair)")
    axes[2].set_ylabel("KC pattern correlation (odor pair)")
    return _save(fig, path)


def lesions(les: Dict[str, Any], path: Path) -> Path:
    plt = _plt()
    names = ["intact"] + list(les["lesions"])
    succ = [les["intact"]["success_rate"]] + [v["success_rate"] for v in les["lesions"].values()]
    dist = [les["intact"]["final_distance_mm"]] + [v["final_distance_mm"] for v in les["lesions"].values()]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.28 * len(names)), 7), sharex=True)
    axes[0].bar(range(len(names)), succ, color=["C2"] + ["C3"] * (len(names) - 1))
    axes[0].set_ylabel("success rate")
    axes[0].set_ylim(0, 1)
    axes[0].set_title(f"lesions at evaluation ({les['episodes']} held-out episodes, no retraining)", fontsize=9)
    axes[1].bar(range(len(names)), dist, color="C0")
    axes[1].set_ylabel("final distance (mm)")
    axes[1].set_xticks(range(len(names)))
    axes[1].set_xticklabels(names, rotation=90, fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def manifold(odor: Dict[str, Any], traj: Dict[str, Any], path: Path, population: str = "KC") -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    p = odor.get("populations", {}).get(population)
    if p is not None:
        s = p["_scores"]  # [odor, bins, k]
        axes[0].scatter(s[..., 0].ravel(), s[..., 1].ravel(), s=2, alpha=0.25, color="0.6")
        c = s.mean(1)
        axes[0].scatter(c[:, 0], c[:, 1], s=8, c=np.arange(len(c)), cmap="tab20")
        evr = p["explained_variance_ratio"]
        axes[0].set_xlabel(f"PC1 ({evr[0]:.0%})")
        axes[0].set_ylabel(f"PC2 ({evr[1]:.0%})" if len(evr) > 1 else "PC2")
        axes[0].set_title(f"{population} per odor (dots: odor centroids)", fontsize=9)
    t = traj.get("populations", {}).get(population) if traj else None
    if t is not None:
        s, d = t["_scores"], t["_distance"]
        for e in range(min(s.shape[0], 25)):
            axes[1].plot(s[e, :, 0], s[e, :, 1], color="0.8", lw=0.5)
        sc = axes[1].scatter(s[..., 0].ravel(), s[..., 1].ravel(), c=d.ravel(), s=3, cmap="magma_r")
        fig.colorbar(sc, ax=axes[1], label="distance to source (mm)")
        r2 = t["distance_r2_heldout"]
        axes[1].set_title(f"{population} along trajectories (held-out R^2 of distance: "
                          f"{'n/a' if r2 is None else f'{r2:.2f}'})", fontsize=9)
        axes[1].set_xlabel("PC1")
        axes[1].set_ylabel("PC2")
    return _save(fig, path)


def all_figures(circuit, ref, result: Dict[str, Any], private: Dict[str, Any], out: Path) -> List[str]:
    paths = [weights_vs_counts(circuit, ref, result["learned_vs_connectome"], out / "weights_vs_connectome.png"),
             kc_coding(private["kc_coding"], out / "kc_coding.png")]
    if private.get("lesions"):
        paths.append(lesions(private["lesions"], out / "lesions.png"))
    paths.append(manifold(private["odor_manifold"], private.get("trajectory_manifold") or {}, out / "manifold.png"))
    return [p.name for p in paths]
