"""On-disk cache of loaded circuits.

An entry is keyed by source + version + selection (layers, options, input-file
fingerprint), hashed with SHA-256. It is stored as ``<key>.npz`` (the neuron
and edge columns, loaded with ``allow_pickle=False``) and ``<key>.json``
(source, version, layers, provenance and the SHA-256 of the npz). Both are
written to temporary files and renamed; the JSON is renamed last and is the
commit marker. A corrupt entry (unreadable JSON, checksum mismatch, npz load
failure, missing columns) is logged, warned about (:class:`CacheWarning`),
deleted and rebuilt by the caller.

Default directory: ``$DMN_NEURO_CACHE`` or ``~/.cache/dmn-neuro``; nothing is
created until the first write.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from .tables import EdgeTable, NeuronTable, OlfactoryCircuitData

logger = logging.getLogger(__name__)

CACHE_FORMAT = "dmn-neuro-connectome-cache"
CACHE_FORMAT_VERSION = 1
_NEURON_COLS = ("id", "layer", "sign", "cell_type", "transmitter", "glomerulus", "receptor", "side", "position")
_EDGE_COLS = ("pre_id", "post_id", "count")


class CacheWarning(UserWarning):
    """A cache entry was unusable and is being rebuilt."""


def default_cache_dir() -> Path:
    env = os.environ.get("DMN_NEURO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dmn-neuro"


def cache_key(source: str, version: str, selection: Mapping) -> str:
    text = json.dumps({"format": CACHE_FORMAT_VERSION, "source": source, "version": version,
                       "selection": selection}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ConnectomeCache:
    def __init__(self, cache_dir=None):
        self.root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "connectome"

    def paths(self, key: str):
        return self.root / f"{key}.npz", self.root / f"{key}.json"

    def load(self, key: str) -> Optional[OlfactoryCircuitData]:
        npz_path, json_path = self.paths(key)
        if not json_path.exists():
            return None
        try:
            meta = json.loads(json_path.read_text())
            if meta.get("format") != CACHE_FORMAT or meta.get("format_version") != CACHE_FORMAT_VERSION:
                raise ValueError("unknown cache format")
            if _sha256(npz_path) != meta["npz_sha256"]:
                raise ValueError("checksum mismatch")
            with np.load(npz_path, allow_pickle=False) as z:
                neurons = NeuronTable(**{c: z["n_" + c] for c in _NEURON_COLS})
                edges = EdgeTable(*(z["e_" + c] for c in _EDGE_COLS))
            prov = {(a, b): v for a, b, v in meta["provenance"]}
            return OlfactoryCircuitData(neurons, edges, meta["layers"], prov, meta["source"], meta["version"],
                                        meta["default_provenance"], meta.get("metadata"))
        except Exception as exc:  # any failure means a corrupt entry: rebuild
            msg = f"corrupt connectome cache entry {json_path.name} ({type(exc).__name__}: {exc}); rebuilding"
            logger.warning("%s", msg)
            warnings.warn(msg, CacheWarning, stacklevel=3)
            for p in (json_path, npz_path):
                try:
                    p.unlink()
                except OSError:
                    pass
            return None

    def save(self, key: str, data: OlfactoryCircuitData) -> None:
        npz_path, json_path = self.paths(key)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            arrays = {"n_" + c: getattr(data.neuron_table, c) for c in _NEURON_COLS}
            arrays.update({"e_" + c: getattr(data.edge_table, c) for c in _EDGE_COLS})
            fd, tmp_npz = tempfile.mkstemp(prefix=f".{key}.", suffix=".npz", dir=self.root)
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            meta = {
                "format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION,
                "source": data.source, "version": data.version, "layers": list(data.layers),
                "provenance": [[a, b, v] for (a, b), v in sorted(data._provenance.items())],
                "default_provenance": data.default_provenance, "metadata": data.metadata,
                "npz_sha256": _sha256(Path(tmp_npz)),
            }
            fd, tmp_json = tempfile.mkstemp(prefix=f".{key}.", suffix=".json", dir=self.root)
            with os.fdopen(fd, "w") as fh:
                json.dump(meta, fh)
            os.replace(tmp_npz, npz_path)
            os.replace(tmp_json, json_path)
        except OSError as exc:  # a cache that cannot be written is not fatal
            logger.warning("could not write connectome cache in %s: %s", self.root, exc)
            for p in (locals().get("tmp_npz"), locals().get("tmp_json")):
                if p and os.path.exists(p):
                    os.unlink(p)
