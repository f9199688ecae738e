"""Framework-neutral description of a trained circuit, and its reference simulator.

A :class:`CircuitSpec` is what a trained :class:`DifferentiableOlfactoryCircuit`
hands to the exporters: populations (decay, per-neuron threshold, bias, cell
types, FlyWire root ids), projections (effective signed, masked weight
matrices) and the :class:`~dmn_neuro.simulation.semantics.NeuronSemantics` they run under.
It is saved as one ``.npz`` (numbers) with a JSON header inside (no pickle), so
that the Python 3.10 Lava worker can read it with numpy 1.26.

:func:`simulate` is the NumPy reference of the dynamics documented in
:mod:`dmn_neuro.simulation.semantics`, and the only float LIF update in NumPy in
dmn_neuro and exporters (``exporters.nir_import.run_nir`` executes NIR nodes
independently, on purpose). The PyTorch paths, the NIR executor and the Lava
worker are all tested against it (``tests/test_simulators_agree.py``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import numpy as np

from dmn_neuro.errors import DMNError
from dmn_neuro.simulation.semantics import RESET_VALUE, NeuronSemantics

SPEC_FORMAT = "dmn-neuro-circuit-spec"
SPEC_FORMAT_VERSION = 1


class SpecError(DMNError, ValueError):
    """A circuit spec is inconsistent or a spec file is unreadable."""


def read_npz_arrays(path: os.PathLike, error=None, what: str = "arrays") -> Dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file, never unpickling; a corrupt file raises
    ``error`` (default :class:`SpecError`) with one line naming ``what`` and the path."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:  # zipfile / numpy errors on corrupt files
        raise (error or SpecError)(f"{what} {path} are unreadable: {exc}") from None


@dataclass
class PopulationSpec:
    name: str
    n: int
    beta: float
    threshold: np.ndarray  # [n], > 0
    bias: np.ndarray = None  # [n]
    cell_types: Sequence[str] = ()
    root_ids: np.ndarray = None  # int64 [n], -1 where the neuron is a model assumption
    provenance: str = "model"

    def __post_init__(self) -> None:
        self.threshold = np.asarray(self.threshold, dtype=np.float64).reshape(-1)
        if self.bias is None:
            self.bias = np.zeros(self.n, dtype=np.float64)
        self.bias = np.asarray(self.bias, dtype=np.float64).reshape(-1)
        if self.root_ids is None:
            self.root_ids = np.full(self.n, -1, dtype=np.int64)
        self.root_ids = np.asarray(self.root_ids, dtype=np.int64).reshape(-1)
        if not self.cell_types:
            self.cell_types = [self.name] * self.n
        self.cell_types = [str(c) for c in self.cell_types]
        for key, arr in (("threshold", self.threshold), ("bias", self.bias), ("root_ids", self.root_ids)):
            if arr.shape != (self.n,):
                raise SpecError(f"population {self.name}: {key} has shape {arr.shape}, expected ({self.n},)")
        if len(self.cell_types) != self.n:
            raise SpecError(f"population {self.name}: {len(self.cell_types)} cell types for {self.n} neurons")
        if not np.all(np.isfinite(self.threshold)) or np.any(self.threshold <= 0):
            raise SpecError(f"population {self.name}: thresholds must be finite and > 0")
        if not np.all(np.isfinite(self.bias)):
            raise SpecError(f"population {self.name}: bias contains NaN/Inf")
        if not (np.isfinite(self.beta) and 0.0 <= self.beta < 1.0):
            raise SpecError(f"population {self.name}: beta={self.beta} outside [0, 1)")
        self.beta = float(self.beta)


@dataclass
class ProjectionSpec:
    pre: str
    post: str
    weight: np.ndarray  # [n_post, n_pre], signed, zeros where there is no edge
    provenance: str = "model"

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, dtype=np.float64)
        if self.weight.ndim != 2:
            raise SpecError(f"projection {self.pre}->{self.post}: weight must be 2-D, got {self.weight.shape}")
        if not np.all(np.isfinite(self.weight)):
            raise SpecError(f"projection {self.pre}->{self.post}: weight contains NaN/Inf")

    @property
    def name(self) -> str:
        return f"{self.pre}->{self.post}"


class PopulationLookup:
    """Name-based access to ``self.populations`` shared by circuit specs
    (float here, fixed point in :mod:`dmn_neuro.simulation.fixed_point`)."""

    lookup_error = SpecError

    @property
    def population_names(self) -> List[str]:
        return [p.name for p in self.populations]

    def population(self, name: str):
        for p in self.populations:
            if p.name == name:
                return p
        raise self.lookup_error(f"unknown population {name!r}; known: {self.population_names}")


@dataclass
class CircuitSpec(PopulationLookup):
    populations: List[PopulationSpec]
    projections: List[ProjectionSpec]
    semantics: NeuronSemantics = field(default_factory=NeuronSemantics)
    input_population: str = "ORN"
    output_population: str = "DN"
    metadata: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [p.name for p in self.populations]
        if len(set(names)) != len(names):
            raise SpecError(f"duplicate population names: {names}")
        sizes = {p.name: p.n for p in self.populations}
        for name in (self.input_population, self.output_population):
            if name not in sizes:
                raise SpecError(f"population {name!r} not in {names}")
        for proj in self.projections:
            for end in (proj.pre, proj.post):
                if end not in sizes:
                    raise SpecError(f"projection {proj.name}: unknown population {end!r}; known: {names}")
            want = (sizes[proj.post], sizes[proj.pre])
            if proj.weight.shape != want:
                raise SpecError(f"type mismatch: {proj.name}: weight {proj.weight.shape}, expected {want}")

    # -- access -------------------------------------------------------------
    def incoming(self, name: str) -> List[ProjectionSpec]:
        return [p for p in self.projections if p.post == name]

    @property
    def n_input(self) -> int:
        return self.population(self.input_population).n

    # -- files --------------------------------------------------------------
    def to_arrays(self) -> Dict[str, np.ndarray]:
        header = {
            "format": SPEC_FORMAT,
            "format_version": SPEC_FORMAT_VERSION,
            "semantics": self.semantics.to_dict(),
            "input_population": self.input_population,
            "output_population": self.output_population,
            "metadata": self.metadata,
            "populations": [
                {"name": p.name, "n": p.n, "beta": p.beta, "cell_types": list(p.cell_types), "provenance": p.provenance}
                for p in self.populations
            ],
            "projections": [{"pre": q.pre, "post": q.post, "provenance": q.provenance} for q in self.projections],
        }
        arrays: Dict[str, np.ndarray] = {"header_json": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
        for p in self.populations:
            arrays[f"pop/{p.name}/threshold"] = p.threshold
            arrays[f"pop/{p.name}/bias"] = p.bias
            arrays[f"pop/{p.name}/root_ids"] = p.root_ids
        for i, q in enumerate(self.projections):
            arrays[f"proj/{i}/weight"] = q.weight
        return arrays

    def save(self, path: os.PathLike) -> Path:
        """Write atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **self.to_arrays())
        os.replace(tmp, path)
        return path

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "CircuitSpec":
        try:
            header = json.loads(bytes(np.asarray(arrays["header_json"], dtype=np.uint8)).decode())
        except (KeyError, ValueError) as exc:
            raise SpecError(f"not a dmn-neuro circuit spec (header unreadable: {exc})") from None
        if header.get("format") != SPEC_FORMAT:
            raise SpecError(f"not a dmn-neuro circuit spec (format={header.get('format')!r})")
        sem = header["semantics"]
        semantics = NeuronSemantics(dt_ms=float(sem["dt_ms"]), delay_steps=int(sem["delay_steps"]), reset=sem["reset"])
        try:
            pops = [
                PopulationSpec(
                    name=p["name"], n=int(p["n"]), beta=float(p["beta"]),
                    threshold=arrays[f"pop/{p['name']}/threshold"], bias=arrays[f"pop/{p['name']}/bias"],
                    root_ids=arrays[f"pop/{p['name']}/root_ids"], cell_types=p["cell_types"],
                    provenance=p.get("provenance", "model"),
                )
                for p in header["populations"]
            ]
            projs = [
                ProjectionSpec(pre=q["pre"], post=q["post"], weight=arrays[f"proj/{i}/weight"], provenance=q.get("provenance", "model"))
                for i, q in enumerate(header["projections"])
            ]
        except KeyError as exc:
            raise SpecError(f"circuit spec is missing array {exc}") from None
        return cls(pops, projs, semantics, header["input_population"], header["output_population"], header.get("metadata", {}))

    @classmethod
    def load(cls, path: os.PathLike) -> "CircuitSpec":
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"circuit spec not found: {path}")
        return cls.from_arrays(read_npz_arrays(path, SpecError, "circuit spec arrays"))


def simulate(spec: CircuitSpec, x: np.ndarray, record_membrane: bool = False, dtype=np.float64) -> Dict[str, np.ndarray]:
    """Reference simulation of ``spec`` on external input ``x`` ``[T, B, n_input]``.

    Returns ``{population: bool spikes [T, B, n]}`` (and ``{population+'_mem':
    float [T, B, n]}`` post-reset membranes with ``record_membrane``).
    """
    x = np.asarray(x, dtype=dtype)
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3 or x.shape[2] != spec.n_input:
        raise SpecError(f"input must be [T, batch, {spec.n_input}], got {list(x.shape)}")
    if spec.semantics.delay_steps != 1:
        raise SpecError("reference simulator implements delay_steps == 1")
    T, B, _ = x.shape
    pops = spec.populations
    v = {p.name: np.zeros((B, p.n), dtype=dtype) for p in pops}
    s_prev = {p.name: np.zeros((B, p.n), dtype=dtype) for p in pops}
    out = {p.name: np.zeros((T, B, p.n), dtype=bool) for p in pops}
    mem = {p.name: np.zeros((T, B, p.n), dtype=dtype) for p in pops} if record_membrane else None
    weights = [(q.pre, q.post, q.weight.astype(dtype).T) for q in spec.projections]
    for t in range(T):
        cur = {p.name: np.zeros((B, p.n), dtype=dtype) for p in pops}
        cur[spec.input_population] += x[t]
        for pre, post, wt in weights:
            cur[post] += s_prev[pre] @ wt
        for p in pops:
            vn = p.beta * v[p.name] + cur[p.name] + p.bias
            s = vn > p.threshold
            vn = np.where(s, RESET_VALUE, vn)
            v[p.name] = vn
            s_prev[p.name] = s.astype(dtype)
            out[p.name][t] = s
            if mem is not None:
                mem[p.name][t] = vn
    if mem is not None:
        out.update({k + "_mem": m for k, m in mem.items()})
    return out
