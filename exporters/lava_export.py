"""Export a :class:`~dmn_neuro.simulation.spec.CircuitSpec` as a framework-neutral Lava process graph.

The graph is two files in ``out_dir``:

* ``lava_graph.json`` -- the manifest: format/version, mode (``float`` or
  ``fixed``), dt, the semantics dict, the input lag, one entry per process
  (``source``; one ``LIF`` per population with ``du``, ``dv``, ``vth``, cell
  types) and one per connection (``Dense``: pre, post, message bits, weight
  exponent, sign mode), the names of the arrays holding the numbers, and, in
  fixed point, the quantisation report.
* ``lava_graph.npz`` -- the arrays (``allow_pickle=False``; numpy 1.26 reads it).

Lava semantics used (see ``dmn_neuro.simulation.semantics``): LIF with ``du = 1`` (``u =
a_in``, no synaptic filter), ``dv = 1 - beta``; per-neuron thresholds folded
into each incoming row and the bias (``vth = 1``). Spikes travel through
``Dense`` with ``num_message_bits = 0``; the graded ORN input goes source ->
``Dense(num_message_bits=24)`` -> ORN, one extra hop, so every Lava population
lags the model by :data:`dmn_neuro.simulation.semantics.LAVA_INPUT_DELAY_STEPS`.
The worker (``exporters/lava_worker/worker.py``) builds and runs this graph.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Mapping, Tuple

import numpy as np

from connectome.atomic import atomic_dir
from dmn_neuro.errors import ExportError
from dmn_neuro.simulation.semantics import LAVA_INPUT_DELAY_STEPS, lava_lif_parameters
from dmn_neuro.simulation.spec import CircuitSpec, read_npz_arrays

from dmn_neuro.simulation.fixed_point import DECAY_UNITY, MAX_UV, FixedPointSpec, decay_trunc, quantize

logger = logging.getLogger(__name__)

GRAPH_FORMAT = "dmn-neuro-lava-graph"
GRAPH_FORMAT_VERSION = 1
MANIFEST_NAME = "lava_graph.json"
ARRAYS_NAME = "lava_graph.npz"
NETX_NAME = "netx.h5"
INPUT_PROCESS = "input"
GRADED_MESSAGE_BITS = 24
SPIKE_MESSAGE_BITS = 0


def _float_v_init(name: str, bias: np.ndarray, dv: float) -> np.ndarray:
    """Initial membrane that the lag step (Lava step 1: no input yet, bias only) brings to 0.

    Every Lava population runs one step before the model's first step (the
    input hop); with ``v_init = -bias / (1 - dv)`` it ends that step at
    ``v = 0`` (up to one rounding), the model's ``v[-1] = 0``.
    """
    keep = 1.0 - dv
    if keep == 0.0:
        if np.any(bias > 1.0):
            raise ExportError(f"population {name}: beta = 0 and bias above threshold would spike in the Lava lag step")
        return np.zeros_like(bias)
    return -bias / keep


def _fixed_v_init(name: str, eff_bias: np.ndarray, dv: int) -> np.ndarray:
    """Integer ``v0`` with ``trunc(v0 * (4096 - dv) / 4096) == -eff_bias`` exactly (see :func:`_float_v_init`)."""
    k = DECAY_UNITY - int(dv)
    target = -np.asarray(eff_bias, dtype=np.int64)
    v0 = np.zeros_like(target)
    for i, tgt in enumerate(target):
        if tgt == 0:
            continue
        guess = int(tgt) * DECAY_UNITY // k
        for cand in sorted(range(guess - 2, guess + 3), key=abs):
            if int(decay_trunc(np.int64(cand), int(dv))) == tgt:
                v0[i] = cand
                break
        else:  # pragma: no cover - every integer is reachable for 1 <= k <= 4096
            raise ExportError(f"population {name}: no exact initial membrane for bias {int(-tgt)}")
    if np.any(np.abs(v0) >= MAX_UV):
        raise ExportError(f"population {name}: bias too large for the 24-bit membrane in the Lava lag step")
    return v0.astype(np.int32)


def _float_graph(spec: CircuitSpec) -> Tuple[dict, Dict[str, np.ndarray]]:
    arrays: Dict[str, np.ndarray] = {}
    procs = [{"name": INPUT_PROCESS, "kind": "source", "n": spec.n_input}]
    for p in spec.populations:
        lif = lava_lif_parameters(p.beta)
        arrays[f"lif/{p.name}/bias_mant"] = p.bias / p.threshold
        arrays[f"lif/{p.name}/v_init"] = _float_v_init(p.name, p.bias / p.threshold, lif["dv"])
        procs.append({
            "name": p.name, "kind": "LIF", "n": p.n, "du": lif["du"], "dv": lif["dv"], "vth": 1.0,
            "bias_mant": f"lif/{p.name}/bias_mant", "bias_exp": 0, "v_init": f"lif/{p.name}/v_init", "beta": p.beta,
            "cell_types": list(p.cell_types), "threshold": f"lif/{p.name}/threshold",
        })
        arrays[f"lif/{p.name}/threshold"] = p.threshold
    inp = spec.population(spec.input_population)
    arrays["conn/0/weights"] = np.diag(1.0 / inp.threshold)
    arrays["input/scale"] = np.ones(inp.n)
    conns = [{"name": f"{INPUT_PROCESS}->{inp.name}", "kind": "Dense", "pre": INPUT_PROCESS, "post": inp.name,
              "weights": "conn/0/weights", "num_message_bits": GRADED_MESSAGE_BITS}]
    for i, q in enumerate(spec.projections, start=1):
        theta = spec.population(q.post).threshold
        arrays[f"conn/{i}/weights"] = q.weight / theta[:, None]
        conns.append({"name": q.name, "kind": "Dense", "pre": q.pre, "post": q.post,
                      "weights": f"conn/{i}/weights", "num_message_bits": SPIKE_MESSAGE_BITS})
    return {"processes": procs, "connections": conns, "input": {"scale": "input/scale", "quantise": False}}, arrays


def _fixed_graph(fps: FixedPointSpec) -> Tuple[dict, Dict[str, np.ndarray]]:
    arrays: Dict[str, np.ndarray] = {}
    procs = [{"name": INPUT_PROCESS, "kind": "source", "n": fps.population(fps.input_population).n}]
    for p in fps.populations:
        arrays[f"lif/{p.name}/bias_mant"] = p.bias_mant.astype(np.int32)
        arrays[f"lif/{p.name}/bias_exp"] = p.bias_exp.astype(np.int32)
        arrays[f"lif/{p.name}/threshold"] = p.threshold
        arrays[f"lif/{p.name}/v_init"] = _fixed_v_init(p.name, p.effective_bias, p.dv)
        procs.append({
            "name": p.name, "kind": "LIF", "n": p.n, "du": int(p.du), "dv": int(p.dv), "vth": int(p.vth),
            "bias_mant": f"lif/{p.name}/bias_mant", "bias_exp": f"lif/{p.name}/bias_exp",
            "v_init": f"lif/{p.name}/v_init", "beta": p.beta,
            "cell_types": list(p.cell_types), "threshold": f"lif/{p.name}/threshold",
        })
    n_in = fps.population(fps.input_population).n
    arrays["conn/0/weights"] = np.eye(n_in, dtype=np.int32)
    arrays["input/scale"] = fps.input_scale
    conns = [{"name": f"{INPUT_PROCESS}->{fps.input_population}", "kind": "Dense", "pre": INPUT_PROCESS,
              "post": fps.input_population, "weights": "conn/0/weights", "num_message_bits": GRADED_MESSAGE_BITS,
              "weight_exp": 0, "num_weight_bits": 8, "sign_mode": "EXCITATORY"}]
    for i, q in enumerate(fps.projections, start=1):
        arrays[f"conn/{i}/weights"] = q.weight.astype(np.int32)
        conns.append({"name": q.name, "kind": "Dense", "pre": q.pre, "post": q.post, "weights": f"conn/{i}/weights",
                      "num_message_bits": SPIKE_MESSAGE_BITS, "weight_exp": int(q.weight_exp),
                      "num_weight_bits": int(q.num_weight_bits), "sign_mode": q.sign_mode})
    inp = {"scale": "input/scale", "quantise": True, "limit": int(fps.input_limit)}
    return {"processes": procs, "connections": conns, "input": inp}, arrays


def export_lava(spec: CircuitSpec, out_dir: os.PathLike, fixed_point: bool = False, write_netx_file: bool = True,
                **fp_options) -> dict:
    """Write the Lava process graph of ``spec`` into ``out_dir``.

    ``fixed_point=True`` quantises with :func:`dmn_neuro.simulation.fixed_point.quantize`
    (``fp_options`` go there) and also writes the netx HDF5 file (unless
    ``write_netx_file=False``).

    Returns ``{"graph_dir", "manifest", "files", "fixed_point"}`` plus, in fixed
    point, ``"quantisation"`` (the report) and ``"fixed_point_spec"``.

    Stores: ``lava_graph.json``, ``lava_graph.npz`` and, in fixed point, ``netx.h5``.
    """
    if not isinstance(spec, CircuitSpec):
        raise ExportError(f"export_lava needs a CircuitSpec, got {type(spec).__name__}")
    if spec.semantics.lava_input_delay_steps != LAVA_INPUT_DELAY_STEPS:
        raise ExportError(f"semantics.lava_input_delay_steps={spec.semantics.lava_input_delay_steps}, "
                          f"the Lava graph adds exactly {LAVA_INPUT_DELAY_STEPS}")
    if fp_options and not fixed_point:
        raise ExportError(f"fixed-point options {sorted(fp_options)} given without fixed_point=True")
    out = Path(out_dir)
    fps = None
    if fixed_point:
        fps = quantize(spec, **fp_options)
        body, arrays = _fixed_graph(fps)
    else:
        body, arrays = _float_graph(spec)
    manifest = {
        "format": GRAPH_FORMAT,
        "format_version": GRAPH_FORMAT_VERSION,
        "mode": "fixed" if fixed_point else "float",
        "select_tag": "fixed_pt" if fixed_point else "floating_pt",
        "dt_ms": spec.semantics.dt_ms,
        "semantics": spec.semantics.to_dict(),
        "lava_input_delay_steps": LAVA_INPUT_DELAY_STEPS,
        "input_population": spec.input_population,
        "output_population": spec.output_population,
        "populations": [{"name": p.name, "n": p.n, "cell_types": sorted(set(p.cell_types))} for p in spec.populations],
        "threshold_folding": "row i of every incoming weight and bias divided by theta_i; vth = 1 (float) "
                             "or one integer per population (fixed)",
        "metadata": spec.metadata,
        **body,
    }
    if fps is not None:
        manifest["quantisation"] = fps.report
    names = [ARRAYS_NAME, MANIFEST_NAME] + ([NETX_NAME] if fps is not None and write_netx_file else [])
    # The whole directory is built aside and swapped in: a reader sees the old
    # export or the new one, never a mix (no stale netx.h5 from an earlier
    # fixed-point export), and a failure or Ctrl-C leaves the old one untouched.
    with atomic_dir(out) as tmp:
        with open(tmp / ARRAYS_NAME, "wb") as fh:
            np.savez(fh, **arrays)
        (tmp / MANIFEST_NAME).write_bytes(json.dumps(manifest, indent=1, default=_json_default).encode())
        if fps is not None and write_netx_file:
            from exporters.netx import write_netx

            write_netx(fps, tmp / NETX_NAME)
    files = [out / name for name in names]
    result = {"graph_dir": out, "manifest": manifest, "files": files, "fixed_point": bool(fixed_point)}
    if fps is not None:
        result["quantisation"] = fps.report
        result["fixed_point_spec"] = fps
    logger.info("wrote Lava graph (%s) to %s", manifest["mode"], out)
    return result


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_lava_graph(graph_dir: os.PathLike) -> Tuple[dict, Dict[str, np.ndarray]]:
    """Read and check a graph written by :func:`export_lava`; raises ExportError (one line) when unusable."""
    d = Path(graph_dir)
    mpath, apath = d / MANIFEST_NAME, d / ARRAYS_NAME
    for path in (mpath, apath):
        if not path.is_file():
            raise ExportError(f"Lava graph file not found: {path}")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"Lava graph manifest {mpath} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != GRAPH_FORMAT:
        raise ExportError(f"{mpath} is not a dmn-neuro Lava graph")
    if manifest.get("format_version") != GRAPH_FORMAT_VERSION:
        raise ExportError(f"{mpath}: unsupported format_version {manifest.get('format_version')!r}")
    arrays = read_npz_arrays(apath, ExportError, "Lava graph arrays")
    for key in [c["weights"] for c in manifest.get("connections", [])] + [manifest.get("input", {}).get("scale")]:
        if key not in arrays:
            raise ExportError(f"Lava graph {d} is missing array {key!r}")
    return manifest, arrays
