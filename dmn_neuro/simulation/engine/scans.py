"""LIF scans: one population, or a strongly connected group, over all ``T`` steps as ONE autograd node.

Because the zero reset is detached, the backward is the linear reverse recurrence::

    v_t  = beta * vr_{t-1} + I_t,   s_t = H(v_t - theta),   vr_t = v_t * (1 - s_t)
    a_t := dL/dv_t = g_t * sigma'(v_t - theta) + (1 - s_t) * (h_t + beta * a_{t+1})
    dL/dI_t = a_t,   dL/dbeta = sum_t a_t * vr_{t-1},   dL/dtheta = -sum_t g_t * sigma'(v_t - theta)

(``g_t = dL/ds_t``, ``h_t = dL/dvr_t`` from outside, ``vr_{-1} = mem0``,
``dL/dmem0 = beta * a_0``, ``sigma'`` the
:class:`~dmn_neuro.simulation.neurons.Surrogate`). Only the pre-reset membrane
``v`` is saved (dtype of the input); spikes and reset masks are recomputed
from it. A group couples its populations through delayed recurrent
projections (KC <-> APL), stepped in C where the kernels reproduce the torch
loop's rounding (:mod:`.group_kernel`), else in torch; feed-forward
projections into or out of the group can be computed inside the scan chunk by
chunk (:class:`_FusedIn`, :class:`_FusedOut`). The tensors cross ``autograd.Function`` positionally;
:class:`_ScanInputs`, :class:`_ScanSaved` and :class:`_ScanOutputs` name them
(:func:`_flatten` / ``unflatten``).
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type

import torch

from dmn_neuro.simulation.engine import group_kernel as _group_kernel
from dmn_neuro.simulation.engine import kernels
from dmn_neuro.simulation.engine import projections as _proj
from dmn_neuro.simulation.engine import sparse as _sparse
from dmn_neuro.simulation.engine.contract import as_param
from dmn_neuro.simulation.engine.projections import (
    _KernelPlan, _WeightGradAcc, _delayed_rows, _kernel_current, _kernel_input_grad,
)
from dmn_neuro.simulation.engine.sparse import SparseStructure, _all_finite, _weight_grad
from dmn_neuro.errors import ConfigError
from dmn_neuro.simulation.neurons import DEFAULT_SURROGATE, DEFAULT_SURROGATE_SLOPE, Surrogate, check_surrogate

__all__ = ["lif_scan", "lif_scan_with_state"]


class _FusedIn(NamedTuple):
    """A feed-forward projection computed inside the group that receives it,
    chunk by chunk (its ``[T, B, n_post]`` current and that current's gradient
    never exist as whole tensors)."""

    post: int  # local index of the receiving population
    kplan: _KernelPlan
    grad_mask: Optional[torch.Tensor]


class _FusedOut(NamedTuple):
    """A feed-forward projection computed inside the group that sends it: the
    group returns its current; the gradient w.r.t. the spikes is formed chunk
    by chunk in the group's backward (never as a whole ``[T, B, n_pre]`` tensor)."""

    pre: int  # local index of the sending population
    n_post: int
    kplan: _KernelPlan
    grad_mask: Optional[torch.Tensor]


class _GroupPlan(NamedTuple):
    """Static description of one group scan (not a tensor; passed to autograd as is)."""

    sizes: Tuple[int, ...]
    edges: Tuple[Tuple[int, int, Optional[SparseStructure]], ...]  # (post, pre, structure) local indices
    surrogate: Surrogate
    trace: bool  # return the post-reset membrane trace [T, B, n] instead of the last membrane
    event_driven: bool  # sparse recurrent edges: gather active presynaptic rows in the forward
    fused_in: Tuple[_FusedIn, ...] = ()
    fused_out: Tuple[_FusedOut, ...] = ()


#: Elements per time chunk in the backward pass (~1 MB of fp32): the
#: elementwise work (surrogate, masks) runs on chunks that stay in cache,
#: measured ~4x cheaper per element than whole-[T, B, N] passes on this CPU.
_CHUNK_ELEMENTS = 1 << 18


# ---------------------------------------------------------------------------
# the tensors of a group scan, by name (autograd.Function takes them positionally)
# ---------------------------------------------------------------------------
class _FusedInTensors(NamedTuple):
    """Tensors of one fused incoming projection (or their gradients)."""

    pre_spikes: Any  # [T, B, n_pre] presynaptic spikes (bool when saved)
    pre_s0: Any  # [B, n_pre] presynaptic spikes before the first step
    weight: Any  # [n_post, n_pre]


def _layout(plan: _GroupPlan) -> Dict[str, Tuple[int, Optional[Type[NamedTuple]]]]:
    """How many items each named field holds for ``plan`` (and their item type
    when an item is itself several tensors)."""
    K = len(plan.sizes)
    return {
        "current": (K, None), "beta": (K, None), "theta": (K, None), "mem0": (K, None), "spk0": (K, None),
        "weights": (len(plan.edges), None), "fused_in": (len(plan.fused_in), _FusedInTensors),
        "fused_out_weights": (len(plan.fused_out), None),
        "v": (K, None), "spikes": (K, None), "mem": (K, None), "fused_out_currents": (len(plan.fused_out), None),
    }


def _flatten(struct: NamedTuple) -> Tuple[Any, ...]:
    """The positional tuple autograd sees: fields in order, nested items spread."""
    flat: List[Any] = []
    for field in struct:
        for item in field:
            if isinstance(item, _FusedInTensors):
                flat.extend(item)
            else:
                flat.append(item)
    return tuple(flat)


def _unflatten(cls, plan: _GroupPlan, flat: Sequence[Any]):
    """Inverse of :func:`_flatten` for a structure of ``cls`` described by ``plan``."""
    layout = _layout(plan)
    it = iter(flat)
    fields = []
    for name in cls._fields:
        count, item = layout[name]
        if item is None:
            fields.append(tuple(next(it) for _ in range(count)))
        else:
            fields.append(tuple(item(*(next(it) for _ in item._fields)) for _ in range(count)))
    if next(it, _END) is not _END:  # pragma: no cover - internal invariant
        raise RuntimeError(f"{cls.__name__}: more tensors than the plan describes")
    return cls(*fields)


_END = object()


class _ScanInputs(NamedTuple):
    """Inputs of :class:`_GroupScan` (and, in the same layout, their gradients)."""

    current: Tuple[Optional[torch.Tensor], ...]  # K x [T, B, n_k]; None: fed by a fused projection
    beta: Tuple[torch.Tensor, ...]  # K x 0-d
    theta: Tuple[torch.Tensor, ...]  # K x [n_k]
    mem0: Tuple[torch.Tensor, ...]  # K x [B, n_k] post-reset membranes before the first step
    spk0: Tuple[torch.Tensor, ...]  # K x [B, n_k] spikes before the first step
    weights: Tuple[torch.Tensor, ...]  # E x dense [n_post, n_pre] or sparse values [nnz] (plan.edges order)
    fused_in: Tuple[_FusedInTensors, ...]  # per plan.fused_in
    fused_out_weights: Tuple[torch.Tensor, ...]  # per plan.fused_out

    @classmethod
    def unflatten(cls, plan: _GroupPlan, flat: Sequence[Any]) -> "_ScanInputs":
        return _unflatten(cls, plan, flat)


class _ScanSaved(NamedTuple):
    """What :class:`_GroupScan` saves for its backward pass."""

    v: Tuple[torch.Tensor, ...]  # K x [T, B, n_k] pre-reset membranes
    mem0: Tuple[torch.Tensor, ...]
    spk0: Tuple[torch.Tensor, ...]
    beta: Tuple[torch.Tensor, ...]
    theta: Tuple[torch.Tensor, ...]
    weights: Tuple[torch.Tensor, ...]
    fused_in: Tuple[_FusedInTensors, ...]  # spikes as bool
    fused_out_weights: Tuple[torch.Tensor, ...]

    @classmethod
    def unflatten(cls, plan: _GroupPlan, flat: Sequence[Any]) -> "_ScanSaved":
        return _unflatten(cls, plan, flat)


class _ScanOutputs(NamedTuple):
    """Outputs of :class:`_GroupScan` (and, in the same layout, their incoming gradients)."""

    spikes: Tuple[torch.Tensor, ...]  # K x [T, B, n_k]
    mem: Tuple[torch.Tensor, ...]  # K x last post-reset membrane [B, n_k], or the trace [T, B, n_k] (plan.trace)
    fused_out_currents: Tuple[torch.Tensor, ...]  # per plan.fused_out: [T, B, n_post]

    @classmethod
    def unflatten(cls, plan: _GroupPlan, flat: Sequence[Any]) -> "_ScanOutputs":
        return _unflatten(cls, plan, flat)


class _AStore:
    """dL/dv of one population during the reverse sweep: the whole ``[T, B, n]``
    when it is returned as the current's gradient, else only the current chunk
    plus the step after it."""

    def __init__(self, full: bool, T: int, chunk: int, like: torch.Tensor) -> None:
        self.full = full
        self.buf = like.new_empty((T + 1 if full else chunk + 1), *like.shape[1:])
        self.prev_len = 0

    def window(self, c0: int, c1: int) -> torch.Tensor:
        """Rows for steps ``c0 .. c1`` (the last one final from the previous chunk)."""
        if self.full:
            return self.buf[c0:c1 + 1]
        if self.prev_len:  # the previous chunk's first step is this chunk's step c1
            self.buf[c1 - c0].copy_(self.buf[0])
        self.prev_len = c1 - c0
        return self.buf[:c1 - c0 + 1]


class _GroupScan(torch.autograd.Function):
    """LIF scan of ``K`` populations coupled by delayed projections (``K = 1`` and
    no edges: :func:`lif_scan`).

    Call as ``_GroupScan.apply(plan, *_flatten(_ScanInputs(...)))``; the
    outputs are ``_flatten(_ScanOutputs(...))`` (read them back with
    :meth:`_ScanOutputs.unflatten`). Saved for backward (:class:`_ScanSaved`):
    the pre-reset membranes ``V`` (spikes, reset masks and surrogate
    derivatives are recomputed from them) and the presynaptic spikes of fused
    incoming projections as ``bool``.

    Per step the forward computes ``v = beta*vr + I`` (mul, then add: the
    rounding of :func:`~dmn_neuro.simulation.neurons.lif_step`), ``s = v > theta``
    written as float and ``vr = v - v*s`` (exactly ``v*(1-s)`` for ``s`` in
    {0, 1}) in place; the tests hold these loops to ``lif_step`` bit for bit.
    """

    @staticmethod
    def forward(ctx, plan: _GroupPlan, *flat):
        inp = _ScanInputs.unflatten(plan, flat)
        K = len(plan.sizes)
        cur, beta, theta, mem0, spk0, wts = inp.current, inp.beta, inp.theta, inp.mem0, inp.spk0, inp.weights
        T = next(c.shape[0] for c in (*cur, *(f.pre_spikes for f in inp.fused_in)) if c is not None)
        B = mem0[0].shape[0]
        V = [mem0[k].new_empty(T, B, n) for k, n in enumerate(plan.sizes)]
        S = [torch.empty_like(v) for v in V]
        Vs = [v.unbind(0) for v in V]
        Ss = [s.unbind(0) for s in S]
        Cs = [c.unbind(0) if c is not None else None for c in cur]
        fed = {f.post: i for i, f in enumerate(plan.fused_in)}
        chunk = max(1, min(T, _CHUNK_ELEMENTS // max(1, B * max(plan.sizes)))) if fed else T
        inbuf = {k: mem0[k].new_empty(chunk, B, plan.sizes[k]) for k in fed}
        vr = [m.clone() for m in mem0]
        incoming: List[List[Tuple[int, int]]] = [[] for _ in range(K)]
        for e, (post, pre, _) in enumerate(plan.edges):
            incoming[post].append((e, pre))
        wts_t = []  # dense: W^T; sparse: values in transposed order (event) or values (CSR)
        for (post, pre, st), w in zip(plan.edges, wts):
            if st is None:
                wts_t.append(w.t())
            else:
                wts_t.append(w[st.t_perm] if plan.event_driven else w)
        sprev = list(spk0)
        fg = _group_kernel.plan(plan.edges, wts, B, mem0[0], (*cur, *beta, *theta, *mem0, *spk0))
        if fg is not None:  # the steps in C, one call per chunk (same rounding as the loop below)
            vr = [m.contiguous().clone() for m in mem0]
            betas = [float(b) for b in beta]
            thetas = [th.contiguous() for th in theta]
        # Per step: v = beta*vr + I (mul, add: the rounding of snnTorch's Leaky);
        # s = v > theta written as float; vr = v - v*s (exactly v*(1-s) for s in {0,1}).
        for c0 in range(0, T, chunk):
            c1 = min(T, c0 + chunk)
            for k, i in fed.items():  # fused incoming currents of this chunk (bit-identical to the GEMM)
                f = inp.fused_in[i]
                _kernel_current(f.pre_spikes, f.pre_s0, plan.fused_in[i].kplan, inbuf[k], c0, c1)
            if fg is not None:
                ext = [cur[k][c0:c1].contiguous() if cur[k] is not None else inbuf[k][:c1 - c0] for k in range(K)]
                # (fresh, aligned initial spikes: the reductions' order depends on alignment, see kernels.dot_orders)
                s_prev = [spk0[k].clone(memory_format=torch.contiguous_format) if c0 == 0 else S[k][c0 - 1]
                          for k in range(K)]
                kernels.group_forward_chunk(c1 - c0, B, plan.sizes, ext, [v[c0:c1] for v in V], [s[c0:c1] for s in S],
                                            vr, s_prev, betas, thetas, fg)
            elif plan.edges:
                for t in range(c0, c1):
                    currents = []
                    for k in range(K):
                        I = Cs[k][t] if Cs[k] is not None else inbuf[k][t - c0]
                        for e, pre in incoming[k]:
                            st = plan.edges[e][2]
                            if st is None:  # (small batches: an aligned copy, see _MIN_GEMM_ROWS)
                                contrib = torch.mm(sprev[pre] if B >= _proj._MIN_GEMM_ROWS else sprev[pre].clone(), wts_t[e])
                            elif plan.event_driven:
                                contrib = st.event_matmul(wts_t[e], sprev[pre])
                            else:
                                contrib = st.spmm(wts_t[e], sprev[pre])
                            I = I + contrib
                        currents.append(I)
                    for k in range(K):
                        v, s = Vs[k][t], Ss[k][t]
                        torch.mul(vr[k], beta[k], out=v)
                        v.add_(currents[k])
                        torch.gt(v, theta[k], out=s)
                        vr[k] = torch.addcmul(v, v, s, value=-1.0)
                        sprev[k] = s
            else:
                for k in range(K):
                    b, th, vk, sk, m = beta[k], theta[k], Vs[k], Ss[k], vr[k]
                    ck = Cs[k] if Cs[k] is not None else inbuf[k].unbind(0)
                    off = 0 if Cs[k] is not None else c0
                    for t in range(c0, c1):
                        v, s = vk[t], sk[t]
                        torch.mul(m, b, out=v)
                        v.add_(ck[t - off])
                        torch.gt(v, th, out=s)
                        m = torch.addcmul(v, v, s, value=-1.0)
                    vr[k] = m
        del inbuf
        outs = []
        for fo in plan.fused_out:  # the whole train at once: one kernel call over all T*B rows
            outs.append(_kernel_current(S[fo.pre], spk0[fo.pre], fo.kplan, mem0[0].new_empty(T, B, fo.n_post)))
        mems = [torch.addcmul(V[k], V[k], S[k], value=-1.0) for k in range(K)] if plan.trace else vr
        ctx.plan = plan
        ctx.group_edges = fg
        fin_saved = tuple(_FusedInTensors(f.pre_spikes.bool(), f.pre_s0.bool(), f.weight) for f in inp.fused_in)
        ctx.save_for_backward(*_flatten(_ScanSaved(tuple(V), mem0, spk0, beta, theta, wts, fin_saved,
                                                   inp.fused_out_weights)))
        return _flatten(_ScanOutputs(tuple(S), tuple(mems), tuple(outs)))

    @staticmethod
    def backward(ctx, *grads):
        plan: _GroupPlan = ctx.plan
        K = len(plan.sizes)
        V, mem0, spk0, beta, theta, wts, fin, fout_w = _ScanSaved.unflatten(plan, ctx.saved_tensors)
        g_out = _ScanOutputs.unflatten(plan, grads)
        gS, gM = g_out.spikes, g_out.mem
        gO = [None if g is None else g.contiguous() for g in g_out.fused_out_currents]
        T, B = V[0].shape[:2]
        need = _ScanInputs.unflatten(plan, ctx.needs_input_grad[1:])  # drop plan
        betas = [float(b) for b in beta]
        surrogate = plan.surrogate
        num = surrogate.numerator
        chunk = max(1, min(T, _CHUNK_ELEMENTS // max(1, B * max(plan.sizes))))
        store = [_AStore(bool(need.current[k]), T, chunk, V[k]) for k in range(K)]  # a_t = dL/dv_t (= dL/dI_t)
        g_theta = [torch.zeros_like(th) for th in theta]
        g_beta = [V[k].new_zeros(()) for k in range(K)]
        outgoing: List[List[Tuple[int, int]]] = [[] for _ in range(K)]
        for e, (post, pre, _) in enumerate(plan.edges):
            outgoing[pre].append((e, post))
        # weight gradients of the internal edges, accumulated chunk by chunk from the
        # reset masks already in cache (no second pass over V; event-driven when sparse)
        w_need = need.weights
        g_w: List[Optional[torch.Tensor]] = [
            (V[0].new_zeros(plan.sizes[post], plan.sizes[pre]) if st is None else V[0].new_zeros(st.nnz)) if w_need[e] else None
            for e, (post, pre, st) in enumerate(plan.edges)]
        # fused outgoing projections: dL/ds_pre[t] += gO[t+1] @ W, dW += gO[t+1]^T s_pre[t]
        fo_finite = [g is not None and _all_finite(g) for g in gO]
        elementwise_kernel = (V[0].dtype == torch.float32 and V[0].device.type == "cpu" and kernels.available()
                              and all(th.is_contiguous() for th in theta))
        if elementwise_kernel:
            mbuf = [V[k].new_empty(chunk, B, n) for k, n in enumerate(plan.sizes)]
            sdbuf = [V[k].new_empty(chunk, B, n) for k, n in enumerate(plan.sizes)] if plan.edges else None
        fg = ctx.group_edges
        if plan.edges:  # recurrent part of dL/dv per step; its chunk sum goes into dL/dtheta
            rbuf = [V[k].new_empty(chunk, B, n) for k, n in enumerate(plan.sizes)]
            has_out = [q for q in range(K) if outgoing[q]]
        gbuf = {fo.pre: V[fo.pre].new_empty(chunk, B, plan.sizes[fo.pre])
                for j, fo in enumerate(plan.fused_out) if gO[j] is not None}
        fo_acc = [_WeightGradAcc(fo.n_post, plan.sizes[fo.pre], fo.grad_mask, V[0])
                  if gO[j] is not None and need.fused_out_weights[j] else None for j, fo in enumerate(plan.fused_out)]
        # fused incoming projections: dL/dpre[t-1] = a[t] @ W, dW += a[t]^T pre[t-1]
        fi_gpre = [V[0].new_empty(f.pre_spikes.shape) if n.pre_spikes else None for f, n in zip(fin, need.fused_in)]
        fi_gpre0 = [None] * len(fin)
        fi_acc = [_WeightGradAcc(plan.sizes[f.post], t.pre_spikes.shape[2], f.grad_mask, V[0]) if n.weight else None
                  for f, t, n in zip(plan.fused_in, fin, need.fused_in)]
        for c1 in range(T, 0, -chunk):
            c0 = max(0, c1 - chunk)
            L = c1 - c0
            hi = min(c1, T - 1)  # steps [c0, hi) have a successor
            Aw = [st.window(c0, c1) for st in store]
            As = [a.unbind(0) for a in Aw]
            Mc, SDc = [], []
            for k in range(K):
                vc = V[k][c0:c1]
                ac = Aw[k][:L]
                g = gS[k][c0:c1] if gS[k] is not None else None
                parts = [(j, fo) for j, fo in enumerate(plan.fused_out) if fo.pre == k and gO[j] is not None]
                if parts and hi > c0:  # dL/ds_k[t] from the fused outgoing currents at t+1
                    buf = gbuf[k][:L]
                    for n_part, (j, fo) in enumerate(parts):
                        rows = gO[j][c0 + 1:hi + 1].view(-1, fo.n_post)
                        if n_part == 0:
                            _kernel_input_grad(rows, fo.kplan, fout_w[j], fo_finite[j],
                                               out=buf[:hi - c0].view(-1, plan.sizes[k]))
                        else:
                            buf[:hi - c0].add_(_kernel_input_grad(rows, fo.kplan, fout_w[j], fo_finite[j])
                                               .view(hi - c0, B, plan.sizes[k]))
                    if hi - c0 < L:
                        buf[hi - c0:].zero_()  # the last step feeds no current
                    g = buf if g is None else buf.add_(g)
                if elementwise_kernel:  # one pass instead of ~10 whole-chunk torch ops
                    m, sd = mbuf[k][:L], (sdbuf[k][:L] if plan.edges else None)
                    kernels.lif_backward_chunk(vc, theta[k], None if g is None else g.contiguous(), surrogate.kind,
                                               surrogate.slope, ac, m, sd, g_theta[k])
                else:
                    x = torch.sub(vc, theta[k])
                    m = torch.le(x, 0.0, out=torch.empty_like(x))  # 1 - s
                    d = surrogate.denominator_(x)
                    if g is None:
                        ac.zero_()
                    elif num == 1.0:
                        torch.div(g, d, out=ac)
                    else:
                        torch.div(g, d, out=ac).mul_(num)
                    g_theta[k].sub_(ac.sum((0, 1)))
                    sd = d.reciprocal_().mul_(num) if plan.edges else None
                h = gM[k]
                if h is not None:
                    if plan.trace:
                        ac.addcmul_(m, h[c0:c1])
                    elif c1 == T:
                        ac[-1].addcmul_(m[-1], h)
                Mc.append(m)
                SDc.append(sd)
            if fg is not None:  # the reverse steps in C (same rounding as the loop below)
                kernels.group_backward_chunk(L, B, plan.sizes, Aw, Mc, SDc, betas, [r[:L] for r in rbuf], c1 == T, fg)
            elif plan.edges:
                for q in has_out:
                    rbuf[q][:L].zero_()
            for t in range(c1 - 1, c0 - 1, -1) if fg is None else ():
                if t == T - 1:
                    continue
                i = t - c0
                if plan.edges:
                    for q in has_out:
                        r = None
                        for e, p in outgoing[q]:
                            st = plan.edges[e][2]
                            a_next = As[p][i + 1]
                            c = torch.mm(a_next, wts[e]) if st is None else st.spmm_t(wts[e], a_next)
                            r = c if r is None else r + c
                        # recurrent part of dL/dv_t: (dL/ds_t via W) * sigma'
                        As[q][i].add_(torch.mul(r, SDc[q][i], out=rbuf[q][i]))
                for q in range(K):
                    As[q][i].addcmul_(Mc[q][i], As[q][i + 1], value=betas[q])
            if plan.edges:
                for q in has_out:
                    g_theta[q].sub_(rbuf[q][:L].sum((0, 1)))
            # a[c0 .. c1) are final: gradients of the fused incoming projections for these steps
            for i, f in enumerate(plan.fused_in):
                a_rows = Aw[f.post][:L]
                pre_sb, pre_s0b, w = fin[i]
                n_post = plan.sizes[f.post]
                need_pre = fi_gpre[i] is not None or need.fused_in[i].pre_s0
                finite = _all_finite(a_rows) if need_pre else True
                if need_pre:
                    if c0 == 0:
                        fi_gpre0[i] = _kernel_input_grad(a_rows[0], f.kplan, w, finite)
                        if fi_gpre[i] is not None and c1 > 1:
                            _kernel_input_grad(a_rows[1:].reshape(-1, n_post), f.kplan, w, finite,
                                               out=fi_gpre[i][0:c1 - 1].view(-1, pre_sb.shape[2]))
                    elif fi_gpre[i] is not None:
                        _kernel_input_grad(a_rows.reshape(-1, n_post), f.kplan, w, finite,
                                           out=fi_gpre[i][c0 - 1:c1 - 1].view(-1, pre_sb.shape[2]))
                if fi_acc[i] is not None:
                    acc = fi_acc[i]
                    _delayed_rows(pre_sb, pre_s0b, c0, c1,
                                  lambda rows, r0, r1, acc=acc, a_rows=a_rows, n_post=n_post:
                                  acc.add(a_rows[r0:r1].reshape(-1, n_post), rows))
            if hi > c0:
                for e, (post, pre, st) in enumerate(plan.edges):
                    if not w_need[e]:
                        continue
                    # sum_{t in [c0, hi)} a_post[t+1]^T s_pre[t]  (a[c0+1 .. hi] are final here)
                    a_c = Aw[post][1:hi - c0 + 1].reshape(-1, plan.sizes[post])
                    m_c = Mc[pre][: hi - c0].reshape(-1, plan.sizes[pre])  # 1 - s_pre
                    if st is None and plan.sizes[post] >= _sparse._EVENT_WGRAD_MIN_POST:
                        g_w[e].add_(_weight_grad(a_c, torch.eq(m_c, 0.0)))
                    elif st is None:  # few postsynaptic rows: a small GEMM beats gathering events
                        g_w[e].addmm_(a_c.t(), torch.rsub(m_c, 1.0))
                    else:
                        g_w[e].add_(st.sddmm(a_c, torch.rsub(m_c, 1.0)))
                for j, fo in enumerate(plan.fused_out):
                    if fo_acc[j] is not None:
                        keep = Mc[fo.pre][: hi - c0].view(-1, plan.sizes[fo.pre])  # 1 - s
                        fo_acc[j].add(gO[j][c0 + 1:hi + 1].view(-1, fo.n_post), keep)
            # dL/dbeta: sum_t a_t . vr_{t-1}, with vr_{t-1} = (1 - s_{t-1}) v_{t-1} for t-1 in [c0, c1)
            for k in range(K):
                if need.beta[k] and hi > c0:
                    vr_c = Mc[k][: hi - c0].mul_(V[k][c0:hi])
                    g_beta[k].add_(torch.dot(Aw[k][1:hi - c0 + 1].reshape(-1), vr_c.reshape(-1)))
        A0 = [st.buf[0] for st in store]  # a at step 0 (both layouts keep it in row 0 at the end)
        g_cur = [store[k].buf[:T] if need.current[k] else None for k in range(K)]
        g_mem0, g_spk0 = [], []
        for k in range(K):
            g_beta[k].add_(torch.dot(A0[k].reshape(-1), mem0[k].reshape(-1)))
            g_mem0.append(A0[k] * beta[k] if need.mem0[k] else None)
        g_beta = [gb.reshape(beta[k].shape) if need.beta[k] else None for k, gb in enumerate(g_beta)]
        g_theta = [gt if need.theta[k] else None for k, gt in enumerate(g_theta)]
        for q in range(K):
            if not need.spk0[q]:
                g_spk0.append(None)
                continue
            r = None
            for e, (post, pre, st) in enumerate(plan.edges):
                if pre != q:
                    continue
                c = torch.mm(A0[post], wts[e]) if st is None else st.spmm_t(wts[e], A0[post])
                r = c if r is None else r + c
            for j, fo in enumerate(plan.fused_out):
                if fo.pre == q and gO[j] is not None:
                    c = _kernel_input_grad(gO[j][0], fo.kplan, fout_w[j], fo_finite[j])
                    r = c if r is None else r + c
            g_spk0.append(r if r is not None else torch.zeros_like(spk0[q]))
        for e, (post, pre, st) in enumerate(plan.edges):
            if w_need[e]:  # step 0 reads the initial spikes
                if st is None:
                    g_w[e].addmm_(A0[post].t(), spk0[pre])
                else:
                    g_w[e].add_(st.sddmm(A0[post], spk0[pre]))
        g_fin = []
        for i, n in enumerate(need.fused_in):
            if fi_gpre[i] is not None:
                fi_gpre[i][-1].zero_()  # the last presynaptic step reaches no current
            g_fin.append(_FusedInTensors(fi_gpre[i], fi_gpre0[i] if n.pre_s0 else None,
                                         fi_acc[i].result() if fi_acc[i] is not None else None))
        g_fout = []
        for j, fo in enumerate(plan.fused_out):
            if not need.fused_out_weights[j]:
                g_fout.append(None)
            elif fo_acc[j] is None:  # the current was not used
                g_fout.append(torch.zeros_like(fout_w[j]))
            else:
                fo_acc[j].add(gO[j][0], spk0[fo.pre].bool())  # step 0 reads the initial spikes
                g_fout.append(fo_acc[j].result())
        grads_in = _ScanInputs(tuple(g_cur), tuple(g_beta), tuple(g_theta), tuple(g_mem0), tuple(g_spk0),
                               tuple(g_w), tuple(g_fin), tuple(g_fout))
        return (None, *_flatten(grads_in))


def lif_scan_with_state(
    current: torch.Tensor,
    beta,
    threshold,
    mem0: Optional[torch.Tensor] = None,
    surrogate: str = DEFAULT_SURROGATE,
    slope: float = DEFAULT_SURROGATE_SLOPE,
    trace: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`lif_scan` from an initial post-reset membrane ``mem0 [B, N]``.

    Returns ``(spikes [T, B, N], mem)`` with ``mem`` the last post-reset
    membrane ``[B, N]`` (or the whole trace ``[T, B, N]`` with ``trace=True``),
    both differentiable.
    """
    check_surrogate(surrogate)
    if current.ndim != 3:
        raise ConfigError(f"lif_scan: current must be [T, B, N], got {list(current.shape)}")
    T, B, N = current.shape
    beta = as_param(beta, current, (), "lif_scan beta")
    threshold = as_param(threshold, current, (N,), "lif_scan threshold")
    mem0 = current.new_zeros(B, N) if mem0 is None else as_param(mem0, current, (B, N), "lif_scan mem0")
    plan = _GroupPlan((N,), (), Surrogate(surrogate, float(slope)), bool(trace), False)
    spk0 = current.new_zeros(B, N)
    inputs = _ScanInputs((current,), (beta,), (threshold,), (mem0,), (spk0,), (), (), ())
    out = _ScanOutputs.unflatten(plan, _GroupScan.apply(plan, *_flatten(inputs)))
    return out.spikes[0], out.mem[0]


def lif_scan(current: torch.Tensor, beta, threshold, surrogate: str = DEFAULT_SURROGATE,
             slope: float = DEFAULT_SURROGATE_SLOPE) -> torch.Tensor:
    """Spikes ``[T, B, N]`` of one LIF population driven by ``current [T, B, N]``
    from rest, as one autograd node (hand-written backward; see module doc).

    ``beta``: 0-d decay; ``threshold``: ``[N]`` (or 0-d). Same spikes as
    stepping :func:`~dmn_neuro.simulation.neurons.lif_step`; gradients w.r.t. current,
    beta and threshold equal to float rounding.
    """
    return lif_scan_with_state(current, beta, threshold, None, surrogate, slope)[0]
