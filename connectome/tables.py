"""Columnar neuron / edge tables and the circuit object built on them.

Tables are struct-of-arrays with explicit dtypes (as flyvis does):

* :class:`NeuronTable` -- essential columns ``id`` (int64), ``layer`` (str),
  ``sign`` (int8, +1 excitatory / -1 inhibitory / 0 modulatory); convenience
  columns ``cell_type``, ``transmitter``, ``glomerulus``, ``receptor``, ``side``
  (str arrays, ``""`` where unknown).
* :class:`EdgeTable` -- essential columns ``pre_id``, ``post_id`` (int64) and
  ``count`` (int32 synapses per neuron pair); convenience columns
  ``pre_layer``/``post_layer`` are derived on demand by
  :class:`OlfactoryCircuitData`.

:class:`OlfactoryCircuitData` is what :meth:`FlyWireConnectome.fetch_olfactory_circuit`
returns. ``neurons`` / ``synapses`` give the seed's object view
(:class:`NeuronMetadata`, :class:`SynapseConnection`), built lazily from the
tables, so that 15M edges cost ~200 MB of arrays and no Python objects.

Neuron order: within a layer, neurons are sorted by (glomerulus, cell_type, id)
(see :func:`layer_sort_order`). That order is the neuron index order of that
population everywhere (:meth:`OlfactoryCircuitData.layer_ids`,
:meth:`~OlfactoryCircuitData.count_matrix`, ...).
"""
from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError
from .views import NeuronMetadata, NeuronView, SynapseConnection, SynapseView, neuron_row

#: Every layer name the data layer knows, in canonical (feed-forward) order.
LAYERS: Tuple[str, ...] = ("ORN", "PN", "KC", "APL", "MBON", "DN", "DAN")
_LAYER_BY_LOWER = {name.lower(): name for name in LAYERS}
#: Layers used when none are given.
DEFAULT_LAYERS: Tuple[str, ...] = ("ORN", "PN", "KC", "MBON", "DN")
#: Allowed provenance labels of a projection.
PROVENANCES: Tuple[str, ...] = (
    "flywire_v783", "hemibrain_v1.2.1", "codex", "cave", "model", "synthetic",
)

#: Dale's law: transmitter -> sign of the fast synaptic effect.
#: Glutamate is inhibitory in the fly CNS (GluClalpha; Liu & Wilson 2013).
TRANSMITTER_SIGN: Dict[str, int] = {
    "acetylcholine": 1,
    "gaba": -1,
    "glutamate": -1,
    "dopamine": 0,
    "serotonin": 0,
    "octopamine": 0,
    "tyramine": 0,
    "unknown": 0,
}
_TRANSMITTER_ALIASES = {
    "ach": "acetylcholine", "acetylcholine": "acetylcholine", "cholinergic": "acetylcholine",
    "gaba": "gaba", "gabaergic": "gaba",
    "glut": "glutamate", "glutamate": "glutamate", "glu": "glutamate", "glutamatergic": "glutamate",
    "da": "dopamine", "dopamine": "dopamine",
    "ser": "serotonin", "5ht": "serotonin", "serotonin": "serotonin",
    "oct": "octopamine", "octopamine": "octopamine",
    "tyr": "tyramine", "tyramine": "tyramine",
    "": "unknown", "nan": "unknown", "none": "unknown", "unknown": "unknown",
}


def normalize_transmitter(name: str) -> str:
    """Map 'ACH', 'acetylcholine', 'GLUT', ... onto the keys of :data:`TRANSMITTER_SIGN`."""
    key = str(name).strip().lower()
    if key not in _TRANSMITTER_ALIASES:
        raise DataError(f"unknown neurotransmitter {name!r}; known: {sorted(set(_TRANSMITTER_ALIASES.values()))}")
    return _TRANSMITTER_ALIASES[key]


def canonical_layer(name: str) -> str:
    """Layer name in canonical spelling ('orn' -> 'ORN'); unknown names pass through unchanged."""
    name = str(name).strip()
    return _LAYER_BY_LOWER.get(name.lower(), name)


def check_layers(layers: Sequence[str]) -> Tuple[str, ...]:
    """Validate layer names (unknown -> DataError naming it and listing valid ones)."""
    if isinstance(layers, str):
        layers = [s for s in layers.split(",") if s.strip()]
    out: List[str] = []
    for name in layers:
        name = canonical_layer(name)
        if name not in LAYERS:
            raise DataError(f"unknown layer {name!r}; valid layers: {', '.join(LAYERS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise DataError(f"no layers selected; valid layers: {', '.join(LAYERS)}")
    return tuple(out)


@dataclass(frozen=True)
class ProjectionInfo:
    """Summary of all edges from one layer to another."""

    pre: str
    post: str
    n_edges: int
    n_synapses: int
    density: float
    n_excitatory_edges: int
    n_inhibitory_edges: int
    provenance: str

    def to_dict(self) -> Dict[str, object]:
        return {
            "pre": self.pre, "post": self.post, "n_edges": self.n_edges,
            "n_synapses": self.n_synapses, "density": self.density,
            "n_excitatory_edges": self.n_excitatory_edges,
            "n_inhibitory_edges": self.n_inhibitory_edges,
            "provenance": self.provenance,
            "model_assumption": self.provenance == "model",
        }


_STR_COLUMNS = ("layer", "cell_type", "transmitter", "glomerulus", "receptor", "side")


def _str_array(values, n: int, name: str) -> np.ndarray:
    if values is None:
        return np.full(n, "", dtype="<U1")
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise DataError(f"neuron table: column {name} has shape {arr.shape}, expected ({n},)")
    if arr.dtype.kind != "U":
        arr = np.asarray(["" if v is None else str(v) for v in arr.tolist()], dtype=str)
        if arr.size == 0:
            arr = np.zeros(0, dtype="<U1")
    return arr


@dataclass
class NeuronTable:
    """Struct-of-arrays neuron table.

    [Essential fields] ``id`` int64, ``layer`` str, ``sign`` int8.
    [Convenience fields] ``cell_type``, ``transmitter``, ``glomerulus``,
    ``receptor``, ``side`` (str, "" where unknown), ``position`` float64 [n, 3]
    (NaN where unknown).
    """

    id: np.ndarray
    layer: np.ndarray
    sign: np.ndarray
    cell_type: np.ndarray = None
    transmitter: np.ndarray = None
    glomerulus: np.ndarray = None
    receptor: np.ndarray = None
    side: np.ndarray = None
    position: np.ndarray = None

    def __post_init__(self) -> None:
        self.id = np.asarray(self.id, dtype=np.int64).reshape(-1)
        n = self.id.shape[0]
        for name in _STR_COLUMNS:
            setattr(self, name, _str_array(getattr(self, name), n, name))
        self.sign = np.asarray(self.sign, dtype=np.int8).reshape(-1)
        if self.sign.shape != (n,):
            raise DataError(f"neuron table: column sign has shape {self.sign.shape}, expected ({n},)")
        if np.any((self.sign < -1) | (self.sign > 1)):
            raise DataError("neuron table: sign must be -1, 0 or +1")
        if self.position is None:
            self.position = np.full((n, 3), np.nan)
        self.position = np.asarray(self.position, dtype=np.float64)
        if self.position.shape != (n, 3):
            raise DataError(f"neuron table: position has shape {self.position.shape}, expected ({n}, 3)")
        if n and np.unique(self.id).size != n:
            dup = self.id[np.argsort(self.id)]
            dup = dup[1:][dup[1:] == dup[:-1]][0]
            raise DataError(f"neuron table: duplicate neuron id {int(dup)}")
        bad = sorted(set(self.layer.tolist()) - set(LAYERS))
        if bad:
            raise DataError(f"neuron table: unknown layer {bad[0]!r}; valid layers: {', '.join(LAYERS)}")

    def __len__(self) -> int:
        return int(self.id.shape[0])

    def columns(self) -> Dict[str, np.ndarray]:
        out = {"id": self.id, "sign": self.sign, "position": self.position}
        out.update({name: getattr(self, name) for name in _STR_COLUMNS})
        return out

    def take(self, index: np.ndarray) -> "NeuronTable":
        return NeuronTable(**{k: v[index] for k, v in self.columns().items()})

    @staticmethod
    def concat(tables: Sequence["NeuronTable"]) -> "NeuronTable":
        tables = [t for t in tables if t is not None]
        if not tables:
            return NeuronTable(id=np.zeros(0, np.int64), layer=np.zeros(0, "<U1"), sign=np.zeros(0, np.int8))
        cols = {}
        for k in tables[0].columns():
            cols[k] = np.concatenate([t.columns()[k] for t in tables])
        return NeuronTable(**cols)


@dataclass
class EdgeTable:
    """Struct-of-arrays edge table.

    [Essential fields] ``pre_id``, ``post_id`` int64; ``count`` int32 (> 0).
    Pairs are unique.
    """

    pre_id: np.ndarray
    post_id: np.ndarray
    count: np.ndarray

    def __post_init__(self) -> None:
        self.pre_id = np.asarray(self.pre_id, dtype=np.int64).reshape(-1)
        self.post_id = np.asarray(self.post_id, dtype=np.int64).reshape(-1)
        count = np.asarray(self.count).reshape(-1)
        if count.dtype.kind == "f" and not np.all(np.isfinite(count)):
            raise DataError("edge table: synapse counts contain NaN/Inf")
        if count.size and (np.any(count < np.iinfo(np.int32).min) or np.any(count > np.iinfo(np.int32).max)):
            raise DataError(f"edge table: a synapse count exceeds the int32 range (max {count.max()})")
        self.count = count.astype(np.int32)
        n = self.pre_id.shape[0]
        if self.post_id.shape != (n,) or self.count.shape != (n,):
            raise DataError(
                f"edge table: column lengths differ (pre_id {n}, post_id {self.post_id.shape[0]}, count {self.count.shape[0]})")
        if n and self.count.min() <= 0:
            raise DataError("edge table: synapse counts must be positive")

    def __len__(self) -> int:
        return int(self.pre_id.shape[0])

    def columns(self) -> Dict[str, np.ndarray]:
        return {"pre_id": self.pre_id, "post_id": self.post_id, "count": self.count}

    def take(self, index) -> "EdgeTable":
        return EdgeTable(self.pre_id[index], self.post_id[index], self.count[index])

    @staticmethod
    def concat(tables: Sequence["EdgeTable"]) -> "EdgeTable":
        tables = [t for t in tables if t is not None]
        if not tables:
            return EdgeTable(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32))
        return EdgeTable(
            np.concatenate([t.pre_id for t in tables]),
            np.concatenate([t.post_id for t in tables]),
            np.concatenate([t.count for t in tables]),
        )

    @staticmethod
    def aggregate(pre_id, post_id, count) -> "EdgeTable":
        """Sum counts over duplicate (pre, post) pairs (e.g. per-ROI rows), sorted by pair."""
        pre_id = np.asarray(pre_id, dtype=np.int64)
        post_id = np.asarray(post_id, dtype=np.int64)
        count = np.asarray(count, dtype=np.int64)
        if pre_id.size == 0:
            return EdgeTable(pre_id, post_id, count)
        order = np.lexsort((post_id, pre_id))
        pre_s, post_s, cnt_s = pre_id[order], post_id[order], count[order]
        new = np.empty(pre_s.size, dtype=bool)
        new[0] = True
        new[1:] = (pre_s[1:] != pre_s[:-1]) | (post_s[1:] != post_s[:-1])
        starts = np.flatnonzero(new)
        sums = np.add.reduceat(cnt_s, starts)
        keep = sums > 0
        return EdgeTable(pre_s[starts][keep], post_s[starts][keep], sums[keep])


def layer_sort_order(table: NeuronTable) -> np.ndarray:
    """Index order: by canonical layer, then glomerulus, cell type, id."""
    rank_map = {name: i for i, name in enumerate(LAYERS)}
    layer_rank = np.fromiter((rank_map[x] for x in table.layer.tolist()), dtype=np.int64, count=len(table))
    return np.lexsort((table.id, table.cell_type, table.glomerulus, layer_rank))


class OlfactoryCircuitData:
    """The selected olfactory circuit: neuron and edge tables plus per-projection provenance.

    Args:
        neuron_table: all neurons of the selected layers (any order; re-sorted here).
        edge_table: edges among them (edges touching other neurons are dropped).
        layers: the selected layer names (validated, order as requested).
        provenance: {(pre_layer, post_layer): label} for projections that have edges.
            A pair without an entry gets ``default_provenance``.
        source, version: where the data came from.
        default_provenance: label for pairs not in ``provenance``.
        metadata: JSON-able extra info (model-layer options, citations).
    """

    def __init__(self, neuron_table: NeuronTable, edge_table: EdgeTable, layers: Sequence[str],
                 provenance: Mapping[Tuple[str, str], str], source: str, version: str,
                 default_provenance: str, metadata: Optional[Mapping] = None):
        self.layers = check_layers(layers)
        missing = [l for l in self.layers if not np.any(neuron_table.layer == l)]
        if missing:
            raise DataError(f"source {source}: layer {missing[0]} has no neurons")
        keep_n = np.isin(neuron_table.layer, np.array(self.layers))
        t = neuron_table.take(np.flatnonzero(keep_n))
        self.neuron_table = t.take(layer_sort_order(t))
        self._sorted_ids_order = np.argsort(self.neuron_table.id, kind="stable")
        self._sorted_ids = self.neuron_table.id[self._sorted_ids_order]
        n_ids = self._sorted_ids.size
        self._contiguous = bool(n_ids) and int(self._sorted_ids[-1] - self._sorted_ids[0]) == n_ids - 1
        pre_idx = self.index_of(edge_table.pre_id)
        post_idx = self.index_of(edge_table.post_id)
        keep = (pre_idx >= 0) & (post_idx >= 0)
        if not keep.all():
            edge_table = edge_table.take(np.flatnonzero(keep))
            pre_idx, post_idx = pre_idx[keep], post_idx[keep]
        self.edge_table = edge_table
        idx_dtype = np.int32 if len(self.neuron_table) < 2**31 - 1 else np.int64
        self._pre_idx = pre_idx.astype(idx_dtype)
        self._post_idx = post_idx.astype(idx_dtype)
        rank = {name: i for i, name in enumerate(LAYERS)}
        self._layer_code = np.fromiter((rank[x] for x in self.neuron_table.layer.tolist()),
                                       dtype=np.int8, count=len(self.neuron_table))
        self._layer_start: Dict[str, int] = {}
        for name in LAYERS:
            pos = np.flatnonzero(self._layer_code == rank[name])
            if pos.size:
                self._layer_start[name] = int(pos[0])
        self.source = str(source)
        self.version = str(version)
        self.default_provenance = default_provenance
        self._provenance = {tuple(k): str(v) for k, v in provenance.items()}
        for v in list(self._provenance.values()) + [default_provenance]:
            if v not in PROVENANCES:
                raise DataError(f"unknown provenance {v!r}; known: {', '.join(PROVENANCES)}")
        self.metadata = dict(metadata or {})
        self._projections: Optional[List[ProjectionInfo]] = None

    # ----------------------------------------------------------------- lookup
    def index_of(self, ids) -> np.ndarray:
        """Row index in :attr:`neuron_table` of each id (-1 where absent)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._sorted_ids.size == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        if self._contiguous:  # ids are first..first+n-1: index arithmetic, no search
            pos = ids - self._sorted_ids[0]
            ok = (pos >= 0) & (pos < self._sorted_ids.size)
            out = np.full(ids.shape, -1, dtype=np.int64)
            out[ok] = self._sorted_ids_order[pos[ok]]
            return out
        pos = np.searchsorted(self._sorted_ids, ids)
        pos = np.clip(pos, 0, self._sorted_ids.size - 1)
        found = self._sorted_ids[pos] == ids
        return np.where(found, self._sorted_ids_order[pos], -1).astype(np.int64)

    def _check_layer(self, layer: str) -> str:
        check_layers([layer])
        if layer not in self.layers:
            raise DataError(f"layer {layer!r} is not in this circuit (selected: {', '.join(self.layers)})")
        return layer

    def _slice(self, layer: str) -> slice:
        self._check_layer(layer)
        start = self._layer_start[layer]
        return slice(start, start + self.layer_sizes[layer])

    # ----------------------------------------------------------- seed API
    #: Keys of the design document's mapping view (``connectome['neurons']``).
    MAPPING_KEYS: Tuple[str, ...] = ("neurons", "synapses", "layer_sizes", "total_synapses", "source", "version",
                                     "layers")

    def __getitem__(self, key: str):
        """``data['neurons']``, ``data['layer_sizes']``, ... (the design document's dict view)."""
        if key not in self.MAPPING_KEYS:
            raise KeyError(f"{key!r}; OlfactoryCircuitData keys: {', '.join(self.MAPPING_KEYS)}")
        return getattr(self, key)

    @property
    def layer_sizes(self) -> Dict[str, int]:
        return {name: int(np.count_nonzero(self.neuron_table.layer == name)) for name in self.layers}

    @property
    def total_synapses(self) -> int:
        return int(self.edge_table.count.sum(dtype=np.int64))

    @property
    def neurons(self) -> Mapping[int, NeuronMetadata]:
        return NeuronView(self.neuron_table, self.index_of)

    @property
    def synapses(self) -> Sequence[SynapseConnection]:
        return SynapseView(self.edge_table)

    # ------------------------------------------------------ circuit builder API
    def layer_ids(self, layer: str) -> np.ndarray:
        """Neuron ids of ``layer`` (int64) in the population's index order."""
        return self.neuron_table.id[self._slice(layer)].copy()

    def layer_neurons(self, layer: str) -> List[NeuronMetadata]:
        s = self._slice(layer)
        return [neuron_row(self.neuron_table, i) for i in range(s.start, s.stop)]

    def layer_column(self, layer: str, column: str) -> np.ndarray:
        """A neuron-table column (e.g. 'glomerulus', 'cell_type') for ``layer`` in index order."""
        cols = self.neuron_table.columns()
        if column not in cols:
            raise DataError(f"unknown neuron column {column!r}; known: {', '.join(cols)}")
        return cols[column][self._slice(layer)].copy()

    def _edge_select(self, pre_layer: str, post_layer: str):
        sp, so = self._slice(pre_layer), self._slice(post_layer)
        sel = ((self._pre_idx >= sp.start) & (self._pre_idx < sp.stop)
               & (self._post_idx >= so.start) & (self._post_idx < so.stop))
        sel = np.flatnonzero(sel)
        return sel, self._pre_idx[sel] - sp.start, self._post_idx[sel] - so.start

    def edges_between(self, pre_layer: str, post_layer: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pre_index, post_index, count) of the edges pre_layer -> post_layer (layer-local indices)."""
        sel, pi, qi = self._edge_select(pre_layer, post_layer)
        return pi.astype(np.int64), qi.astype(np.int64), self.edge_table.count[sel].copy()

    def count_matrix(self, pre_layer: str, post_layer: str) -> np.ndarray:
        """Synapse counts as float64 ``[n_post, n_pre]`` (0 = no edge)."""
        pi, qi, cnt = self.edges_between(pre_layer, post_layer)
        m = np.zeros((self.layer_sizes[post_layer], self.layer_sizes[pre_layer]), dtype=np.float64)
        np.add.at(m, (qi, pi), cnt.astype(np.float64))
        return m

    def presynaptic_sign(self, layer: str) -> np.ndarray:
        """Dale's-law sign of each neuron of ``layer`` as float64 in {-1, +1}.

        Raises DataError when the layer holds modulatory neurons (sign 0, e.g.
        dopaminergic DANs): they have no fast excitatory/inhibitory effect.
        """
        s = self._slice(layer)
        sign = self.neuron_table.sign[s].astype(np.float64)
        if np.any(sign == 0):
            i = s.start + int(np.flatnonzero(sign == 0)[0])
            raise DataError(
                f"layer {layer} has modulatory neurons (e.g. id {int(self.neuron_table.id[i])}, "
                f"transmitter {self.neuron_table.transmitter[i] or 'unknown'}): no fast synaptic sign; "
                f"do not use it as a presynaptic layer")
        return sign

    def provenance(self, pre_layer: str, post_layer: str) -> str:
        self._check_layer(pre_layer)
        self._check_layer(post_layer)
        return self._provenance.get((pre_layer, post_layer), self.default_provenance)

    @property
    def projections(self) -> List[ProjectionInfo]:
        """One :class:`ProjectionInfo` per layer pair with edges, in canonical layer order."""
        if self._projections is None:
            out = []
            ordered = [l for l in LAYERS if l in self.layers]
            pre_code = self._layer_code[self._pre_idx]
            post_code = self._layer_code[self._post_idx]
            rank = {name: i for i, name in enumerate(LAYERS)}
            pair = pre_code.astype(np.int64) * len(LAYERS) + post_code
            present = set(np.unique(pair).tolist())
            esign = self.neuron_table.sign[self._pre_idx]
            for a in ordered:
                for b in ordered:
                    code = rank[a] * len(LAYERS) + rank[b]
                    if code not in present:
                        continue
                    sel = pair == code
                    n_e = int(np.count_nonzero(sel))
                    n_s = int(self.edge_table.count[sel].sum(dtype=np.int64))
                    sz = self.layer_sizes
                    out.append(ProjectionInfo(
                        pre=a, post=b, n_edges=n_e, n_synapses=n_s,
                        density=float(n_e) / float(sz[a] * sz[b]),
                        n_excitatory_edges=int(np.count_nonzero(esign[sel] > 0)),
                        n_inhibitory_edges=int(np.count_nonzero(esign[sel] < 0)),
                        provenance=self.provenance(a, b)))
            self._projections = out
        return list(self._projections)

    # ------------------------------------------------------------ export
    def to_tables(self, out_dir) -> Tuple[Path, Path]:
        """Write ``neurons.csv`` and ``edges.csv`` into ``out_dir`` atomically.

        Stores:
            neurons.csv: id, layer, cell_type, transmitter, sign, glomerulus, receptor, side
            edges.csv: pre_id, post_id, count, pre_layer, post_layer, provenance
        Both files are written to temporary names first and renamed only when
        both are complete, so an error never leaves a partial file.
        """
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot create output directory {out}: {exc.strerror or exc}") from None
        t = self.neuron_table
        ncols = ["id", "layer", "cell_type", "transmitter", "sign", "glomerulus", "receptor", "side"]
        layer_of = t.layer
        pre_l = layer_of[self._pre_idx]
        post_l = layer_of[self._post_idx]
        prov = np.array([self.provenance(a, b) for a, b in zip(pre_l.tolist(), post_l.tolist())], dtype=str) \
            if len(self.edge_table) < 100_000 else self._edge_provenance(pre_l, post_l)
        tmp_files = []
        try:
            n_tmp = _write_csv_tmp(out, "neurons.csv", ncols,
                                   [t.id, t.layer, t.cell_type, t.transmitter, t.sign, t.glomerulus, t.receptor, t.side])
            tmp_files.append(n_tmp)
            e = self.edge_table
            e_tmp = _write_csv_tmp(out, "edges.csv", ["pre_id", "post_id", "count", "pre_layer", "post_layer", "provenance"],
                                   [e.pre_id, e.post_id, e.count, pre_l, post_l, prov])
            tmp_files.append(e_tmp)
            os.replace(n_tmp, out / "neurons.csv")
            os.replace(e_tmp, out / "edges.csv")
            tmp_files = []
        except OSError as exc:
            raise DataError(f"cannot write tables into {out}: {exc.strerror or exc}") from None
        finally:
            for f in tmp_files:
                try:
                    os.unlink(f)
                except OSError:
                    pass
        return out / "neurons.csv", out / "edges.csv"

    def _edge_provenance(self, pre_l, post_l) -> np.ndarray:
        prov = np.full(pre_l.shape, self.default_provenance, dtype="<U16")
        for (a, b), v in self._provenance.items():
            prov[(pre_l == a) & (post_l == b)] = v
        return prov

    def summary(self) -> Dict[str, object]:
        """The JSON object printed by ``connectome info --json``."""
        return {
            "source": self.source,
            "version": self.version,
            "layers": {name: {"n": self.layer_sizes[name]} for name in self.layers},
            "projections": [p.to_dict() for p in self.projections],
        }

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.layer_sizes.items())
        return (f"OlfactoryCircuitData(source={self.source!r}, version={self.version!r}, {sizes}, "
                f"edges={len(self.edge_table)}, synapses={self.total_synapses})")


def _write_csv_tmp(out: Path, name: str, header: Sequence[str], columns: Sequence[np.ndarray]) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            n = len(columns[0])
            for start in range(0, n, 65536):
                chunk = [c[start:start + 65536].tolist() for c in columns]
                w.writerows(zip(*chunk))
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp
