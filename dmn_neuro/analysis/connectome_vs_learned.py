"""Learned weights against the connectome they were constrained by.

For every projection: how well the learned magnitudes |w| follow the synapse
counts (Spearman, over all synapses and within each postsynaptic neuron), and
how far training moved them from the untrained circuit. The untrained circuit
is rebuilt from the checkpoint's own config and seed (the same code path as
``train``: :func:`dmn_neuro.training.optimizer.build_components`), so its
weights are the initial ones of a run started from scratch with that config.
For a checkpoint fine-tuned from another one (``train --init-from``) the
reference is still the untrained circuit, not the parent checkpoint.

Also the MBON -> DN readout grouped by MBON transmitter and cell type.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from dmn_neuro.errors import DMNError

#: A weight whose magnitude moved by less than this fraction of its initial
#: value counts as unchanged (Adam moves any weight with a gradient by far more).
UNCHANGED_RTOL = 1e-3
#: Rows (postsynaptic neurons) need at least this many synapses for a within-row Spearman.
MIN_ROW_SYNAPSES = 3
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class ConnectomeReference:
    """What the learned circuit is compared with: the untrained circuit rebuilt
    from the checkpoint's config, the connectome data it was built from, and
    the MBONs' transmitters."""

    initial: Any  # DifferentiableOlfactoryCircuit, untrained
    data: Any  # connectome.tables.OlfactoryCircuitData
    counts: Dict[str, np.ndarray]  # "PRE->POST" -> [n_post, n_pre] synapse counts
    mbon_transmitters: List[str]


def rebuild_reference(circuit, cfg) -> ConnectomeReference:
    """The untrained circuit and the connectome data of ``cfg`` (the checkpoint's config).

    Raises :class:`DMNError` when the rebuilt wiring is not the checkpoint's
    (other neurons, masks or signs: the config no longer describes the data).
    """
    from connectome.fetch_data import FlyWireConnectome
    from dmn_neuro.simulation.mechanism import POPULATION_ORDER
    from dmn_neuro.training.optimizer import build_components

    cpu = torch.device("cpu")
    initial = build_components(cfg, device=cpu)[0]
    if initial.structure.root_ids != circuit.structure.root_ids:
        raise DMNError("the checkpoint's config rebuilds a circuit with other neurons than the checkpoint's "
                       "(connectome data changed?): cannot compare with the untrained weights")
    for a, b in circuit.projection_pairs:
        w, w0 = circuit.weight(a, b), initial.weight(a, b)
        if not (torch.equal(w.mask.cpu(), w0.mask.cpu()) and torch.equal(w.sign.cpu(), w0.sign.cpu())):
            raise DMNError(f"the rebuilt {a}->{b} has other synapses or signs than the checkpoint's")
    cc = cfg.connectome
    data = FlyWireConnectome().fetch_olfactory_circuit(include_layers=list(POPULATION_ORDER), source=cc.source,
                                                       **cc.resolved_source_options())
    counts = {f"{a}->{b}": data.count_matrix(a, b) for a, b in circuit.projection_pairs}
    mbon_tx = [_transmitter(t) for t in data.layer_column("MBON", "transmitter")] if "MBON" in data.layers else []
    return ConnectomeReference(initial, data, counts, mbon_tx)


def _transmitter(name) -> str:
    """'ACH' -> 'acetylcholine' etc.; a label the table does not know stays as it is."""
    from connectome.errors import DataError
    from connectome.tables import normalize_transmitter

    try:
        return normalize_transmitter(str(name))
    except DataError:
        return str(name)


def _finite(x) -> Optional[float]:
    x = float(x)
    return x if np.isfinite(x) else None


def spearman(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    """Spearman rank correlation (average ranks for ties); ``None`` when undefined
    (fewer than 3 values or a constant input)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _finite(spearmanr(x, y).statistic)


def within_row_spearman(mag: np.ndarray, counts: np.ndarray, mask: np.ndarray) -> Dict[str, Any]:
    """Spearman of magnitude vs count within each postsynaptic neuron (row) that
    has at least :data:`MIN_ROW_SYNAPSES` synapses and varied counts."""
    rhos = []
    for i in range(mask.shape[0]):
        m = mask[i]
        if int(m.sum()) >= MIN_ROW_SYNAPSES:
            r = spearman(mag[i, m], counts[i, m])
            if r is not None:
                rhos.append(r)
    rhos_a = np.asarray(rhos, dtype=float)
    return {"n_rows": int(rhos_a.size), "n_rows_total": int(mask.shape[0]),
            "mean": _finite(rhos_a.mean()) if rhos_a.size else None,
            "median": _finite(np.median(rhos_a)) if rhos_a.size else None}


def projection_comparison(learned: np.ndarray, initial: np.ndarray, counts: np.ndarray, mask: np.ndarray,
                          provenance: str = "") -> Dict[str, Any]:
    """Learned magnitudes ``learned`` vs ``counts`` and vs ``initial`` on ``mask`` (all ``[n_post, n_pre]``)."""
    mask = np.asarray(mask, dtype=bool)
    lw, iw, c = learned[mask], initial[mask], counts[mask]
    rel = (lw - iw) / np.maximum(iw, 1e-12)
    unchanged = np.abs(rel) < UNCHANGED_RTOL
    ratio = np.log10(np.maximum(lw, 1e-12) / np.maximum(iw, 1e-12))
    return {
        "provenance": provenance,
        "n_synapses": int(mask.sum()),
        "spearman_learned_vs_count": spearman(lw, c),
        "spearman_initial_vs_count": spearman(iw, c),
        "spearman_learned_vs_initial": spearman(lw, iw),
        "within_post_learned_vs_count": within_row_spearman(learned, counts, mask),
        "within_post_initial_vs_count": within_row_spearman(initial, counts, mask),
        "relative_change": {
            "definition": "(|w_learned| - |w_initial|) / |w_initial| per synapse",
            "mean": _finite(rel.mean()) if rel.size else None,
            "quantiles": {f"q{int(q * 100):02d}": _finite(np.quantile(rel, q)) for q in QUANTILES} if rel.size else {},
            "fraction_increased": _finite((rel >= UNCHANGED_RTOL).mean()) if rel.size else None,
            "fraction_decreased": _finite((rel <= -UNCHANGED_RTOL).mean()) if rel.size else None,
            "log10_ratio_histogram": _histogram(ratio),
        },
        "fraction_unchanged": _finite(unchanged.mean()) if rel.size else None,
        "unchanged_rtol": UNCHANGED_RTOL,
        "mean_magnitude_learned": _finite(lw.mean()) if lw.size else None,
        "mean_magnitude_initial": _finite(iw.mean()) if iw.size else None,
    }


def _histogram(values: np.ndarray, bins: int = 30) -> Dict[str, List[float]]:
    if values.size == 0:
        return {"edges": [], "counts": []}
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    return {"edges": [float(e) for e in edges], "counts": [int(n) for n in counts]}


def _magnitudes(circuit, a: str, b: str) -> np.ndarray:
    with torch.no_grad():
        return circuit.weight(a, b).magnitude().detach().double().cpu().numpy()


def learned_vs_connectome(circuit, ref: ConnectomeReference) -> Dict[str, Any]:
    """:func:`projection_comparison` for every projection, keyed ``"PRE->POST"``."""
    out: Dict[str, Any] = {}
    for a, b in circuit.projection_pairs:
        key = f"{a}->{b}"
        mask = circuit.weight(a, b).mask.cpu().numpy()
        out[key] = projection_comparison(_magnitudes(circuit, a, b), _magnitudes(ref.initial, a, b), ref.counts[key],
                                         mask, circuit.structure.provenance.get(key, "model"))
    return out


def _group_readout(w: np.ndarray, w0: np.ndarray, groups: List[str], rate: Optional[np.ndarray]) -> Dict[str, Any]:
    """Readout summaries of MBON columns grouped by label (``w``: signed ``[n_dn, n_mbon]``)."""
    total_abs = float(np.abs(w).sum()) or 1.0
    out: Dict[str, Any] = {}
    for g in sorted(set(groups)):
        cols = np.array([i for i, x in enumerate(groups) if x == g])
        sub, sub0 = w[:, cols], w0[:, cols]
        net = sub.sum(0)  # net signed drive of each MBON onto all DNs (the motor drive is the DN mean)
        entry = {
            "n_mbon": int(cols.size),
            "sum_abs_weight": float(np.abs(sub).sum()),
            "fraction_of_readout": float(np.abs(sub).sum()) / total_abs,
            "net_weight_per_mbon": float(net.mean()),
            "sum_abs_weight_initial": float(np.abs(sub0).sum()),
            "change_of_sum_abs": float(np.abs(sub).sum() / max(np.abs(sub0).sum(), 1e-12) - 1.0),
        }
        if rate is not None:
            r = rate[cols]
            entry["mean_rate_hz"] = float(r.mean())
            # activity-weighted drive onto the mean DN, in threshold-normalised units per second
            entry["net_drive_per_s"] = float((net * r).sum() / w.shape[0])
        out[g] = entry
    return out


def mbon_readout(circuit, ref: ConnectomeReference, mbon_rate_hz: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """The MBON -> DN readout by MBON transmitter and by cell type: learned
    weights, their share of the readout, the change from the untrained circuit
    and (with ``mbon_rate_hz``) the activity-weighted net drive."""
    if ("MBON", "DN") not in circuit.projection_pairs:
        return {"available": False}
    with torch.no_grad():
        w = circuit.weight("MBON", "DN")().detach().double().cpu().numpy()
        w0 = ref.initial.weight("MBON", "DN")().detach().double().cpu().numpy()
    types = list(circuit.structure.cell_types.get("MBON", []))
    tx = list(ref.mbon_transmitters) or ["unknown"] * w.shape[1]
    return {"available": True, "n_dn": int(w.shape[0]), "n_mbon": int(w.shape[1]),
            "by_transmitter": _group_readout(w, w0, tx, mbon_rate_hz),
            "by_cell_type": _group_readout(w, w0, types, mbon_rate_hz)}
