"""Running a circuit: :func:`run_layered` (the fused engine) and :func:`run_reference` (per step).

:func:`run_layered` runs the groups of :mod:`dmn_neuro.simulation.engine.grouping`
in topological order: feed-forward projections between groups are delayed
matmuls over the whole time axis (:mod:`dmn_neuro.simulation.engine.projections`),
or, when their weight is sparse and kernel-eligible, computed inside the scan
of the larger population's group (``_FUSE_PROJECTIONS``); each group is one
:class:`~dmn_neuro.simulation.engine.scans._GroupScan`. With
``checkpoint_every`` only the state at segment boundaries and the requested
outputs are kept; each segment is recomputed in the backward pass.

:func:`run_reference` steps every population with
:func:`~dmn_neuro.simulation.neurons.lif_step` (the tests' and the benchmark's baseline).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from dmn_neuro.errors import ConfigError
from dmn_neuro.simulation.engine.contract import (
    PopulationLike, PopulationState, ProjectionLike, as_param,
)
from dmn_neuro.simulation.engine.grouping import _Circuit, _prepare
from dmn_neuro.simulation.engine.projections import _delayed_projection, _kernel_plan
from dmn_neuro.simulation.engine.scans import (
    _FusedIn, _FusedInTensors, _FusedOut, _GroupPlan, _GroupScan, _ScanInputs, _ScanOutputs, _flatten,
)
from dmn_neuro.simulation.neurons import DEFAULT_SURROGATE, DEFAULT_SURROGATE_SLOPE, Surrogate, check_surrogate, lif_step

__all__ = ["run_layered", "run_layered_with_state", "run_reference"]

#: compute kernel-eligible feed-forward projections inside the scan of the
#: larger population's group (no whole [T, B, n] current or spike gradient)
_FUSE_PROJECTIONS = True


def _run_segment(x, state: Dict[str, PopulationState], circ: _Circuit, input_population: str, surrogate: str,
                 slope: float, record_membrane: bool, outputs: Sequence[str], event_driven: bool):
    """Run all populations over the steps of ``x``; returns (outputs, new state)."""
    T, B, _ = x.shape
    group_of = {n: gi for gi, g in enumerate(circ.groups) for n in g}
    # consumers left for each population's spike train (to free float spikes early)
    uses = {n: (1 if n in outputs else 0) for n in circ.names}
    for q in circ.projs:
        if group_of[q.pre] != group_of[q.post]:
            uses[q.pre] += 1
    spikes: Dict[str, torch.Tensor] = {}
    out: Dict[str, torch.Tensor] = {}
    new_state: Dict[str, PopulationState] = {}
    produced: Dict[int, torch.Tensor] = {}  # currents of projections fused into their sending group
    pidx = {id(q): i for i, q in enumerate(circ.projs)}

    def release(pre: str) -> None:
        uses[pre] -= 1
        if uses[pre] == 0:
            del spikes[pre]

    for group in circ.groups:
        gset = set(group)
        local = {n: i for i, n in enumerate(group)}
        currents: List[Optional[torch.Tensor]] = []
        fused_in: List[_FusedIn] = []
        fin_tensors: List[_FusedInTensors] = []
        for name in group:
            n = circ.sizes[name]
            external = [q for q in circ.projs if q.post == name and q.pre not in gset]
            bias = circ.pops[name].bias
            # A sparse projection into a larger population that is this population's
            # only input is computed inside the scan, chunk by chunk (_FusedIn).
            if (_FUSE_PROJECTIONS and len(external) == 1 and name != input_population and bias is None
                    and pidx[id(external[0])] not in produced and external[0].weight is not None
                    and external[0].sparse is None and n >= circ.sizes[external[0].pre]):
                q = external[0]
                kp = _kernel_plan(state[q.pre].spikes, q.weight)
                if kp is not None:
                    fused_in.append(_FusedIn(local[name], kp, q.grad_mask))
                    fin_tensors.append(_FusedInTensors(spikes[q.pre], state[q.pre].spikes, q.weight))
                    release(q.pre)
                    currents.append(None)
                    continue
            ext = x if name == input_population else None
            for q in external:
                c = produced.pop(pidx[id(q)], None)
                if c is None:
                    c = _delayed_projection(spikes[q.pre], state[q.pre].spikes, q)
                    release(q.pre)
                ext = c if ext is None else ext + c
            if bias is not None:
                bias = as_param(bias, x, (n,), f"population {name} bias")
                ext = bias.expand(T, B, n) if ext is None else ext + bias
            if ext is None:
                ext = x.new_zeros(T, B, n)
            currents.append(ext)
        # A sparse projection out of this group into a smaller population is
        # computed inside the scan, its spike gradient formed chunk by chunk (_FusedOut).
        fused_out: List[_FusedOut] = []
        fout_tensors: List[torch.Tensor] = []
        fout_ids: List[int] = []
        for q in circ.projs:
            if (not _FUSE_PROJECTIONS or q.pre not in gset or q.post in gset or q.sparse is not None
                    or q.weight is None or circ.sizes[q.pre] <= circ.sizes[q.post]):
                continue
            kp = _kernel_plan(state[q.pre].spikes, q.weight)
            if kp is None:
                continue
            fused_out.append(_FusedOut(local[q.pre], circ.sizes[q.post], kp, q.grad_mask))
            fout_tensors.append(q.weight)
            fout_ids.append(pidx[id(q)])
            uses[q.pre] -= 1  # its spike train is consumed inside the scan
        internal = [q for q in circ.projs if q.pre in gset and q.post in gset]
        plan = _GroupPlan(
            tuple(circ.sizes[n] for n in group),
            tuple((local[q.post], local[q.pre], q.sparse) for q in internal),
            Surrogate(surrogate, float(slope)), bool(record_membrane), bool(event_driven),
            tuple(fused_in), tuple(fused_out),
        )
        inputs = _ScanInputs(
            current=tuple(currents),
            beta=tuple(as_param(circ.pops[n].beta, x, (), f"population {n} beta") for n in group),
            theta=tuple(as_param(circ.pops[n].threshold, x, (circ.sizes[n],), f"population {n} threshold")
                        for n in group),
            mem0=tuple(state[n].mem for n in group),
            spk0=tuple(state[n].spikes for n in group),
            weights=tuple(q.weight if q.sparse is None else q.values for q in internal),
            fused_in=tuple(fin_tensors),
            fused_out_weights=tuple(fout_tensors),
        )
        res = _ScanOutputs.unflatten(plan, _GroupScan.apply(plan, *_flatten(inputs)))
        for j, i in enumerate(fout_ids):
            produced[i] = res.fused_out_currents[j]
        for i, name in enumerate(group):
            s, m = res.spikes[i], res.mem[i]
            if uses[name] > 0:
                spikes[name] = s
            if name in outputs:
                out[name] = s
                if record_membrane:
                    out[name + "_mem"] = m
            # clone: a view of the last step would keep the whole [T, B, n] buffer alive
            last_m = m[-1].clone() if record_membrane else m
            new_state[name] = PopulationState(last_m, s[-1].clone())
        del res, inputs, currents, fin_tensors
    return out, new_state


def _zero_state(x: torch.Tensor, circ: _Circuit) -> Dict[str, PopulationState]:
    B = x.shape[1]
    return {n: PopulationState(x.new_zeros(B, circ.sizes[n]), x.new_zeros(B, circ.sizes[n])) for n in circ.names}


def run_layered_with_state(
    x: torch.Tensor,
    populations: Sequence[PopulationLike],
    projections: Sequence[ProjectionLike],
    surrogate: str = DEFAULT_SURROGATE,
    slope: float = DEFAULT_SURROGATE_SLOPE,
    input_population: str = "ORN",
    checkpoint_every: Optional[int] = None,
    record_membrane: bool = False,
    outputs: Optional[Sequence[str]] = None,
    initial_state: Optional[Mapping[str, PopulationState]] = None,
    event_driven: bool = False,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, PopulationState]]:
    """:func:`run_layered` that also takes/returns the state (``{name: PopulationState}``)
    so that an episode can be continued (truncated BPTT, streaming)."""
    check_surrogate(surrogate)
    circ = _prepare(x, populations, projections, input_population)
    outputs = list(circ.names) if outputs is None else list(outputs)
    for n in outputs:
        if n not in circ.sizes:
            raise ConfigError(f"unknown output population {n!r}; known: {circ.names}")
    state = _zero_state(x, circ) if initial_state is None else dict(initial_state)
    for n in circ.names:
        if n not in state:
            raise ConfigError(f"initial_state lacks population {n!r}")
    T = x.shape[0]
    if checkpoint_every is not None and int(checkpoint_every) <= 0:
        raise ConfigError(f"checkpoint_every must be a positive number of steps, got {checkpoint_every}")
    use_ckpt = checkpoint_every is not None and int(checkpoint_every) < T and torch.is_grad_enabled()
    if not use_ckpt:
        return _run_segment(x, state, circ, input_population, surrogate, slope, record_membrane, outputs, event_driven)

    K = int(checkpoint_every)
    names = circ.names

    def segment(x_seg, *flat):
        st = {n: PopulationState(flat[2 * i], flat[2 * i + 1]) for i, n in enumerate(names)}
        o, ns = _run_segment(x_seg, st, circ, input_population, surrogate, slope, record_membrane, outputs, event_driven)
        keys = list(o.keys())
        return tuple(o[k] for k in keys) + tuple(t for n in names for t in ns[n])

    keys = [k for n in outputs for k in ((n, n + "_mem") if record_membrane else (n,))]
    pieces: Dict[str, List[torch.Tensor]] = {k: [] for k in keys}
    for start in range(0, T, K):
        flat = tuple(t for n in names for t in state[n])
        res = _torch_checkpoint(segment, x[start:start + K], *flat, use_reentrant=False)
        for i, k in enumerate(keys):
            pieces[k].append(res[i])
        rest = res[len(keys):]
        state = {n: PopulationState(rest[2 * i], rest[2 * i + 1]) for i, n in enumerate(names)}
    return {k: torch.cat(v, 0) for k, v in pieces.items()}, state


def run_layered(
    x: torch.Tensor,
    populations: Sequence[PopulationLike],
    projections: Sequence[ProjectionLike],
    surrogate: str = DEFAULT_SURROGATE,
    slope: float = DEFAULT_SURROGATE_SLOPE,
    input_population: str = "ORN",
    checkpoint_every: Optional[int] = None,
    record_membrane: bool = False,
    outputs: Optional[Sequence[str]] = None,
    event_driven: bool = False,
) -> Dict[str, torch.Tensor]:
    """Simulate a circuit on ``x [T, B, n_input]`` from rest; differentiable.

    Returns ``{population: spikes [T, B, n]}`` (float, dtype/device of ``x``)
    for the populations in ``outputs`` (default: all), plus
    ``{population + '_mem': post-reset membrane [T, B, n]}`` with
    ``record_membrane``. ``checkpoint_every=K`` recomputes each K-step segment
    in the backward pass (memory ~ K instead of T); ``event_driven`` makes
    sparse projections inside recurrent groups gather only the rows of active
    presynaptic neurons in the forward pass (fast for sparse activity).
    Populations not listed in ``outputs`` are never materialised over all T,
    which is what keeps long episodes lean.
    """
    return run_layered_with_state(x, populations, projections, surrogate, slope, input_population,
                                  checkpoint_every, record_membrane, outputs, None, event_driven)[0]


# ---------------------------------------------------------------------------
# the snnTorch reference (tests, benchmark baseline)
# ---------------------------------------------------------------------------
def run_reference(
    x: torch.Tensor,
    populations: Sequence[PopulationLike],
    projections: Sequence[ProjectionLike],
    surrogate: str = DEFAULT_SURROGATE,
    slope: float = DEFAULT_SURROGATE_SLOPE,
    input_population: str = "ORN",
    record_membrane: bool = False,
    outputs: Optional[Sequence[str]] = None,
) -> Dict[str, torch.Tensor]:
    """Per-step loop on the one LIF step (:func:`~dmn_neuro.simulation.neurons.lif_step`,
    which :class:`~dmn_neuro.simulation.neurons.LIFCell` also calls), with the
    same contract and outputs as :func:`run_layered`.

    Current of population p at step t: ``x[t]`` (input population) plus
    ``spikes_q[t-1] @ W^T`` for every projection ``q -> p`` in list order.
    Sparse projections are run densely (``structure.to_dense(values)``).
    """
    check_surrogate(surrogate)
    circ = _prepare(x, populations, projections, input_population)
    outputs = list(circ.names) if outputs is None else list(outputs)
    T, B, _ = x.shape
    betas = {n: as_param(circ.pops[n].beta, x, (), n) for n in circ.names}
    thetas = {n: as_param(circ.pops[n].threshold, x, (circ.sizes[n],), n) for n in circ.names}
    biases = {n: circ.pops[n].bias for n in circ.names}
    wts = [(q.pre, q.post, (q.weight if q.sparse is None else q.sparse.to_dense(q.values)).t()) for q in circ.projs]
    mem = {n: x.new_zeros(B, circ.sizes[n]) for n in circ.names}
    prev = {n: x.new_zeros(B, circ.sizes[n]) for n in circ.names}
    rec: Dict[str, List[torch.Tensor]] = {n: [] for n in outputs}
    rec_m: Dict[str, List[torch.Tensor]] = {n: [] for n in outputs}
    for xt in x.unbind(0):
        cur: Dict[str, Optional[torch.Tensor]] = {n: None for n in circ.names}
        cur[input_population] = xt
        for pre, post, wt in wts:
            c = prev[pre] @ wt
            cur[post] = c if cur[post] is None else cur[post] + c
        new_prev = {}
        for n in circ.names:
            c = cur[n] if cur[n] is not None else x.new_zeros(B, circ.sizes[n])
            if biases[n] is not None:
                c = c + biases[n].to(x.dtype)
            spk, mem[n] = lif_step(c, mem[n], betas[n], thetas[n], surrogate, slope)
            new_prev[n] = spk
            if n in rec:
                rec[n].append(spk)
                rec_m[n].append(mem[n])
        prev = new_prev
    out = {n: torch.stack(v) for n, v in rec.items()}
    if record_membrane:
        out.update({n + "_mem": torch.stack(v) for n, v in rec_m.items()})
    return out
