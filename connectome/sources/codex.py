"""FlyWire Codex CSV exports on disk (``codex:DIR``).

Files (as published at codex.flywire.ai/api/download, release 783), ``.csv.gz`` or ``.csv``:

* ``neurons``: root_id, group, nt_type, nt_type_score, ... (nt_type: ACH, GABA, GLUT, DA, SER, OCT)
* ``classification``: root_id, flow, super_class, class, sub_class, cell_type,
  hemibrain_type, hemilineage, side, nerve
* ``consolidated_cell_types`` (optional): root_id, primary_type, additional_type(s);
  primary_type overrides classification.cell_type where given
* ``connections``: pre_root_id, post_root_id, neuropil, syn_count, nt_type
  (one row per neuropil; counts are summed per pair; Codex applies >= 5 synapses)

Selection by annotation: see :mod:`connectome.sources._select`. Every projection,
including the real ORN->PN and MBON->DN edges, carries provenance 'codex'.
Options: side ('right'), all_alpn (False), dn_min_synapses (10), min_synapses (5, pair threshold),
version ('v783').
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from ..tables import EdgeTable, NeuronTable, OlfactoryCircuitData
from ._csv import iter_rows, read_columns, to_int
from ._options import check_option_names
from ._select import classify, glomerulus_of, select_dns, transmitters

OPTIONS = {"directory": None, "side": "right", "all_alpn": False, "dn_min_synapses": 10, "min_synapses": 5,
           "version": "v783"}
FILES = ("neurons", "classification", "consolidated_cell_types", "connections")


def _find(d: Path, stem: str, required: bool = True):
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        if (d / name).is_file():
            return d / name
    if required:
        raise DataError(f"codex directory {d}: missing {stem}.csv.gz")
    return None


def load_codex(layers: Sequence[str], **options) -> OlfactoryCircuitData:
    check_option_names("codex", options, OPTIONS)
    opts = {**OPTIONS, **options}
    d = Path(str(opts["directory"]))
    if not d.exists():
        raise DataError(f"codex directory not found: {d}")
    if not d.is_dir():
        raise DataError(f"codex path is not a directory: {d}")
    for key in ("dn_min_synapses", "min_synapses"):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise DataError(f"source codex: option {key} must be a positive integer, got {v!r}")
    f_neu, f_cls, f_con = _find(d, "neurons"), _find(d, "classification"), _find(d, "connections")
    f_cct = _find(d, "consolidated_cell_types", required=False)

    cls = read_columns(f_cls, ["root_id", "super_class", "class", "cell_type", "side"],
                       optional=["sub_class", "flow", "hemibrain_type", "nerve"])
    ids = to_int(cls["root_id"], f_cls, "root_id")
    n = ids.size
    if np.unique(ids).size != n:
        raise DataError(f"{f_cls}: duplicate root_id")
    ctype = np.array(cls["cell_type"], dtype=str)
    if f_cct is not None:
        cc = read_columns(f_cct, ["root_id", "primary_type"], allow_empty=True)
        cid = to_int(cc.get("root_id", []), f_cct, "root_id")
        prim = dict(zip(cid.tolist(), cc.get("primary_type", [])))
        ctype = np.array([prim.get(i) or t for i, t in zip(ids.tolist(), ctype.tolist())], dtype=str)
    layer = classify(cls["super_class"], cls["class"], cls.get("sub_class", [""] * n), ctype, cls["side"],
                     opts["side"], bool(opts["all_alpn"]))
    neu = read_columns(f_neu, ["root_id", "nt_type"])
    nid = to_int(neu["root_id"], f_neu, "root_id")
    nt_of = dict(zip(nid.tolist(), neu["nt_type"]))

    # connections: stream, keep rows among candidate neurons, sum over neuropils
    cand_ids = np.sort(ids[layer != ""])
    pre_l, post_l, cnt_l = [], [], []
    for header, rows in iter_rows(f_con, ["pre_root_id", "post_root_id", "syn_count"]):
        if not rows:
            continue
        jp, jq, jc = (header.index(c) for c in ("pre_root_id", "post_root_id", "syn_count"))
        pre = to_int([r[jp] for r in rows], f_con, "pre_root_id")
        post = to_int([r[jq] for r in rows], f_con, "post_root_id")
        cnt = to_int([r[jc] for r in rows], f_con, "syn_count", dtype=np.int32, minimum=0)
        keep = np.isin(pre, cand_ids) & np.isin(post, cand_ids)
        pre_l.append(pre[keep]), post_l.append(post[keep]), cnt_l.append(cnt[keep])
    if not pre_l:
        raise DataError(f"{f_con}: file has a header but no rows")
    edges = EdgeTable.aggregate(np.concatenate(pre_l), np.concatenate(post_l), np.concatenate(cnt_l))
    edges = edges.take(np.flatnonzero(edges.count >= int(opts["min_synapses"])))

    layer = select_dns(layer, ids, edges.pre_id, edges.post_id, edges.count, int(opts["dn_min_synapses"]))
    sel = np.flatnonzero(layer != "")
    ids, layer, ctype = ids[sel], layer[sel], ctype[sel]
    nts, sign = transmitters(layer, ctype, [nt_of.get(i, "") for i in ids.tolist()])
    neurons = NeuronTable(id=ids, layer=layer, sign=sign, cell_type=ctype, transmitter=nts,
                          glomerulus=glomerulus_of(layer, ctype), side=np.array(cls["side"], dtype=str)[sel])
    for l in layers:
        if not np.any(layer == l):
            raise DataError(f"codex directory {d}: no neurons of layer {l} found (side={opts['side']})")
    return OlfactoryCircuitData(neurons, edges, layers, {}, source=f"codex:{d}", version=str(opts["version"]),
                                default_provenance="codex",
                                metadata={"side": opts["side"], "dn_min_synapses": int(opts["dn_min_synapses"])})
