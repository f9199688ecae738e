"""``dmn-neuro analyze``: what a trained checkpoint learned, in one JSON object.

Sections (keys of the result):

* ``learned_vs_connectome``: per projection, Spearman of |w| vs synapse count
  (overall and within postsynaptic neuron), relative change from the untrained
  circuit, fraction unchanged (:mod:`dmn_neuro.analysis.connectome_vs_learned`);
* ``kc_coding``: fraction of KCs responding per odor, pairwise overlap, KC vs PN
  pattern correlation (:mod:`dmn_neuro.analysis.kc_coding`);
* ``mbon_readout``: the MBON -> DN readout by transmitter and cell type;
* ``lesions``: held-out success and distance with APL, each MBON transmitter
  class and each MBON cell type lesioned (:mod:`dmn_neuro.analysis.lesions`);
* ``manifold``: PCA (UMAP if installed) per odor and along trajectories
  (:mod:`dmn_neuro.analysis.manifold`).

Written to OUT/analysis.json, OUT/kc_coding.npz (the odor-by-odor matrices)
and figures, all atomically.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch

from dmn_neuro.errors import ConfigError, DMNError

#: Defaults of the command: about a minute on one CPU thread for the shipped model.
DEFAULT_EPISODES = 25
DEFAULT_ODOR_STEPS = 250
DEFAULT_SEED = 12345


def _clean(obj):
    """JSON-safe: NaN/Inf -> None, NumPy scalars/arrays -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def default_out_dir(checkpoint: os.PathLike) -> Path:
    """CHECKPOINT_analysis next to the checkpoint (``best_model.pt`` -> ``best_model_analysis``)."""
    p = Path(str(checkpoint).rstrip("/"))
    if p.suffix == ".pt":
        p = p.with_suffix("")
    return Path(str(p) + "_analysis")


def check_out_dir(out: Path) -> None:
    """Refuse an output directory that cannot be created (a file in its place or above it) before any work."""
    for p in [out, *out.parents]:
        if p.exists():
            if not p.is_dir():
                raise DMNError(f"cannot write {out}: {p} is a file, not a directory")
            return


def analyze_checkpoint(checkpoint: os.PathLike, out_dir: Optional[os.PathLike] = None, episodes: int = DEFAULT_EPISODES,
                       steps: Optional[int] = None, odor_steps: int = DEFAULT_ODOR_STEPS,
                       odors: Optional[Sequence[str]] = None, seed: int = DEFAULT_SEED, lesions: bool = True,
                       use_umap: bool = True, figures: bool = True,
                       progress: Optional[Callable[[str, int], None]] = None) -> Dict[str, Any]:
    """Run every analysis on ``checkpoint``; write the results to ``out_dir``
    (``None``: :func:`default_out_dir`); return the JSON object.

    ``episodes`` held-out episodes per lesion condition (0: no lesions and no
    trajectory manifold), ``steps`` their length (default: the checkpoint's),
    ``odor_steps`` the length of each open-loop odor presentation.
    ``progress(label, total)`` is called once per unit of work.
    """
    from connectome.atomic import atomic_file
    from dmn_neuro.analysis import analysis_figures, connectome_vs_learned as cvl, kc_coding as kcc
    from dmn_neuro.analysis import lesions as les
    from dmn_neuro.analysis import manifold as mf
    from dmn_neuro.analysis.plots import write_json
    from dmn_neuro.training.checkpoint import load_circuit
    from dmn_neuro.training.config import TrainingConfig

    if episodes < 0 or odor_steps < 1 or (steps is not None and steps < 1):
        raise ConfigError("analyze: episodes must be >= 0, steps and odor_steps >= 1")
    out = Path(out_dir) if out_dir is not None else default_out_dir(checkpoint)
    check_out_dir(out)
    circuit, ck = load_circuit(checkpoint, device=torch.device("cpu"))
    circuit = circuit.float()
    cfg = TrainingConfig.from_dict(ck["meta"]["config"]).replace(device="cpu")
    odor_list = kcc.odor_panel(circuit, cfg, odors)
    ref = cvl.rebuild_reference(circuit, cfg)
    plan = les.lesion_plan(circuit, ref.mbon_transmitters) if (lesions and episodes > 0) else []
    total = 3 + (1 + len(plan) if episodes > 0 else 0)

    def tick(label: str) -> None:
        if progress is not None:
            progress(label, total)

    tick("learned vs connectome")
    comparison = cvl.learned_vs_connectome(circuit, ref)
    spikes = kcc.odor_panel_spikes(circuit, cfg, odor_list, odor_steps, seed=seed)
    dt = circuit.semantics.dt_ms
    coding = kcc.kc_coding(spikes, odor_list, dt)
    tick("odor panel")
    rates = kcc.population_rates_hz(spikes, "MBON", len(odor_list), dt) if "MBON" in spikes else None
    readout = cvl.mbon_readout(circuit, ref, rates)
    odor_man = mf.odor_manifold(spikes, odor_list, use_umap=use_umap)
    tick("odor manifold")
    lesion_res, traj_man = None, None
    if episodes > 0:
        lesion_res = les.evaluate_lesions(circuit, cfg, plan, episodes, steps, seed=seed, progress=tick,
                                          keep_intact_rollouts=True)
        traj_man = mf.trajectory_manifold(lesion_res.pop("_rollouts"), use_umap=use_umap)
    result: Dict[str, Any] = {
        "checkpoint": str(checkpoint), "out_dir": str(out), "episode": int(ck["meta"].get("episode", 0)),
        "settings": {"episodes": int(episodes), "steps": steps, "odor_steps": int(odor_steps), "seed": int(seed),
                     "n_odors": len(odor_list), "umap": bool(use_umap and mf.umap_available())},
        "initial_weights": "rebuilt from the checkpoint's config and seed (the untrained circuit of a run from "
                           "scratch); for a fine-tuned checkpoint this is not the parent checkpoint",
        "learned_vs_connectome": comparison,
        "kc_coding": {k: v for k, v in coding.items() if k != "matrices"},
        "mbon_readout": readout,
        "lesions": lesion_res if lesion_res is not None else {"skipped": "--episodes 0"},
        "manifold": {"per_odor": mf.strip_private(odor_man),
                     "trajectories": mf.strip_private(traj_man) if traj_man is not None
                     else {"skipped": "--episodes 0"}},
    }
    result["headline"] = headline(result)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    m = coding["matrices"]
    np.savez_compressed(buf, odors=np.array(m["odors"]), jaccard=m["jaccard"], corr_pn=m["corr_pn"],
                        corr_kc=m["corr_kc"], kc_counts=m["kc_counts"], pn_counts=m["pn_counts"])
    with atomic_file(out / "kc_coding.npz", "wb") as fh:
        fh.write(buf.getvalue())
    if figures:
        private = {"kc_coding": coding, "lesions": lesion_res, "odor_manifold": odor_man,
                   "trajectory_manifold": traj_man}
        result["figures"] = analysis_figures.all_figures(circuit, ref, result, private, out)
    result = _clean(result)
    write_json(out / "analysis.json", result)
    tick("written")
    return result


def headline(result: Dict[str, Any]) -> Dict[str, Any]:
    """The few numbers worth a line each."""
    cmp_ = result["learned_vs_connectome"]
    h: Dict[str, Any] = {
        "spearman_learned_vs_count": {k: v["spearman_learned_vs_count"] for k, v in cmp_.items()},
        "spearman_within_post_mean": {k: v["within_post_learned_vs_count"]["mean"] for k, v in cmp_.items()},
        "fraction_unchanged": {k: v["fraction_unchanged"] for k, v in cmp_.items()},
        "median_relative_change": {k: v["relative_change"]["quantiles"].get("q50") for k, v in cmp_.items()},
        "kc_fraction_responding_mean": result["kc_coding"]["fraction_responding_mean"],
        "kc_fraction_responding_blank": result["kc_coding"]["fraction_responding_blank"],
        "kc_pairwise_overlap_mean": result["kc_coding"]["pairwise_overlap_jaccard"]["mean"],
        "pattern_correlation_mean": {"pn": result["kc_coding"]["pattern_correlation"]["pn"]["mean"],
                                     "kc": result["kc_coding"]["pattern_correlation"]["kc"]["mean"]},
    }
    les = result["lesions"]
    if "intact" in les:
        from dmn_neuro.analysis.lesions import headline as lesion_headline

        h["success"] = lesion_headline(les)
    return h
