"""Odor coding of the Kenyon cells, open loop, on the real Hallem & Carlson odors.

Each odor is presented at a constant concentration for ``steps`` steps through
the checkpoint's own encoder (its gain, encoding and Poisson input, seeded),
plus a blank (concentration 0: the ORNs' spontaneous rates). A KC *responds*
to an odor when it fires at least once during the presentation; the blank's
fraction says how much of that is spontaneous.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

#: Name of the blank (no odor) entry of an odor panel run.
BLANK = "(blank)"


def odor_panel(circuit, cfg, odors: Optional[Sequence[str]] = None) -> List[str]:
    """The odors to present: ``odors``, or every odor the checkpoint's encoder knows (Hallem & Carlson)."""
    enc = panel_encoder(circuit, cfg)
    if not odors:
        return list(enc.odors)
    for o in odors:
        enc.odor_index(o)  # raises a one-line error for an unknown odor
    return list(odors)


def panel_encoder(circuit, cfg):
    """The checkpoint's encoder (gain and encoding as in training) over all known odors."""
    from dmn_neuro.training.optimizer import build_components

    return build_components(cfg.replace(odors=[]), circuit=circuit, device=torch.device("cpu"))[1]


def odor_panel_spikes(circuit, cfg, odors: Sequence[str], steps: int, concentration: float = 1.0,
                      seed: int = 0) -> Dict[str, np.ndarray]:
    """Spikes ``{population: bool [steps, len(odors) + 1, n]}``; the last entry is the blank."""
    from dmn_neuro.analysis.recording import run_open_loop
    from dmn_neuro.environment.odors import static_odor_input

    enc = panel_encoder(circuit, cfg)
    gen = torch.Generator().manual_seed(int(seed))
    x = np.asarray(static_odor_input(enc, list(odors), steps, concentration=concentration, generator=gen))
    blank = np.asarray(static_odor_input(enc, [list(odors)[0]], steps, concentration=0.0, generator=gen))
    dtype = next(circuit.parameters()).dtype
    try:
        return run_open_loop(circuit, np.concatenate([x, blank], axis=1), dtype=torch.float32, engine=circuit.engine)
    finally:
        circuit.to(dtype)


def _corr_rows(m: np.ndarray) -> np.ndarray:
    """Pearson correlation between rows (0 where a row is constant)."""
    z = m - m.mean(1, keepdims=True)
    n = np.linalg.norm(z, axis=1, keepdims=True)
    z = np.divide(z, n, out=np.zeros_like(z), where=n > 0)
    return z @ z.T


def _upper(m: np.ndarray) -> np.ndarray:
    return m[np.triu_indices(m.shape[0], k=1)]


def jaccard_matrix(resp: np.ndarray) -> np.ndarray:
    """Jaccard overlap of the responding sets of each pair of rows (``resp``: bool [odor, n]); NaN if both empty."""
    r = resp.astype(np.float64)
    inter = r @ r.T
    size = r.sum(1)
    union = size[:, None] + size[None, :] - inter
    return np.divide(inter, union, out=np.full_like(inter, np.nan), where=union > 0)


def _stats(v: np.ndarray) -> Dict[str, Optional[float]]:
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0, "mean": None, "median": None, "max": None}
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)), "max": float(v.max())}


def kc_coding(spikes: Dict[str, np.ndarray], odors: Sequence[str], dt_ms: float) -> Dict[str, Any]:
    """KC coding statistics from :func:`odor_panel_spikes` output.

    Returns per-odor fraction of KCs responding, the blank's fraction, pairwise
    Jaccard overlap of responding KC sets, and KC vs PN pattern correlation:
    the Pearson correlation of each odor pair's spike-count vectors in PN and
    in KC, and how the two similarity structures relate (``similarity_pn_vs_kc``).
    The full matrices are under ``matrices`` (for the .npz, not the JSON).
    """
    n = len(odors)
    kc = spikes["KC"].sum(0).astype(np.float64)  # [odor+1, n_kc]
    pn = spikes["PN"].sum(0).astype(np.float64)
    secs = spikes["KC"].shape[0] * dt_ms / 1000.0
    resp = kc > 0
    frac = resp.mean(1)
    jac = jaccard_matrix(resp[:n])
    r_pn, r_kc = _corr_rows(pn[:n]), _corr_rows(kc[:n])
    u_pn, u_kc = _upper(r_pn), _upper(r_kc)
    from dmn_neuro.analysis.connectome_vs_learned import spearman

    pearson = None
    if u_pn.size >= 3 and np.ptp(u_pn) > 0 and np.ptp(u_kc) > 0:
        pearson = float(np.corrcoef(u_pn, u_kc)[0, 1])
    return {
        "n_odors": n, "presentation_s": secs, "n_kc": int(kc.shape[1]),
        "response_definition": "a KC responds to an odor when it fires at least once during the presentation",
        "fraction_responding": {o: float(f) for o, f in zip(odors, frac[:n])},
        "fraction_responding_mean": float(frac[:n].mean()) if n else None,
        "fraction_responding_blank": float(frac[n]),
        "fraction_silent_to_all_odors": float((~resp[:n].any(0)).mean()) if n else None,
        "kc_mean_rate_hz": float(kc[:n].mean() / secs) if n else None,
        "pn_mean_rate_hz": float(pn[:n].mean() / secs) if n else None,
        "pairwise_overlap_jaccard": _stats(_upper(jac)),
        "pattern_correlation": {
            "pn": _stats(u_pn), "kc": _stats(u_kc),
            "similarity_pn_vs_kc": {"pearson": pearson, "spearman": spearman(u_pn, u_kc)},
            "definition": "Pearson correlation of spike-count vectors between each pair of odors, in PN and in KC; "
                          "similarity_pn_vs_kc relates the two over all odor pairs",
        },
        "matrices": {"odors": list(odors), "jaccard": jac, "corr_pn": r_pn, "corr_kc": r_kc,
                     "kc_counts": kc[:n], "pn_counts": pn[:n]},
    }


def population_rates_hz(spikes: Dict[str, np.ndarray], population: str, n_odors: int, dt_ms: float) -> np.ndarray:
    """Mean rate of each neuron of ``population`` over the odor entries (not the blank), in Hz."""
    s = spikes[population][:, :n_odors].astype(np.float64)
    return s.mean((0, 1)) * 1000.0 / dt_ms
