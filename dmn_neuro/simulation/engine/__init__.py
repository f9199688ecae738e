"""Fused, memory-lean BPTT engine with the semantics of :mod:`dmn_neuro.simulation.semantics`.

The per-step snnTorch path (:class:`dmn_neuro.simulation.neurons.LIFCell`, reproduced
here by :func:`run_reference`) builds ~10 autograd nodes per population per
step and stores several fp32 copies of every state. This module computes the
same spikes (bit for bit) and the same gradients (to float rounding) with

* :func:`lif_scan` -- the LIF recurrence of one population over all ``T``
  steps as ONE autograd node with a hand-written backward. Because the zero
  reset is detached, the backward is the linear reverse recurrence::

      v_t  = beta * vr_{t-1} + I_t,   s_t = H(v_t - theta),   vr_t = v_t * (1 - s_t)
      a_t := dL/dv_t = g_t * sigma'(v_t - theta) + (1 - s_t) * (h_t + beta * a_{t+1})
      dL/dI_t = a_t,   dL/dbeta = sum_t a_t * vr_{t-1},   dL/dtheta = -sum_t g_t * sigma'(v_t - theta)

  (``g_t = dL/ds_t``, ``h_t = dL/dvr_t`` from outside, ``vr_{-1} = mem0``,
  ``dL/dmem0 = beta * a_0``). Only the pre-reset membrane ``v`` is saved
  (dtype of the input); spikes and reset masks are recomputed from it.
* :func:`run_layered` -- a whole circuit: populations are grouped into
  strongly connected components of the projection graph. Projections between
  components are feed-forward: with the one-step synaptic delay the current of
  every step is ONE matmul over all ``T*B`` rows of the shifted presynaptic
  spikes (a custom autograd Function that saves the spikes as ``bool``). Only
  a true recurrence (KC <-> APL) is stepped, inside one custom Function
  (:class:`_GroupScan`) whose backward is the coupled reverse recurrence.
* on the CPU in float32, feed-forward projections with a sparse weight
  (FlyWire PN->KC 3 %, KC->MBON 6 % nonzero) run through the event-driven C
  kernels of :mod:`dmn_neuro.simulation.engine.kernels` (forward bit-identical to the GEMM) and
  are computed inside the scan of the larger population's group: PN->KC
  chunk by chunk inside the KC scan, KC->MBON from the KC scan's spikes, so
  neither the ``[T, B, 2597]`` KC input current nor the gradient w.r.t. the KC
  spikes ever exists as a whole tensor (:class:`_FusedIn`, :class:`_FusedOut`).
* sparse projections (:class:`SparseStructure`): CSR forward SpMM, input
  gradient through the CSR of ``W^T``, weight gradient only on the nonzeros
  (sampled dense-dense matmul); event-driven forward (gather the outgoing rows
  of the active presynaptic neurons) inside stepped recurrences.
* gradient checkpointing over time segments (``checkpoint_every``): only the
  state at segment boundaries and the requested outputs are kept; each segment
  is recomputed during the backward pass.

Contract (what the circuit hands in)::

    populations: [{"name": str, "beta": 0-d tensor, "threshold": [n] tensor,
                   optional "bias": [n] tensor (added to the current)}, ...]
    projections: [{"pre": str, "post": str,
                   "weight": [n_post, n_pre] effective signed weight (dense),
                   optional "sparse": SparseStructure of the nonzeros,
                   optional "values": [nnz] effective weights in the structure's
                                      CSR order (then "weight" may be omitted),
                   optional "grad_mask": bool [n_post, n_pre] -- the weight is
                                      structurally zero outside it (synapse mask),
                                      so its gradient is computed only inside
                                      (zero outside)}, ...]

On the CPU in float32, a dense projection whose weight is sparse runs through
the event-driven kernels of :mod:`dmn_neuro.simulation.engine.kernels` (forward bit-identical to
the GEMM; set ``DMN_NEURO_KERNELS=0`` to use plain torch).

When a projection has a ``"sparse"`` structure but no ``"values"``, the values
are gathered from the dense ``"weight"`` at the structure's nonzeros
(``weight[row, col]``), so gradients reach the dense raw parameter unchanged
(zero outside the mask, as with the dense path). At whole-brain scale, where
no dense matrix can exist, pass ``"values"`` computed from a per-edge raw
parameter (``sign * softplus(raw_nnz)``) instead.

Summation order of the input current (it decides float rounding, hence exact
spike equality): external input ``x`` first, then projections from other
components in list order, then projections inside the component in list order.
:func:`run_reference` and :func:`dmn_neuro.simulation.spec.simulate` sum in list order,
which is the same for the usual ORN, PN, KC, APL, MBON, DN ordering.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from dmn_neuro.simulation.engine import kernels
from dmn_neuro.simulation import semantics
from dmn_neuro.errors import ConfigError
from dmn_neuro.simulation.neurons import SURROGATES, LIFCell, surrogate_derivative

logger = logging.getLogger(__name__)

if (semantics.SYNAPTIC_DELAY_STEPS != 1 or semantics.RESET_MODE != "zero"
        or semantics.SPIKE_CONDITION != "v > threshold"):  # pragma: no cover - guard
    raise ImportError("dmn_neuro.simulation.engine (and dmn_neuro.simulation.engine.kernels) implement a one-step synaptic delay, "
                      "zero reset and the strict spike condition v > threshold only")

__all__ = [
    "SparseStructure",
    "PopulationState",
    "lif_scan",
    "lif_scan_with_state",
    "lif_step",
    "run_layered",
    "run_layered_with_state",
    "run_reference",
    "strongly_connected_groups",
]


def _check_surrogate(surrogate: str) -> None:
    if surrogate not in SURROGATES:
        raise ConfigError(f"unknown surrogate {surrogate!r}; choose one of {SURROGATES}")


# ---------------------------------------------------------------------------
# sparse projections
# ---------------------------------------------------------------------------
class SparseStructure:
    """Fixed nonzero pattern of a projection ``W [n_post, n_pre]`` (CSR order).

    ``row[k]``/``col[k]`` are the post/pre index of nonzero ``k``; values are
    passed separately (``[nnz]``, same order) so that they carry gradients.
    Keeps the CSR of ``W`` (forward) and of ``W^T`` (input gradient, and the
    event-driven forward: outgoing synapses of each presynaptic neuron).
    Indices are int32 when they fit (measured ~3x faster SpMM than int64).
    """

    def __init__(self, row: torch.Tensor, col: torch.Tensor, n_post: int, n_pre: int) -> None:
        row = torch.as_tensor(row).reshape(-1).to(torch.int64)
        col = torch.as_tensor(col).reshape(-1).to(torch.int64)
        if row.shape != col.shape:
            raise ConfigError(f"sparse structure: {row.numel()} row indices but {col.numel()} column indices")
        self.n_post, self.n_pre = int(n_post), int(n_pre)
        if row.numel() and (int(row.min()) < 0 or int(row.max()) >= self.n_post
                            or int(col.min()) < 0 or int(col.max()) >= self.n_pre):
            raise ConfigError(f"sparse structure: indices out of range for a [{n_post}, {n_pre}] projection")
        order = torch.argsort(row * self.n_pre + col)
        row, col = row[order], col[order]
        if row.numel() > 1 and bool(((row[1:] == row[:-1]) & (col[1:] == col[:-1])).any()):
            raise ConfigError("sparse structure: duplicate (post, pre) entries")
        idx = torch.int32 if max(row.numel(), self.n_post, self.n_pre) < 2**31 - 1 else torch.int64
        self.index_dtype = idx
        self.row = row  # int64, for gathers
        self.col = col
        self.crow = torch.cat([row.new_zeros(1), torch.bincount(row, minlength=self.n_post).cumsum(0)]).to(idx)
        self.col_idx = col.to(idx)
        # transpose (rows = presynaptic neuron)
        perm = torch.argsort(col * self.n_post + row)
        self.t_perm = perm
        self.t_crow = torch.cat([col.new_zeros(1), torch.bincount(col, minlength=self.n_pre).cumsum(0)]).to(idx)
        self.t_col_idx = row[perm].to(idx)
        self.t_col64 = row[perm]
        self.t_deg = torch.bincount(col, minlength=self.n_pre)

    # -- construction ------------------------------------------------------
    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "SparseStructure":
        """Structure of the nonzeros of a dense ``[n_post, n_pre]`` mask/weight."""
        mask = torch.as_tensor(mask)
        if mask.ndim != 2:
            raise ConfigError(f"sparse structure: mask must be 2-D, got shape {tuple(mask.shape)}")
        row, col = (mask != 0).nonzero(as_tuple=True)
        return cls(row, col, mask.shape[0], mask.shape[1])

    @classmethod
    def from_edges(cls, post: torch.Tensor, pre: torch.Tensor, n_post: int, n_pre: int) -> "SparseStructure":
        """Structure from columnar edge indices (``target_index``, ``source_index``)."""
        return cls(post, pre, n_post, n_pre)

    def to(self, device) -> "SparseStructure":
        new = object.__new__(SparseStructure)
        for key, val in self.__dict__.items():
            new.__dict__[key] = val.to(device) if isinstance(val, torch.Tensor) else val
        return new

    @property
    def nnz(self) -> int:
        return int(self.row.numel())

    @property
    def device(self) -> torch.device:
        return self.row.device

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.n_post, self.n_pre)

    def gather(self, weight: torch.Tensor) -> torch.Tensor:
        """Values ``[nnz]`` of a dense ``[n_post, n_pre]`` weight at the nonzeros."""
        return weight[self.row, self.col]

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros(self.n_post, self.n_pre)
        out[self.row, self.col] = values
        return out

    # -- kernels (no autograd; used inside the Functions below) -------------
    def csr(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col_idx, values, (self.n_post, self.n_pre), check_invariants=False)

    def csr_t(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.t_crow, self.t_col_idx, values[self.t_perm], (self.n_pre, self.n_post),
                                       check_invariants=False)

    def spmm(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x [M, n_pre] @ W^T -> [M, n_post]`` (CSR SpMM)."""
        return torch.mm(self.csr(values), x.t().contiguous()).t().contiguous()

    def spmm_t(self, values: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``g [M, n_post] @ W -> [M, n_pre]`` (CSR of ``W^T``)."""
        return torch.mm(self.csr_t(values), g.t().contiguous()).t().contiguous()

    def sddmm(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Weight gradient on the nonzeros: ``(g^T @ x)[row, col]`` for ``g [M, n_post]``, ``x [M, n_pre]``."""
        pattern = self.csr(g.new_zeros(self.nnz))
        if g.device.type == "cpu" or g.dtype in (torch.float32, torch.float64):
            try:
                return torch.sparse.sampled_addmm(pattern, g.t(), x, beta=0.0).values()
            except (RuntimeError, NotImplementedError):  # pragma: no cover - backend without SDDMM
                pass
        # fallback: chunked gather (memory nnz * chunk)
        out = g.new_zeros(self.nnz)
        chunk = max(1, (1 << 24) // max(1, self.nnz))
        for start in range(0, g.shape[0], chunk):
            gs, xs = g[start:start + chunk], x[start:start + chunk]
            out += (gs[:, self.row] * xs[:, self.col]).sum(0)
        return out

    def event_matmul(self, values_t: torch.Tensor, spikes: torch.Tensor) -> torch.Tensor:
        """Event-driven ``spikes [B, n_pre] @ W^T`` for binary spikes: gathers the
        outgoing synapses of the active presynaptic neurons only.
        ``values_t`` are the values in transposed order (``values[t_perm]``)."""
        B = spikes.shape[0]
        out = values_t.new_zeros(B * self.n_post)
        b, j = spikes.nonzero(as_tuple=True)
        if j.numel() == 0:
            return out.view(B, self.n_post)
        cnt = self.t_deg[j]
        start = self.t_crow[j].to(torch.int64)
        total = int(cnt.sum())
        if total == 0:
            return out.view(B, self.n_post)
        ends = cnt.cumsum(0)
        # position of each gathered synapse: start[event] + (k - first k of event)
        offs = torch.repeat_interleave(start - (ends - cnt), cnt, output_size=total)
        e = offs + torch.arange(total, device=offs.device)
        tgt = self.t_col64[e]
        if B > 1:
            tgt = tgt + torch.repeat_interleave(b * self.n_post, cnt, output_size=total)
        out.index_add_(0, tgt, values_t[e])
        return out.view(B, self.n_post)

    def __repr__(self) -> str:
        return f"SparseStructure([{self.n_post}, {self.n_pre}], nnz={self.nnz}, index={self.index_dtype})"


# ---------------------------------------------------------------------------
# delayed projections (feed-forward between components)
# ---------------------------------------------------------------------------
#: Binary-spike kernels (backward of the delayed dense projection). The
#: forward stays one dense GEMM: its float summation order is what makes the
#: spikes bit-identical to the per-step reference, and a gather/CSR sum over
#: the active inputs only is NOT bit-identical for long reductions (measured:
#: 1-ulp differences at n_pre=2597 with MKL). Gradients only need to agree to
#: float rounding, so the backward exploits sparsity:
#:
#: * weight gradient ``dW = G^T S`` with binary ``S``: when the fraction of
#:   active presynaptic entries is at most ``_EVENT_WGRAD_DENSITY``,
#:   ``dW[:, j] = sum of G[r, :] over the events (r, j)`` -- one ``index_add_``
#:   over the events instead of a ``[M, n_pre] x [M, n_post]`` GEMM (only for
#:   at least ``_EVENT_WGRAD_MIN_POST`` postsynaptic neurons: below that the
#:   GEMM is cheaper than finding the events);
#: * input gradient ``dS = G W``: when the weight has at most
#:   ``_SPARSE_DGRAD_DENSITY`` nonzeros (connectome masks: 3-6 %), a CSR SpMM
#:   of ``W^T`` on row blocks of ``G`` (``_DGRAD_ROWS`` rows: the transposed
#:   block stays in cache, no ``[M, n]`` transpose), CPU only (dense is the
#:   better kernel on GPUs).
#:
#: Both choices are made per call from the actual data; results are equal to
#: the dense kernels to float rounding whatever the sparsity (and with a
#: non-finite incoming gradient the dense kernels run, so NaN/Inf propagate
#: exactly as through the reference's GEMMs).
_EVENT_WGRAD_DENSITY = 0.02
_EVENT_WGRAD_MIN_POST = 16
_SPARSE_DGRAD_DENSITY = 0.25
_DGRAD_ROWS = 128
_SPARSE_DGRAD_MIN_ELEMENTS = 4096
_EVENT_CHUNK_ELEMENTS = 1 << 22


def _all_finite(g: torch.Tensor) -> bool:
    """Cheap test (one reduction) that ``g`` holds no NaN/Inf. The sparse kernels
    skip exact zeros, where the dense GEMM turns ``NaN * 0`` into NaN; with a
    non-finite gradient the dense kernel is used so both agree entry for entry
    (a finite sum that overflows only costs the faster kernel)."""
    return bool(torch.isfinite(g.sum()))


def _event_weight_grad(g: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """``g^T @ sb`` for ``g [M, n_post]`` and binary ``sb [M, n_pre]`` (bool),
    summing only the rows of ``g`` at the events of ``sb``. Returns ``[n_post, n_pre]``."""
    n_post, n_pre = g.shape[1], sb.shape[1]
    out_t = g.new_zeros(n_pre, n_post)
    r, j = sb.nonzero(as_tuple=True)
    step = max(1, _EVENT_CHUNK_ELEMENTS // max(1, n_post))
    for k in range(0, r.numel(), step):
        out_t.index_add_(0, j[k:k + step], g.index_select(0, r[k:k + step]))
    return out_t.t()


def _weight_grad(g: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """``g^T @ sb`` (``[n_post, n_pre]``), event-driven when ``sb`` is sparse."""
    if (g.shape[1] >= _EVENT_WGRAD_MIN_POST and sb.numel()
            and int(torch.count_nonzero(sb)) <= _EVENT_WGRAD_DENSITY * sb.numel() and _all_finite(g)):
        return _event_weight_grad(g, sb)
    return g.t() @ sb.to(g.dtype)


def _sparse_weight_t(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """CSR of ``W^T`` when it pays (CPU, few nonzeros), else ``None``."""
    if weight.device.type != "cpu" or weight.numel() < _SPARSE_DGRAD_MIN_ELEMENTS:
        return None
    if int(torch.count_nonzero(weight)) > _SPARSE_DGRAD_DENSITY * weight.numel():
        return None
    return weight.t().contiguous().to_sparse_csr()


def _input_grad(g: torch.Tensor, weight: torch.Tensor, w_t_csr: Optional[torch.Tensor],
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``g [M, n_post] @ W [n_post, n_pre]`` into ``out [M, n_pre]``."""
    if out is None:
        out = g.new_empty(g.shape[0], weight.shape[1])
    if w_t_csr is None:
        return torch.mm(g, weight, out=out)
    for r0 in range(0, g.shape[0], _DGRAD_ROWS):
        blk = g[r0:r0 + _DGRAD_ROWS]
        out[r0:r0 + blk.shape[0]].copy_(torch.mm(w_t_csr, blk.t()).t())
    return out


#: MKL sums a GEMM with fewer than 4 rows in a different order than one with
#: more (measured for float32 and float64 on this CPU; from 4 rows on the order
#: does not depend on the row count). With a batch below this the feed-forward
#: projections therefore run one B-row GEMM per step, as the per-step reference
#: does, so that the spikes stay bit-identical.
_MIN_GEMM_ROWS = 4

#: a dense weight this sparse (fraction of nonzeros) or sparser runs through
#: the event-driven kernels of :mod:`dmn_neuro.simulation.engine.kernels` on the CPU
_KERNEL_WEIGHT_DENSITY = 0.25
#: compute kernel-eligible feed-forward projections inside the scan of the
#: larger population's group (no whole [T, B, n] current or spike gradient)
_FUSE_PROJECTIONS = True


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
            or weight.numel() < _SPARSE_DGRAD_MIN_ELEMENTS or not kernels.available()):
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


def _delayed_projection(spikes, s0, proj: "_Proj"):
    if proj.structure is not None:
        return _DelayedSparse.apply(spikes, s0, proj.values, proj.structure)
    return _DelayedDense.apply(spikes, s0, proj.weight, proj.grad_mask)


# ---------------------------------------------------------------------------
# the scan: one population, or a strongly connected group with delayed recurrence
# ---------------------------------------------------------------------------
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
    sizes: Tuple[int, ...]
    edges: Tuple[Tuple[int, int, Optional[SparseStructure]], ...]  # (post, pre, structure) local indices
    surrogate: str
    slope: float
    trace: bool  # return the post-reset membrane trace [T, B, n] instead of the last membrane
    event_driven: bool  # sparse recurrent edges: gather active presynaptic rows in the forward
    fused_in: Tuple[_FusedIn, ...] = ()
    fused_out: Tuple[_FusedOut, ...] = ()


#: Elements per time chunk in the backward pass (~1 MB of fp32): the
#: elementwise work (surrogate, masks) runs on chunks that stay in cache,
#: measured ~4x cheaper per element than whole-[T, B, N] passes on this CPU.
_CHUNK_ELEMENTS = 1 << 18


def _surrogate_chunk(x: torch.Tensor, kind: str, slope: float) -> torch.Tensor:
    """In place: ``x = v - theta`` -> the *denominator* ``d`` with ``sigma'(x) = num / d``.

    fast_sigmoid: ``(slope |x| + 1)^2`` (num 1); atan: ``1 + (pi/2 slope x)^2``
    (num slope/2) -- the operation order of snnTorch's surrogates.
    """
    if kind == "fast_sigmoid":
        return x.abs_().mul_(slope).add_(1.0).square_()
    return x.mul_(math.pi / 2 * slope).square_().add_(1.0)


def _surrogate_num(kind: str, slope: float) -> float:
    return 1.0 if kind == "fast_sigmoid" else slope / 2


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

    Inputs: ``plan, current*K [T,B,n_k] (None for a population fed by a fused
    projection), beta*K (0-d), theta*K [n_k], mem0*K [B,n_k], spk0*K [B,n_k],
    w*E`` (dense ``[n_post,n_pre]`` or sparse values ``[nnz]``), then per fused
    incoming projection ``pre_spikes [T,B,n_pre], pre_s0 [B,n_pre], weight``
    and per fused outgoing projection ``weight``. Outputs: ``spikes*K [T,B,n_k]``,
    ``mem*K`` (last post-reset membrane ``[B,n_k]``, or the trace ``[T,B,n_k]``
    with ``plan.trace``), and the current ``[T,B,n_post]`` of every fused
    outgoing projection. Saved for backward: the pre-reset membranes ``V`` (spikes,
    reset masks and surrogate derivatives are recomputed from them) and the
    presynaptic spikes of fused incoming projections as ``bool``.
    """

    @staticmethod
    def forward(ctx, plan: _GroupPlan, *tensors):
        K, E, FI = len(plan.sizes), len(plan.edges), len(plan.fused_in)
        cur = tensors[0:K]
        beta = tensors[K:2 * K]
        theta = tensors[2 * K:3 * K]
        mem0 = tensors[3 * K:4 * K]
        spk0 = tensors[4 * K:5 * K]
        wts = tensors[5 * K:5 * K + E]
        fin = tensors[5 * K + E:5 * K + E + 3 * FI]
        fout_w = tensors[5 * K + E + 3 * FI:]
        T = next(c.shape[0] for c in (*cur, *fin[0::3]) if c is not None)
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
        # Per step: v = beta*vr + I (mul, add: the rounding of snnTorch's Leaky);
        # s = v > theta written as float; vr = v - v*s (exactly v*(1-s) for s in {0,1}).
        for c0 in range(0, T, chunk):
            c1 = min(T, c0 + chunk)
            for k, i in fed.items():  # fused incoming currents of this chunk (bit-identical to the GEMM)
                _kernel_current(fin[3 * i], fin[3 * i + 1], plan.fused_in[i].kplan, inbuf[k], c0, c1)
            if plan.edges:
                for t in range(c0, c1):
                    currents = []
                    for k in range(K):
                        I = Cs[k][t] if Cs[k] is not None else inbuf[k][t - c0]
                        for e, pre in incoming[k]:
                            st = plan.edges[e][2]
                            if st is None:  # (small batches: an aligned copy, see _MIN_GEMM_ROWS)
                                contrib = torch.mm(sprev[pre] if B >= _MIN_GEMM_ROWS else sprev[pre].clone(), wts_t[e])
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
        fin_saved = []
        for i in range(FI):
            fin_saved += [fin[3 * i].bool(), fin[3 * i + 1].bool(), fin[3 * i + 2]]
        ctx.save_for_backward(*V, *mem0, *spk0, *beta, *theta, *wts, *fin_saved, *fout_w)
        return (*S, *mems, *outs)

    @staticmethod
    def backward(ctx, *grads):
        plan: _GroupPlan = ctx.plan
        K, E, FI, FO = len(plan.sizes), len(plan.edges), len(plan.fused_in), len(plan.fused_out)
        saved = ctx.saved_tensors
        V = saved[0:K]
        mem0 = saved[K:2 * K]
        spk0 = saved[2 * K:3 * K]
        beta = saved[3 * K:4 * K]
        theta = saved[4 * K:5 * K]
        wts = saved[5 * K:5 * K + E]
        fin = saved[5 * K + E:5 * K + E + 3 * FI]
        fout_w = saved[5 * K + E + 3 * FI:]
        gS = grads[0:K]
        gM = grads[K:2 * K]
        gO = [None if g is None else g.contiguous() for g in grads[2 * K:]]
        T, B = V[0].shape[:2]
        need = ctx.needs_input_grad[1:]  # drop plan
        i_fin = 5 * K + E  # offsets in `need`
        i_fout = i_fin + 3 * FI
        betas = [float(b) for b in beta]
        num = _surrogate_num(plan.surrogate, plan.slope)
        chunk = max(1, min(T, _CHUNK_ELEMENTS // max(1, B * max(plan.sizes))))
        store = [_AStore(bool(need[k]), T, chunk, V[k]) for k in range(K)]  # a_t = dL/dv_t (= dL/dI_t)
        g_theta = [torch.zeros_like(th) for th in theta]
        g_beta = [V[k].new_zeros(()) for k in range(K)]
        outgoing: List[List[Tuple[int, int]]] = [[] for _ in range(K)]
        for e, (post, pre, _) in enumerate(plan.edges):
            outgoing[pre].append((e, post))
        # weight gradients of the internal edges, accumulated chunk by chunk from the
        # reset masks already in cache (no second pass over V; event-driven when sparse)
        w_need = [need[5 * K + e] for e in range(E)]
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
        gbuf = {fo.pre: V[fo.pre].new_empty(chunk, B, plan.sizes[fo.pre])
                for j, fo in enumerate(plan.fused_out) if gO[j] is not None}
        fo_acc = [_WeightGradAcc(fo.n_post, plan.sizes[fo.pre], fo.grad_mask, V[0])
                  if gO[j] is not None and need[i_fout + j] else None for j, fo in enumerate(plan.fused_out)]
        # fused incoming projections: dL/dpre[t-1] = a[t] @ W, dW += a[t]^T pre[t-1]
        fi_gpre = [V[0].new_empty(fin[3 * i].shape) if need[i_fin + 3 * i] else None for i in range(FI)]
        fi_gpre0 = [None] * FI
        fi_acc = [_WeightGradAcc(plan.sizes[f.post], fin[3 * i].shape[2], f.grad_mask, V[0])
                  if need[i_fin + 3 * i + 2] else None for i, f in enumerate(plan.fused_in)]
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
                    kernels.lif_backward_chunk(vc, theta[k], None if g is None else g.contiguous(), plan.surrogate,
                                               plan.slope, ac, m, sd, g_theta[k])
                else:
                    x = torch.sub(vc, theta[k])
                    m = torch.le(x, 0.0, out=torch.empty_like(x))  # 1 - s
                    d = _surrogate_chunk(x, plan.surrogate, plan.slope)
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
            for t in range(c1 - 1, c0 - 1, -1):
                if t == T - 1:
                    continue
                i = t - c0
                if plan.edges:
                    for q in range(K):
                        r = None
                        for e, p in outgoing[q]:
                            st = plan.edges[e][2]
                            a_next = As[p][i + 1]
                            c = torch.mm(a_next, wts[e]) if st is None else st.spmm_t(wts[e], a_next)
                            r = c if r is None else r + c
                        if r is not None:
                            r.mul_(SDc[q][i])  # recurrent part of dL/dv_t: (dL/ds_t via W) * sigma'
                            As[q][i].add_(r)
                            g_theta[q].sub_(r.sum(0))
                for q in range(K):
                    As[q][i].addcmul_(Mc[q][i], As[q][i + 1], value=betas[q])
            # a[c0 .. c1) are final: gradients of the fused incoming projections for these steps
            for i, f in enumerate(plan.fused_in):
                a_rows = Aw[f.post][:L]
                pre_sb, pre_s0b, w = fin[3 * i], fin[3 * i + 1], fin[3 * i + 2]
                n_post = plan.sizes[f.post]
                finite = _all_finite(a_rows) if (fi_gpre[i] is not None or need[i_fin + 3 * i + 1]) else True
                if fi_gpre[i] is not None or need[i_fin + 3 * i + 1]:
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
                    if st is None and plan.sizes[post] >= _EVENT_WGRAD_MIN_POST:
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
                if need[K + k] and hi > c0:
                    vr_c = Mc[k][: hi - c0].mul_(V[k][c0:hi])
                    g_beta[k].add_(torch.dot(Aw[k][1:hi - c0 + 1].reshape(-1), vr_c.reshape(-1)))
        A0 = [st.buf[0] for st in store]  # a at step 0 (both layouts keep it in row 0 at the end)
        g_cur = [store[k].buf[:T] if need[k] else None for k in range(K)]
        g_mem0, g_spk0 = [], []
        for k in range(K):
            g_beta[k].add_(torch.dot(A0[k].reshape(-1), mem0[k].reshape(-1)))
            g_mem0.append(A0[k] * beta[k] if need[3 * K + k] else None)
        g_beta = [gb.reshape(beta[k].shape) if need[K + k] else None for k, gb in enumerate(g_beta)]
        g_theta = [gt if need[2 * K + k] else None for k, gt in enumerate(g_theta)]
        for q in range(K):
            if not need[4 * K + q]:
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
        for i in range(FI):
            if fi_gpre[i] is not None:
                fi_gpre[i][-1].zero_()  # the last presynaptic step reaches no current
            g_fin += [fi_gpre[i], fi_gpre0[i] if need[i_fin + 3 * i + 1] else None,
                      fi_acc[i].result() if fi_acc[i] is not None else None]
        g_fout = []
        for j, fo in enumerate(plan.fused_out):
            if not need[i_fout + j]:
                g_fout.append(None)
            elif fo_acc[j] is None:  # the current was not used
                g_fout.append(torch.zeros_like(fout_w[j]))
            else:
                fo_acc[j].add(gO[j][0], spk0[fo.pre].bool())  # step 0 reads the initial spikes
                g_fout.append(fo_acc[j].result())
        return (None, *g_cur, *g_beta, *g_theta, *g_mem0, *g_spk0, *g_w, *g_fin, *g_fout)


def _as_param(value, like: torch.Tensor, shape: Optional[Tuple[int, ...]] = None, what: str = "") -> torch.Tensor:
    t = torch.as_tensor(value, device=like.device)
    if t.dtype != like.dtype:
        t = t.to(like.dtype)
    if shape is not None and tuple(t.shape) != shape:
        if t.ndim == 0:
            t = t.expand(shape)
        else:
            raise ConfigError(f"{what}: expected shape {list(shape)}, got {list(t.shape)}")
    return t


def lif_scan_with_state(
    current: torch.Tensor,
    beta,
    threshold,
    mem0: Optional[torch.Tensor] = None,
    surrogate: str = "fast_sigmoid",
    slope: float = 25.0,
    trace: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`lif_scan` from an initial post-reset membrane ``mem0 [B, N]``.

    Returns ``(spikes [T, B, N], mem)`` with ``mem`` the last post-reset
    membrane ``[B, N]`` (or the whole trace ``[T, B, N]`` with ``trace=True``),
    both differentiable.
    """
    _check_surrogate(surrogate)
    if current.ndim != 3:
        raise ConfigError(f"lif_scan: current must be [T, B, N], got {list(current.shape)}")
    T, B, N = current.shape
    beta = _as_param(beta, current, (), "lif_scan beta")
    threshold = _as_param(threshold, current, (N,), "lif_scan threshold")
    mem0 = current.new_zeros(B, N) if mem0 is None else _as_param(mem0, current, (B, N), "lif_scan mem0")
    plan = _GroupPlan((N,), (), surrogate, float(slope), bool(trace), False)
    spk0 = current.new_zeros(B, N)
    spikes, mem = _GroupScan.apply(plan, current, beta, threshold, mem0, spk0)
    return spikes, mem


def lif_scan(current: torch.Tensor, beta, threshold, surrogate: str = "fast_sigmoid", slope: float = 25.0) -> torch.Tensor:
    """Spikes ``[T, B, N]`` of one LIF population driven by ``current [T, B, N]``
    from rest, as one autograd node (hand-written backward; see module doc).

    ``beta``: 0-d decay; ``threshold``: ``[N]`` (or 0-d). Same spikes as
    stepping :class:`~dmn_neuro.simulation.neurons.LIFCell`; gradients w.r.t. current,
    beta and threshold equal to float rounding.
    """
    return lif_scan_with_state(current, beta, threshold, None, surrogate, slope)[0]


# ---------------------------------------------------------------------------
# one step (closed-loop training)
# ---------------------------------------------------------------------------
class _LIFStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, current, mem, beta, threshold, surrogate, slope):
        v = beta * mem + current
        s = v > threshold
        ctx.surrogate, ctx.slope = surrogate, slope
        ctx.save_for_backward(v, mem, beta, threshold)
        return s.to(current.dtype), v.masked_fill(s, 0.0)

    @staticmethod
    def backward(ctx, g_s, g_m):
        v, mem, beta, threshold = ctx.saved_tensors
        x = v - threshold
        a = None
        gt = None
        if g_s is not None:
            a = g_s * surrogate_derivative(x, ctx.surrogate, ctx.slope)
            gt = (-a).sum_to_size(threshold.shape) if ctx.needs_input_grad[3] else None
        if g_m is not None:
            hm = g_m.masked_fill(x > 0, 0.0)
            a = hm if a is None else a + hm
        if a is None:
            return None, None, None, None, None, None
        g_mem = a * beta if ctx.needs_input_grad[1] else None
        g_beta = (a * mem).sum_to_size(beta.shape) if ctx.needs_input_grad[2] else None
        return a, g_mem, g_beta, gt, None, None


def lif_step(current: torch.Tensor, mem: torch.Tensor, beta, threshold, surrogate: str = "fast_sigmoid",
             slope: float = 25.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """One LIF step ``(spikes, membrane after reset)`` with the semantics of
    :meth:`dmn_neuro.simulation.neurons.LIFCell.forward` (one autograd node, no snnTorch).

    ``current``/``mem``: ``[B, N]``; ``beta`` 0-d; ``threshold`` ``[N]``.
    """
    _check_surrogate(surrogate)
    beta = _as_param(beta, current)
    threshold = _as_param(threshold, current)
    return _LIFStep.apply(current, mem, beta, threshold, surrogate, float(slope))


# ---------------------------------------------------------------------------
# circuits
# ---------------------------------------------------------------------------
class PopulationState(NamedTuple):
    """State of one population between steps: post-reset membrane and last spikes, ``[B, n]``."""

    mem: torch.Tensor
    spikes: torch.Tensor


class _Proj(NamedTuple):
    pre: str
    post: str
    weight: Optional[torch.Tensor]
    structure: Optional[SparseStructure]
    values: Optional[torch.Tensor]
    grad_mask: Optional[torch.Tensor] = None  # bool [n_post, n_pre]: weight gradient needed only here


def strongly_connected_groups(names: Sequence[str], edges: Sequence[Tuple[str, str]]) -> List[List[str]]:
    """Strongly connected components of the projection graph in a topological
    order (ties broken by the order of ``names``); members keep ``names`` order."""
    index = {n: i for i, n in enumerate(names)}
    succ: Dict[str, List[str]] = {n: [] for n in names}
    for pre, post in edges:
        succ[pre].append(post)
    # Tarjan (iterative)
    counter = [0]
    low: Dict[str, int] = {}
    num: Dict[str, int] = {}
    stack: List[str] = []
    on_stack = set()
    comp_of: Dict[str, int] = {}
    comps: List[List[str]] = []
    for root in names:
        if root in num:
            continue
        work = [(root, iter(succ[root]))]
        num[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in num:
                    num[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(succ[nxt])))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], num[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == num[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp_of[w] = len(comps)
                    comp.append(w)
                    if w == node:
                        break
                comps.append(sorted(comp, key=index.__getitem__))
    # condensation, Kahn with ties by first member index
    n_c = len(comps)
    indeg = [0] * n_c
    csucc: List[set] = [set() for _ in range(n_c)]
    for pre, post in edges:
        a, b = comp_of[pre], comp_of[post]
        if a != b and b not in csucc[a]:
            csucc[a].add(b)
            indeg[b] += 1
    ready = sorted((index[comps[c][0]], c) for c in range(n_c) if indeg[c] == 0)
    order: List[List[str]] = []
    import heapq

    heapq.heapify(ready)
    while ready:
        _, c = heapq.heappop(ready)
        order.append(comps[c])
        for d in csucc[c]:
            indeg[d] -= 1
            if indeg[d] == 0:
                heapq.heappush(ready, (index[comps[d][0]], d))
    return order


class _Circuit(NamedTuple):
    names: List[str]
    sizes: Dict[str, int]
    pops: Dict[str, Mapping]
    projs: List[_Proj]
    groups: List[List[str]]


def _prepare(x: torch.Tensor, populations, projections, input_population: str) -> _Circuit:
    if x.ndim != 3:
        raise ConfigError(f"input x must be [T, batch, n_input], got shape {list(x.shape)}")
    names = []
    pops: Dict[str, Mapping] = {}
    sizes: Dict[str, int] = {}
    for p in populations:
        name = p.get("name")
        if name in pops:
            raise ConfigError(f"duplicate population {name!r}")
        if "threshold" not in p or "beta" not in p:
            raise ConfigError(f"population {name!r} needs 'beta' and 'threshold'")
        thr = torch.as_tensor(p["threshold"])
        if thr.ndim != 1:
            raise ConfigError(f"population {name!r}: threshold must be [n], got shape {list(thr.shape)}")
        if torch.as_tensor(p["beta"]).numel() != 1:
            raise ConfigError(f"population {name!r}: beta must be a scalar (one decay per population)")
        names.append(name)
        pops[name] = p
        sizes[name] = int(thr.shape[0])
    if input_population not in pops:
        raise ConfigError(f"input population {input_population!r} not among {names}")
    if x.shape[2] != sizes[input_population]:
        raise ConfigError(f"input x has {x.shape[2]} channels but {input_population} has {sizes[input_population]} neurons")
    projs: List[_Proj] = []
    for q in projections:
        pre, post = q.get("pre"), q.get("post")
        for end in (pre, post):
            if end not in pops:
                raise ConfigError(f"projection {pre}->{post}: unknown population {end!r}; known: {names}")
        st = q.get("sparse")
        weight = q.get("weight")
        values = q.get("values")
        if st is not None:
            if not isinstance(st, SparseStructure):
                raise ConfigError(f"projection {pre}->{post}: 'sparse' must be a SparseStructure")
            if st.shape != (sizes[post], sizes[pre]):
                raise ConfigError(f"projection {pre}->{post}: sparse structure {list(st.shape)}, expected {[sizes[post], sizes[pre]]}")
            if st.device != x.device:
                st = st.to(x.device)
            if values is None:
                if weight is None:
                    raise ConfigError(f"projection {pre}->{post}: sparse projection needs 'values' or a dense 'weight'")
                values = st.gather(weight)
            if values.shape != (st.nnz,):
                raise ConfigError(f"projection {pre}->{post}: values has shape {list(values.shape)}, expected [{st.nnz}]")
            projs.append(_Proj(pre, post, None, st, values.to(x.dtype)))
        else:
            if weight is None:
                raise ConfigError(f"projection {pre}->{post}: missing 'weight'")
            if tuple(weight.shape) != (sizes[post], sizes[pre]):
                raise ConfigError(f"type mismatch: {pre}->{post}: weight {list(weight.shape)}, expected {[sizes[post], sizes[pre]]}")
            grad_mask = q.get("grad_mask")
            if grad_mask is not None:
                grad_mask = torch.as_tensor(grad_mask)
                if grad_mask.dtype != torch.bool or tuple(grad_mask.shape) != tuple(weight.shape):
                    raise ConfigError(f"projection {pre}->{post}: grad_mask must be a bool tensor of shape "
                                      f"{list(weight.shape)}, got {grad_mask.dtype} {list(grad_mask.shape)}")
                grad_mask = grad_mask.to(weight.device)
            projs.append(_Proj(pre, post, weight.to(x.dtype), None, None, grad_mask))
    groups = strongly_connected_groups(names, [(q.pre, q.post) for q in projs])
    return _Circuit(names, sizes, pops, projs, groups)


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
        fin_tensors: List[torch.Tensor] = []
        for name in group:
            n = circ.sizes[name]
            external = [q for q in circ.projs if q.post == name and q.pre not in gset]
            bias = circ.pops[name].get("bias")
            # A sparse projection into a larger population that is this population's
            # only input is computed inside the scan, chunk by chunk (_FusedIn).
            if (_FUSE_PROJECTIONS and len(external) == 1 and name != input_population and bias is None
                    and pidx[id(external[0])] not in produced and external[0].weight is not None
                    and external[0].structure is None and n >= circ.sizes[external[0].pre]):
                q = external[0]
                kp = _kernel_plan(state[q.pre].spikes, q.weight)
                if kp is not None:
                    fused_in.append(_FusedIn(local[name], kp, q.grad_mask))
                    fin_tensors += [spikes[q.pre], state[q.pre].spikes, q.weight]
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
                bias = _as_param(bias, x, (n,), f"population {name} bias")
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
            if (not _FUSE_PROJECTIONS or q.pre not in gset or q.post in gset or q.structure is not None
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
            tuple((local[q.post], local[q.pre], q.structure) for q in internal),
            surrogate, float(slope), bool(record_membrane), bool(event_driven),
            tuple(fused_in), tuple(fused_out),
        )
        betas = [_as_param(circ.pops[n]["beta"], x, (), f"population {n} beta") for n in group]
        thetas = [_as_param(circ.pops[n]["threshold"], x, (circ.sizes[n],), f"population {n} threshold") for n in group]
        mem0 = [state[n].mem for n in group]
        spk0 = [state[n].spikes for n in group]
        wts = [q.weight if q.structure is None else q.values for q in internal]
        res = _GroupScan.apply(plan, *currents, *betas, *thetas, *mem0, *spk0, *wts, *fin_tensors, *fout_tensors)
        K = len(group)
        for j, i in enumerate(fout_ids):
            produced[i] = res[2 * K + j]
        for i, name in enumerate(group):
            s, m = res[i], res[K + i]
            if uses[name] > 0:
                spikes[name] = s
            if name in outputs:
                out[name] = s
                if record_membrane:
                    out[name + "_mem"] = m
            # clone: a view of the last step would keep the whole [T, B, n] buffer alive
            last_m = m[-1].clone() if record_membrane else m
            new_state[name] = PopulationState(last_m, s[-1].clone())
        del res, currents, fin_tensors
    return out, new_state


def _zero_state(x: torch.Tensor, circ: _Circuit) -> Dict[str, PopulationState]:
    B = x.shape[1]
    return {n: PopulationState(x.new_zeros(B, circ.sizes[n]), x.new_zeros(B, circ.sizes[n])) for n in circ.names}


def run_layered_with_state(
    x: torch.Tensor,
    populations: Sequence[Mapping],
    projections: Sequence[Mapping],
    surrogate: str = "fast_sigmoid",
    slope: float = 25.0,
    input_population: str = "ORN",
    checkpoint_every: Optional[int] = None,
    record_membrane: bool = False,
    outputs: Optional[Sequence[str]] = None,
    initial_state: Optional[Mapping[str, PopulationState]] = None,
    event_driven: bool = False,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, PopulationState]]:
    """:func:`run_layered` that also takes/returns the state (``{name: PopulationState}``)
    so that an episode can be continued (truncated BPTT, streaming)."""
    _check_surrogate(surrogate)
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
    populations: Sequence[Mapping],
    projections: Sequence[Mapping],
    surrogate: str = "fast_sigmoid",
    slope: float = 25.0,
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
    populations: Sequence[Mapping],
    projections: Sequence[Mapping],
    surrogate: str = "fast_sigmoid",
    slope: float = 25.0,
    input_population: str = "ORN",
    record_membrane: bool = False,
    outputs: Optional[Sequence[str]] = None,
) -> Dict[str, torch.Tensor]:
    """Per-step loop on :class:`~dmn_neuro.simulation.neurons.LIFCell` (snnTorch ``Leaky``)
    with the same contract and outputs as :func:`run_layered`.

    Current of population p at step t: ``x[t]`` (input population) plus
    ``spikes_q[t-1] @ W^T`` for every projection ``q -> p`` in list order.
    Sparse projections are run densely (``structure.to_dense(values)``).
    """
    _check_surrogate(surrogate)
    circ = _prepare(x, populations, projections, input_population)
    outputs = list(circ.names) if outputs is None else list(outputs)
    T, B, _ = x.shape
    cells = {n: LIFCell(circ.sizes[n], surrogate=surrogate, slope=slope, learnable_tau=False,
                        learnable_threshold=False, name=n).to(device=x.device, dtype=x.dtype)
             for n in circ.names}
    betas = {n: _as_param(circ.pops[n]["beta"], x, (), n) for n in circ.names}
    thetas = {n: _as_param(circ.pops[n]["threshold"], x, (circ.sizes[n],), n) for n in circ.names}
    biases = {n: circ.pops[n].get("bias") for n in circ.names}
    wts = [(q.pre, q.post, (q.weight if q.structure is None else q.structure.to_dense(q.values)).t()) for q in circ.projs]
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
            spk, mem[n] = cells[n](c, mem[n], beta=betas[n], threshold=thetas[n])
            new_prev[n] = spk
            if n in rec:
                rec[n].append(spk)
                rec_m[n].append(mem[n])
        prev = new_prev
    out = {n: torch.stack(v) for n, v in rec.items()}
    if record_membrane:
        out.update({n + "_mem": torch.stack(v) for n, v in rec_m.items()})
    return out
