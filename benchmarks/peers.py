"""Peer contenders of ``benchmarks/bptt.py --peers``, each with the engine's semantics where it can.

The dynamics to match (:mod:`dmn_neuro.simulation.semantics`): per population
``v = beta * mem + I`` (mul, then add), ``s = v > theta`` (strict, per-neuron
theta), zero reset in the same step, detached in the backward pass; every
synaptic hop delays by one step; the current is the external input (ORN) plus
the projections in list order (:func:`dmn_neuro.simulation.engine.run_reference`).

* :func:`plain_loop` -- the dynamics written as a plain torch per-step loop
  with a straight-through surrogate (no custom autograd.Function, so
  ``torch.compile`` traces forward and backward); :func:`compiled_step`
  compiles its one-step function. Spikes are bit-identical to the engine
  (inductor does not contract mul+add into an FMA: ``-ffp-contract=off``);
  the gradient is autograd's derivative of the surrogate's antiderivative
  (``x / (1 + k|x|)`` for fast_sigmoid), equal to the engine's to float rounding.
* :func:`norse_loop` -- Norse 1.1.0's ``lif_box_feed_forward_step`` (LIF without
  a synaptic current). Its update is Euler ``v + dt/tau (I' + v_leak - v)``:
  matched with ``dt = 1``, ``1/tau = 1 - beta``, ``v_leak = 0`` and the input
  scaled ``I' = I / (1 - beta)`` -- algebraically the engine's step, rounded
  differently, so a membrane within a few ulp of threshold can spike on one
  side only. Its reset is passed as ``reset_method`` with the spike detached
  (Norse's default resets through the surrogate). Its SuperSpike surrogate is
  ``1 / (|x| + 1)^2`` whatever ``alpha`` (1.1.0 ignores it), i.e. fast_sigmoid
  with slope 1: gradients are compared with an engine run at slope 1.
* :func:`spikingjelly_loop` -- SpikingJelly's ``LIFNode`` (single step), with
  ``decay_input=False``, ``tau = 1 / (1 - beta)``, ``v_reset = 0``,
  ``detach_reset=True`` and its SuperSpike surrogate at ``alpha = 1``
  (``alpha / (1 + |x|)^2``: fast_sigmoid, slope 1). SpikingJelly 2.0.0 takes
  ``tau`` and ``v_threshold`` as Python floats only (its C++ op asserts it), so
  the per-neuron thresholds enter as input gains ``1 / theta`` with threshold 1
  (the membrane in units of theta) and the decay has no gradient. Not exact:
  ``v - v / tau + I / theta`` rounds differently, the spike condition is
  ``v / theta - 1 >= 0`` (not strict), and the surrogate is taken at
  ``(v - theta) / theta``, so its gradients differ by design, not by rounding
  (the decay is left out of its gradient comparison).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from dmn_neuro.simulation.engine.contract import as_param, as_population, as_projection
from dmn_neuro.simulation.neurons import check_surrogate

#: surrogate of the peers that cannot set the engine's slope (Norse 1.1.0, SpikingJelly SuperSpike alpha=1)
PEER_SLOPE = 1.0


def straight_through_spike(v: torch.Tensor, theta: torch.Tensor, surrogate: str, slope: float) -> torch.Tensor:
    """Heaviside ``v > theta`` forward; backward the derivative of the surrogate's
    antiderivative (:class:`~dmn_neuro.simulation.neurons.Surrogate`): ``x/(1+k|x|)``
    for fast_sigmoid, ``atan(pi/2 k x)/pi`` for atan, at ``x = v - theta``."""
    x = v - theta
    if surrogate == "fast_sigmoid":
        g = x / (slope * x.abs() + 1.0)
    else:
        g = torch.atan((math.pi / 2 * slope) * x) / math.pi
    return (v > theta).to(v.dtype) + (g - g.detach())


def currents(xt, prevs, edges, wts, biases, sizes, input_index) -> List[torch.Tensor]:
    """Input current of every population at one step: ``x_t`` (input population), then
    ``prev_pre @ W^T`` per projection in list order, then the bias (run_reference's order)."""
    cur: List[Optional[torch.Tensor]] = [None] * len(sizes)
    cur[input_index] = xt
    for (pre, post), wt in zip(edges, wts):
        c = prevs[pre] @ wt
        cur[post] = c if cur[post] is None else cur[post] + c
    out = []
    for i, c in enumerate(cur):
        c = c if c is not None else xt.new_zeros(xt.shape[0], sizes[i])
        out.append(c if biases[i] is None else c + biases[i])
    return out


def make_plain_step(sizes: Sequence[int], edges: Sequence[tuple], input_index: int, surrogate: str,
                    slope: float) -> Callable:
    """One step of the whole circuit: ``(x_t, mems, prev spikes, betas, thetas, W^T, biases) -> (spikes, mems)``.
    ``edges``: ``(pre index, post index)`` per projection, in list order."""
    check_surrogate(surrogate)

    def step(xt, mems: List[torch.Tensor], prevs: List[torch.Tensor], betas, thetas, wts, biases):
        spikes, new_mems = [], []
        for i, c in enumerate(currents(xt, prevs, edges, wts, biases, sizes, input_index)):
            v = betas[i] * mems[i] + c
            s = straight_through_spike(v, thetas[i], surrogate, slope)
            spikes.append(s)
            new_mems.append(v * (1.0 - s.detach()))
        return spikes, new_mems

    return step


_COMPILED: Dict[tuple, Callable] = {}


def compiled_step(sizes, edges, input_index, surrogate, slope) -> Callable:
    """``torch.compile`` of :func:`make_plain_step` (cached per circuit structure)."""
    key = (tuple(sizes), tuple(edges), input_index, surrogate, float(slope))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(make_plain_step(sizes, edges, input_index, surrogate, slope), dynamic=False)
    return _COMPILED[key]


def _circuit(x, populations, projections):
    pops = [as_population(p) for p in populations]
    projs = [as_projection(q) for q in projections]
    names = [p.name for p in pops]
    index = {nm: i for i, nm in enumerate(names)}
    sizes = [int(torch.as_tensor(p.threshold).reshape(-1).shape[0]) for p in pops]
    betas = [as_param(p.beta, x, (), p.name) for p in pops]
    thetas = [as_param(p.threshold, x, (sizes[i],), p.name) for i, p in enumerate(pops)]
    biases = [None if p.bias is None else as_param(p.bias, x, (sizes[i],), p.name) for i, p in enumerate(pops)]
    wts = [(q.weight if q.sparse is None else q.sparse.to_dense(q.values)).to(x.dtype).t() for q in projs]
    edges = [(index[q.pre], index[q.post]) for q in projs]
    return names, index, sizes, betas, thetas, biases, wts, edges


def plain_loop(x: torch.Tensor, populations, projections, surrogate: str, slope: float,
               input_population: str = "ORN", outputs: Optional[Sequence[str]] = None, compiled: bool = False,
               checkpoint_every: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The circuit as a plain torch per-step loop (``compiled``: through :func:`compiled_step`);
    ``checkpoint_every=K`` wraps every K steps in ``torch.utils.checkpoint`` (non-reentrant)."""
    names, index, sizes, betas, thetas, biases, wts, edges = _circuit(x, populations, projections)
    outputs = names if outputs is None else list(outputs)
    maker = compiled_step if compiled else make_plain_step
    step = maker(sizes, edges, index[input_population], surrogate, slope)
    T, B, _ = x.shape
    out_idx = [index[o] for o in outputs]

    def segment(xs, *state):
        mems, prevs = list(state[:len(names)]), list(state[len(names):])
        rec = [[] for _ in out_idx]
        for xt in xs.unbind(0):
            prevs, mems = step(xt, mems, prevs, betas, thetas, wts, biases)
            for r, i in zip(rec, out_idx):
                r.append(prevs[i])
        return tuple(torch.stack(r) for r in rec) + tuple(mems) + tuple(prevs)

    state = tuple(x.new_zeros(B, k) for k in sizes) * 2
    pieces: List[List[torch.Tensor]] = [[] for _ in out_idx]
    K = T if not checkpoint_every or not torch.is_grad_enabled() else int(checkpoint_every)
    for start in range(0, T, K):
        xs = x[start:start + K]
        res = segment(xs, *state) if K >= T else _checkpoint(segment, xs, *state, use_reentrant=False)
        for p, r in zip(pieces, res[:len(out_idx)]):
            p.append(r)
        state = res[len(out_idx):]
    return {o: torch.cat(p) for o, p in zip(outputs, pieces)}


# ---------------------------------------------------------------------------
# Norse and SpikingJelly (imported only when asked for; make peers-env)
# ---------------------------------------------------------------------------
def available() -> Dict[str, str]:
    """Installed peer libraries and their versions."""
    found = {}
    for mod in ("norse", "spikingjelly"):
        try:
            from importlib.metadata import version

            __import__(mod)
            found[mod] = version(mod)
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            pass
    return found


def _detached_reset(z, v, reset, th):
    """Norse reset_method: zero reset with the spike detached (the engine's)."""
    zd = z.detach()
    return (1 - zd) * v + zd * reset


def norse_loop(x: torch.Tensor, populations, projections, input_population: str = "ORN",
               outputs: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """Per-step loop over Norse's ``lif_box_feed_forward_step`` (see module docstring for the matching)."""
    from norse.torch.functional.lif_box import LIFBoxFeedForwardState, LIFBoxParameters, lif_box_feed_forward_step

    names, index, sizes, betas, thetas, biases, wts, edges = _circuit(x, populations, projections)
    outputs = names if outputs is None else list(outputs)
    T, B, _ = x.shape
    params = [LIFBoxParameters(tau_mem_inv=1.0 - b, v_leak=torch.zeros((), dtype=x.dtype), v_th=th,
                               v_reset=torch.zeros((), dtype=x.dtype), method="super", alpha=PEER_SLOPE,
                               reset_method=_detached_reset) for b, th in zip(betas, thetas)]
    gains = [1.0 / (1.0 - b) for b in betas]
    state = [LIFBoxFeedForwardState(v=x.new_zeros(B, k)) for k in sizes]
    prev = [x.new_zeros(B, k) for k in sizes]
    rec = {o: [] for o in outputs}
    for xt in x.unbind(0):
        new_prev = []
        for i, c in enumerate(currents(xt, prev, edges, wts, biases, sizes, index[input_population])):
            z, state[i] = lif_box_feed_forward_step(c * gains[i], state[i], params[i], dt=1.0)
            new_prev.append(z)
        prev = new_prev
        for o in outputs:
            rec[o].append(prev[index[o]])
    return {o: torch.stack(v) for o, v in rec.items()}


def spikingjelly_loop(x: torch.Tensor, populations, projections, input_population: str = "ORN",
                      outputs: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """Per-step loop over SpikingJelly's ``LIFNode`` in single-step mode (see module docstring)."""
    from spikingjelly.activation_based import neuron, surrogate as sj_surrogate

    names, index, sizes, betas, thetas, biases, wts, edges = _circuit(x, populations, projections)
    outputs = names if outputs is None else list(outputs)
    T, B, _ = x.shape
    nodes = [neuron.LIFNode(tau=float(1.0 / (1.0 - float(b.detach()))), decay_input=False, v_threshold=1.0,
                            v_reset=0.0, surrogate_function=sj_surrogate.SuperSpike(alpha=PEER_SLOPE),
                            detach_reset=True, step_mode="s") for b in betas]
    gains = [1.0 / th for th in thetas]  # per-neuron thresholds as input gains (threshold 1)
    prev = [x.new_zeros(B, k) for k in sizes]
    rec = {o: [] for o in outputs}
    for xt in x.unbind(0):
        new_prev = [nodes[i](c * gains[i]) for i, c in enumerate(currents(xt, prev, edges, wts, biases, sizes,
                                                                index[input_population]))]
        prev = new_prev
        for o in outputs:
            rec[o].append(prev[index[o]])
    return {o: torch.stack(v) for o, v in rec.items()}
