"""Validated view of ``connectome/cell_types.yaml``.

``load_cell_types(path=None) -> CellTypesConfig``. Every schema problem raises
:class:`~connectome.errors.ConfigError` naming the file and key path, e.g.
``cell_types.yaml: neuron_parameters.KC.tau_m_ms must be a positive number``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import yaml

from .errors import ConfigError
from .tables import LAYERS, TRANSMITTER_SIGN, normalize_transmitter

DEFAULT_PATH = Path(__file__).resolve().parent / "cell_types.yaml"
_NEURON_KEYS = ("tau_m_ms", "threshold_mv", "rest_mv", "refractory_ms")


@dataclass(frozen=True)
class NeuronParams:
    """Physiological LIF parameters (reset is to rest)."""

    tau_m_ms: float
    threshold_mv: float
    rest_mv: float
    refractory_ms: float

    def __post_init__(self) -> None:
        for k in _NEURON_KEYS:
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"NeuronParams: {k} must be a finite number, got {v!r}")
        if self.tau_m_ms <= 0:
            raise ConfigError(f"NeuronParams: tau_m_ms must be positive, got {self.tau_m_ms}")
        if self.refractory_ms < 0:
            raise ConfigError(f"NeuronParams: refractory_ms must be >= 0, got {self.refractory_ms}")
        if self.threshold_mv <= self.rest_mv:
            raise ConfigError(f"NeuronParams: threshold_mv ({self.threshold_mv}) must exceed rest_mv ({self.rest_mv})")

    @property
    def reset_mv(self) -> float:
        return self.rest_mv


@dataclass(frozen=True)
class SynapseParams:
    transmitter: str
    sign: int
    tau_syn_ms: float
    reversal_mv: float
    cite: Tuple[str, ...] = ()


@dataclass(frozen=True)
class LayerInfo:
    name: str
    description: str
    bundled_provenance: str


@dataclass(frozen=True)
class TopologyEntry:
    pre: str
    post: str
    bundled: str
    description: str = ""


@dataclass(frozen=True)
class CellTypesConfig:
    layers: Dict[str, LayerInfo]
    neuron_parameters: Dict[str, NeuronParams]
    cell_type_parameters: Dict[str, Dict[str, NeuronParams]]
    synapses: Dict[str, SynapseParams]
    topology: Tuple[TopologyEntry, ...]
    orn_spontaneous_hz: Dict[str, Tuple[str, float]]  # receptor -> (glomerulus, rate)
    validation: Mapping
    mbon_transmitters: Dict[str, str]
    citations: Dict[str, str]
    source_path: str = ""

    def neuron_params(self, layer: str, cell_type: Optional[str] = None) -> NeuronParams:
        """Parameters of ``layer`` (with the ``cell_type`` override where one exists)."""
        if layer not in self.neuron_parameters:
            raise ConfigError(f"unknown layer {layer!r}; valid layers: {', '.join(self.neuron_parameters)}")
        if cell_type is not None and cell_type in self.cell_type_parameters.get(layer, {}):
            return self.cell_type_parameters[layer][cell_type]
        return self.neuron_parameters[layer]

    def transmitter_sign(self, transmitter: str) -> int:
        t = normalize_transmitter(transmitter)
        if t not in self.synapses:
            return TRANSMITTER_SIGN[t]
        return self.synapses[t].sign

    def spontaneous_rate_by_glomerulus(self) -> Dict[str, float]:
        return {g: r for g, r in self.orn_spontaneous_hz.values()}


class _Checker:
    def __init__(self, name: str):
        self.name = name

    def fail(self, path: str, what: str):
        raise ConfigError(f"{self.name}: {path} {what}")

    def mapping(self, obj, path: str) -> Mapping:
        if not isinstance(obj, Mapping):
            self.fail(path, "must be a mapping")
        return obj

    def get(self, obj: Mapping, key: str, path: str):
        if key not in obj:
            self.fail(f"{path}.{key}" if path else key, "is missing")
        return obj[key]

    def number(self, obj: Mapping, key: str, path: str, positive=False, nonneg=False) -> float:
        v = self.get(obj, key, path)
        p = f"{path}.{key}"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(p, "must be a positive number" if positive else "must be a finite number")
        if positive and v <= 0:
            self.fail(p, "must be a positive number")
        if nonneg and v < 0:
            self.fail(p, "must be a non-negative number")
        return float(v)

    def string(self, obj: Mapping, key: str, path: str) -> str:
        v = self.get(obj, key, path)
        if not isinstance(v, str):
            self.fail(f"{path}.{key}", "must be a string")
        return v

    def cites(self, obj: Mapping, path: str, citations: Mapping) -> Tuple[str, ...]:
        c = obj.get("cite", [])
        if not isinstance(c, list) or not all(isinstance(x, str) for x in c):
            self.fail(f"{path}.cite", "must be a list of citation keys")
        for x in c:
            if x not in citations:
                self.fail(f"{path}.cite", f"names unknown citation {x!r}")
        return tuple(c)

    def neuron(self, obj, path: str, citations, base: Optional[NeuronParams] = None) -> NeuronParams:
        obj = self.mapping(obj, path)
        unknown = sorted(set(obj) - set(_NEURON_KEYS) - {"cite"})
        if unknown:
            self.fail(f"{path}.{unknown[0]}", f"is not a known key (known: {', '.join(_NEURON_KEYS)}, cite)")
        vals = {}
        for k in _NEURON_KEYS:
            if base is not None and k not in obj:
                vals[k] = getattr(base, k)
                continue
            vals[k] = self.number(obj, k, path, positive=(k == "tau_m_ms"), nonneg=(k == "refractory_ms"))
        if vals["threshold_mv"] <= vals["rest_mv"]:
            self.fail(f"{path}.threshold_mv", "must exceed rest_mv")
        self.cites(obj, path, citations)
        return NeuronParams(**vals)


def parse_cell_types(raw, name: str = "cell_types.yaml") -> CellTypesConfig:
    c = _Checker(name)
    root = c.mapping(raw, "(top level)")
    allowed = {"schema_version", "citations", "layers", "neuron_parameters", "cell_type_parameters", "synapses",
               "topology", "baseline_rates", "validation", "mbon_transmitters"}
    unknown = sorted(set(root) - allowed)
    if unknown:
        c.fail(unknown[0], f"is not a known key (known: {', '.join(sorted(allowed))})")
    if c.get(root, "schema_version", "") != 1:
        c.fail("schema_version", "must be 1")
    citations = c.mapping(c.get(root, "citations", ""), "citations")
    citations = {str(k): str(v) for k, v in citations.items()}

    layers = {}
    for lname, info in c.mapping(c.get(root, "layers", ""), "layers").items():
        if lname not in LAYERS:
            c.fail(f"layers.{lname}", f"is not a known layer (valid: {', '.join(LAYERS)})")
        info = c.mapping(info, f"layers.{lname}")
        prov = c.string(info, "bundled_provenance", f"layers.{lname}")
        if prov not in ("data", "model"):
            c.fail(f"layers.{lname}.bundled_provenance", "must be 'data' or 'model'")
        layers[lname] = LayerInfo(lname, c.string(info, "description", f"layers.{lname}"), prov)
    missing = [l for l in LAYERS if l not in layers]
    if missing:
        c.fail(f"layers.{missing[0]}", "is missing")

    nparams = {}
    np_raw = c.mapping(c.get(root, "neuron_parameters", ""), "neuron_parameters")
    for lname in LAYERS:
        nparams[lname] = c.neuron(c.get(np_raw, lname, "neuron_parameters"), f"neuron_parameters.{lname}", citations)
    for lname in np_raw:
        if lname not in LAYERS:
            c.fail(f"neuron_parameters.{lname}", f"is not a known layer (valid: {', '.join(LAYERS)})")

    ctp = {}
    for lname, types in c.mapping(root.get("cell_type_parameters", {}) or {}, "cell_type_parameters").items():
        if lname not in LAYERS:
            c.fail(f"cell_type_parameters.{lname}", f"is not a known layer (valid: {', '.join(LAYERS)})")
        types = c.mapping(types or {}, f"cell_type_parameters.{lname}")
        ctp[lname] = {str(t): c.neuron(v, f"cell_type_parameters.{lname}.{t}", citations, base=nparams[lname])
                      for t, v in types.items()}

    syn = {}
    for tname, v in c.mapping(c.get(root, "synapses", ""), "synapses").items():
        p = f"synapses.{tname}"
        try:
            t = normalize_transmitter(tname)
        except Exception:
            c.fail(p, "is not a known transmitter")
        v = c.mapping(v, p)
        sign = c.get(v, "sign", p)
        if sign not in (-1, 0, 1) or isinstance(sign, bool):
            c.fail(f"{p}.sign", "must be -1, 0 or 1")
        if sign != TRANSMITTER_SIGN[t]:
            c.fail(f"{p}.sign", f"contradicts Dale's-law table ({t} -> {TRANSMITTER_SIGN[t]})")
        syn[t] = SynapseParams(t, int(sign), c.number(v, "tau_syn_ms", p, positive=True),
                               c.number(v, "reversal_mv", p), c.cites(v, p, citations))

    topo = []
    t_raw = c.get(root, "topology", "")
    if not isinstance(t_raw, list):
        c.fail("topology", "must be a list")
    for i, e in enumerate(t_raw):
        p = f"topology[{i}]"
        e = c.mapping(e, p)
        pre, post = c.string(e, "pre", p), c.string(e, "post", p)
        for k, l in (("pre", pre), ("post", post)):
            if l not in LAYERS:
                c.fail(f"{p}.{k}", f"is not a known layer (valid: {', '.join(LAYERS)})")
        b = c.string(e, "bundled", p)
        if b not in ("data", "model"):
            c.fail(f"{p}.bundled", "must be 'data' or 'model'")
        topo.append(TopologyEntry(pre, post, b, str(e.get("description", ""))))

    br = c.mapping(c.get(root, "baseline_rates", ""), "baseline_rates")
    rates = {}
    for r, v in c.mapping(c.get(br, "orn_spontaneous_hz", "baseline_rates"), "baseline_rates.orn_spontaneous_hz").items():
        p = f"baseline_rates.orn_spontaneous_hz.{r}"
        v = c.mapping(v, p)
        rate = c.number(v, "rate_hz", p, nonneg=True)
        rates[str(r)] = (c.string(v, "glomerulus", p), rate)

    validation = c.mapping(c.get(root, "validation", ""), "validation")
    ks = c.mapping(c.get(validation, "kc_sparsity", "validation"), "validation.kc_sparsity")
    lo = c.number(ks, "min", "validation.kc_sparsity", nonneg=True)
    hi = c.number(ks, "max", "validation.kc_sparsity", positive=True)
    if not lo < hi <= 1:
        c.fail("validation.kc_sparsity", "must have 0 <= min < max <= 1")

    mb = c.mapping(c.get(root, "mbon_transmitters", ""), "mbon_transmitters")
    mbon = {}
    for k, v in c.mapping(c.get(mb, "types", "mbon_transmitters"), "mbon_transmitters.types").items():
        try:
            mbon[str(k)] = normalize_transmitter(v)
        except Exception:
            c.fail(f"mbon_transmitters.types.{k}", f"is not a known transmitter: {v!r}")
    return CellTypesConfig(layers, nparams, ctp, syn, tuple(topo), rates, validation, mbon, citations)


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int) -> CellTypesConfig:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p.name}: invalid YAML{where}") from None
    cfg = parse_cell_types(raw, p.name)
    return CellTypesConfig(**{**cfg.__dict__, "source_path": str(p)})


def load_cell_types(path=None) -> CellTypesConfig:
    """Load and validate ``cell_types.yaml`` (the bundled one by default)."""
    p = Path(path) if path is not None else DEFAULT_PATH
    try:
        st = p.stat()
    except OSError:
        raise ConfigError(f"cell types file not found: {p}") from None
    return _load_cached(str(p.resolve()), st.st_mtime_ns)


__all__ = ["NeuronParams", "SynapseParams", "LayerInfo", "TopologyEntry", "CellTypesConfig", "load_cell_types",
           "parse_cell_types"]
