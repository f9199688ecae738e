"""Bundled offline sources: FlyWire v783 and hemibrain v1.2.1 mushroom-body subgraphs.

``flywire_v783_mb`` (default): connectome/data/flywire_v783_mb (CC BY-NC 4.0).
    Layers from ``cell_class``: ALPN -> PN (124), Kenyon_Cell -> KC (2597),
    MBIN with cell_type APL -> APL (1), MBON -> MBON (48), DAN -> DAN (165).
    Transmitter and sign from the table (Eckstein et al. 2024 predictions or
    known transmitters). Real edges (pair threshold >= 5 synapses) carry
    provenance 'flywire_v783'.
``hemibrain_v1.2.1_mb``: connectome/data/hemibrain_v1.2.1_mb (CC BY 4.0).
    Layers from ``cell_type``: ``*PN`` -> PN, ``KC*`` -> KC, ``APL`` -> APL,
    ``MBON*`` -> MBON. Counts are summed over ROIs per pair. Signs by cell type
    (no transmitter column): PN, KC acetylcholine; APL GABA; MBONs from the
    ``mbon_transmitters`` table of cell_types.yaml (Aso et al. 2014).
    Provenance 'hemibrain_v1.2.1'.
Both add the model ORN and DN layers (see :mod:`connectome.sources.model`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np

from ..errors import DataError
from ..tables import TRANSMITTER_SIGN, EdgeTable, NeuronTable, OlfactoryCircuitData, normalize_transmitter
from ._csv import read_columns, to_int
from ._options import check_option_names
from .model import MODEL_OPTIONS, add_model_layers, check_model_options, normalize_glomerulus

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

_FLYWIRE_CLASS = {"ALPN": "PN", "Kenyon_Cell": "KC", "MBON": "MBON", "DAN": "DAN"}


#: Options of both bundled sources (the model layers' plus ``data_dir``, another copy of the data), with defaults.
OPTIONS = {**MODEL_OPTIONS, "data_dir": None}
#: What ``dmn-neuro train`` uses when the config names no source options (the shipped models' circuit).
TRAINING_DEFAULTS = {"orn_per_glomerulus": 8, "n_dn": 16}


def _read_edges(path: Path, pre_col: str, post_col: str) -> EdgeTable:
    e = read_columns(path, [pre_col, post_col, "syn_count"])
    return EdgeTable.aggregate(to_int(e[pre_col], path, pre_col), to_int(e[post_col], path, post_col),
                               to_int(e["syn_count"], path, "syn_count", dtype=np.int32, minimum=0))


def _with_model_layers(neurons, edges, layers, options, source: str, version: str, provenance_name: str,
                       license_: str) -> OlfactoryCircuitData:
    """Add the modelled ORN/DN layers and wrap a bundled subgraph with its provenance and license."""
    provenance: Dict[Tuple[str, str], str] = {}
    neurons, edges = add_model_layers(neurons, edges, layers, options, provenance)
    return OlfactoryCircuitData(neurons, edges, layers, provenance, source=source, version=version,
                                default_provenance=provenance_name,
                                metadata={"model_options": check_model_options(options),
                                          "model_layers": [l for l in ("ORN", "DN") if l in layers],
                                          "license": license_})


def load_flywire_v783_mb(layers: Sequence[str], data_dir=None, **options) -> OlfactoryCircuitData:
    check_option_names("flywire_v783_mb", options, MODEL_OPTIONS)
    check_model_options(options)
    d = Path(data_dir) if data_dir is not None else DATA_DIR / "flywire_v783_mb"
    cols = read_columns(d / "neurons.csv", ["root_id", "cell_class", "cell_type", "nt", "sign"],
                        optional=["glomerulus", "side", "cell_sub_class"])
    ids = to_int(cols["root_id"], d / "neurons.csv", "root_id")
    layer = []
    for cls, ctype in zip(cols["cell_class"], cols["cell_type"]):
        if cls == "MBIN" and ctype == "APL":
            layer.append("APL")
        else:
            layer.append(_FLYWIRE_CLASS.get(cls, ""))
    layer = np.array(layer, dtype=str)
    known = layer != ""
    n = ids.size
    sign = to_int(cols["sign"], d / "neurons.csv", "sign")
    transmitter = np.array([normalize_transmitter(t) for t in cols["nt"]], dtype=str)
    glom = np.array([normalize_glomerulus(g) for g in cols.get("glomerulus", [""] * n)], dtype=str)
    neurons = NeuronTable(id=ids, layer=np.where(known, layer, "KC"), sign=sign,
                          cell_type=np.array(cols["cell_type"], dtype=str), transmitter=transmitter,
                          glomerulus=glom, side=np.array(cols.get("side", [""] * n), dtype=str))
    neurons = neurons.take(np.flatnonzero(known))
    edges = _read_edges(d / "edges.csv", "pre_root_id", "post_root_id")
    return _with_model_layers(neurons, edges, layers, options, "flywire_v783_mb", "v783", "flywire_v783",
                              "CC BY-NC 4.0 (FlyWire)")


def _hemibrain_layer(cell_type: str) -> str:
    if cell_type == "APL":
        return "APL"
    if cell_type.startswith("KC"):
        return "KC"
    if cell_type.startswith("MBON"):
        return "MBON"
    if cell_type.endswith("PN"):
        return "PN"
    return ""


def load_hemibrain_v121_mb(layers: Sequence[str], data_dir=None, **options) -> OlfactoryCircuitData:
    from ..config import load_cell_types  # local: config reads YAML

    check_option_names("hemibrain_v1.2.1_mb", options, MODEL_OPTIONS)
    check_model_options(options)
    d = Path(data_dir) if data_dir is not None else DATA_DIR / "hemibrain_v1.2.1_mb"
    cols = read_columns(d / "neurons.csv", ["body_id", "cell_type"], optional=["instance"])
    ids = to_int(cols["body_id"], d / "neurons.csv", "body_id")
    ctypes = np.array([c.strip() for c in cols["cell_type"]], dtype=str)
    layer = np.array([_hemibrain_layer(c) for c in ctypes.tolist()], dtype=str)
    mbon_nt = load_cell_types().mbon_transmitters  # Aso et al. 2014 (+ FlyWire for MBON20, 24-35)
    nts = []
    for c, l in zip(ctypes.tolist(), layer.tolist()):
        if l in ("PN", "KC"):
            nts.append("acetylcholine")
        elif l == "APL":
            nts.append("gaba")
        elif l == "MBON":
            key = c.split(",")[0]
            nts.append(mbon_nt.get(key, mbon_nt.get(key.replace("-like", ""), "unknown")))
        else:
            nts.append("unknown")
    transmitter = np.array(nts, dtype=str)
    sign = np.array([TRANSMITTER_SIGN[t] for t in nts], dtype=np.int8)
    glom = np.array([normalize_glomerulus(c.rsplit("_", 1)[0]) if l == "PN" else ""
                     for c, l in zip(ctypes.tolist(), layer.tolist())], dtype=str)
    inst = cols.get("instance", [""] * ids.size)
    side = np.array(["right" if s.endswith("_R") else "left" if s.endswith("_L") else "" for s in inst], dtype=str)
    known = layer != ""
    neurons = NeuronTable(id=ids, layer=np.where(known, layer, "KC"), sign=sign, cell_type=ctypes,
                          transmitter=transmitter, glomerulus=glom, side=side).take(np.flatnonzero(known))
    edges = _read_edges(d / "edges_by_roi.csv", "pre_body_id", "post_body_id")
    if "DAN" in layers:
        raise DataError("source hemibrain_v1.2.1_mb has no DAN layer; valid here: ORN, PN, KC, APL, MBON, DN")
    return _with_model_layers(neurons, edges, layers, options, "hemibrain_v1.2.1_mb", "v1.2.1", "hemibrain_v1.2.1",
                              "CC BY 4.0 (Janelia)")
