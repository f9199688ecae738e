"""Run a dmn-neuro Lava graph with lava-nc 0.10.0 (run with the .venv-lava interpreter).

    python worker.py --graph DIR --input x.npy --out spikes.npz [--steps T] [--fixed-point]
                     [--batch-chunk C]

Reads ``DIR/lava_graph.json`` + ``DIR/lava_graph.npz`` (written by
``exporters.lava_export.export_lava``) and the real-valued ORN input
``x [T, B, n_in]``; builds one ``lava.proc.lif.process.LIF`` per population, one
``lava.proc.dense.process.Dense`` per connection, a ``RingBuffer`` source for the
graded input and one fast custom sink (:class:`SpikeSink`) that writes every
step of every population into a memory-mapped ``.npy``; runs with
``Loihi2SimCfg(select_tag="floating_pt" | "fixed_pt")``.

Batch: ``C`` batch elements are stacked as independent copies in one Lava
network (LIF shape ``C * n``, block-diagonal weights) and the batch runs in
chunks of ``C``, one Lava run each. Stacking pays for small circuits (the cost
per step is messaging between processes), not for large ones (Dense gathers
``C**2`` times more weights per step: 4 stacked copies of the full fly circuit
ran 3x slower than 4 runs of one), so the default ``C`` is the largest with
``C**2 * (total weight elements) <= 2**18`` -- 1 for the full circuit.

Output ``spikes.npz``: ``{population: bool [T, B, n]}`` in model time (the raw
Lava output shifted back by the input lag), ``lag`` (raw lag, steps),
``lava_steps`` (steps Lava ran per chunk) and ``timing_json``.

This folder must hold only worker scripts: Lava's compiler imports every .py
file next to a module that defines a custom Process when it searches for
ProcessModels; the ``__main__`` guard keeps that import side-effect free.
On failure it prints one line ``lava worker: <problem>`` on stderr and exits 2.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from lava.magma.core.decorator import implements, requires, tag
from lava.magma.core.model.py.model import PyLoihiProcessModel
from lava.magma.core.model.py.ports import PyInPort
from lava.magma.core.model.py.type import LavaPyType
from lava.magma.core.process.ports.ports import InPort
from lava.magma.core.process.process import AbstractProcess
from lava.magma.core.resources import CPU
from lava.magma.core.sync.protocols.loihi_protocol import LoihiProtocol

MAX_SINK_PORTS = 8


class SpikeSink(AbstractProcess):
    """Writes the vectors arriving on ``in_0 .. in_{k-1}`` at step t into row t-1
    of the memory-mapped ``.npy`` files ``paths[k]`` (uint8 [steps, n_k])."""

    def __init__(self, *, shapes, paths, name=None):
        if not 1 <= len(shapes) <= MAX_SINK_PORTS or len(shapes) != len(paths):
            raise ValueError(f"SpikeSink takes 1..{MAX_SINK_PORTS} ports, got {len(shapes)}")
        super().__init__(shapes=list(shapes), paths=list(paths), name=name)
        for k in range(MAX_SINK_PORTS):
            shape = tuple(shapes[k]) if k < len(shapes) else (1,)
            setattr(self, f"in_{k}", InPort(shape=shape))


@implements(proc=SpikeSink, protocol=LoihiProtocol)
@requires(CPU)
@tag("floating_pt", "fixed_pt")
class PySpikeSinkModel(PyLoihiProcessModel):
    in_0: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    in_1: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    in_2: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    in_3: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    in_4: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    in_5: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    in_6: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    in_7: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)

    def __init__(self, proc_params):
        super().__init__(proc_params)
        self._paths = list(proc_params["paths"])
        self._maps = None

    def run_spk(self):
        if self._maps is None:
            self._maps = [np.load(p, mmap_mode="r+") for p in self._paths]
            self._ports = [getattr(self, f"in_{k}") for k in range(len(self._paths))]
        row = self.time_step - 1
        for port, mm in zip(self._ports, self._maps):
            data = port.recv()
            if row < mm.shape[0]:
                mm[row] = data != 0


class WorkerError(Exception):
    pass


def _load_graph(graph_dir):
    mpath = os.path.join(graph_dir, "lava_graph.json")
    apath = os.path.join(graph_dir, "lava_graph.npz")
    try:
        with open(mpath) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as exc:
        raise WorkerError(f"cannot read graph manifest {mpath}: {exc}")
    if not isinstance(manifest, dict) or manifest.get("format") != "dmn-neuro-lava-graph":
        raise WorkerError(f"{mpath} is not a dmn-neuro Lava graph")
    try:
        with np.load(apath, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise WorkerError(f"cannot read graph arrays {apath}: {exc}")
    return manifest, arrays


def _block_diag(w, c):
    if c == 1:
        return w
    out = np.zeros((c * w.shape[0], c * w.shape[1]), dtype=w.dtype)
    for b in range(c):
        out[b * w.shape[0]:(b + 1) * w.shape[0], b * w.shape[1]:(b + 1) * w.shape[1]] = w
    return out


def _arr(arrays, key):
    if key not in arrays:
        raise WorkerError(f"graph is missing array {key!r}")
    return arrays[key]


def _run_chunk(manifest, arrays, src_data, steps, fixed, tmpdir):
    """Build and run the graph for ``c`` stacked batch elements; src_data [c, n_in, steps]."""
    from lava.magma.core.run_conditions import RunSteps
    from lava.magma.core.run_configs import Loihi2SimCfg
    from lava.proc.dense.process import Dense
    from lava.proc.io.source import RingBuffer
    from lava.proc.lif.process import LIF
    from lava.utils.weightutils import SignMode

    c = src_data.shape[0]
    t0 = time.perf_counter()
    procs = {}
    lifs = []
    for p in manifest["processes"]:
        n = int(p["n"])
        if p["kind"] == "source":
            data = src_data.reshape(c * n, steps)  # copy b at rows b*n .. (b+1)*n-1
            procs[p["name"]] = RingBuffer(data=data)
        elif p["kind"] == "LIF":
            bias = np.tile(_arr(arrays, p["bias_mant"]), c)
            bexp = p["bias_exp"]
            bexp = np.tile(_arr(arrays, bexp), c) if isinstance(bexp, str) else bexp
            # v_init: the lag step (bias only, no input yet) ends at v = 0, the model's v[-1].
            v0 = np.tile(_arr(arrays, p["v_init"]), c)
            if fixed:
                lif = LIF(shape=(c * n,), du=int(p["du"]), dv=int(p["dv"]), vth=int(p["vth"]),
                          bias_mant=bias.astype(np.int32), bias_exp=np.asarray(bexp, dtype=np.int32),
                          v=v0.astype(np.int32), name=p["name"])
            else:
                lif = LIF(shape=(c * n,), du=float(p["du"]), dv=float(p["dv"]), vth=float(p["vth"]),
                          bias_mant=bias.astype(np.float64), bias_exp=bexp, v=v0.astype(np.float64),
                          name=p["name"])
            procs[p["name"]] = lif
            lifs.append((p["name"], n, lif))
        else:
            raise WorkerError(f"unknown process kind {p['kind']!r}")
    for q in manifest["connections"]:
        if q["kind"] != "Dense":
            raise WorkerError(f"unknown connection kind {q['kind']!r}")
        if q["pre"] not in procs or q["post"] not in procs:
            raise WorkerError(f"connection {q['name']}: unknown process")
        w = _block_diag(_arr(arrays, q["weights"]), c)
        kw = {"num_message_bits": int(q["num_message_bits"]), "name": q["name"]}
        if fixed:
            kw.update(weight_exp=int(q.get("weight_exp", 0)), num_weight_bits=int(q.get("num_weight_bits", 8)),
                      sign_mode=SignMode[q.get("sign_mode", "MIXED")])
            w = w.astype(np.int32)
        else:
            w = w.astype(np.float64)
        if w.shape != (procs[q["post"]].a_in.shape[0], procs[q["pre"]].s_out.shape[0]):
            raise WorkerError(f"connection {q['name']}: weights {w.shape} do not match its processes")
        dense = Dense(weights=w, **kw)
        procs[q["pre"]].s_out.connect(dense.s_in)
        dense.a_out.connect(procs[q["post"]].a_in)
    paths = []
    sinks = []
    for k0 in range(0, len(lifs), MAX_SINK_PORTS):
        group = lifs[k0:k0 + MAX_SINK_PORTS]
        gpaths = []
        for name, n, _ in group:
            path = os.path.join(tmpdir, f"spk_{len(paths)}.npy")
            np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(steps, c * n)).flush()
            paths.append(path)
            gpaths.append(path)
        sink = SpikeSink(shapes=[(c * n,) for _, n, _ in group], paths=gpaths)
        for k, (_, _, lif) in enumerate(group):
            lif.s_out.connect(getattr(sink, f"in_{k}"))
        sinks.append(sink)
    t1 = time.perf_counter()
    run_cfg = Loihi2SimCfg(select_tag="fixed_pt" if fixed else "floating_pt")
    anchor = lifs[0][2]
    try:
        anchor.run(condition=RunSteps(num_steps=steps), run_cfg=run_cfg)
    finally:
        anchor.stop()
    t2 = time.perf_counter()
    out = {}
    for (name, n, _), path in zip(lifs, paths):
        raw = np.load(path).astype(bool)  # [steps, c*n]
        out[name] = raw.reshape(steps, c, n)
        os.remove(path)
    return out, {"build_s": t1 - t0, "run_s": t2 - t1, "steps": steps, "stacked": c}


#: Stack batch copies only while the block-diagonal weights stay this small (elements):
#: beyond it Dense's per-step column gather costs more than the per-step messaging saved.
STACK_WEIGHT_BUDGET = 1 << 18


def _auto_chunk(manifest, arrays, batch):
    total = sum(int(_arr(arrays, q["weights"]).size) for q in manifest["connections"])
    c = 1
    while c < batch and (c + 1) ** 2 * total <= STACK_WEIGHT_BUDGET:
        c += 1
    return c


def run(args):
    manifest, arrays = _load_graph(args.graph)
    fixed = manifest.get("mode") == "fixed"
    if args.fixed_point and not fixed:
        raise WorkerError("--fixed-point given but the graph is a float graph (export with fixed_point=True)")
    try:
        x = np.load(args.input, allow_pickle=False)
    except Exception as exc:
        raise WorkerError(f"cannot read input {args.input}: {exc}")
    if x.ndim == 2:
        x = x[:, None, :]
    n_in = [p["n"] for p in manifest["processes"] if p["kind"] == "source"][0]
    if x.ndim != 3 or x.shape[2] != n_in:
        raise WorkerError(f"input must be [T, batch, {n_in}], got {list(x.shape)}")
    if not np.all(np.isfinite(x)):
        raise WorkerError("input contains NaN/Inf")
    steps = int(args.steps) if args.steps is not None else x.shape[0]
    if steps < 1:
        raise WorkerError(f"--steps must be >= 1, got {steps}")
    lag = int(manifest["lava_input_delay_steps"])
    lava_steps = steps + lag
    B = x.shape[1]
    xin = np.zeros((lava_steps, B, n_in), dtype=np.float64)
    k = min(steps, x.shape[0])
    xin[:k] = x[:k]
    scale = _arr(arrays, manifest["input"]["scale"]).astype(np.float64)
    if manifest["input"].get("quantise"):
        # dmn_neuro.simulation.fixed_point.quantise_input, repeated: this env cannot import dmn_neuro.
        # Every other integer (weights, dv, vth, bias, v_init) comes from the graph file.
        lim = int(manifest["input"]["limit"])
        src = np.clip(np.rint(xin * scale), -lim, lim).astype(np.int32)
    else:
        src = xin * scale
    chunk = int(args.batch_chunk) if args.batch_chunk else _auto_chunk(manifest, arrays, B)
    chunk = max(1, min(chunk, B))
    pops = [p for p in manifest["processes"] if p["kind"] == "LIF"]
    result = {p["name"]: np.zeros((steps, B, int(p["n"])), dtype=bool) for p in pops}
    timing = []
    tmpdir = os.path.dirname(os.path.abspath(args.out))
    for b0 in range(0, B, chunk):
        sl = slice(b0, min(B, b0 + chunk))
        data = np.ascontiguousarray(src[:, sl, :].transpose(1, 2, 0))  # [c, n_in, lava_steps]
        out, tm = _run_chunk(manifest, arrays, data, lava_steps, fixed, tmpdir)
        for name, raw in out.items():
            result[name][:, sl, :] = raw[lag:lag + steps]  # model time t == Lava step t + lag
        timing.append(tm)
    payload = dict(result)
    payload["lag"] = np.array(lag)
    payload["lava_steps"] = np.array(lava_steps)
    payload["timing_json"] = np.frombuffer(json.dumps(timing).encode(), dtype=np.uint8)
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as fh:
        np.savez(fh, **payload)
    os.replace(tmp, args.out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--fixed-point", action="store_true")
    ap.add_argument("--batch-chunk", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        run(args)
    except WorkerError as exc:
        print(f"lava worker: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except Exception as exc:  # Lava's own errors: keep them to one line
        import traceback

        traceback.print_exc(file=sys.stderr)
        print(f"lava worker: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
