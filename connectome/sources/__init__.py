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

Options are per source: each :class:`SourceSpec` lists the options it accepts
(with their defaults) and its *training defaults*, the options ``dmn-neuro
train`` uses when its config names none (``connectome.source_options: null``).
An option a source does not accept is a one-line error naming the option, the
source and the accepted ones (:func:`check_source_options`).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Dict, Mapping, Optional, Tuple

from ..errors import DataError
from . import bundled, cave, codex, synthetic
from ._options import check_option_names


@dataclass(frozen=True)
class SourceSpec:
    """One registered source.

    ``load(layers, **options) -> OlfactoryCircuitData``; ``version`` names the
    data release (part of the cache key); ``cacheable`` says whether results may
    be cached; ``fingerprint(options)`` returns extra cache-key text (e.g. the
    size and mtime of input files). ``options``: every option ``load`` accepts,
    with its default (``None``: none, or set by the source string, as codex's
    ``directory``). ``training_defaults``: the options training uses when its
    config names none; a subset of ``options``.
    """

    name: str
    version: str
    load: Callable
    cacheable: bool = True
    fingerprint: Optional[Callable[[Mapping], str]] = None
    options: Mapping[str, object] = field(default_factory=dict)
    training_defaults: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        object.__setattr__(self, "training_defaults", MappingProxyType(dict(self.training_defaults)))
        check_option_names(self.name, self.training_defaults, self.options)


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


_BUNDLED = {"options": bundled.OPTIONS, "training_defaults": bundled.TRAINING_DEFAULTS}
SOURCES: Dict[str, SourceSpec] = {
    "flywire_v783_mb": SourceSpec("flywire_v783_mb", "v783", bundled.load_flywire_v783_mb, **_BUNDLED),
    "hemibrain_v1.2.1_mb": SourceSpec("hemibrain_v1.2.1_mb", "v1.2.1", bundled.load_hemibrain_v121_mb, **_BUNDLED),
    # codex and cave read the real ORNs and DNs: no model-layer options, no training defaults
    "codex": SourceSpec("codex", "v783", codex.load_codex, fingerprint=_files_fingerprint, options=codex.OPTIONS),
    "cave": SourceSpec("cave", "v783", cave.load_cave, cacheable=True,
                       fingerprint=lambda o: "client_factory" if o.get("client_factory") else "",
                       options=cave.OPTIONS),
    "synthetic": SourceSpec("synthetic", "synthetic-1", synthetic.load_synthetic, cacheable=False,
                            options=synthetic.OPTIONS, training_defaults=synthetic.TRAINING_DEFAULTS),
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


def check_source_options(source: str, options: Mapping) -> SourceSpec:
    """Raise a one-line DataError if ``source`` (as :func:`resolve_source` takes it) does not accept an option."""
    spec, _ = resolve_source(source)
    check_option_names(spec.name, options, spec.options)
    return spec


def training_options(source: str, options: Optional[Mapping] = None) -> Dict[str, object]:
    """The options training passes to ``source``: ``options`` checked, or the source's training defaults if None."""
    spec = check_source_options(source, options or {})
    return dict(spec.training_defaults if options is None else options)


__all__ = ["SOURCES", "SourceSpec", "DEFAULT_SOURCE", "resolve_source", "check_source_options", "training_options"]
