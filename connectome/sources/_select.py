"""Annotation-based selection of the olfactory pathway, shared by the Codex and CAVE loaders.

Rules (FlyWire v783 annotations, Schlegel et al. 2024):

=====  =====================================================================
ORN    super_class ``sensory`` and class ``olfactory`` (or cell_type ``ORN_*``);
       glomerulus from the cell type ``ORN_<glomerulus>``
PN     class ``ALPN`` and sub_class containing ``uniglomerular`` (``all_alpn=True``
       keeps every ALPN); glomerulus from the cell type prefix ``<glomerulus>_...PN``
KC     class ``Kenyon_Cell``
APL    cell_type ``APL``
MBON   class ``MBON``
DAN    class ``DAN``
DN     super_class ``descending`` receiving >= ``dn_min_synapses`` synapses in total
       from the selected MBONs (any side)
=====  =====================================================================

``side`` ('right' default, 'left' or 'both') filters every layer but DN.
Transmitters: known ones win (ORN, PN, KC acetylcholine; APL GABA; MBONs by type
from cell_types.yaml); otherwise the FlyWire prediction (Eckstein et al. 2024).
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from ..errors import DataError
from ..tables import TRANSMITTER_SIGN, normalize_transmitter
from .model import normalize_glomerulus

KNOWN_TRANSMITTER = {"ORN": "acetylcholine", "PN": "acetylcholine", "KC": "acetylcholine", "APL": "gaba"}
SIDES = ("right", "left", "both")


def classify(super_class, cls, sub_class, cell_type, side, want_side: str, all_alpn: bool = False) -> np.ndarray:
    """Layer name per neuron ('' = not selected; DN candidates are marked 'DN?')."""
    if want_side not in SIDES:
        raise DataError(f"option side must be one of {', '.join(SIDES)}, got {want_side!r}")
    n = len(cls)
    out = np.full(n, "", dtype="<U4")
    sup = np.char.lower(np.asarray(super_class, dtype=str))
    c = np.asarray(cls, dtype=str)
    cl = np.char.lower(c)
    sub = np.char.lower(np.asarray(sub_class, dtype=str))
    ct = np.asarray(cell_type, dtype=str)
    out[((sup == "sensory") & (cl == "olfactory")) | np.char.startswith(ct, "ORN_")] = "ORN"
    pn = cl == "alpn"
    if not all_alpn:
        pn &= np.char.find(sub, "uniglomerular") >= 0
    out[pn] = "PN"
    out[cl == "kenyon_cell"] = "KC"
    out[cl == "mbon"] = "MBON"
    out[cl == "dan"] = "DAN"
    out[ct == "APL"] = "APL"
    if want_side != "both":
        out[np.asarray(side, dtype=str) != want_side] = ""
    out[(sup == "descending") & (out == "")] = "DN?"
    return out


def glomerulus_of(layer: np.ndarray, cell_type: np.ndarray) -> np.ndarray:
    out = []
    for l, t in zip(layer.tolist(), np.asarray(cell_type, dtype=str).tolist()):
        if l == "ORN":
            out.append(normalize_glomerulus(t[4:] if t.startswith("ORN_") else ""))
        elif l == "PN":
            out.append(normalize_glomerulus(t.rsplit("_", 1)[0]) if "_" in t else "")
        else:
            out.append("")
    return np.array(out, dtype=str)


def transmitters(layer: np.ndarray, cell_type: np.ndarray, predicted: Sequence[str]):
    from ..config import load_cell_types

    mbon = load_cell_types().mbon_transmitters
    nts = []
    for l, t, p in zip(layer.tolist(), np.asarray(cell_type, dtype=str).tolist(), list(predicted)):
        if l in KNOWN_TRANSMITTER:
            nts.append(KNOWN_TRANSMITTER[l])
        elif l == "MBON" and t.split(",")[0] in mbon:
            nts.append(mbon[t.split(",")[0]])
        else:
            nts.append(normalize_transmitter(p))
    nts = np.array(nts, dtype=str)
    sign = np.array([TRANSMITTER_SIGN[t] for t in nts.tolist()], dtype=np.int8)
    return nts, sign


def select_dns(layer: np.ndarray, ids: np.ndarray, pre: np.ndarray, post: np.ndarray, cnt: np.ndarray,
               min_synapses: int) -> np.ndarray:
    """Resolve 'DN?' candidates: keep those receiving >= min_synapses from the selected MBONs."""
    layer = layer.copy()
    cand = layer == "DN?"
    mbon_ids = ids[layer == "MBON"]
    sel = np.isin(pre, mbon_ids) & np.isin(post, ids[cand])
    totals: Dict[int, int] = {}
    if sel.any():
        u, inv = np.unique(post[sel], return_inverse=True)
        sums = np.bincount(inv, weights=cnt[sel])
        totals = dict(zip(u.tolist(), sums.tolist()))
    keep = np.array([totals.get(i, 0) >= min_synapses for i in ids[cand].tolist()], dtype=bool)
    idx = np.flatnonzero(cand)
    layer[idx[keep]] = "DN"
    layer[idx[~keep]] = ""
    return layer
