"""Sparse projections and the sparsity-exploiting backward helpers of the engine.

* :class:`SparseStructure` -- the fixed nonzero pattern of a projection (CSR
  of ``W`` and of ``W^T``): CSR SpMM forward, input gradient through ``W^T``,
  weight gradient only on the nonzeros (sampled dense-dense matmul), and an
  event-driven forward that gathers the outgoing synapses of the active
  presynaptic neurons only.
* the binary-spike gradient helpers of dense projections: event-driven
  ``dW = G^T S`` (:func:`_weight_grad`) and ``dS = G W`` through the CSR of
  ``W^T`` (:func:`_input_grad`), each chosen per call from the data.

The thresholds below are module attributes read at call time (tests force
either branch by patching them here).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from dmn_neuro.errors import ConfigError

__all__ = ["SparseStructure"]


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
# binary-spike backward helpers (weight and input gradients)
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

