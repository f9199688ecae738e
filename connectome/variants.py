"""Counterfactual connectomes: the same neurons, rewired, randomised or ablated.

A *variant* is a small JSON-able mapping (``connectome.variant`` of a training
config) applied to an :class:`~connectome.tables.OlfactoryCircuitData` before
the circuit is built. Every variant keeps the neurons (ids, order, cell types,
transmitters, Dale's-law signs); only the edge table changes:

``{kind: real}`` (or ``None``)
    the connectome as read.
``{kind: shuffled, seed: S, projections: [PRE->POST, ...]}``
    degree-preserving rewiring per projection by double-edge swaps: edges
    (a->x, b->y) become (a->y, b->x) when neither new pair exists already (and,
    within one layer, neither is a self-loop). Every neuron keeps its in- and
    out-degree within the projection; each edge keeps its synapse count, which
    travels with its presynaptic end. 10 swap attempts per edge.
``{kind: random, seed: S, projections: [...]}``
    the same number of edges per projection placed uniformly at random among
    all (pre, post) pairs (no self-loops within a layer); the projection's
    synapse counts are permuted onto them (same density, same count
    distribution, no structure).
``{kind: ablate, projections: [...], cell_types: [...], transmitters: [...]}``
    remove the named projections' edges, and every edge into or out of the
    named cell types (e.g. ``APL``) or transmitter classes (``gaba``: every
    GABAergic neuron; ``MBON:gaba``: the GABAergic MBONs). The ablated neurons
    stay in their populations (sizes and ids unchanged) without synapses.

``projections`` of shuffled/random defaults to every projection whose edges
come from the connectome (provenance other than ``model``: the modelled
ORN->PN and MBON->DN wiring keeps its design). Variants are deterministic
functions of (data, spec); the variant's label is appended to the data's
``version`` (``v783+shuffled(seed=3)``), so a circuit built from it records
which wiring it has, and checkpoint validation rebuilds and compares the same.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from .errors import DataError
from .tables import LAYERS, EdgeTable, OlfactoryCircuitData, canonical_layer

KINDS = ("real", "shuffled", "random", "ablate")
#: Double-edge swap attempts per edge of a shuffled projection.
SWAPS_PER_EDGE = 10
_KEYS = {"real": {"kind"}, "shuffled": {"kind", "seed", "projections"}, "random": {"kind", "seed", "projections"},
         "ablate": {"kind", "projections", "cell_types", "transmitters"}}


def _projection_name(p: Any) -> str:
    if not isinstance(p, str) or "->" not in p:
        raise DataError(f"connectome variant: a projection is written PRE->POST (e.g. APL->KC), got {p!r}")
    a, b = (canonical_layer(x) for x in p.split("->", 1))
    for x in (a, b):
        if x not in LAYERS:
            raise DataError(f"connectome variant: unknown layer {x!r} in projection {p!r} (known: {', '.join(LAYERS)})")
    return f"{a}->{b}"


def _str_list(spec: Mapping, key: str) -> List[str]:
    val = spec.get(key)
    if val is None:
        return []
    if isinstance(val, str):
        val = [val]
    if not isinstance(val, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in val):
        raise DataError(f"connectome variant: {key} must be a list of names, got {val!r}")
    return [v.strip() for v in val]


def normalize_variant(spec: Any) -> Optional[Dict[str, Any]]:
    """The canonical form of a variant spec (``None`` for the real connectome); a bad spec is a
    one-line DataError. Canonical: known keys only, lists sorted and unique, ``seed`` an int."""
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, Mapping):
        raise DataError(f"connectome variant must be a mapping with a kind ({', '.join(KINDS)}), got {spec!r}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise DataError(f"connectome variant: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    unknown = sorted(str(k) for k in set(spec) - _KEYS[kind])
    if unknown:
        raise DataError(f"connectome variant {kind}: unknown key(s) {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(_KEYS[kind]))})")
    if kind == "real":
        return None
    out: Dict[str, Any] = {"kind": kind}
    projections = sorted({_projection_name(p) for p in _str_list(spec, "projections")})
    if kind in ("shuffled", "random"):
        seed = spec.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise DataError(f"connectome variant {kind}: seed must be a non-negative integer, got {seed!r}")
        out["seed"] = int(seed)
        out["projections"] = projections or None
        return out
    out["projections"] = projections
    out["cell_types"] = sorted(set(_str_list(spec, "cell_types")))
    tx = []
    for t in _str_list(spec, "transmitters"):
        layer, _, name = t.rpartition(":")
        layer = canonical_layer(layer) if layer else ""
        if layer and layer not in LAYERS:
            raise DataError(f"connectome variant ablate: unknown layer {layer!r} in transmitters entry {t!r}")
        tx.append(f"{layer}:{name.lower()}" if layer else name.lower())
    out["transmitters"] = sorted(set(tx))
    if not (out["projections"] or out["cell_types"] or out["transmitters"]):
        raise DataError("connectome variant ablate names nothing to remove (give projections, cell_types "
                        "or transmitters)")
    return out


def variant_label(spec: Any) -> str:
    """Short canonical text of a variant (``real``, ``shuffled(seed=3)``, ``ablate(cell_types=APL)``)."""
    v = normalize_variant(spec)
    if v is None:
        return "real"
    parts = []
    for k in sorted(k for k in v if k != "kind"):
        val = v[k]
        if val is None or val == []:
            continue
        parts.append(f"{k}={','.join(val) if isinstance(val, list) else val}")
    return f"{v['kind']}({';'.join(parts)})"


def _layer_of(data: OlfactoryCircuitData, ids: np.ndarray) -> np.ndarray:
    return data.neuron_table.layer[data.index_of(ids)]


def _target_projections(data: OlfactoryCircuitData, v: Dict[str, Any]) -> List[str]:
    present = {f"{p.pre}->{p.post}": p for p in data.projections}
    if v.get("projections"):
        missing = [p for p in v["projections"] if p not in present]
        if missing:
            raise DataError(f"connectome variant {v['kind']}: projection {missing[0]} has no edges in this "
                            f"connectome ({data.source}); it has {', '.join(present)}")
        return list(v["projections"])
    return [name for name, p in present.items() if p.provenance != "model"]


def _shuffle(pre: np.ndarray, post: np.ndarray, same_layer: bool, rng: np.random.Generator) -> np.ndarray:
    """Post ids after degree-preserving double-edge swaps (pre ids and counts stay with their edge)."""
    post = post.copy()
    n = pre.size
    if n < 2:
        return post
    pre_l, post_l = pre.tolist(), post.tolist()
    keys = set(zip(pre_l, post_l))
    picks = rng.integers(0, n, size=(SWAPS_PER_EDGE * n, 2)).tolist()
    for a, b in picks:
        pa, qa, pb, qb = pre_l[a], post_l[a], pre_l[b], post_l[b]
        if pa == pb or qa == qb or (pa, qb) in keys or (pb, qa) in keys:
            continue
        if same_layer and (pa == qb or pb == qa):
            continue
        keys.discard((pa, qa))
        keys.discard((pb, qb))
        keys.add((pa, qb))
        keys.add((pb, qa))
        post_l[a], post_l[b] = qb, qa
    return np.asarray(post_l, dtype=np.int64)


def _random(pre_ids: np.ndarray, post_ids: np.ndarray, counts: np.ndarray, same_layer: bool,
            rng: np.random.Generator):
    n_pre, n_post, n = pre_ids.size, post_ids.size, counts.size
    pairs = n_pre * n_post - (min(n_pre, n_post) if same_layer else 0)
    if n > pairs:
        raise DataError(f"connectome variant random: {n} edges do not fit {pairs} pairs")
    chosen: List[int] = []
    taken = set()
    while len(chosen) < n:  # rejection of repeats and self-loops; the density is at most 1
        for f in rng.integers(0, n_pre * n_post, size=2 * (n - len(chosen)) + 8).tolist():
            if f in taken or (same_layer and pre_ids[f // n_post] == post_ids[f % n_post]):
                continue
            taken.add(f)
            chosen.append(f)
            if len(chosen) == n:
                break
    flat = np.asarray(chosen, dtype=np.int64)
    return pre_ids[flat // n_post], post_ids[flat % n_post], rng.permutation(counts)


def apply_variant(data: OlfactoryCircuitData, spec: Any) -> OlfactoryCircuitData:
    """``data`` with the variant applied (``data`` itself for the real connectome)."""
    v = normalize_variant(spec)
    if v is None:
        return data
    e = data.edge_table
    pre_layer, post_layer = _layer_of(data, e.pre_id), _layer_of(data, e.post_id)
    pair = np.char.add(np.char.add(pre_layer.astype(str), "->"), post_layer.astype(str))
    pre_id, post_id, count = e.pre_id.copy(), e.post_id.copy(), e.count.copy()
    keep = np.ones(len(e), dtype=bool)
    if v["kind"] in ("shuffled", "random"):
        seed_seq = np.random.SeedSequence([v["seed"], 0x5EED])
        for i, name in enumerate(_target_projections(data, v)):
            rng = np.random.default_rng(seed_seq.spawn(i + 1)[-1])  # one stream per projection, by position
            sel = np.flatnonzero(pair == name)
            a, b = name.split("->")
            if v["kind"] == "shuffled":
                post_id[sel] = _shuffle(pre_id[sel], post_id[sel], a == b, rng)
            else:
                pre_id[sel], post_id[sel], count[sel] = _random(data.layer_ids(a), data.layer_ids(b), count[sel],
                                                                a == b, rng)
    else:
        if v["projections"]:
            present = {f"{p.pre}->{p.post}" for p in data.projections}
            missing = [p for p in v["projections"] if p not in present]
            if missing:
                raise DataError(f"connectome variant ablate: projection {missing[0]} has no edges in this "
                                f"connectome ({data.source})")
            keep &= ~np.isin(pair, np.array(v["projections"]))
        nt = data.neuron_table
        gone = np.zeros(len(nt), dtype=bool)
        for ct in v["cell_types"]:
            hit = nt.cell_type == ct
            if not hit.any():
                raise DataError(f"connectome variant ablate: no neuron has cell type {ct!r}")
            gone |= hit
        for t in v["transmitters"]:
            layer, _, name = t.rpartition(":")
            hit = np.char.lower(nt.transmitter.astype(str)) == name
            if layer:
                hit &= nt.layer == layer
            if not hit.any():
                raise DataError(f"connectome variant ablate: no neuron matches transmitter class {t!r}")
            gone |= hit
        if gone.any():
            dead = nt.id[gone]
            keep &= ~(np.isin(e.pre_id, dead) | np.isin(e.post_id, dead))
    edges = EdgeTable(pre_id[keep], post_id[keep], count[keep])
    meta = dict(data.metadata)
    meta["variant"] = json.loads(json.dumps(v))
    return OlfactoryCircuitData(data.neuron_table, edges, data.layers, data._provenance, data.source,
                                f"{data.version}+{variant_label(v)}", data.default_provenance, meta)


__all__ = ["KINDS", "normalize_variant", "variant_label", "apply_variant", "SWAPS_PER_EDGE"]
