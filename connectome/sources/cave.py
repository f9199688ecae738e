"""Live FlyWire through caveclient (optional extra ``dmn-neuro[flywire]``).

* datastack ``flywire_fafb_public``, materialization pinned to 783;
* neurons from the annotation table ``hierarchical_neuron_annotations``
  (columns pt_root_id, classification_system, cell_type; systems super_class,
  cell_class, cell_sub_class, cell_type, side), selected as in
  :mod:`connectome.sources._select`;
* synapses from ``synapses_nt_v1`` (pre_pt_root_id, post_pt_root_id, cleft_score,
  gaba, ach, glut, oct, ser, da), cleft_score >= 50, queried in batches of
  presynaptic ids; a batch that returns ``row_limit`` rows is split and repeated,
  so no query is silently truncated; pair threshold ``min_synapses`` (5);
* a neuron's transmitter is the argmax of the mean synapse-level predictions of
  its outgoing synapses (Eckstein et al. 2024), unless known (see _select).

Authentication: caveclient reads its token from its standard place
(``~/.cloudvolume/secrets``); this module never reads, prints or logs it.
Tests inject ``client_factory`` (a callable returning a client-like object).
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Sequence

import numpy as np

from ..errors import DataError
from ..tables import EdgeTable, NeuronTable, OlfactoryCircuitData
from ._options import check_option_names
from ._select import classify, glomerulus_of, select_dns, transmitters

logger = logging.getLogger(__name__)

DATASTACK = "flywire_fafb_public"
MATERIALIZATION_VERSION = 783
ANNOTATION_TABLE = "hierarchical_neuron_annotations"
SYNAPSE_TABLE = "synapses_nt_v1"
NT_COLUMNS = {"ach": "acetylcholine", "gaba": "gaba", "glut": "glutamate", "da": "dopamine",
              "ser": "serotonin", "oct": "octopamine"}
OPTIONS = {"client_factory": None, "datastack": DATASTACK, "materialization_version": MATERIALIZATION_VERSION,
           "side": "right", "all_alpn": False, "dn_min_synapses": 10, "min_synapses": 5, "cleft_score": 50,
           "batch_size": 50, "row_limit": 500_000}


def _default_client(datastack: str):
    try:
        import caveclient
    except ImportError:
        raise DataError("source cave needs caveclient: pip install 'dmn-neuro[flywire]'") from None
    return caveclient.CAVEclient(datastack)


def _col(df, name: str, what: str) -> np.ndarray:
    try:
        return np.asarray(df[name])
    except (KeyError, IndexError):
        raise DataError(f"CAVE {what}: result has no column {name!r}") from None


def _safe(exc: BaseException) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {msg[:160]}"


def load_cave(layers: Sequence[str], **options) -> OlfactoryCircuitData:
    check_option_names("cave", options, OPTIONS)
    o = {**OPTIONS, **options}
    for key in ("batch_size", "row_limit", "min_synapses", "dn_min_synapses"):
        v = o[key]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise DataError(f"source cave: option {key} must be a positive integer, got {v!r}")
    factory: Callable = o["client_factory"] or (lambda: _default_client(o["datastack"]))
    try:
        client = factory()
    except DataError:
        raise
    except Exception as exc:  # connection / auth problems: one line, never the token
        raise DataError(f"cannot connect to CAVE datastack {o['datastack']}: {_safe(exc)}") from None
    version = int(o["materialization_version"])

    def query(table, **kw):
        try:
            return client.materialize.query_table(table, materialization_version=version, **kw)
        except Exception as exc:
            raise DataError(f"CAVE query on {table} (v{version}) failed: {_safe(exc)}") from None

    ann = query(ANNOTATION_TABLE)
    rid = _col(ann, "pt_root_id", ANNOTATION_TABLE).astype(np.int64)
    system = _col(ann, "classification_system", ANNOTATION_TABLE).astype(str)
    value = _col(ann, "cell_type", ANNOTATION_TABLE).astype(str)
    per: Dict[int, Dict[str, str]] = {}
    for r, s, v in zip(rid.tolist(), system.tolist(), value.tolist()):
        per.setdefault(r, {})[s] = v
    ids = np.array(sorted(per), dtype=np.int64)
    get = lambda key: [per[i].get(key, "") for i in ids.tolist()]  # noqa: E731
    ctype = np.array(get("cell_type"), dtype=str)
    layer = classify(get("super_class"), get("cell_class"), get("cell_sub_class"), ctype, get("side"),
                     o["side"], bool(o["all_alpn"]))
    cand = ids[layer != ""]

    pre_l: List[np.ndarray] = []
    post_l: List[np.ndarray] = []
    nt_sum: Dict[int, np.ndarray] = {}
    nt_n: Dict[int, int] = {}
    batches = [cand[i:i + o["batch_size"]] for i in range(0, cand.size, o["batch_size"])]
    cols = ["pre_pt_root_id", "post_pt_root_id", "cleft_score"] + list(NT_COLUMNS)
    n_queries = 0
    while batches:
        b = batches.pop()
        df = query(SYNAPSE_TABLE, filter_in_dict={"pre_pt_root_id": b.tolist()}, select_columns=cols,
                   limit=o["row_limit"])
        n_queries += 1
        if len(df) >= o["row_limit"]:
            if b.size == 1:
                raise DataError(f"CAVE {SYNAPSE_TABLE}: neuron {int(b[0])} alone exceeds the row limit {o['row_limit']}")
            batches += [b[: b.size // 2], b[b.size // 2:]]
            continue
        pre = _col(df, "pre_pt_root_id", SYNAPSE_TABLE).astype(np.int64)
        post = _col(df, "post_pt_root_id", SYNAPSE_TABLE).astype(np.int64)
        keep = (_col(df, "cleft_score", SYNAPSE_TABLE).astype(float) >= o["cleft_score"]) & np.isin(post, cand)
        probs = np.stack([_col(df, c, SYNAPSE_TABLE).astype(float) for c in NT_COLUMNS], axis=1)
        for i in np.unique(pre).tolist():
            m = pre == i
            nt_sum[i] = nt_sum.get(i, 0) + probs[m].sum(axis=0)
            nt_n[i] = nt_n.get(i, 0) + int(m.sum())
        pre_l.append(pre[keep])
        post_l.append(post[keep])
    logger.info("CAVE: %d synapse queries for %d candidate neurons", n_queries, cand.size)
    pre = np.concatenate(pre_l) if pre_l else np.zeros(0, np.int64)
    post = np.concatenate(post_l) if post_l else np.zeros(0, np.int64)
    edges = EdgeTable.aggregate(pre, post, np.ones(pre.size, np.int64))
    edges = edges.take(np.flatnonzero(edges.count >= o["min_synapses"]))
    layer = select_dns(layer, ids, edges.pre_id, edges.post_id, edges.count, int(o["dn_min_synapses"]))
    sel = np.flatnonzero(layer != "")
    ids, layer, ctype = ids[sel], layer[sel], ctype[sel]
    names = list(NT_COLUMNS.values())
    predicted = [names[int(np.argmax(nt_sum[i]))] if i in nt_sum else "" for i in ids.tolist()]
    nts, sign = transmitters(layer, ctype, predicted)
    side = np.array([per[i].get("side", "") for i in ids.tolist()], dtype=str)
    neurons = NeuronTable(id=ids, layer=layer, sign=sign, cell_type=ctype, transmitter=nts,
                          glomerulus=glomerulus_of(layer, ctype), side=side)
    for l in layers:
        if not np.any(layer == l):
            raise DataError(f"CAVE datastack {o['datastack']} v{version}: no neurons of layer {l} found")
    return OlfactoryCircuitData(neurons, edges, layers, {}, source="cave", version=f"v{version}",
                                default_provenance="cave",
                                metadata={"datastack": o["datastack"], "side": o["side"]})
