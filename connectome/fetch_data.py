"""Entry point of the connectome data layer: :class:`FlyWireConnectome`.

>>> fetcher = FlyWireConnectome(cache_dir=tmp)                       # doctest: +SKIP
>>> data = fetcher.fetch_olfactory_circuit(['ORN', 'PN', 'KC', 'APL', 'MBON', 'DN'])  # doctest: +SKIP
>>> data.count_matrix('PN', 'KC').shape                               # doctest: +SKIP
(2597, 124)

See :mod:`connectome.sources` for the sources and :mod:`connectome.tables` for
the returned :class:`OlfactoryCircuitData`.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from .cache import ConnectomeCache, cache_key
from .errors import DataError
from .sources import DEFAULT_SOURCE, check_option_names, resolve_source
from .tables import (DEFAULT_LAYERS, LAYERS, EdgeTable, NeuronMetadata, NeuronTable, OlfactoryCircuitData,
                     ProjectionInfo, SynapseConnection, check_layers)

logger = logging.getLogger(__name__)


class FlyWireConnectome:
    """Loads the fly olfactory circuit from a registered source, with an on-disk cache.

    Args:
        use_cache: read/write the cache (``False`` bypasses it entirely).
        cache_dir: cache root (default ``$DMN_NEURO_CACHE`` or ``~/.cache/dmn-neuro``).
    """

    def __init__(self, use_cache: bool = True, cache_dir=None):
        self.use_cache = bool(use_cache)
        self.cache_dir = cache_dir
        self._cache = ConnectomeCache(cache_dir) if self.use_cache else None

    def fetch_olfactory_circuit(self, include_layers: Optional[Sequence[str]] = None, use_synthetic: bool = False,
                                source: str = DEFAULT_SOURCE, **source_options) -> OlfactoryCircuitData:
        """Load the selected layers.

        Args:
            include_layers: subset of ORN, PN, KC, APL, MBON, DN, DAN
                (default ORN, PN, KC, MBON, DN). DAN only when asked for.
            use_synthetic: shorthand for ``source='synthetic'``.
            source: 'flywire_v783_mb' (default), 'hemibrain_v1.2.1_mb', 'codex:DIR', 'cave', 'synthetic'.
            **source_options: passed to the source; each source accepts its own
                (``SOURCES[name].options``: e.g. ``orn_per_glomerulus``, ``n_dn``
                for the bundled ones, ``seed``, ``scale`` for synthetic,
                ``client_factory`` for cave).
        Raises:
            DataError: unknown source / layer / option, or malformed input files.
        """
        layers = check_layers(DEFAULT_LAYERS if include_layers is None else include_layers)
        if use_synthetic:
            source = "synthetic"
        spec, implied = resolve_source(source)
        check_option_names(spec.name, source_options, spec.options)
        options = {**implied, **source_options}
        if self._cache is not None and spec.cacheable and not options.get("client_factory"):
            selection = {"layers": list(layers),
                         "options": {k: v for k, v in sorted(options.items()) if not callable(v)},
                         "fingerprint": spec.fingerprint(options) if spec.fingerprint else ""}
            key = cache_key(spec.name, spec.version, selection)
            data = self._cache.load(key)
            if data is not None:
                logger.debug("connectome cache hit %s", key)
                return data
            data = spec.load(layers, **options)
            self._cache.save(key, data)
            return data
        return spec.load(layers, **options)


__all__ = ["FlyWireConnectome", "OlfactoryCircuitData", "NeuronMetadata", "SynapseConnection", "ProjectionInfo",
           "NeuronTable", "EdgeTable", "LAYERS", "DEFAULT_LAYERS", "DataError"]
