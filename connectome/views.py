"""The seed's object view of the circuit tables: one neuron, one synapse pair,
built lazily from the columnar tables so that 15M edges cost no Python objects."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .tables import EdgeTable, NeuronTable


class NeuronMetadata(NamedTuple):
    """One neuron (the seed's object view of a :class:`NeuronTable` row)."""

    id: int
    cell_type: str
    layer: str
    transmitter: str
    sign: int
    position: Optional[Tuple[float, float, float]] = None
    glomerulus: Optional[str] = None
    side: Optional[str] = None
    receptor: Optional[str] = None


class SynapseConnection(NamedTuple):
    """One neuron pair with its synapse count."""

    pre_id: int
    post_id: int
    count: int


class SynapseView(Sequence):
    """Lazy ``Sequence[SynapseConnection]`` over an :class:`EdgeTable`."""

    def __init__(self, edges: EdgeTable):
        self._edges = edges

    def __len__(self) -> int:
        return len(self._edges)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        e = self._edges
        return SynapseConnection(int(e.pre_id[i]), int(e.post_id[i]), int(e.count[i]))

    def __iter__(self) -> Iterator[SynapseConnection]:
        e = self._edges
        for start in range(0, len(e), 65536):
            stop = start + 65536
            for a, b, c in zip(e.pre_id[start:stop].tolist(), e.post_id[start:stop].tolist(), e.count[start:stop].tolist()):
                yield SynapseConnection(a, b, c)


class NeuronView(Mapping):
    """Lazy ``Mapping[int, NeuronMetadata]`` over a :class:`NeuronTable`."""

    def __init__(self, table: NeuronTable, index_of):
        self._t = table
        self._index_of = index_of

    def __len__(self) -> int:
        return len(self._t)

    def __iter__(self):
        return iter(self._t.id.tolist())

    def __getitem__(self, key) -> NeuronMetadata:
        idx = self._index_of(np.asarray([key], dtype=np.int64))[0]
        if idx < 0:
            raise KeyError(key)
        return neuron_row(self._t, int(idx))


def neuron_row(t: NeuronTable, i: int) -> NeuronMetadata:
    pos = t.position[i]
    return NeuronMetadata(
        id=int(t.id[i]), cell_type=str(t.cell_type[i]), layer=str(t.layer[i]),
        transmitter=str(t.transmitter[i]), sign=int(t.sign[i]),
        position=None if np.any(np.isnan(pos)) else tuple(float(x) for x in pos),
        glomerulus=str(t.glomerulus[i]) or None, side=str(t.side[i]) or None,
        receptor=str(t.receptor[i]) or None,
    )
