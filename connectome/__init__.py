"""Connectome data layer of dmn-neuro: real fly olfactory wiring, offline by default.

Importing this package has no side effects; the names below are loaded lazily.

* :class:`connectome.fetch_data.FlyWireConnectome` -- load a circuit from a source
* :class:`connectome.adjacency_matrix.AdjacencyMatrixGenerator`, :class:`~connectome.adjacency_matrix.ConstrainedWeight`
* :func:`connectome.config.load_cell_types` -- validated cell_types.yaml
"""
from connectome.lazy import lazy_exports

_LAZY = {
    "FlyWireConnectome": "connectome.fetch_data",
    "OlfactoryCircuitData": "connectome.tables",
    "NeuronMetadata": "connectome.tables",
    "SynapseConnection": "connectome.tables",
    "ProjectionInfo": "connectome.tables",
    "AdjacencyMatrixGenerator": "connectome.adjacency_matrix",
    "ConstrainedWeight": "connectome.adjacency_matrix",
    "load_cell_types": "connectome.config",
}
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
