"""BPTT benchmark: snnTorch per-step loop vs the fused engine (``make bench``).

On the shipped circuit (the trained model examples/pretrained/flywire_mb_navigator:
FlyWire v783 mushroom body with ORN 440, PN 124, KC 2597, APL 1, MBON 48, DN 16;
``--circuit connectome`` for the untrained from_connectome() defaults) at batch
B and T steps, measures forward+backward wall time and peak memory of

(a) the baseline: :func:`snntorch_loop`, one snnTorch ``Leaky`` call per
    population per step (the contract and summation order of
    :func:`dmn_neuro.simulation.engine.run_reference`), autograd through every step;
(b) the engine: :func:`dmn_neuro.simulation.engine.run_layered` (each feed-forward
    projection over all T*B rows at once -- through the event-driven kernels
    of dmn_neuro.simulation.engine.kernels for the sparse FlyWire matrices, else one GEMM --,
    fused LIF scans with hand-written backward, stepped KC<->APL group;
    gradient checkpointing for long episodes).

Timing: both variants in this process, alternating, median of ``--runs``.
Peak memory: a fresh child process per (variant, T) measures the growth of its
resident set during one forward+backward (Linux: VmHWM after resetting it via
/proc/self/clear_refs, minus VmRSS before; elsewhere ru_maxrss), i.e. all
memory torch allocates for the run (activations, temporaries, gradients); the
heap is trimmed (malloc_trim) after the warm-up so that reused memory counts.
Equal loss and gradients (allclose) are asserted between the two variants.

Whole-brain scale: forward simulation ms/step on a synthetic connectome of
FlyWire size (connectome.sources.synthetic, scale='whole_brain': ~141k
neurons, ~15M edges) with one recurrent sparse projection, via the CSR SpMM
path and the event-driven path (gather of the active presynaptic rows):
median, min and max of ``--wb-runs`` timed runs in this process; then, in a
child process with a resident-set watchdog (``--wb-mem-limit-gb``), fwd+bwd
BPTT of that circuit at T=``--wb-bptt-steps`` (ms/step, peak memory).

``--peers`` (make bench-peers): also a ``torch.compile``d plain loop, Norse and
SpikingJelly (benchmarks/peers.py: how each matches the semantics), timed in
the same alternation, with their spike equality and gradient error vs the
engine; T=5000 memory of the engine and the compiled loop, each with and
without checkpointing. Load averages before/after each part go to the JSON.

Allocator: every tensor over glibc's mmap threshold (32 MB at most) is a fresh
mmap whose pages fault in on first touch (measured here: ~0.2 s of system time
per engine fwd+bwd at T=500, whose [T*B, 2597] KC tensors are 83 MB each). The
timing process therefore raises M_MMAP_THRESHOLD/M_TRIM_THRESHOLD (mallopt) so
freed blocks are reused, for BOTH variants alike (``--no-malloc-tune`` to keep
glibc's defaults; the memory children never tune).

Timings on a shared machine are noisy; the numbers are from one invocation.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse invariant checks.*")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dmn_neuro.simulation.engine import (  # noqa: E402
    PopulationParams, ProjectionParams, SparseStructure, run_layered,
)
from dmn_neuro.simulation.neurons import make_surrogate  # noqa: E402

from benchmarks import peers  # noqa: E402

OUTPUTS = ["MBON", "DN"]
WB_GAIN = 0.15


# ---------------------------------------------------------------------------
# circuit, input, loss
# ---------------------------------------------------------------------------
SHIPPED = REPO / "examples" / "pretrained" / "flywire_mb_navigator"


def build_circuit(cache_dir: str, which: str = "shipped"):
    """(module with parameters, populations(), projections(), surrogate, slope, source).

    ``shipped``: the trained model in examples/pretrained (FlyWire v783 MB with
    8 ORNs per glomerulus and 16 DNs, as TrainingConfig builds it);
    ``connectome``: ``from_connectome()`` with its defaults (1 ORN per glomerulus, 4 DNs), untrained.
    """
    try:
        from dmn_neuro.simulation.mechanism import DifferentiableOlfactoryCircuit
    except ImportError:  # pragma: no cover - before the circuit module existed
        return _fallback_circuit(cache_dir)
    if which == "shipped":
        from dmn_neuro.training.checkpoint import load_circuit

        circ = load_circuit(SHIPPED)[0]
        src = f"{SHIPPED.relative_to(REPO)} (trained; FlyWire v783 MB)"
    else:
        circ = DifferentiableOlfactoryCircuit.from_connectome(cache_dir=cache_dir)
        src = "dmn_neuro.simulation.mechanism.DifferentiableOlfactoryCircuit.from_connectome() (FlyWire v783 MB, untrained)"
    return circ, circ.population_params, circ.projection_weights, circ.surrogate, circ.surrogate_slope, src


def _fallback_circuit(cache_dir: str):  # pragma: no cover - only without dmn_neuro.simulation.mechanism
    import torch.nn.functional as F
    from torch import nn

    from connectome.fetch_data import FlyWireConnectome

    layers = ["ORN", "PN", "KC", "APL", "MBON", "DN"]
    data = FlyWireConnectome(cache_dir=cache_dir).fetch_olfactory_circuit(include_layers=layers)
    pairs = [("ORN", "PN"), ("PN", "KC"), ("KC", "APL"), ("APL", "KC"), ("KC", "MBON"), ("MBON", "DN")]
    mod = nn.Module()
    mod.sizes = {n: int(data.layer_sizes[n]) for n in layers}
    for n in layers:
        setattr(mod, f"beta_{n}", nn.Parameter(torch.tensor(2.0)))
        setattr(mod, f"thr_{n}", nn.Parameter(torch.full((mod.sizes[n],), 0.5)))
    masks = {}
    for pre, post in pairs:
        cnt = torch.as_tensor(data.count_matrix(pre, post), dtype=torch.float32)
        sign = torch.as_tensor(data.presynaptic_sign(pre), dtype=torch.float32)
        masks[pre, post] = ((cnt > 0).float(), sign)
        fan = (cnt > 0).sum(1, keepdim=True).clamp_min(1)
        setattr(mod, f"w_{pre}_{post}", nn.Parameter(torch.log(torch.expm1((2.0 / fan).expand_as(cnt).clone()))))

    def pops():
        return [PopulationParams(n, torch.sigmoid(getattr(mod, f"beta_{n}")), F.softplus(getattr(mod, f"thr_{n}")))
                for n in layers]

    def projs():
        return [ProjectionParams(a, b, masks[a, b][0] * masks[a, b][1][None, :] * F.softplus(getattr(mod, f"w_{a}_{b}")))
                for a, b in pairs]

    return mod, pops, projs, "fast_sigmoid", 5.0, "connectome.fetch_data (fallback builder)"


def make_input(bundle, T: int, B: int, kind: str = "odor", seed: int = 0) -> torch.Tensor:
    """ORN input currents ``[T, B, n_orn]``.

    ``odor``: real odors -- B different Hallem & Carlson odors at concentration
    1 (the source), Poisson-encoded with the training defaults (what the shipped
    model sees; ~6 % of ORNs and ~7 % of PNs active per step).
    ``drive``: a synthetic overdrive -- a random glomerular pattern of up to 3x
    the threshold-holding current plus noise (~35 % of ORNs, ~57 % of PNs active).
    """
    circ = bundle[0]
    if kind == "odor" and hasattr(circ, "orn_glomeruli"):
        from dmn_neuro.environment.odors import OdorEncoder, static_odor_input
        from dmn_neuro.training.optimizer import default_current_per_hz

        enc = OdorEncoder(circ.orn_glomeruli, dt_ms=circ.semantics.dt_ms, encoding="poisson",
                          current_per_hz=default_current_per_hz(circ))
        odors = [enc.odors[i % len(enc.odors)] for i in range(B)]
        x = static_odor_input(enc, odors, T, concentration=1.0, generator=torch.Generator().manual_seed(seed))
        return torch.as_tensor(x, dtype=torch.float32)
    return _drive_input(bundle[1](), T, B, seed)


def _drive_input(pops, T: int, B: int, seed: int = 0) -> torch.Tensor:
    orn = [p for p in pops if p.name == "ORN"][0]
    thr = orn.threshold.detach()
    drive = thr * (1 - orn.beta.detach())  # current that holds v at threshold
    g = torch.Generator().manual_seed(seed)
    pattern = torch.rand(B, thr.shape[0], generator=g)
    return (pattern * 3.0 * drive) + torch.randn(T, B, thr.shape[0], generator=g) * 0.3 * drive


def loss_fn(out) -> torch.Tensor:
    return ((out["DN"].mean(0) - 0.05) ** 2).sum() + ((out["MBON"].mean(0) - 0.02) ** 2).sum()


def snntorch_loop(x: torch.Tensor, pops, projs, surrogate: str, slope: float, input_population: str = "ORN",
                  outputs=None):
    """The baseline: a plain snnTorch ``Leaky`` per population, stepped in
    Python, zero reset applied detached (the semantics of the model), currents
    summed in list order as in :func:`dmn_neuro.simulation.engine.run_reference`."""
    import snntorch as snn

    T, B, _ = x.shape
    pops = list(pops)
    names = [p.name for p in pops]
    outputs = names if outputs is None else list(outputs)
    cells, mem, prev = {}, {}, {}
    for p in pops:
        n = int(p.threshold.shape[0])
        cell = snn.Leaky(beta=1.0, threshold=1.0, spike_grad=make_surrogate(surrogate, slope), init_hidden=False,
                         reset_mechanism="none")
        cell.beta, cell.threshold = p.beta.to(x.dtype), p.threshold.to(x.dtype)
        cells[p.name] = cell
        mem[p.name] = x.new_zeros(B, n)
        prev[p.name] = x.new_zeros(B, n)
    wts = [(q.pre, q.post, q.weight.to(x.dtype).t()) for q in projs]
    rec = {n: [] for n in outputs}
    for xt in x.unbind(0):
        cur = {n: None for n in names}
        cur[input_population] = xt
        for pre, post, wt in wts:
            c = prev[pre] @ wt
            cur[post] = c if cur[post] is None else cur[post] + c
        for p in pops:
            n = p.name
            c = cur[n] if cur[n] is not None else torch.zeros_like(mem[n])
            if p.bias is not None:
                c = c + p.bias.to(x.dtype)
            spk, v = cells[n](c, mem[n])
            spk = spk.to(x.dtype)
            mem[n] = v * (1.0 - spk.detach())
            prev[n] = spk
            if n in rec:
                rec[n].append(spk)
    return {n: torch.stack(v) for n, v in rec.items()}


def engine_projections(projs, sparse: list):
    return [q._replace(sparse=SparseStructure.from_mask(q.weight.detach())) if f"{q.pre}->{q.post}" in sparse else q
            for q in projs()]


#: contenders of --peers (besides the snnTorch baseline and the engine)
PEERS = ("compiled", "norse", "spikingjelly")


def fwd_bwd(kind: str, bundle, x: torch.Tensor, checkpoint_every, sparse, slope=None, spikes_out=None):
    """One forward+backward of ``kind``; ``slope`` overrides the surrogate's (engine/plain loops);
    ``spikes_out``: dict that receives the output spikes (bool)."""
    mod, pops, projs, surrogate, model_slope, _ = bundle
    slope = model_slope if slope is None else slope
    params = [p for p in mod.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    if kind == "baseline":
        out = snntorch_loop(x, pops(), projs(), surrogate, slope, outputs=OUTPUTS)
    elif kind in ("compiled", "plain"):
        out = peers.plain_loop(x, pops(), projs(), surrogate, slope, outputs=OUTPUTS, compiled=kind == "compiled",
                               checkpoint_every=checkpoint_every)
    elif kind == "norse":
        out = peers.norse_loop(x, pops(), projs(), outputs=OUTPUTS)
    elif kind == "spikingjelly":
        out = peers.spikingjelly_loop(x, pops(), projs(), outputs=OUTPUTS)
    else:
        out = run_layered(x, pops(), engine_projections(projs, sparse), surrogate, slope, outputs=OUTPUTS,
                          checkpoint_every=checkpoint_every)
    loss = loss_fn(out)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    wall = time.perf_counter() - t0
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    rates = {k: float(v.detach().mean()) for k, v in out.items()}
    if spikes_out is not None:
        spikes_out.update({k: v.detach().bool() for k, v in out.items()})
    return float(loss.detach()), grads, wall, rates


def load() -> list:
    """1/5/15-minute load average of the machine (``uptime``)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not Unix
        return []


def grad_error(grads_a, grads_b, rtol=1e-3, skip=()):
    """Max over parameters of ``max|a - b| / max|a|`` (finite entries; parameters in
    ``skip`` left out), non-finite entries, and where the two disagree (None if nowhere)."""
    worst, nonfinite, problem = 0.0, 0, None
    for i, (a, b) in enumerate(zip(grads_a, grads_b)):
        if i in skip:
            continue
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        # BPTT through the KC<->APL loop can overflow on both paths alike; they must agree on where
        if not torch.equal(fa, fb) or not torch.equal(a[~fa].nan_to_num(), b[~fb].nan_to_num()):
            problem = problem or "gradients differ in their non-finite entries"
        nonfinite += int((~fa).sum())
        a, b = a[fa & fb], b[fa & fb]
        if a.numel() == 0:
            continue
        scale = float(a.abs().max()) + 1e-30
        err = float((a - b).abs().max()) / scale
        worst = max(worst, err)
        if not torch.allclose(a, b, rtol=rtol, atol=rtol * scale):
            problem = problem or f"gradients differ: max relative error {err:.2e}"
    return {"max_rel_err": worst, "nonfinite_entries": nonfinite}, problem


def compare(loss_a, grads_a, loss_b, grads_b, rtol=1e-3):
    """Loss equal to float rounding; every gradient allclose relative to its scale."""
    if abs(loss_a - loss_b) > 1e-5 * max(1.0, abs(loss_a)):
        raise AssertionError(f"loss differs: baseline {loss_a} vs engine {loss_b}")
    res, problem = grad_error(grads_a, grads_b, rtol)
    if problem:
        raise AssertionError(problem)
    return res


def peer_agreement(kind, bundle, x, args, loss, grads, spikes, engine_ref) -> dict:
    """How a peer's loss, output spikes and gradients compare with the engine's
    (for Norse/SpikingJelly against an engine run with their surrogate slope)."""
    e_loss, e_grads, e_spk = engine_ref
    skip = ()
    if kind in ("norse", "spikingjelly"):
        e_loss, e_grads, _, _ = fwd_bwd("engine", bundle, x, None, args.sparse, slope=peers.PEER_SLOPE)
        if kind == "spikingjelly":  # its decay is a Python float: no gradient
            names = [n for n, p in bundle[0].named_parameters() if p.requires_grad]
            skip = tuple(i for i, n in enumerate(names) if "beta" in n)
    err, problem = grad_error(e_grads, grads, skip=skip)
    return {"loss_abs_diff": abs(loss - e_loss),
            "output_spikes_equal": all(torch.equal(spikes[k], e_spk[k]) for k in e_spk),
            "output_spikes_differing": int(sum(int((spikes[k] != e_spk[k]).sum()) for k in e_spk)),
            "grad_max_rel_err": err["max_rel_err"], "grads_allclose_1e-3": problem is None,
            "surrogate_slope_compared": peers.PEER_SLOPE if kind in ("norse", "spikingjelly") else bundle[4],
            "params_left_out": len(skip)}


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def tune_malloc() -> bool:
    """Keep freed large blocks in the heap (glibc only); True if applied."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False


# ---------------------------------------------------------------------------
# peak memory in a child process
# ---------------------------------------------------------------------------
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def child(args) -> None:
    torch.set_num_threads(args.threads)
    bundle = build_circuit(tempfile.mkdtemp(prefix="dmn_bench_"), args.circuit)
    x = make_input(bundle, args.T, args.batch, args.input)
    ck = args.checkpoint_every if args.checkpoint_every > 0 else None
    # warm up kernels (block-size probes, library load, torch.compile) on the path measured
    fwd_bwd(args.child, bundle, x[:6], 3 if ck else None, args.sparse)
    gc.collect()
    _malloc_trim()  # hand freed heap back, so that reused memory is not hidden from the peak
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM (peak RSS) to the current RSS
        before = _rss_kb("VmRSS")
        method = "VmHWM-VmRSS"
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss delta"
    loss, grads, wall, rates = fwd_bwd(args.child, bundle, x, ck, args.sparse)
    peak = _rss_kb("VmHWM") if method == "VmHWM-VmRSS" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.grads_out:
        torch.save({"loss": loss, "grads": [g.detach() for g in grads]}, args.grads_out)
    print(json.dumps({"peak_mb": (peak - before) / 1024, "wall_s": wall, "loss": loss, "method": method, "rates": rates}))


def run_child(kind: str, T: int, args, ck: int, grads_out: str = "") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--T", str(T), "--batch", str(args.batch),
           "--threads", str(args.threads), "--checkpoint-every", str(ck), "--sparse", ",".join(args.sparse),
           "--circuit", args.circuit, "--input", args.input]
    if grads_out:
        cmd += ["--grads-out", grads_out]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
    if res.returncode != 0:
        raise RuntimeError(f"child {kind} T={T} failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# whole-brain forward
# ---------------------------------------------------------------------------
def wholebrain_circuit(T: int):
    """The synthetic FlyWire-size circuit as one recurrent sparse population, and its ORN drive ``[T, 1, n]``."""
    from connectome.sources.synthetic import generate

    neurons, edges, _, meta = generate(seed=0, scale="whole_brain")
    n = len(neurons.id)
    pre = torch.from_numpy(edges.pre_id - 1)
    post = torch.from_numpy(edges.post_id - 1)
    del edges
    st = SparseStructure.from_edges(post, pre, n, n)
    del pre, post
    sign = torch.as_tensor(neurons.sign, dtype=torch.float32)
    # fan-in normalised: all excitatory inputs of a neuron together = WB_GAIN
    # thresholds, inhibitory synapses twice as strong -> sparse, self-limiting activity
    indeg = torch.bincount(st.row, minlength=n).clamp_min(1).to(torch.float32)
    values = (WB_GAIN / indeg[st.row]) * torch.where(sign[st.col] < 0, -2.0, 1.0)
    orn = torch.tensor([lay == "ORN" for lay in neurons.layer])
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(T, 1, n)
    x[:, 0, orn] = (torch.rand(T, int(orn.sum()), generator=g) < 0.3).float() * 1.5
    return n, st, values, x


def wholebrain(args) -> dict:
    """Forward ms/step, CSR and event-driven, ``--wb-runs`` timed runs each (alternating, one process)."""
    t0 = time.perf_counter()
    n, st, values, x = wholebrain_circuit(args.wb_steps)
    setup_s = time.perf_counter() - t0
    T = args.wb_steps
    pops = [PopulationParams("brain", torch.tensor(0.9), torch.ones(n))]
    projs = [ProjectionParams("brain", "brain", sparse=st, values=values)]
    res = {"neurons": n, "edges": st.nnz, "setup_s": setup_s, "steps": T, "batch": 1, "runs": args.wb_runs,
           "load_before": load()}
    walls = {"csr": [], "event": []}
    with torch.no_grad():
        for name, event in (("csr", False), ("event", True)):
            run_layered(x[:3], pops, projs, input_population="brain", event_driven=event)  # warm-up
        for _ in range(args.wb_runs):
            for name, event in (("csr", False), ("event", True)):
                t0 = time.perf_counter()
                out = run_layered(x, pops, projs, input_population="brain", event_driven=event)
                walls[name].append((time.perf_counter() - t0) / T * 1e3)
                res[f"{name}_activity"] = float(out["brain"].mean())
                if name == "csr":
                    ref = out["brain"]
                else:
                    res["event_matches_csr"] = res.get("event_matches_csr", True) and torch.equal(out["brain"], ref)
    for name, w in walls.items():
        res.update({f"{name}_ms_per_step": statistics.median(w), f"{name}_ms_per_step_min": min(w),
                    f"{name}_ms_per_step_max": max(w), f"{name}_ms_per_step_runs": w})
    res["load_after"] = load()
    return res


def wholebrain_bptt_child(args) -> None:
    """fwd+bwd BPTT of the whole-brain circuit (B=1, event-driven forward, gradient w.r.t.
    the 15M synaptic values, the decay and the thresholds); prints ms/step and peak memory.
    A watchdog ends the process when its resident set passes ``--wb-mem-limit-gb``."""
    import threading

    torch.set_num_threads(args.threads)
    limit_kb = int(args.wb_mem_limit_gb * 1024 * 1024)

    def watchdog():
        while True:
            if _rss_kb("VmRSS") > limit_kb:
                print(json.dumps({"aborted": f"resident set over {args.wb_mem_limit_gb} GB"}), flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watchdog, daemon=True).start()
    n, st, values, x = wholebrain_circuit(args.T)
    values = values.requires_grad_()
    beta = torch.tensor(0.9, requires_grad=True)
    theta = torch.ones(n, requires_grad=True)
    pops = [PopulationParams("brain", beta, theta)]
    projs = [ProjectionParams("brain", "brain", sparse=st, values=values)]

    def step(xs):
        t0 = time.perf_counter()
        out = run_layered(xs, pops, projs, input_population="brain", event_driven=True)
        loss = ((out["brain"].mean(0) - 0.01) ** 2).sum()
        grads = torch.autograd.grad(loss, [values, beta, theta])
        return time.perf_counter() - t0, out["brain"], grads

    step(x[:3])  # warm-up
    gc.collect()
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _rss_kb("VmRSS")
    walls = []
    for _ in range(args.wb_runs):
        wall, spikes, grads = step(x)
        walls.append(wall / args.T * 1e3)
    peak = _rss_kb("VmHWM")
    print(json.dumps({"ms_per_step": statistics.median(walls), "ms_per_step_min": min(walls),
                      "ms_per_step_max": max(walls), "ms_per_step_runs": walls, "peak_mb": (peak - before) / 1024,
                      "rss_before_mb": before / 1024, "activity": float(spikes.detach().mean()),
                      "grad_finite": all(bool(torch.isfinite(g).all()) for g in grads),
                      "grad_values_nonzero": int((grads[0] != 0).sum()), "steps": args.T, "batch": 1}))


# ---------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs; T=5000 measured once per variant in children")
    ap.add_argument("--json", action="store_true", help="print one JSON object (and nothing else on stdout)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared box)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5, help="timing runs per variant at T=500")
    ap.add_argument("--long-runs", type=int, default=2, help="timing runs per variant at T=5000 (baseline is slow)")
    ap.add_argument("--checkpoint-every", type=int, default=500, help="engine checkpoint segment at T=5000")
    ap.add_argument("--circuit", choices=("shipped", "connectome"), default="shipped",
                    help="shipped: the trained model in examples/pretrained (default); connectome: from_connectome() defaults")
    ap.add_argument("--input", choices=("odor", "drive"), default="odor",
                    help="odor: real odors, Poisson-encoded (default); drive: synthetic overdrive (most PNs active)")
    ap.add_argument("--sparse", default="", help="projections run on the sparse path, e.g. 'PN->KC,KC->MBON'")
    ap.add_argument("--wb-steps", type=int, default=100, help="steps of the whole-brain forward")
    ap.add_argument("--wb-runs", type=int, default=5,
                    help="timed runs of each whole-brain measurement (median, min, max)")
    ap.add_argument("--wb-bptt-steps", type=int, default=100, help="steps of the whole-brain fwd+bwd (0: skip it)")
    ap.add_argument("--wb-mem-limit-gb", type=float, default=10.0,
                    help="abort the whole-brain fwd+bwd when its process's resident set passes this")
    ap.add_argument("--skip-wholebrain", action="store_true")
    ap.add_argument("--peers", action="store_true",
                    help="also time torch.compile of a plain loop, Norse and SpikingJelly "
                         "(when installed; make peers-env)")
    ap.add_argument("--no-malloc-tune", action="store_true", help="keep glibc's mmap/trim thresholds in the timing process")
    # internal (child processes)
    ap.add_argument("--child", choices=("baseline", "engine", "wholebrain-bptt") + PEERS,
                    help=argparse.SUPPRESS)
    ap.add_argument("--T", type=int, default=500, help=argparse.SUPPRESS)
    ap.add_argument("--grads-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.sparse = [s for s in args.sparse.split(",") if s]
    if args.child == "wholebrain-bptt":
        wholebrain_bptt_child(args)
        return 0
    if args.child:
        child(args)
        return 0
    torch.set_num_threads(args.threads)
    malloc_tuned = False if args.no_malloc_tune else tune_malloc()
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    runs = 3 if args.quick else args.runs
    bundle = build_circuit(tempfile.mkdtemp(prefix="dmn_bench_"), args.circuit)
    sizes = {p.name: int(p.threshold.shape[0]) for p in bundle[1]()}
    log(f"circuit: {bundle[5]}; sizes {sizes}; surrogate {bundle[3]}({bundle[4]})")
    log(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {args.threads}, batch {args.batch}; engine SparseStructure projections: {args.sparse or 'none'}; "
        f"malloc tuned (both variants): {malloc_tuned}")
    from dmn_neuro.simulation.engine import kernels

    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
              "threads": args.threads, "batch": args.batch, "sizes": sizes, "sparse": args.sparse,
              "malloc_tuned": malloc_tuned, "input": args.input, "circuit": bundle[5],
              "event_kernels": kernels.available()}

    # --- T=500: timing, alternating, in-process -----------------------------
    T = 500
    x = make_input(bundle, T, args.batch, args.input)
    with torch.no_grad():
        act = run_layered(x, bundle[1](), bundle[2](), bundle[3], bundle[4])
    result["activity_T500"] = {k: float(v.mean()) for k, v in act.items()}
    del act
    log(f"input: {args.input}; fraction of neurons spiking per step: "
        + ", ".join(f"{k} {v:.2%}" for k, v in result["activity_T500"].items())
        + f"; event-driven kernels: {'on' if kernels.available() else 'off (' + str(kernels.load_error()) + ')'}")
    fwd_bwd("engine", bundle, x[:10], None, args.sparse)  # warm-up
    kinds = ["baseline", "engine"]
    if args.peers:
        found = peers.available()
        kinds += [k for k in PEERS if k == "compiled" or k in found]
        result["peers"] = {"installed": found, "missing": [k for k in PEERS[1:] if k not in found],
                           "matching": peers.__doc__.split("\n\n", 1)[1].strip()}
        t0 = time.perf_counter()
        fwd_bwd("compiled", bundle, x[:3], None, args.sparse)  # torch.compile: forward and backward graphs
        result["peers"]["compile_s"] = time.perf_counter() - t0
        log(f"peers: {kinds[2:]} (missing: {result['peers']['missing'] or 'none'}); "
            f"torch.compile of the step: {result['peers']['compile_s']:.1f} s (not in the timings)")
    walls = {k: [] for k in kinds}
    cpus = {k: [] for k in kinds}  # process CPU time: less sensitive to other load on the box
    ref = None
    result["load_T500"] = {"before": load()}
    for i in range(runs):
        for kind in kinds:
            c0 = time.process_time()
            spk = {}
            loss, grads, wall, rates = fwd_bwd(kind, bundle, x, None, args.sparse, spikes_out=spk)
            cpus[kind].append(time.process_time() - c0)
            walls[kind].append(wall)
            if ref is None:
                ref = (loss, grads)
                result["rates_T500"] = rates
            elif i == 0 and kind == "engine":
                result["grad_max_rel_err_T500"] = compare(ref[0], ref[1], loss, grads)
                engine_ref = (loss, grads, spk)
            elif i == 0:
                result["peers"][kind] = peer_agreement(kind, bundle, x, args, loss, grads, spk, engine_ref)
                log(f"{kind} vs engine: {result['peers'][kind]}")
            del grads
    result["load_T500"]["after"] = load()
    med = {k: statistics.median(v) for k, v in walls.items()}
    if args.peers:
        for k in kinds[2:]:
            result["peers"][k].update({"s_T500": med[k], "engine_speedup_T500": med[k] / med["engine"],
                                       "walls_T500": walls[k], "cpu_s_T500": cpus[k]})
    result.update({"baseline_s_T500": med["baseline"], "engine_s_T500": med["engine"],
                   "speedup_T500": med["baseline"] / med["engine"], "runs_T500": runs,
                   "walls_T500": walls, "cpu_s_T500": cpus,
                   "speedup_cpu_T500": statistics.median(cpus["baseline"]) / statistics.median(cpus["engine"])})
    log(f"T=500: loss equal, grads allclose ({result['grad_max_rel_err_T500']}); output rates {result['rates_T500']}")

    # --- T=5000: memory in children (+ timing) -----------------------------
    T = 5000
    with tempfile.TemporaryDirectory() as tmp:
        gb, ge = os.path.join(tmp, "b.pt"), os.path.join(tmp, "e.pt")
        mem_e = run_child("engine", T, args, args.checkpoint_every, ge)
        mem_b = run_child("baseline", T, args, 0, gb)
        ob, oe = torch.load(gb, weights_only=True), torch.load(ge, weights_only=True)
        result["grad_max_rel_err_T5000"] = compare(ob["loss"], ob["grads"], oe["loss"], oe["grads"])
    log(f"T=5000: loss equal, grads allclose ({result['grad_max_rel_err_T5000']})")
    result.update({"engine_peak_mb_T5000": mem_e["peak_mb"], "baseline_peak_mb_T5000": mem_b["peak_mb"],
                   "memory_method": mem_e["method"], "engine_checkpoint_every_T5000": args.checkpoint_every})
    if args.peers:  # like for like: engine and compiled loop, each with and without checkpointing
        mem = {"load_before": load()}
        for kind in ("engine", "compiled"):
            for ck in (args.checkpoint_every, 0):
                r = run_child(kind, T, args, ck)
                mem[f"{kind}_{'ckpt' if ck else 'no_ckpt'}"] = {"peak_mb": r["peak_mb"], "wall_s": r["wall_s"]}
                log(f"T=5000 {kind} checkpoint_every={ck or 'none'}: {r['peak_mb']:.0f} MB, {r['wall_s']:.1f} s")
        mem["load_after"] = load()
        result["peers"]["memory_T5000"] = mem
    long_walls = {"baseline": [mem_b["wall_s"]], "engine": [mem_e["wall_s"]]}
    if not args.quick:
        x = make_input(bundle, T, args.batch, args.input)
        for _ in range(max(0, args.long_runs - 1)):
            for kind in ("baseline", "engine"):
                _, _, wall, _ = fwd_bwd(kind, bundle, x, args.checkpoint_every if kind == "engine" else None, args.sparse)
                long_walls[kind].append(wall)
        del x
    result.update({"baseline_s_T5000": statistics.median(long_walls["baseline"]),
                   "engine_s_T5000": statistics.median(long_walls["engine"]),
                   "runs_T5000": len(long_walls["engine"])})
    result["speedup_T5000"] = result["baseline_s_T5000"] / result["engine_s_T5000"]

    # --- whole brain ------------------------------------------------------------
    if not args.skip_wholebrain:
        wb = wholebrain(args)
        result["wholebrain"] = wb
        result["wholebrain_forward_ms_per_step"] = min(wb["csr_ms_per_step"], wb["event_ms_per_step"])
        if args.wb_bptt_steps > 0:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "wholebrain-bptt", "--T",
                   str(args.wb_bptt_steps), "--threads", str(args.threads), "--wb-runs", str(max(1, args.wb_runs // 2)),
                   "--wb-mem-limit-gb", str(args.wb_mem_limit_gb)]
            lb = load()
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
            lines = res.stdout.strip().splitlines()
            bp = json.loads(lines[-1]) if lines else {"failed": res.stderr.strip().splitlines()[-1:]}
            bp.update({"load_before": lb, "load_after": load()})
            result["wholebrain_bptt"] = bp

    # --- report -------------------------------------------------------------
    log("")
    log(f"| B={args.batch} | baseline (snnTorch loop) | engine | ratio |")
    log("|---|---|---|---|")
    log(f"| T=500 fwd+bwd, median of {runs} | {result['baseline_s_T500']:.2f} s | {result['engine_s_T500']:.2f} s | "
        f"{result['speedup_T500']:.1f}x |")
    log(f"| T=500 process CPU time, median of {runs} | {statistics.median(cpus['baseline']):.2f} s | "
        f"{statistics.median(cpus['engine']):.2f} s | {result['speedup_cpu_T500']:.1f}x |")
    log(f"| T=5000 fwd+bwd, median of {result['runs_T5000']} | {result['baseline_s_T5000']:.1f} s | "
        f"{result['engine_s_T5000']:.1f} s (checkpoint every {args.checkpoint_every}) | {result['speedup_T5000']:.1f}x |")
    log(f"| T=5000 peak memory ({result['memory_method']}) | {result['baseline_peak_mb_T5000']:.0f} MB | "
        f"{result['engine_peak_mb_T5000']:.0f} MB | {result['baseline_peak_mb_T5000'] / max(result['engine_peak_mb_T5000'], 1):.1f}x |")
    if "wholebrain" in result:
        wb = result["wholebrain"]
        log(f"whole-brain forward ({wb['neurons']:,} neurons, {wb['edges']:,} edges, B=1, {wb['steps']} steps): "
            f"CSR SpMM {wb['csr_ms_per_step']:.1f} ms/step, event-driven {wb['event_ms_per_step']:.1f} ms/step "
            f"(median of {wb['runs']}; event-driven min {wb['event_ms_per_step_min']:.1f}, max "
            f"{wb['event_ms_per_step_max']:.1f}; activity {wb['event_activity']:.2%} per step; "
            f"event == CSR spikes: {wb['event_matches_csr']}; load {wb['load_before']} -> {wb['load_after']})")
    if "wholebrain_bptt" in result:
        log(f"whole-brain fwd+bwd BPTT: {json.dumps(result['wholebrain_bptt'])}")
    if "peers" in result:
        pe = result["peers"]
        log(f"| B={args.batch}, T=500 fwd+bwd | median s | engine speedup | output spikes == engine "
            "| grad max rel err |")
        log("|---|---|---|---|---|")
        for k in PEERS:
            if k in pe:
                log(f"| {k} | {pe[k]['s_T500']:.2f} | {pe[k]['engine_speedup_T500']:.1f}x | "
                    f"{pe[k]['output_spikes_equal']} | {pe[k]['grad_max_rel_err']:.1e} |")
        if "memory_T5000" in pe:
            log(f"T=5000 peak memory: {json.dumps(pe['memory_T5000'])}")
    if args.quick:
        log("(--quick: T=500 median of 3; T=5000 one run per variant, timed inside the memory child)")
    log("Timings are from one invocation on a shared machine and are noisy.")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
