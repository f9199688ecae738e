"""Closed loop on the engine: advance the circuit in skewed blocks between arena updates.

In the closed loop the ORN input of step ``t`` depends on where the fly is,
i.e. on the DN spikes of step ``t-1``. With one step of synaptic delay per
hop, a population ``d`` hops downstream of the input only needs the input up
to ``t-d`` for its step ``t``. So the groups of the projection graph
(:mod:`.grouping`) can run on *skewed* clocks: the input group is advanced
over ``x[t0:t0+K]``, a group at depth ``d`` over ``[t0+d, t0+K+d)``, and the
DN spikes ``[t0+d_out, t0+K+d_out)`` then give the arena (hence the input) for
the next ``K = d_out + 1`` steps (5 for ORN -> PN -> KC -> MBON -> DN).

Each group advances through the engine's group scan (:func:`.runner._run_segment`
on a sub-circuit: one autograd node per group and block with the hand-written
backward); a projection between groups is ONE ``spikes[t-1] @ W^T`` matmul over
all steps of the block. Forward arithmetic is that of the per-step path: the
same ``spikes @ W.t()`` product per row (MKL's summation order does not depend
on the row count from :data:`.projections._MIN_GEMM_ROWS` rows on; below it
one GEMM per step is used), the same order of summation of the input current,
the same LIF step. Spikes are therefore bit-identical to
:meth:`DifferentiableOlfactoryCircuit.step` in a loop; gradients agree to float
rounding (they are summed in a different order).

:meth:`SkewedLoop.build` returns ``None`` for circuits it does not reproduce
exactly (a group with more than one population receiving input from outside
it, or a population whose external projections do not all precede its
internal ones in the projection list); callers then step per step.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from dmn_neuro.simulation.engine.contract import PopulationLike, PopulationState, ProjectionLike
from dmn_neuro.simulation.engine.grouping import _Circuit, _prepare
from dmn_neuro.simulation.engine import kernels
from dmn_neuro.simulation.engine.projections import _MIN_GEMM_ROWS, _KernelPlan, _kernel_plan
from dmn_neuro.simulation.engine.sparse import _all_finite
from dmn_neuro.simulation.engine.runner import _run_segment

__all__ = ["SkewedLoop"]


class _ProjPlan(NamedTuple):
    """How one projection between groups runs for the whole rollout (its weight is fixed)."""

    plan: Optional[_KernelPlan]  # event-driven kernel whose sums are the GEMM's, or None: torch matmul
    edges: Optional["kernels.CSR"]  # synapse mask by presynaptic neuron, for the weight gradient


def _plan(q, s: torch.Tensor) -> _ProjPlan:
    plan = _kernel_plan(s[0], q.weight) if s.shape[1] >= _MIN_GEMM_ROWS else None
    edges = None
    if plan is not None and q.grad_mask is not None:
        edges = kernels.csr_by_pre(q.grad_mask, values=False)
    return _ProjPlan(plan, edges)


class _BlockProjection(torch.autograd.Function):
    """``out[i] = s[i] @ W^T`` for binary spikes ``s [n, rows, n_pre]`` through the
    engine's event-driven kernels (forward sums as the GEMM does, bit for bit;
    :mod:`.kernels`); backward: input gradient through the nonzeros of ``W``,
    weight gradient only on the synapse mask. The plan is made once per rollout
    (the per-call planning of :class:`.projections._DelayedDense` would dominate
    at blocks of a few steps)."""

    @staticmethod
    def forward(ctx, s, weight, cache: _ProjPlan):
        n, rows, n_pre = s.shape
        flat = s.reshape(n * rows, n_pre).contiguous()
        out = kernels.spike_matmul(flat, cache.plan.csr, cache.plan.block)
        ctx.cache = cache
        ctx.save_for_backward(flat.bool(), weight)
        return out.view(n, rows, -1)

    @staticmethod
    def backward(ctx, grad_out):
        sb, weight = ctx.saved_tensors
        cache: _ProjPlan = ctx.cache
        n, rows, n_post = grad_out.shape
        g = grad_out.reshape(n * rows, n_post).contiguous()
        finite = _all_finite(g)
        g_s = g_w = None
        if ctx.needs_input_grad[0]:
            gs = kernels.spike_matmul_input_grad(g, cache.plan.csr) if finite else g @ weight
            g_s = gs.view(n, rows, -1)
        if ctx.needs_input_grad[1]:
            if cache.edges is not None and finite:
                acc = kernels.spike_weight_grad(g, sb, cache.edges)
                g_w = g.new_zeros(weight.shape)
                g_w[cache.edges.idx, cache.edges.pre] = acc
            else:
                g_w = g.t() @ sb.to(g.dtype)
        return g_s, g_w, None


class _Stage:
    """One group of the circuit with its own clock."""

    def __init__(self, names, circ: _Circuit, internal, external, entry: str, offset: int) -> None:
        self.names = list(names)
        self.circ = circ  # sub-circuit: the group and its internal projections
        self.external = external  # projections into ``entry`` from other groups, in list order
        self.entry = entry  # the population that takes the group's input current
        self.offset = offset
        self.hi = 0  # steps [0, hi) done


class SkewedLoop:
    """State of a circuit advanced block by block (see the module docstring).

    Use: ``loop.advance(None)`` once (the steps that need no input), then
    ``loop.advance(x)`` with the next ``len(x) <= loop.block`` input steps;
    after each call ``loop.done(name)`` tells up to which step a population is
    known and ``loop.step_spikes(name, t)`` / ``loop.spikes(name)`` return its spikes.
    """

    def __init__(self, stages: List[_Stage], sizes: Dict[str, int], input_population: str, output_population: str,
                 rows: int, steps: int, like: torch.Tensor, surrogate: str, slope: float) -> None:
        self.stages = stages
        self.sizes = sizes
        self.input_population = input_population
        self.output_population = output_population
        self.rows = int(rows)
        self.steps = int(steps)
        self.surrogate = surrogate
        self.slope = float(slope)
        self._plans: Dict[int, "_ProjPlan"] = {}  # per projection, resolved on first use
        self.stage_of = {n: st for st in stages for n in st.names}
        out_offset = self.stage_of[output_population].offset
        self.block = max(1, min(out_offset + 1, self.steps))
        self.state: Dict[str, PopulationState] = {
            n: PopulationState(like.new_zeros(rows, sizes[n]), like.new_zeros(rows, sizes[n])) for n in sizes}
        self._init_spikes = {n: self.state[n].spikes for n in sizes}
        self._windows: Dict[str, List[torch.Tensor]] = {n: [] for n in sizes}
        self._starts: Dict[str, List[int]] = {n: [] for n in sizes}
        self._steps_of: Dict[str, List[torch.Tensor]] = {n: [] for n in sizes}  # per-step views (output only)

    # -- construction ---------------------------------------------------------
    @classmethod
    def build(cls, populations: Sequence[PopulationLike], projections: Sequence[ProjectionLike],
              input_population: str, output_population: str, *, rows: int, steps: int, like: torch.Tensor,
              surrogate: str, slope: float) -> Optional["SkewedLoop"]:
        n_in = None
        pops = list(populations)
        for p in pops:
            name = p.name if hasattr(p, "name") else p["name"]
            thr = p.threshold if hasattr(p, "threshold") else p["threshold"]
            if name == input_population:
                n_in = int(torch.as_tensor(thr).shape[0])
        if n_in is None:
            return None
        circ = _prepare(like.new_zeros(1, rows, n_in), pops, projections, input_population)
        if output_population not in circ.sizes:
            return None
        group_of = {n: gi for gi, g in enumerate(circ.groups) for n in g}
        offsets: List[int] = []
        stages: List[_Stage] = []
        big = int(steps) + 1
        for gi, group in enumerate(circ.groups):
            gset = set(group)
            internal = [q for q in circ.projs if q.pre in gset and q.post in gset]
            entries = [n for n in group if n == input_population
                       or any(q.post == n and q.pre not in gset for q in circ.projs)]
            if len(entries) > 1 or any(q.sparse is not None for q in circ.projs if q.post in gset):
                return None
            for n in group:  # per-step order: external projections first, then internal ones
                kinds = [q.pre in gset for q in circ.projs if q.post == n]
                if kinds != sorted(kinds):
                    return None
            entry = entries[0] if entries else group[0]
            external = [q for q in circ.projs if q.post == entry and q.pre not in gset]
            if input_population in gset:
                off = 0
            else:
                off = min([offsets[group_of[q.pre]] + 1 for q in external], default=big)
            off = min(off, big)
            offsets.append(off)
            sub = _Circuit(list(group), {n: circ.sizes[n] for n in group}, {n: circ.pops[n] for n in group},
                           internal, [list(group)])
            stages.append(_Stage(group, sub, internal, external, entry, off))
        return cls(stages, circ.sizes, input_population, output_population, rows, steps, like, surrogate, slope)

    # -- queries --------------------------------------------------------------
    def done(self, name: str) -> int:
        return self.stage_of[name].hi

    def step_spikes(self, name: str, t: int) -> torch.Tensor:
        """Spikes ``[rows, n]`` of step ``t`` (must be done)."""
        steps = self._steps_of[name]
        while len(steps) <= t:
            w = len(steps)
            i = self._find(name, w)
            steps.extend(self._windows[name][i].unbind(0))
        return steps[t]

    def spikes(self, name: str) -> torch.Tensor:
        """All spikes of ``name`` so far, ``[done, rows, n]``."""
        ws = self._windows[name]
        if not ws:
            return self._init_spikes[name].new_zeros(0, self.rows, self.sizes[name])
        return ws[0] if len(ws) == 1 else torch.cat(ws, 0)

    def _find(self, name: str, t: int) -> int:
        starts = self._starts[name]
        for i in range(len(starts) - 1, -1, -1):
            if starts[i] <= t:
                return i
        raise IndexError(t)

    def _slice(self, name: str, a: int, b: int) -> torch.Tensor:
        """Spikes of steps ``[a, b)``; step -1 is the initial (zero) state."""
        pieces = []
        if a < 0:
            pieces.append(self._init_spikes[name].unsqueeze(0))
            a = 0
        if b > a:
            ws, starts = self._windows[name], self._starts[name]
            i = self._find(name, a)
            while a < b:
                w, s0 = ws[i], starts[i]
                e = min(b, s0 + w.shape[0])
                pieces.append(w if (a == s0 and e == s0 + w.shape[0]) else w[a - s0:e - s0])
                a = e
                i += 1
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)

    # -- advancing ------------------------------------------------------------
    def _projection(self, q, lo: int, hi: int) -> torch.Tensor:
        """``spikes_pre[t-1] @ W^T`` for ``t`` in ``[lo, hi)``, as the per-step path computes it."""
        s = self._slice(q.pre, lo - 1, hi - 1)
        cache = self._plans.get(id(q))
        if cache is None:
            cache = self._plans[id(q)] = _plan(q, s)
        if cache.plan is not None:
            return _BlockProjection.apply(s, q.weight, cache)
        wt = q.weight.t()
        n, rows, n_pre = s.shape
        if rows < _MIN_GEMM_ROWS:  # MKL sums GEMMs of < 4 rows in another order: one per step
            return torch.stack([st @ wt for st in s.unbind(0)])
        return (s.reshape(n * rows, n_pre) @ wt).reshape(n, rows, wt.shape[1])

    def advance(self, x: Optional[torch.Tensor]) -> None:
        """Advance with the next input steps ``x [k, rows, n_in]`` (``None``: only
        the steps that need no new input, i.e. the start of the skew)."""
        inp = self.stage_of[self.input_population]
        target_in = inp.hi + (0 if x is None else int(x.shape[0]))
        for st in self.stages:
            if target_in >= self.steps:
                hi = self.steps
            else:
                hi = min(self.steps, target_in + st.offset)
            lo = st.hi
            if hi <= lo:
                continue
            cur = None
            if st.entry == self.input_population:
                if x is None or x.shape[0] != hi - lo:
                    raise RuntimeError("SkewedLoop: input block does not match the input group's window")
                cur = x
            for q in st.external:
                c = self._projection(q, lo, hi)
                cur = c if cur is None else cur + c
            if cur is None:
                cur = self.state[st.entry].mem.new_zeros(hi - lo, self.rows, self.sizes[st.entry])
            out, new_state = _run_segment(cur, {n: self.state[n] for n in st.names}, st.circ, st.entry,
                                          self.surrogate, self.slope, False, st.names, False)
            for n in st.names:
                self._windows[n].append(out[n])
                self._starts[n].append(lo)
                self.state[n] = new_state[n]
            st.hi = hi
