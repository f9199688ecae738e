"""Model-assumption layers: ORN per glomerulus and a small DN layer.

No offline source has ORN->PN or MBON->DN synapse counts, so for the bundled
sources these two layers are *models*, labelled with provenance ``'model'``:

ORN layer
    One ORN population per glomerulus that has at least one PN in the source,
    ``orn_per_glomerulus`` neurons each (default 1). Each ORN carries its
    glomerulus and receptor (``glomeruli/glomeruli.csv``, Schlegel et al. 2021).
    Ids are synthesised, negative and deterministic:
    ``id = -(ORN_ID_BASE + 1000 * g + k)`` where ``g`` is the glomerulus' row in
    glomeruli.csv (glomeruli not listed there get ``len(csv) + rank`` in sorted
    order) and ``k < 1000`` the ORN index within the glomerulus.
    ORN_g -> every PN of glomerulus g, nominal synapse count
    ``max(1, round(orn_pn_synapses_per_orn * expected_ORNs(g) / orn_per_glomerulus))``:
    one model ORN stands for the expected number of ORNs of its type
    (Grabe et al. 2016; median over glomeruli where unknown), each contributing
    ``orn_pn_synapses_per_orn`` (default 10) synapses to each sister PN. This is
    a nominal choice, not a measurement.

DN layer
    ``n_dn`` (default 4) cholinergic (+1) descending neurons, ids ``-(k + 1)``,
    with an all-to-all MBON->DN mask and a nominal count ``dn_synapses``
    (default 10) per pair.
"""
from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, Mapping, Tuple

import numpy as np

from ..errors import DataError
from ..tables import EdgeTable, NeuronTable

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
GLOMERULI_CSV = DATA_DIR / "glomeruli" / "glomeruli.csv"
ORN_ID_BASE = 1_000_000
MAX_ORN_PER_GLOMERULUS = 1000
MAX_DN = ORN_ID_BASE - 1

#: Options understood by the model layers, with defaults.
MODEL_OPTIONS = {"orn_per_glomerulus": 1, "orn_pn_synapses_per_orn": 10, "n_dn": 4, "dn_synapses": 10}


def normalize_glomerulus(label: str) -> str:
    """Primary glomerulus of a PN/ORN label: 'VP1l+' -> 'VP1l', 'VP3+VP1l' -> 'VP3', 'VP5+Z' -> 'VP5'."""
    label = str(label).strip()
    if not label:
        return ""
    first = label.split("+")[0].strip()
    return first or label.strip("+")


@lru_cache(maxsize=4)
def load_glomeruli(path: str = str(GLOMERULI_CSV)) -> Tuple[Tuple[str, str, float], ...]:
    """Rows (glomerulus, receptor, expected ORN count or NaN) of glomeruli.csv, in file order."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"glomerulus table not found: {p}")
    out = []
    with open(p, newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"glomerulus", "receptor", "expected_RN_female_1h"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise DataError(f"{p}: missing columns {sorted(need - set(reader.fieldnames or []))}")
        for row in reader:
            try:
                n = float(row["expected_RN_female_1h"])
            except (TypeError, ValueError):
                n = float("nan")
            out.append((row["glomerulus"].strip(), (row["receptor"] or "").strip(), n))
    return tuple(out)


def check_model_options(options: Mapping) -> Dict[str, int]:
    out = dict(MODEL_OPTIONS)
    for key, value in options.items():
        if key not in MODEL_OPTIONS:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise DataError(f"option {key} must be a positive integer, got {value!r}")
        out[key] = int(value)
    if out["orn_per_glomerulus"] > MAX_ORN_PER_GLOMERULUS:
        raise DataError(f"option orn_per_glomerulus must be <= {MAX_ORN_PER_GLOMERULUS}")
    if out["n_dn"] > MAX_DN:
        raise DataError(f"option n_dn must be <= {MAX_DN}")
    return out


def build_orn_layer(pn_ids: np.ndarray, pn_glomeruli: np.ndarray, options: Mapping) -> Tuple[NeuronTable, EdgeTable]:
    """Model ORN populations for the glomeruli of ``pn_glomeruli`` and their ORN->PN edges."""
    opts = check_model_options(options)
    per = opts["orn_per_glomerulus"]
    rows = load_glomeruli()
    index = {g: i for i, (g, _, _) in enumerate(rows)}
    info = {g: (r, n) for g, r, n in rows}
    known_counts = np.array([n for _, _, n in rows if np.isfinite(n)])
    median = float(np.median(known_counts)) if known_counts.size else 1.0
    pn_glomeruli = np.asarray([normalize_glomerulus(g) for g in np.asarray(pn_glomeruli).tolist()], dtype=object)
    gloms = sorted({g for g in pn_glomeruli.tolist() if g})
    unknown = [g for g in gloms if g not in index]
    gindex = dict(index)
    for j, g in enumerate(sorted(unknown)):
        gindex[g] = len(rows) + j
    ids, types, gl, rec = [], [], [], []
    pre, post, cnt = [], [], []
    pn_ids = np.asarray(pn_ids, dtype=np.int64)
    for g in gloms:
        receptor, n_exp = info.get(g, ("", float("nan")))
        if not np.isfinite(n_exp):
            n_exp = median
        count = max(1, int(round(opts["orn_pn_synapses_per_orn"] * n_exp / per)))
        targets = pn_ids[pn_glomeruli == g]
        for k in range(per):
            oid = -(ORN_ID_BASE + 1000 * gindex[g] + k)
            ids.append(oid)
            types.append(f"ORN_{g}")
            gl.append(g)
            rec.append(receptor)
            pre.extend([oid] * targets.size)
            post.extend(targets.tolist())
            cnt.extend([count] * targets.size)
    n = len(ids)
    table = NeuronTable(
        id=np.array(ids, dtype=np.int64), layer=np.full(n, "ORN"), sign=np.ones(n, np.int8),
        cell_type=np.array(types, dtype=str) if n else None, transmitter=np.full(n, "acetylcholine"),
        glomerulus=np.array(gl, dtype=str) if n else None, receptor=np.array(rec, dtype=str) if n else None,
    )
    return table, EdgeTable(np.array(pre, np.int64), np.array(post, np.int64), np.array(cnt, np.int32))


def build_dn_layer(mbon_ids: Iterable[int], options: Mapping) -> Tuple[NeuronTable, EdgeTable]:
    """``n_dn`` model descending neurons with an all-to-all MBON->DN mask."""
    opts = check_model_options(options)
    n = opts["n_dn"]
    ids = -(np.arange(n, dtype=np.int64) + 1)
    table = NeuronTable(
        id=ids, layer=np.full(n, "DN"), sign=np.ones(n, np.int8),
        cell_type=np.array([f"DN_model_{k}" for k in range(n)]), transmitter=np.full(n, "acetylcholine"),
    )
    mbon_ids = np.asarray(list(mbon_ids), dtype=np.int64)
    pre = np.repeat(mbon_ids, n)
    post = np.tile(ids, mbon_ids.size)
    return table, EdgeTable(pre, post, np.full(pre.size, opts["dn_synapses"], np.int32))


def add_model_layers(neurons: NeuronTable, edges: EdgeTable, layers, options: Mapping,
                     provenance: Dict[Tuple[str, str], str]) -> Tuple[NeuronTable, EdgeTable]:
    """Append the ORN and/or DN model layers when requested; label their projections 'model'."""
    extra_n, extra_e = [neurons], [edges]
    if "ORN" in layers:
        pn = neurons.layer == "PN"
        if not np.any(pn):
            raise DataError("the ORN model layer needs PNs with glomeruli in the source")
        t, e = build_orn_layer(neurons.id[pn], neurons.glomerulus[pn], options)
        extra_n.append(t)
        extra_e.append(e)
        provenance[("ORN", "PN")] = "model"
    if "DN" in layers:
        mb = neurons.layer == "MBON"
        if not np.any(mb):
            raise DataError("the DN model layer needs MBONs in the source")
        t, e = build_dn_layer(neurons.id[mb], options)
        extra_n.append(t)
        extra_e.append(e)
        provenance[("MBON", "DN")] = "model"
    return NeuronTable.concat(extra_n), EdgeTable.concat(extra_e)
