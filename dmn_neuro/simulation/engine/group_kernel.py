"""The steps of a recurrent group (KC <-> APL) in C, one call per time chunk.

:class:`~dmn_neuro.simulation.engine.scans._GroupScan` steps a strongly
connected group in torch: per step and population a GEMM per recurrent edge,
the LIF update, and in the backward pass the reverse recurrence -- ~30k small
ATen calls per forward+backward at T=500, i.e. dispatch, not arithmetic. On
the CPU in float32, ``group_fwd_chunk`` / ``group_bwd_chunk`` of
:mod:`.kernels` run those steps over a whole chunk in one call, with the
rounding of the torch loop op for op (bit-identical spikes, membranes and
gradients; tests/test_group_kernel.py):

* edges are dense with one side a single neuron (KC -> APL: a reduction
  over the KCs, APL -> KC: a broadcast). The broadcast is one product per
  element, as ``torch.mm`` with an inner dimension of 1 computes it (checked
  here, bit for bit, per shape); the reduction is summed in the order in which
  ``torch.mm`` sums it for this batch (:func:`.kernels.dot_orders`, measured
  per shape, row by row). A group with any other edge, a shape whose order is
  not reproduced, another dtype or device, or ``DMN_NEURO_KERNELS=0``: the
  torch loop runs (``plan`` returns ``None``).
* the weight, decay and surrogate gradients stay chunk-level torch code shared
  with the torch loop; the recurrent part of ``dL/dv`` (whose sum over the
  chunk is the recurrent part of ``dL/dtheta``) is written per step into a
  chunk buffer that both paths sum with the same torch op.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch

from dmn_neuro.simulation.engine import kernels

__all__: list = []

#: run recurrent groups through the C kernels where they reproduce the torch loop
#: (tests switch it off to compare with the torch loop)
ENABLED = True

_outer_cache: Dict[Tuple[int, int, bool, int], bool] = {}


class GroupEdges(NamedTuple):
    """The recurrent edges of a group, as ``group_fwd_chunk`` takes them."""

    post: Tuple[int, ...]
    pre: Tuple[int, ...]
    dot: torch.Tensor  # int32 [E]: 1 for a reduction (n_post 1), 0 for a broadcast (n_pre 1)
    w: Tuple[torch.Tensor, ...]  # the weight's one row or column, contiguous float32
    fwd_orders: Tuple[torch.Tensor, ...]  # int32 [B]: summation order per row (reductions)
    bwd_orders: Tuple[torch.Tensor, ...]


def _outer_is_product(rows: int, n: int, transposed: bool) -> bool:
    """Whether ``torch.mm(x [rows, 1], w [1, n])`` is ``x * w`` bit for bit (signed
    zeros included) for ``w`` a transposed ``[n, 1]`` weight or a contiguous ``[1, n]`` one."""
    key = (int(rows), int(n), bool(transposed), torch.get_num_threads())
    if key not in _outer_cache:
        g = torch.Generator().manual_seed(7)
        ok = True
        for trial in range(4):
            w = torch.randn(n, 1, generator=g).t() if transposed else torch.randn(1, n, generator=g)
            base = torch.randn(rows + 12, generator=g) * (torch.rand(rows + 12, generator=g) < 0.7)
            x = base[4 * trial:4 * trial + rows].view(rows, 1)
            ok &= torch.equal(torch.mm(x, w).view(torch.int32), (x * w).view(torch.int32))
        _outer_cache[key] = ok
    return _outer_cache[key]


def plan(edges: Sequence[tuple], weights: Sequence[torch.Tensor], rows: int, like: torch.Tensor,
         tensors: Sequence[Optional[torch.Tensor]]) -> Optional[GroupEdges]:
    """The edges of a group for the C steps, or ``None`` where the torch loop must run.

    ``edges``: ``(post, pre, structure)`` local indices; ``weights``: the dense
    ``[n_post, n_pre]`` weights; ``tensors``: the other inputs the kernels read
    (must be float32 CPU)."""
    if (not ENABLED or not edges or like.dtype != torch.float32 or like.device.type != "cpu"
            or not kernels.available()):
        return None
    if any(t is not None and (t.dtype != torch.float32 or t.device.type != "cpu") for t in tensors):
        return None
    post, pre, dot, ws, fwd, bwd = [], [], [], [], [], []
    for (p, q, st), w in zip(edges, weights):
        if st is not None or w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous():
            return None
        n_post, n_pre = w.shape
        if (rows * n_post) % 4 or (rows * n_pre) % 4:  # step views off 16-byte alignment (see dot_orders)
            return None
        if n_pre == 1:  # broadcast forward, reduction over n_post in the backward
            f_ord = torch.zeros(rows, dtype=torch.int32)
            b_ord = kernels.dot_orders(rows, n_post, transposed=False)
            if b_ord is None or not _outer_is_product(rows, n_post, transposed=True):
                return None
            dot.append(0)
        elif n_post == 1:  # reduction forward, broadcast in the backward
            f_ord = kernels.dot_orders(rows, n_pre, transposed=True)
            b_ord = torch.zeros(rows, dtype=torch.int32)
            if f_ord is None or not _outer_is_product(rows, n_pre, transposed=False):
                return None
            dot.append(1)
        else:
            return None
        post.append(int(p))
        pre.append(int(q))
        ws.append(w.detach().reshape(-1).contiguous())
        fwd.append(f_ord)
        bwd.append(b_ord)
    return GroupEdges(tuple(post), tuple(pre), torch.tensor(dot, dtype=torch.int32), tuple(ws), tuple(fwd), tuple(bwd))
