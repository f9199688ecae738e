"""Export a :class:`~dmn_neuro.simulation.spec.CircuitSpec` to NIR, built node by node.

The graph is built directly from the circuit (not through snnTorch's
``export_to_nir``, which hard-codes ``dt = 1e-4`` and drops reset modes and
masks; see ``shared/notes/nir_snntorch.md``). Layout, for a spec with
populations ``P`` and projections ``pre -> post``::

    input ─────────────────────────────► <input population> (LIF)
    <pre> (LIF) ─► d_<pre>_<post> (Delay, one step) ─► w_<pre>_<post> (Linear) ─► <post> (LIF)
    <pop> (LIF) ─► out_<pop> (Output)            for every population

* **Every population is an Output** (``out_<pop>``), not only the circuit's
  output population: the verifier compares the spikes of all populations, and a
  backend that only wants the behavioural read-out uses
  ``metadata["output_node"]`` (``out_DN``).
* **LIF parameters** come from :func:`dmn_neuro.simulation.semantics.nir_lif_parameters`
  with the true ``dt`` (seconds). NIR's LIF is ``tau dv/dt = (v_leak - v) + r I``;
  with forward Euler ``v <- (1 - dt/tau) v + (dt/tau) v_leak + (dt/tau) r I``.
  ``r = tau/dt`` makes the input gain 1, so the step is ``v <- beta v + I``.
* **Per-neuron bias** (NIR's LIF has none) is encoded in ``v_leak``: a constant
  drive ``(dt/tau) v_leak = bias``, i.e. ``v_leak = bias * tau / dt``.
* **Bit-exact coefficients**: ``tau``, ``r`` and ``v_leak`` are moved by at most
  a few units in the last place so that the Euler coefficients *evaluated in
  float64 as written above* (``alpha = dt/tau``; ``1 - alpha``, ``alpha * r``,
  ``alpha * v_leak``) equal ``beta``, ``1`` and ``bias`` exactly whenever such a
  float exists. A consumer that evaluates these expressions reproduces the
  model spike for spike; any other order of evaluation differs by rounding only.
* **Delays**: every synaptic hop carries a :class:`nir.Delay` of
  ``SYNAPTIC_DELAY_STEPS * dt`` seconds (one step), so the graph itself encodes
  the per-hop delay of the model (and of Lava's Dense). The external input
  enters the input population without delay.
* **Metadata** (graph level): dt, discretisation, reset semantics, spike
  condition, delay per hop, bias encoding, per-population cell types (JSON
  string), FlyWire root ids (int64 arrays), provenance, and the spec's own
  metadata (dataset, version, ...). See :func:`graph_metadata`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

import nir

from connectome.atomic import describe_os_error, ensure_parent, temp_sibling
from dmn_neuro.errors import ExportError
from dmn_neuro.simulation.semantics import (
    DISCRETISATION,
    RESET_MODE,
    RESET_VALUE,
    SPIKE_CONDITION,
    SYNAPTIC_DELAY_STEPS,
    nir_lif_parameters,
)
from dmn_neuro.simulation.spec import CircuitSpec

logger = logging.getLogger(__name__)

#: Value of ``metadata["format"]`` in graphs written here; the importer checks it.
NIR_FORMAT = "dmn-neuro-nir"
NIR_FORMAT_VERSION = 1
#: Name of the graph's single Input node.
INPUT_NODE = "input"
#: The Euler update (as evaluated by :func:`exporters.nir_import.run_nir`).
EULER_UPDATE = "alpha = dt/tau; v <- (1 - alpha) * v + (alpha * r) * I + alpha * v_leak"
BIAS_ENCODING = "v_leak = bias * tau / dt  (so that (dt/tau) * v_leak = bias)"
#: Most ulps by which a parameter may be moved to make the float64 coefficients exact.
_MAX_ULPS = 8


def delay_node_name(pre: str, post: str) -> str:
    return f"d_{pre}_{post}"


def linear_node_name(pre: str, post: str) -> str:
    return f"w_{pre}_{post}"


def output_node_name(pop: str) -> str:
    return f"out_{pop}"


# -- float64 polishing ------------------------------------------------------------------
def _ulp_search(start: np.ndarray, ok) -> np.ndarray:
    """Per element, the float nearest ``start`` (within ``_MAX_ULPS``) for which
    ``ok(candidate)`` holds; ``start`` where none does."""
    start = np.asarray(start, dtype=np.float64)
    best = start.copy()
    done = ok(start)
    up, down = start.copy(), start.copy()
    for _ in range(_MAX_ULPS):
        if done.all():
            break
        up = np.nextafter(up, np.inf)
        down = np.nextafter(down, -np.inf)
        for cand in (up, down):
            hit = ~done & ok(cand)
            best = np.where(hit, cand, best)
            done = done | hit
    return best


def exact_lif_parameters(beta: float, threshold: np.ndarray, bias: np.ndarray, dt_s: float) -> Dict[str, np.ndarray]:
    """NIR LIF arrays for one population (per neuron, float64).

    Starts from :func:`dmn_neuro.simulation.semantics.nir_lif_parameters`, encodes the bias
    in ``v_leak``, then polishes ``tau``, ``r`` and ``v_leak`` to the last ulp
    (see the module docstring).
    """
    threshold = np.asarray(threshold, dtype=np.float64)
    bias = np.asarray(bias, dtype=np.float64)
    n = threshold.shape[0]
    base = nir_lif_parameters(beta, 1.0, dt_s)
    if base["v_reset"] != RESET_VALUE:  # pragma: no cover - guarded by semantics
        raise ExportError("semantics changed: reset value is not RESET_VALUE")
    tau0 = np.full(1, base["tau"], dtype=np.float64)
    tau = _ulp_search(tau0, lambda t: (1.0 - dt_s / t) == beta)
    alpha = dt_s / tau[0]
    if 1.0 - alpha != beta:
        logger.debug("no float64 tau reproduces beta=%r exactly (off by %g)", beta, (1.0 - alpha) - beta)
    r0 = np.full(1, tau[0] / dt_s, dtype=np.float64)
    r = _ulp_search(r0, lambda c: (alpha * c) == 1.0)
    v_leak = _ulp_search(bias / alpha, lambda c: (alpha * c) == bias)
    return {
        "tau": np.full(n, tau[0]),
        "r": np.full(n, r[0]),
        "v_leak": v_leak,
        "v_threshold": threshold.copy(),
        "v_reset": np.full(n, float(base["v_reset"])),
    }


# -- metadata ---------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """JSON-safe copy of spec metadata (numpy scalars/arrays -> Python)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def graph_metadata(spec: CircuitSpec) -> Dict[str, Any]:
    """Graph-level metadata. Only HDF5-storable values (str, float, int, arrays,
    nested dicts); lists of strings are stored as JSON strings."""
    dt_s = spec.semantics.dt_s
    spec_meta = _plain(spec.metadata)
    pops = {}
    for p in spec.populations:
        pops[p.name] = {
            "n": int(p.n),
            "beta": float(p.beta),
            "cell_types_json": json.dumps(list(p.cell_types)),
            "root_ids": np.asarray(p.root_ids, dtype=np.int64),
            "provenance": str(p.provenance),
        }
    projections = [
        {"pre": q.pre, "post": q.post, "delay_node": delay_node_name(q.pre, q.post),
         "linear_node": linear_node_name(q.pre, q.post), "provenance": str(q.provenance)}
        for q in spec.projections
    ]
    meta: Dict[str, Any] = {
        "format": NIR_FORMAT,
        "format_version": NIR_FORMAT_VERSION,
        "generator": "dmn-neuro exporters.nir_export",
        "nir_version": str(getattr(nir, "__version__", "unknown")),
        "dt": float(dt_s),
        "dt_unit": "s",
        "dt_ms": float(spec.semantics.dt_ms),
        "discretisation": DISCRETISATION,
        "euler_update": EULER_UPDATE,
        "reset": RESET_MODE,
        "reset_value": float(RESET_VALUE),
        "reset_timing": "same-step",
        "spike_condition": SPIKE_CONDITION,
        "delay_steps_per_hop": int(SYNAPTIC_DELAY_STEPS),
        "delay_per_hop_s": float(SYNAPTIC_DELAY_STEPS * dt_s),
        "input_delay_steps": 0,
        "bias_encoding": BIAS_ENCODING,
        "input_node": INPUT_NODE,
        "input_population": spec.input_population,
        "output_population": spec.output_population,
        "output_node": output_node_name(spec.output_population),
        "outputs": "one Output node per population (out_<population>)",
        "population_order_json": json.dumps(spec.population_names),
        "projections_json": json.dumps(projections),
        "populations": pops,
        "spec_metadata_json": json.dumps(spec_meta, sort_keys=True, default=str),
    }
    for key in ("dataset", "version", "dataset_version", "materialization", "checkpoint", "model"):
        if key in spec_meta and isinstance(spec_meta[key], (str, int, float)) and not isinstance(spec_meta[key], bool):
            meta[key] = spec_meta[key]
    return meta


# -- graph ------------------------------------------------------------------------------
def spec_to_nir(spec: CircuitSpec) -> nir.NIRGraph:
    """Build the NIR graph of ``spec`` (type-checked by NIR on construction)."""
    if not isinstance(spec, CircuitSpec):
        raise ExportError(f"spec_to_nir expects a CircuitSpec, got {type(spec).__name__}")
    dt_s = spec.semantics.dt_s
    reserved = {INPUT_NODE} | {output_node_name(p) for p in spec.population_names}
    nodes: Dict[str, nir.NIRNode] = {INPUT_NODE: nir.Input(input_type={"input": np.array([spec.n_input])})}
    edges: List[Tuple[str, str]] = [(INPUT_NODE, spec.input_population)]
    for p in spec.populations:
        if p.name in reserved or p.name.startswith(("d_", "w_", "out_")) or "/" in p.name:
            raise ExportError(f"population name {p.name!r} clashes with NIR node naming (input, d_*, w_*, out_*, '/')")
        params = exact_lif_parameters(p.beta, p.threshold, p.bias, dt_s)
        nodes[p.name] = nir.LIF(**params, metadata={"population": p.name})
    for q in spec.projections:
        d_name, w_name = delay_node_name(q.pre, q.post), linear_node_name(q.pre, q.post)
        if d_name in nodes or w_name in nodes:
            raise ExportError(f"duplicate projection {q.name}: NIR node {w_name!r} already exists")
        n_pre = spec.population(q.pre).n
        nodes[d_name] = nir.Delay(
            delay=np.full(n_pre, SYNAPTIC_DELAY_STEPS * dt_s, dtype=np.float64),
            metadata={"delay_steps": int(SYNAPTIC_DELAY_STEPS), "projection": q.name},
        )
        nodes[w_name] = nir.Linear(weight=np.array(q.weight, dtype=np.float64), metadata={"projection": q.name})
        edges += [(q.pre, d_name), (d_name, w_name), (w_name, q.post)]
    for p in spec.populations:
        out = output_node_name(p.name)
        nodes[out] = nir.Output(output_type={"output": np.array([p.n])})
        edges.append((p.name, out))
    try:
        graph = nir.NIRGraph(nodes=nodes, edges=edges, metadata=graph_metadata(spec), type_check=True)
    except (ValueError, AssertionError) as exc:
        raise ExportError(f"NIR type check failed: {exc}") from None
    return graph


def check_nir_graph(graph: nir.NIRGraph) -> None:
    """Run NIR's own structure and type checks; raise :class:`ExportError` on failure."""
    try:
        graph.validate_structure()
        graph.infer_types()
        graph.check_types()
    except (ValueError, AssertionError, NotImplementedError, KeyError) as exc:
        raise ExportError(f"NIR graph fails NIR's type check: {exc}") from None


def export_nir(spec: CircuitSpec, path: os.PathLike) -> Path:
    """Write ``spec`` as a NIR (HDF5) file, atomically; the file is re-read with
    :func:`nir.read` (type-checked) before it replaces ``path``.

    Stores: ``path`` (NIR HDF5, gzip). Returns ``path``.
    """
    path = Path(path)
    graph = spec_to_nir(spec)
    ensure_parent(path)
    if path.is_dir():
        raise ExportError(f"cannot write NIR file {path}: a directory is in the way")
    tmp = temp_sibling(path, "tmp")
    try:
        nir.write(tmp, graph)
        check_nir_graph(nir.read(tmp, type_check=True))
        os.replace(tmp, path)
    except ExportError:
        raise
    except OSError as exc:
        raise ExportError(describe_os_error(exc, f"NIR file {path}")) from None
    except (ValueError, TypeError) as exc:
        raise ExportError(f"cannot write NIR file {path}: {exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.info("wrote NIR graph with %s nodes to %s", len(graph.nodes), path)
    return path
