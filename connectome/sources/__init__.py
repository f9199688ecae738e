"""Registry of connectome sources. Unknown names are refused (no fallbacks).

=====================  ==========================================================
name                   what
=====================  ==========================================================
flywire_v783_mb        bundled FlyWire v783 MB subgraph (default, offline)
hemibrain_v1.2.1_mb    bundled hemibrain v1.2.1 MB subgraph (offline)
codex:DIR              FlyWire Codex CSV exports in DIR
cave                   live FlyWire via caveclient (extra ``dmn-neuro[flywire]``)
synthetic              seeded generator with literature statistics
=====================  ==========================================================
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple

from ..errors import DataError


@dataclass(frozen=True)
class SourceSpec:
    """One registered source.

    ``load(layers, **options) -> OlfactoryCircuitData``; ``version`` names the
    data release (part of the cache key); ``cacheable`` says whether results may
    be cached; ``fingerprint(options)`` returns extra cache-key text (e.g. the
    size and mtime of input files).
    """

    name: str
    version: str
    load: Callable
    cacheable: bool = True
    fingerprint: Optional[Callable[[Mapping], str]] = None


def _bundled_flywire(layers, **options):
    from .bundled import load_flywire_v783_mb
    return load_flywire_v783_mb(layers, **options)


def _bundled_hemibrain(layers, **options):
    from .bundled import load_hemibrain_v121_mb
    return load_hemibrain_v121_mb(layers, **options)


def _codex(layers, **options):
    from .codex import load_codex
    return load_codex(layers, **options)


def _cave(layers, **options):
    from .cave import load_cave
    return load_cave(layers, **options)


def _synthetic(layers, **options):
    from .synthetic import load_synthetic
    return load_synthetic(layers, **options)


def _files_fingerprint(options: Mapping) -> str:
    d = Path(options.get("directory", ""))
    h = hashlib.sha256(str(d.resolve()).encode())
    if d.is_dir():
        for p in sorted(d.iterdir()):
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


SOURCES: Dict[str, SourceSpec] = {
    "flywire_v783_mb": SourceSpec("flywire_v783_mb", "v783", _bundled_flywire),
    "hemibrain_v1.2.1_mb": SourceSpec("hemibrain_v1.2.1_mb", "v1.2.1", _bundled_hemibrain),
    "codex": SourceSpec("codex", "v783", _codex, fingerprint=_files_fingerprint),
    "cave": SourceSpec("cave", "v783", _cave, cacheable=True,
                       fingerprint=lambda o: "client_factory" if o.get("client_factory") else ""),
    "synthetic": SourceSpec("synthetic", "synthetic-1", _synthetic, cacheable=False),
}

DEFAULT_SOURCE = "flywire_v783_mb"


def resolve_source(source: str) -> Tuple[SourceSpec, Dict[str, object]]:
    """'flywire_v783_mb' | 'hemibrain_v1.2.1_mb' | 'codex:DIR' | 'cave' | 'synthetic' -> (spec, implied options)."""
    source = str(source).strip()
    if source.startswith("codex:"):
        d = source[len("codex:"):]
        if not d:
            raise DataError("source codex:DIR needs a directory, e.g. codex:/data/flywire_codex")
        return SOURCES["codex"], {"directory": os.path.expanduser(d)}
    if source == "codex":
        raise DataError("source codex needs a directory: use codex:DIR")
    if source not in SOURCES:
        raise DataError(
            f"unknown source {source!r}; known: flywire_v783_mb, hemibrain_v1.2.1_mb, codex:DIR, cave, synthetic")
    return SOURCES[source], {}


__all__ = ["SOURCES", "SourceSpec", "DEFAULT_SOURCE", "resolve_source"]
