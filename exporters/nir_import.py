"""Read NIR graphs back: NIR -> :class:`CircuitSpec`, and an exact NIR executor.

* :func:`nir_to_spec` rebuilds a :class:`~dmn_neuro.simulation.spec.CircuitSpec` from a
  LIF / Linear / Delay graph (as written by :mod:`exporters.nir_export`), after
  checking that the semantics recorded in the file (dt, forward Euler, zero
  reset, strict threshold, one step per hop) are the ones dmn-neuro executes.
* :func:`run_nir` executes such a graph step by step in float64 *from the NIR
  nodes alone* (Delay ring buffers, Linear, LIF forward Euler with the node's
  ``tau``/``r``/``v_leak``/``v_threshold``/``v_reset``), independently of
  :func:`dmn_neuro.simulation.spec.simulate`, so that comparing the two tests the export.

Both refuse node types they cannot execute exactly through an explicit
registry (:data:`NODE_KINDS`); an unmapped node raises
:class:`UnsupportedNodeError` (an :class:`ExportError` and a
``NotImplementedError``) naming the node.

snnTorch's ``import_from_nir`` is *not* used: it rebuilds ``Leaky`` neurons with
reset-by-zero after a delay-free step, ignores per-neuron thresholds and the
``Delay`` nodes (``shared/notes/nir_snntorch.md``).

Discrete semantics of :func:`run_nir` (step ``t``, ``k = round(delay/dt)``)::

    Input:  y[t] = x[t]
    Delay:  y[t] = u[t - k]            (u[t < 0] = 0)
    Linear: y[t] = W u[t];  Affine: y[t] = W u[t] + b
    LIF:    alpha = dt/tau
            v[t] = (1 - alpha) v[t-1] + (alpha r) u[t] + alpha v_leak
            s[t] = v[t] > v_threshold;  v[t] = v_reset where s[t]
    Output: y[t] = u[t]

where ``u`` is the sum of a node's incoming edges, in the order of
``graph.edges``. A cycle must pass through a Delay of at least one step.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

import nir

from dmn_neuro.errors import ExportError
from dmn_neuro.simulation.semantics import (
    DISCRETISATION,
    RESET_MODE,
    RESET_VALUE,
    SPIKE_CONDITION,
    SYNAPTIC_DELAY_STEPS,
    NeuronSemantics,
)
from dmn_neuro.simulation.spec import CircuitSpec, PopulationSpec, ProjectionSpec

from exporters.nir_export import NIR_FORMAT, NIR_FORMAT_VERSION

logger = logging.getLogger(__name__)

GraphLike = Union[nir.NIRGraph, str, os.PathLike]


class UnsupportedNodeError(ExportError, NotImplementedError):
    """A NIR node type (or parameter) that dmn-neuro cannot execute exactly."""


#: Node types this module executes, and their role. Exact types only: a
#: subclass or any other NIR primitive (CubaLIF, Conv, Threshold, ...) is refused.
NODE_KINDS: Dict[type, str] = {
    nir.Input: "input",
    nir.Output: "output",
    nir.LIF: "lif",
    nir.Linear: "linear",
    nir.Affine: "affine",
    nir.Delay: "delay",
}

#: Relative tolerance for "parameter equals the exact discrete value" checks.
_RTOL = 1e-9


def node_kind(name: str, node: nir.NIRNode) -> str:
    try:
        return NODE_KINDS[type(node)]
    except KeyError:
        known = ", ".join(sorted(t.__name__ for t in NODE_KINDS))
        raise UnsupportedNodeError(
            f"NIR node {name!r} of type {type(node).__name__} is not supported (supported: {known})"
        ) from None


def load_graph(graph_or_path: GraphLike) -> nir.NIRGraph:
    """A :class:`nir.NIRGraph`, or one read (and type-checked) from a NIR file."""
    if isinstance(graph_or_path, nir.NIRGraph):
        return graph_or_path
    if not isinstance(graph_or_path, (str, os.PathLike)):
        raise ExportError(f"expected a NIRGraph or a path, got {type(graph_or_path).__name__}")
    path = Path(graph_or_path)
    if not path.is_file():
        raise ExportError(f"NIR file not found: {path}")
    try:
        graph = nir.read(path, type_check=True)
    except Exception as exc:  # h5py/NIR raise many types on corrupt or foreign files
        raise ExportError(f"NIR file {path} is unreadable: {type(exc).__name__}: {exc}") from None
    if not isinstance(graph, nir.NIRGraph):
        raise ExportError(f"NIR file {path} does not hold a graph (found {type(graph).__name__})")
    return graph


def _meta_str(meta: Mapping[str, Any], key: str) -> Optional[str]:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf8")
    return str(value)


def graph_dt(graph: nir.NIRGraph, dt: Optional[float] = None) -> float:
    """The step (seconds) to run ``graph`` with, after checking its semantics.

    A graph written by dmn-neuro records dt, discretisation, reset and spike
    condition in its metadata; every recorded value must be one that
    :func:`run_nir` executes exactly. A foreign graph without metadata needs
    ``dt`` and is run with dmn-neuro's semantics (forward Euler, same-step reset).
    """
    meta = graph.metadata if isinstance(graph.metadata, dict) else {}
    expected = {
        "discretisation": DISCRETISATION,
        "reset": RESET_MODE,
        "spike_condition": SPIKE_CONDITION,
        "reset_timing": "same-step",
    }
    for key, want in expected.items():
        got = _meta_str(meta, key)
        if got is not None and got != want:
            raise UnsupportedNodeError(f"NIR graph metadata {key}={got!r} cannot be executed exactly (supported: {want!r})")
    fmt = _meta_str(meta, "format")
    if fmt == NIR_FORMAT and int(meta.get("format_version", 0)) > NIR_FORMAT_VERSION:
        raise ExportError(f"NIR graph format_version {meta.get('format_version')} is newer than this reader ({NIR_FORMAT_VERSION})")
    if "delay_steps_per_hop" in meta and int(meta["delay_steps_per_hop"]) != SYNAPTIC_DELAY_STEPS:
        raise UnsupportedNodeError(f"NIR graph has {int(meta['delay_steps_per_hop'])} delay steps per hop; dmn-neuro uses {SYNAPTIC_DELAY_STEPS}")
    file_dt = meta.get("dt")
    if dt is None:
        if file_dt is None:
            raise ExportError("NIR graph metadata has no 'dt'; pass dt (seconds) explicitly")
        dt = float(file_dt)
    elif file_dt is not None and not np.isclose(float(file_dt), float(dt), rtol=_RTOL, atol=0.0):
        raise ExportError(f"dt={dt} s disagrees with the NIR graph's dt={float(file_dt)} s")
    dt = float(dt)
    if not (np.isfinite(dt) and dt > 0):
        raise ExportError(f"dt must be a positive number of seconds, got {dt}")
    return dt


def delay_steps(name: str, node: nir.Delay, dt: float) -> int:
    """Whole number of steps of a Delay node (uniform over its elements)."""
    d = np.asarray(node.delay, dtype=np.float64).reshape(-1)
    if d.size == 0:
        raise UnsupportedNodeError(f"Delay node {name!r} is empty")
    steps = d / dt
    k = np.rint(steps)
    if not np.allclose(steps, k, rtol=0.0, atol=1e-6) or np.any(k < 0):
        raise UnsupportedNodeError(f"Delay node {name!r}: delay {d[0]} s is not a whole number of steps of dt={dt} s")
    if np.any(k != k[0]):
        raise UnsupportedNodeError(f"Delay node {name!r}: per-element delays differ; only uniform delays are supported")
    return int(k[0])


# -- executor ---------------------------------------------------------------------------
@dataclass
class _Plan:
    order: List[str]                 # nodes evaluated within a step, dependencies first
    preds: Dict[str, List[str]]      # incoming edges in graph.edges order
    kinds: Dict[str, str]
    delays: Dict[str, int]           # delay nodes with k >= 1 (sources within a step)
    input_node: str
    width: Dict[str, int]


def _flat_size(shape: Any) -> int:
    return int(np.prod(np.asarray(shape, dtype=np.int64).reshape(-1)))


def _plan(graph: nir.NIRGraph, dt: float) -> _Plan:
    kinds = {name: node_kind(name, node) for name, node in graph.nodes.items()}
    inputs = [n for n, k in kinds.items() if k == "input"]
    if len(inputs) != 1:
        raise UnsupportedNodeError(f"NIR graph must have exactly one Input node, found {len(inputs)}: {inputs}")
    preds: Dict[str, List[str]] = {n: [] for n in graph.nodes}
    for src, dst in graph.edges:
        if src not in graph.nodes or dst not in graph.nodes:
            raise ExportError(f"NIR edge ({src!r}, {dst!r}) names a missing node")
        preds[dst].append(src)
    delays = {}
    for name, kind in kinds.items():
        if kind == "delay":
            k = delay_steps(name, graph.nodes[name], dt)
            if k >= 1:
                delays[name] = k
    # Topological order of the in-step dependencies (edges into a delay of >= 1
    # step carry no in-step dependency).
    pending = {n: [p for p in preds[n]] if n not in delays else [] for n in graph.nodes}
    order: List[str] = []
    done: set = set()
    while len(order) < len(graph.nodes):
        ready = [n for n in graph.nodes if n not in done and all(p in done for p in pending[n])]
        if not ready:
            stuck = sorted(n for n in graph.nodes if n not in done)
            raise UnsupportedNodeError(f"NIR graph has a cycle without a Delay of >= 1 step through {stuck}")
        for n in ready:
            order.append(n)
            done.add(n)
    width: Dict[str, int] = {}
    for name, node in graph.nodes.items():
        kind = kinds[name]
        if kind == "input":
            width[name] = _flat_size(node.input_type["input"])
        elif kind == "output":
            width[name] = _flat_size(node.output_type["output"])
        elif kind == "lif":
            width[name] = int(np.asarray(node.v_threshold).size)
        elif kind in ("linear", "affine"):
            if np.asarray(node.weight).ndim != 2:
                raise UnsupportedNodeError(f"{type(node).__name__} node {name!r}: only 2-D weights are supported")
            width[name] = int(np.asarray(node.weight).shape[0])
        elif kind == "delay":
            width[name] = int(np.asarray(node.delay).size)
    for dst, srcs in preds.items():
        for src in srcs:
            if kinds[dst] in ("linear", "affine"):
                want = int(np.asarray(graph.nodes[dst].weight).shape[1])
            else:
                want = width[dst]
            if width[src] != want:
                raise ExportError(f"type mismatch: {src}.output: [{width[src]}] -> {dst}.input: [{want}]")
    return _Plan(order, preds, kinds, delays, inputs[0], width)


def run_nir(
    graph_or_path: GraphLike,
    x: np.ndarray,
    dt: Optional[float] = None,
    record_membrane: bool = False,
) -> Dict[str, np.ndarray]:
    """Execute a LIF/Linear/Affine/Delay NIR graph on input ``x`` ``[T, B, n_in]``.

    Returns ``{lif_node_name: bool spikes [T, B, n]}`` for every LIF node (the
    populations, for graphs written by :func:`exporters.nir_export.export_nir`),
    plus ``{name + '_mem': float64 [T, B, n]}`` post-reset membranes with
    ``record_membrane``. All arithmetic is float64.
    """
    graph = load_graph(graph_or_path)
    dt = graph_dt(graph, dt)
    plan = _plan(graph, dt)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x[:, None, :]
    n_in = plan.width[plan.input_node]
    if x.ndim != 3 or x.shape[2] != n_in:
        raise ExportError(f"input must be [T, batch, {n_in}], got {list(x.shape)}")
    if not np.all(np.isfinite(x)):
        raise ExportError("input contains NaN/Inf")
    T, B, _ = x.shape

    # Per-node constants.
    lif: Dict[str, Tuple[np.ndarray, ...]] = {}
    lin: Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]] = {}
    for name, kind in plan.kinds.items():
        node = graph.nodes[name]
        if kind == "lif":
            tau = np.asarray(node.tau, dtype=np.float64).reshape(-1)
            if np.any(tau <= 0) or not np.all(np.isfinite(tau)):
                raise UnsupportedNodeError(f"LIF node {name!r}: tau must be positive and finite")
            alpha = dt / tau
            if np.any(alpha > 1.0):
                raise UnsupportedNodeError(f"LIF node {name!r}: tau < dt makes forward Euler unstable (min tau {tau.min()} s, dt {dt} s)")
            decay = 1.0 - alpha
            gain = alpha * np.asarray(node.r, dtype=np.float64).reshape(-1)
            drive = alpha * np.asarray(node.v_leak, dtype=np.float64).reshape(-1)
            thr = np.asarray(node.v_threshold, dtype=np.float64).reshape(-1)
            reset = np.asarray(node.v_reset, dtype=np.float64).reshape(-1)
            lif[name] = (decay, gain, drive, thr, reset)
        elif kind in ("linear", "affine"):
            w = np.asarray(node.weight, dtype=np.float64)
            b = np.asarray(node.bias, dtype=np.float64).reshape(-1) if kind == "affine" else None
            lin[name] = (w.T, b)

    v = {n: np.zeros((B, plan.width[n])) for n in lif}
    spikes = {n: np.zeros((T, B, plan.width[n]), dtype=bool) for n in lif}
    mem = {n: np.zeros((T, B, plan.width[n])) for n in lif} if record_membrane else None
    buffers = {n: np.zeros((k, B, plan.width[n])) for n, k in plan.delays.items()}
    values: Dict[str, np.ndarray] = {}

    def summed(name: str) -> np.ndarray:
        acc = np.zeros((B, plan.width[name] if plan.kinds[name] not in ("linear", "affine")
                        else lin[name][0].shape[0]))
        for src in plan.preds[name]:
            acc += values[src]
        return acc

    for t in range(T):
        slot = {n: t % k for n, k in plan.delays.items()}
        for name in plan.order:
            kind = plan.kinds[name]
            if name in plan.delays:
                values[name] = buffers[name][slot[name]].copy()
            elif kind == "input":
                values[name] = x[t]
            elif kind in ("output", "delay"):  # delay of 0 steps = identity
                values[name] = summed(name)
            elif kind in ("linear", "affine"):
                wt, b = lin[name]
                y = summed(name) @ wt
                values[name] = y + b if b is not None else y
            else:  # lif
                decay, gain, drive, thr, reset = lif[name]
                vn = decay * v[name] + gain * summed(name) + drive
                s = vn > thr
                vn = np.where(s, reset, vn)
                v[name] = vn
                spikes[name][t] = s
                if mem is not None:
                    mem[name][t] = vn
                values[name] = s.astype(np.float64)
        for name in plan.delays:  # u[t] enters the buffer; it leaves at t + k
            buffers[name][slot[name]] = summed(name)
    out: Dict[str, np.ndarray] = dict(spikes)
    if mem is not None:
        out.update({n + "_mem": m for n, m in mem.items()})
    return out


# -- NIR -> CircuitSpec -----------------------------------------------------------------
def _lif_to_population(name: str, node: nir.LIF, dt: float, info: Mapping[str, Any]) -> PopulationSpec:
    tau = np.asarray(node.tau, dtype=np.float64).reshape(-1)
    if np.any(tau <= 0) or not np.all(np.isfinite(tau)):
        raise UnsupportedNodeError(f"LIF node {name!r}: tau must be positive and finite")
    alpha = dt / tau
    beta = 1.0 - alpha
    if not np.allclose(beta, beta[0], rtol=0.0, atol=1e-12):
        raise UnsupportedNodeError(f"LIF node {name!r}: per-neuron tau differs; a CircuitSpec has one decay per population")
    gain = alpha * np.asarray(node.r, dtype=np.float64).reshape(-1)
    if not np.allclose(gain, 1.0, rtol=_RTOL, atol=0.0):
        raise UnsupportedNodeError(f"LIF node {name!r}: input gain dt*r/tau = {gain[0]!r} != 1 (r must equal tau/dt)")
    v_reset = np.asarray(node.v_reset, dtype=np.float64).reshape(-1)
    if np.any(v_reset != RESET_VALUE):
        raise UnsupportedNodeError(f"LIF node {name!r}: v_reset must be {RESET_VALUE} (zero reset), got {np.unique(v_reset)[:3]}")
    bias = alpha * np.asarray(node.v_leak, dtype=np.float64).reshape(-1)
    n = int(tau.size)
    cell_types: List[str] = []
    root_ids = None
    provenance = "model"
    if info:
        if int(info.get("n", n)) != n:
            raise ExportError(f"NIR metadata says population {name} has {int(info['n'])} neurons, LIF node has {n}")
        if "cell_types_json" in info:
            cell_types = json.loads(_meta_str(info, "cell_types_json") or "[]")
        if "root_ids" in info:
            root_ids = np.asarray(info["root_ids"], dtype=np.int64)
        provenance = _meta_str(info, "provenance") or "model"
    try:
        return PopulationSpec(
            name=name, n=n, beta=float(beta[0]), threshold=np.asarray(node.v_threshold, dtype=np.float64).reshape(-1),
            bias=bias, cell_types=cell_types, root_ids=root_ids, provenance=provenance,
        )
    except ValueError as exc:
        raise ExportError(f"NIR LIF node {name!r} is not a valid population: {exc}") from None


def _trace_projection(graph: nir.NIRGraph, plan: _Plan, dt: float, start: str, first: str) -> Tuple[str, np.ndarray, int, str]:
    """Follow ``start -> first -> ... -> <LIF>`` through Delay/Linear nodes;
    returns ``(post, weight, delay_steps, last_node)``."""
    weight = None
    steps = 0
    prev, cur = start, first
    seen = set()
    while plan.kinds[cur] != "lif":
        if cur in seen:
            raise UnsupportedNodeError(f"NIR path from {start!r} loops through {cur!r} without a LIF")
        seen.add(cur)
        kind = plan.kinds[cur]
        if kind in ("output", "input"):
            raise UnsupportedNodeError(f"NIR path from {start!r} reaches {kind} node {cur!r} before a LIF")
        if len(plan.preds[cur]) != 1:
            raise UnsupportedNodeError(f"NIR node {cur!r} on a projection has {len(plan.preds[cur])} inputs; expected 1")
        succ = [d for s, d in graph.edges if s == cur]
        if len(succ) != 1:
            raise UnsupportedNodeError(f"NIR node {cur!r} on a projection has {len(succ)} outputs; expected 1")
        node = graph.nodes[cur]
        if kind == "delay":
            steps += delay_steps(cur, node, dt)
        else:
            if weight is not None:
                raise UnsupportedNodeError(f"NIR path from {start!r} has two weight nodes (…{cur!r}); expected one Linear")
            if kind == "affine" and np.any(np.asarray(node.bias) != 0):
                raise UnsupportedNodeError(f"Affine node {cur!r} has a nonzero bias; projections are Linear")
            weight = np.asarray(node.weight, dtype=np.float64)
        prev, cur = cur, succ[0]
    if weight is None:
        raise UnsupportedNodeError(f"NIR path {start!r} -> {cur!r} has no Linear node")
    return cur, weight, steps, prev


def nir_to_spec(graph_or_path: GraphLike, dt: Optional[float] = None) -> CircuitSpec:
    """Rebuild a :class:`CircuitSpec` from a NIR graph of the shape written by
    :func:`exporters.nir_export.spec_to_nir`.

    Checks: supported node types only; semantics metadata executable exactly;
    ``r = tau/dt``, zero reset, one decay per population; each projection is
    ``LIF -> Delay(one step) -> Linear -> LIF`` (Delay and Linear in any order);
    the Input feeds one LIF directly. Bias is recovered as ``(dt/tau) v_leak``.
    """
    graph = load_graph(graph_or_path)
    dt = graph_dt(graph, dt)
    plan = _plan(graph, dt)
    meta = graph.metadata if isinstance(graph.metadata, dict) else {}
    pop_meta = meta.get("populations", {}) or {}

    lif_names = [n for n in graph.nodes if plan.kinds[n] == "lif"]
    if not lif_names:
        raise ExportError("NIR graph has no LIF nodes")
    order_json = _meta_str(meta, "population_order_json")
    if order_json:
        order = json.loads(order_json)
        if sorted(order) != sorted(lif_names):
            raise ExportError(f"NIR metadata population order {order} does not match the LIF nodes {lif_names}")
        lif_names = order
    populations = [_lif_to_population(n, graph.nodes[n], dt, pop_meta.get(n, {})) for n in lif_names]

    # Input -> exactly one LIF, without delay.
    in_targets = [d for s, d in graph.edges if s == plan.input_node]
    if len(in_targets) != 1 or plan.kinds[in_targets[0]] != "lif":
        raise UnsupportedNodeError(f"the Input node must feed exactly one LIF directly, it feeds {in_targets}")
    input_population = in_targets[0]
    meta_input = _meta_str(meta, "input_population")
    if meta_input is not None and meta_input != input_population:
        raise ExportError(f"NIR metadata input_population={meta_input!r} but the Input feeds {input_population!r}")

    # Projections, ordered by the position of their last edge (the summation
    # order of a LIF's inputs in run_nir).
    found: List[Tuple[int, ProjectionSpec]] = []
    edge_index = {(s, d): i for i, (s, d) in enumerate(graph.edges)}
    for i, (src, dst) in enumerate(graph.edges):
        if plan.kinds.get(src) != "lif" or plan.kinds[dst] == "output":
            continue
        if plan.kinds[dst] == "lif":
            raise UnsupportedNodeError(f"NIR edge {src!r} -> {dst!r} connects two LIF nodes without a Linear and a Delay")
        post, weight, steps, last = _trace_projection(graph, plan, dt, src, dst)
        if steps != SYNAPTIC_DELAY_STEPS:
            raise UnsupportedNodeError(f"projection {src}->{post} has {steps} steps of delay; dmn-neuro uses {SYNAPTIC_DELAY_STEPS}")
        try:
            proj = ProjectionSpec(pre=src, post=post, weight=weight)
        except ValueError as exc:
            raise ExportError(f"NIR projection {src}->{post}: {exc}") from None
        found.append((edge_index[(last, post)], proj))
    projections = [p for _, p in sorted(found, key=lambda item: item[0])]
    proj_meta = _meta_str(meta, "projections_json")
    if proj_meta:
        for entry in json.loads(proj_meta):
            for p in projections:
                if p.pre == entry["pre"] and p.post == entry["post"]:
                    p.provenance = str(entry.get("provenance", p.provenance))

    outputs = [s for s, d in graph.edges if plan.kinds[d] == "output" and plan.kinds.get(s) == "lif"]
    output_population = _meta_str(meta, "output_population")
    if output_population is None:
        if len(set(outputs)) != 1:
            raise ExportError(f"NIR graph metadata has no output_population and {len(set(outputs))} LIF outputs")
        output_population = outputs[0]

    dt_ms = float(meta["dt_ms"]) if "dt_ms" in meta else dt * 1e3
    spec_meta_json = _meta_str(meta, "spec_metadata_json")
    spec_meta = json.loads(spec_meta_json) if spec_meta_json else {}
    try:
        return CircuitSpec(
            populations, projections, NeuronSemantics(dt_ms=dt_ms),
            input_population=input_population, output_population=output_population, metadata=spec_meta,
        )
    except ValueError as exc:
        raise ExportError(f"NIR graph does not form a valid circuit: {exc}") from None
