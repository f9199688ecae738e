"""Delayed feed-forward projections between strongly connected components.

With the one-step synaptic delay, the current a projection delivers at every
step is ``S[t-1] @ W^T``: ONE matmul over all ``T*B`` rows of the shifted
presynaptic spikes (:class:`_DelayedDense`, :class:`_DelayedSparse`), saved for
the backward pass as ``bool``. On the CPU in float32 a sparse dense-stored
weight runs through the event-driven kernels of
:mod:`dmn_neuro.simulation.engine.kernels` (:func:`_kernel_plan`), whose forward
reproduces the GEMM's rounding bit for bit. The helpers here (kernel current
of a range of steps, weight-gradient accumulator, kernel input gradient) are
shared with the fused projections of :mod:`dmn_neuro.simulation.engine.scans`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from dmn_neuro.simulation.engine import kernels
from dmn_neuro.simulation.engine import sparse as _sparse
from dmn_neuro.simulation.engine.contract import ProjectionParams
from dmn_neuro.simulation.engine.sparse import _all_finite, _input_grad, _sparse_weight_t, _weight_grad

__all__: list = []


#: MKL sums a GEMM with fewer than 4 rows in a different order than one with
#: more (measured for float32 and float64 on this CPU; from 4 rows on the order
#: does not depend on the row count). With a batch below this the feed-forward
#: projections therefore run one B-row GEMM per step, as the per-step reference
#: does, so that the spikes stay bit-identical.
_MIN_GEMM_ROWS = 4

#: a dense weight this sparse (fraction of nonzeros) or sparser runs through
#: the event-driven kernels of :mod:`dmn_neuro.simulation.engine.kernels` on the CPU
_KERNEL_WEIGHT_DENSITY = 0.25


class _KernelPlan(NamedTuple):
    csr: "kernels.CSR"  # nonzeros of W grouped by presynaptic neuron (values as in the forward)
    block: int  # K-block of the GEMM whose rounding the forward reproduces


def _is_binary(s: torch.Tensor) -> bool:
    return bool(((s == 0) | (s == 1)).all())


def _kernel_plan(s0: torch.Tensor, weight: torch.Tensor) -> Optional[_KernelPlan]:
    """Use the event-driven kernels for ``spikes @ W^T`` (float32 CPU, sparse
    finite ``W``, a GEMM order the kernel reproduces bit for bit), else ``None``.
    The spike trains come from LIF scans (binary by construction); the initial
    spikes ``s0`` are checked."""
    if (weight.device.type != "cpu" or weight.dtype != torch.float32 or s0.dtype != torch.float32
            or s0.shape[0] < _MIN_GEMM_ROWS
            or weight.numel() < _sparse._SPARSE_DGRAD_MIN_ELEMENTS or not kernels.available()):
        return None
    w = weight.detach()
    if int(torch.count_nonzero(w)) > _KERNEL_WEIGHT_DENSITY * w.numel() or not bool(torch.isfinite(w).all()):
        return None
    if not _is_binary(s0):
        return None
    block = kernels.gemm_block_size(w.shape[1], w.shape[0])
    if block is None:
        return None
    return _KernelPlan(kernels.csr_by_pre(w), block)


class _DelayedDense(torch.autograd.Function):
    """``out[t] = S[t-1] @ W^T`` (``S[-1] = s0``) over all ``T*B`` rows at once.

    Forward: one dense GEMM, or for a sparse weight on the CPU the event-driven
    kernel that reproduces the GEMM's rounding (:mod:`dmn_neuro.simulation.engine.kernels`);
    either way bit-identical to the per-step reference. Saves the presynaptic
    spikes as ``bool`` (1 byte). Backward: input gradient through the nonzeros
    of ``W``; weight gradient event-driven, and only on ``grad_mask`` (the
    synapse mask, when the caller gives one).
    """

    @staticmethod
    def forward(ctx, spikes, s0, weight, grad_mask):
        T, B, n_pre = spikes.shape
        n_post = weight.shape[0]
        out = spikes.new_empty(T, B, n_post)
        plan = _kernel_plan(s0, weight)
        if plan is not None:
            _kernel_current(spikes, s0, plan, out)
        else:
            wt = weight.t()
            torch.mm(s0, wt, out=out[0])
            if B < _MIN_GEMM_ROWS and spikes.device.type == "cpu":
                for t in range(1, T):  # the reference's own B-row GEMMs (see _MIN_GEMM_ROWS);
                    # a fresh (aligned) copy: these small kernels round differently on unaligned rows
                    out[t].copy_(torch.mm(spikes[t - 1].clone(), wt))
            elif T > 1:
                torch.mm(spikes[:-1].reshape(-1, n_pre), wt, out=out[1:].view(-1, n_post))
        ctx.plan = plan
        ctx.grad_mask = grad_mask
        ctx.save_for_backward(spikes.bool(), s0.bool(), weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        sb, s0b, weight = ctx.saved_tensors
        plan: Optional[_KernelPlan] = ctx.plan
        T, B, n_pre = sb.shape
        n_post = weight.shape[0]
        g = grad_out.contiguous()
        finite = plan is not None and _all_finite(g)
        g_sp = g_s0 = g_w = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            if plan is not None:
                def input_grad(gg, out=None):
                    return _kernel_input_grad(gg, plan, weight, finite, out=out)
            else:
                w_t_csr = _sparse_weight_t(weight)
                if w_t_csr is not None and not _all_finite(g):
                    w_t_csr = None

                def input_grad(gg, out=None):
                    return _input_grad(gg, weight, w_t_csr, out=out)
            if ctx.needs_input_grad[0]:
                g_sp = g.new_empty(T, B, n_pre)
                if T > 1:
                    input_grad(g[1:].view(-1, n_post), out=g_sp[:-1].view(-1, n_pre))
                g_sp[-1].zero_()
            if ctx.needs_input_grad[1]:
                g_s0 = input_grad(g[0])
        if ctx.needs_input_grad[2]:
            acc = _WeightGradAcc(n_post, n_pre, ctx.grad_mask, g)
            _delayed_rows(sb, s0b, 0, T, lambda rows, r0, r1: acc.add(g[r0:r1].view(-1, n_post), rows))
            g_w = acc.result()
        return g_sp, g_s0, g_w, None


class _DelayedSparse(torch.autograd.Function):
    """Sparse version of :class:`_DelayedDense`; gradient only on the ``nnz`` values."""

    @staticmethod
    def forward(ctx, spikes, s0, values, structure):
        T, B, n_pre = spikes.shape
        shifted = torch.cat([s0.unsqueeze(0), spikes[:-1]], 0).reshape(-1, n_pre)
        out = structure.spmm(values, shifted).view(T, B, structure.n_post)
        ctx.structure = structure
        ctx.save_for_backward(shifted.bool(), values)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        shb, values = ctx.saved_tensors
        st = ctx.structure
        T, B = grad_out.shape[:2]
        g = grad_out.reshape(-1, st.n_post)
        g_sp = g_s0 = g_v = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            g_sh = st.spmm_t(values, g).view(T, B, st.n_pre)
            g_sp = torch.cat([g_sh[1:], g_sh.new_zeros(1, B, st.n_pre)], 0)
            g_s0 = g_sh[0]
        if ctx.needs_input_grad[2]:
            g_v = st.sddmm(g, shb.to(g.dtype))
        return g_sp, g_s0, g_v, None


def _delayed_projection(spikes, s0, proj: ProjectionParams):
    """The delayed current ``[T, B, n_post]`` of a validated projection."""
    if proj.sparse is not None:
        return _DelayedSparse.apply(spikes, s0, proj.values, proj.sparse)
    return _DelayedDense.apply(spikes, s0, proj.weight, proj.grad_mask)


def _delayed_rows(pre_s: torch.Tensor, pre_s0: torch.Tensor, c0: int, c1: int, fn) -> None:
    """Apply ``fn(rows [M, n_pre], r0, r1)`` to the presynaptic spikes that steps
    ``[c0, c1)`` read (one step earlier; step 0 reads ``pre_s0``), where
    ``[r0, r1)`` are the step offsets within the chunk."""
    n_pre = pre_s.shape[2]
    if c0 == 0:
        fn(pre_s0, 0, 1)
        if c1 > 1:
            fn(pre_s[0:c1 - 1].reshape(-1, n_pre), 1, c1)
    else:
        fn(pre_s[c0 - 1:c1 - 1].reshape(-1, n_pre), 0, c1 - c0)


def _kernel_current(pre_s: torch.Tensor, pre_s0: torch.Tensor, kplan: _KernelPlan, out: torch.Tensor,
                    c0: int = 0, c1: Optional[int] = None) -> torch.Tensor:
    """The delayed current ``pre[t-1] @ W^T`` of steps ``[c0, c1)`` through the
    kernel, written to ``out[0 : c1-c0]``; returns ``out``."""
    c1 = pre_s.shape[0] if c1 is None else c1
    n = out.shape[-1]

    def fwd(rows, r0, r1):
        kernels.spike_matmul(rows.contiguous(), kplan.csr, kplan.block, out=out[r0:r1].view(-1, n))

    _delayed_rows(pre_s, pre_s0, c0, c1, fwd)
    return out


class _WeightGradAcc:
    """Accumulates ``sum g^T s`` (``g [M, n_post]``, binary ``s [M, n_pre]`` as bool)
    over chunks: on the ``grad_mask`` edges only through the kernels when one is
    given (and the gradients are finite), else dense (event-driven when sparse)."""

    def __init__(self, n_post: int, n_pre: int, grad_mask: Optional[torch.Tensor], like: torch.Tensor) -> None:
        self.shape = (n_post, n_pre)
        self.edges = None
        if (grad_mask is not None and like.dtype == torch.float32 and like.device.type == "cpu"
                and kernels.available()):
            self.edges = kernels.csr_by_pre(grad_mask, values=False)
            self.acc = like.new_zeros(self.edges.idx.numel())
        else:
            self.acc = like.new_zeros(n_post, n_pre)

    def add(self, g: torch.Tensor, sb: torch.Tensor) -> None:
        """``sb``: the spikes as bool, or the reset mask ``1 - s`` (float)."""
        if g.shape[0] == 0:
            return
        if self.edges is not None and not _all_finite(g):
            self.acc, self.edges = self.result(), None  # NaN/Inf: the dense GEMM's propagation from here on
        if self.edges is not None:
            kernels.spike_weight_grad(g.contiguous(), sb.contiguous(), self.edges, acc=self.acc)
        else:
            self.acc.add_(_weight_grad(g, sb if sb.dtype == torch.bool else torch.eq(sb, 0.0)))

    def result(self) -> torch.Tensor:
        if self.edges is None:
            return self.acc
        out = self.acc.new_zeros(self.shape)
        out[self.edges.idx, self.edges.pre] = self.acc
        return out


def _kernel_input_grad(g: torch.Tensor, kplan: _KernelPlan, weight: torch.Tensor, finite: bool,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``g [M, n_post] @ W`` through the kernel, or the GEMM for non-finite ``g``
    (NaN * 0 = NaN exactly as in the reference)."""
    if finite:
        return kernels.spike_matmul_input_grad(g.contiguous(), kplan.csr, out=out)
    return torch.mm(g, weight, out=out) if out is not None else torch.mm(g, weight)
