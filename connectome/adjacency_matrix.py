"""Weight matrices from synapse counts: fixed sign x fixed mask x learned magnitude.

:class:`ConstrainedWeight` holds a raw parameter and computes the effective
weight ``W = mask * sign[None, :] * softplus(raw)`` ([n_post, n_pre]):

* structural zeros (no synapse) are exactly 0 and receive exactly zero gradient
  (``torch.where`` on the mask, so even NaN/Inf upstream gradients cannot leak);
* the sign of every presynaptic neuron is a buffer (Dale's law) and can never
  flip: softplus(raw) > 0 for every finite raw, whatever the optimizer does.

:class:`AdjacencyMatrixGenerator` turns an :class:`~connectome.tables.OlfactoryCircuitData`
projection into such a weight (or into a plain / sparse tensor).
"""
from __future__ import annotations

import logging
import math
import numbers
import warnings
from typing import Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, DataError
from .tables import canonical_layer

logger = logging.getLogger(__name__)

#: Magnitude initialisations: name -> f(count) on edges.
INITS = {
    "log": lambda c: np.log1p(c),       # log-linear in synapse count
    "linear": lambda c: c.astype(np.float64),
    "uniform": lambda c: (c > 0).astype(np.float64),
}
MIN_MAGNITUDE = 1e-6


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """raw with softplus(raw) == x for x > 0 (numerically stable)."""
    return x + torch.log(-torch.expm1(-x))


def _as_tensor(x, name: str, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if dtype is not None:
        t = t.to(dtype)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise DataError(f"ConstrainedWeight: {name} contains NaN/Inf")
    return t


def as_bool_mask(mask: torch.Tensor, what: str) -> torch.Tensor:
    """A 0/1 or bool tensor as bool; anything else is a DataError naming ``what``."""
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise DataError(f"{what} must be boolean (0/1)")
    return mask != 0


class ConstrainedWeight(nn.Module):
    """Learnable signed weight with a fixed sign per presynaptic neuron and a fixed mask.

    Args:
        magnitude: [n_post, n_pre] initial magnitudes, >= 0 (values off the mask are ignored;
            on the mask they are clamped to >= 1e-6 so that raw stays finite).
        sign: [n_pre] presynaptic signs in {-1, +1}.
        mask: [n_post, n_pre] bool, True where a synapse exists.

    Parameter ``raw`` [n_post, n_pre] (magnitude = softplus(raw)); buffers ``sign``
    (float [n_pre]) and ``mask`` (bool [n_post, n_pre]). ``forward()`` and ``weight``
    return the effective weight.
    """

    def __init__(self, magnitude, sign, mask):
        super().__init__()
        dtype = magnitude.dtype if isinstance(magnitude, torch.Tensor) and magnitude.is_floating_point() \
            else torch.get_default_dtype()
        mag = _as_tensor(magnitude, "magnitude", dtype)
        sgn = _as_tensor(sign, "sign", dtype)
        msk = _as_tensor(mask, "mask")
        if mag.dim() != 2:
            raise DataError(f"ConstrainedWeight: magnitude must be 2-D [n_post, n_pre], got shape {tuple(mag.shape)}")
        n_post, n_pre = mag.shape
        if tuple(sgn.shape) != (n_pre,):
            raise DataError(f"ConstrainedWeight: sign has shape {tuple(sgn.shape)}, expected ({n_pre},)")
        if tuple(msk.shape) != (n_post, n_pre):
            raise DataError(f"ConstrainedWeight: mask has shape {tuple(msk.shape)}, expected ({n_post}, {n_pre})")
        msk = as_bool_mask(msk, "ConstrainedWeight: mask")
        if not bool(((sgn == 1) | (sgn == -1)).all()):
            raise DataError("ConstrainedWeight: sign must be -1 or +1 for every presynaptic neuron")
        if bool((mag[msk] < 0).any()):
            raise DataError("ConstrainedWeight: magnitude must be >= 0")
        init = torch.where(msk, mag.clamp_min(MIN_MAGNITUDE), torch.full_like(mag, MIN_MAGNITUDE))
        self.raw = nn.Parameter(inverse_softplus(init).detach().clone())
        self.register_buffer("sign", sgn.detach().clone())
        self.register_buffer("mask", msk.detach().clone())

    @property
    def n_pre(self) -> int:
        return int(self.raw.shape[1])

    @property
    def n_post(self) -> int:
        return int(self.raw.shape[0])

    def magnitude(self) -> torch.Tensor:
        """softplus(raw) on the mask, exactly 0 off it."""
        return torch.where(self.mask, F.softplus(self.raw), torch.zeros((), dtype=self.raw.dtype, device=self.raw.device))

    def forward(self) -> torch.Tensor:
        """Effective signed weight [n_post, n_pre]."""
        return self.magnitude() * self.sign[None, :]

    @property
    def weight(self) -> torch.Tensor:
        return self.forward()

    @property
    def shape(self) -> torch.Size:
        """``[n_post, n_pre]``, the shape of the effective weight."""
        return self.raw.shape

    def extra_repr(self) -> str:
        n_edges = int(self.mask.sum())
        n_inh = int((self.sign < 0).sum())
        return (f"n_pre={self.n_pre}, n_post={self.n_post}, n_edges={n_edges}, "
                f"density={n_edges / max(1, self.n_pre * self.n_post):.4f}, "
                f"excitatory_pre={self.n_pre - n_inh}, inhibitory_pre={n_inh}")


WeightResult = Tuple[Union[ConstrainedWeight, torch.Tensor], torch.Tensor]


class AdjacencyMatrixGenerator:
    """Builds projection weights from synapse counts.

    The effective weight of edge (post i, pre j) is
    ``sign_j * gain * m_ij / sum_k m_ik`` (with ``normalize=True``) or
    ``sign_j * gain * m_ij`` (without), where ``m = init(count)``:
    'log' = log1p(count), 'linear' = count, 'uniform' = 1 on edges.
    Rows without inputs stay 0.
    """

    def magnitudes(self, counts: np.ndarray, init: str = "log", normalize: bool = True, gain: float = 1.0) -> np.ndarray:
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim != 2:
            raise DataError(f"count matrix must be 2-D, got shape {counts.shape}")
        if not np.all(np.isfinite(counts)):
            raise DataError("count matrix contains NaN/Inf")
        if np.any(counts < 0):
            raise DataError("count matrix contains negative synapse counts")
        if init not in INITS:
            raise ConfigError(f"unknown init {init!r}; known: {', '.join(INITS)}")
        if isinstance(gain, bool) or not isinstance(gain, numbers.Real) or not math.isfinite(gain) or gain <= 0:
            raise ConfigError(f"gain must be a finite positive number, got {gain!r}")
        mask = counts > 0
        mag = np.where(mask, INITS[init](counts), 0.0)
        if normalize:
            row = mag.sum(axis=1, keepdims=True)
            mag = np.divide(mag, row, out=np.zeros_like(mag), where=row > 0)
        return mag * float(gain)

    def create_weight_matrix(self, connectivity_data, pre_layer: str, post_layer: str, normalize: bool = True,
                             learnable: bool = True, init: str = "log", sparse: bool = False,
                             gain: float = 1.0) -> WeightResult:
        """(weights, mask) for the projection ``pre_layer -> post_layer`` (layer names in any case).

        Returns:
            * ``learnable=True, sparse=False``: (:class:`ConstrainedWeight`, bool mask [n_post, n_pre]).
            * ``learnable=False, sparse=False``: (float tensor of effective weights, bool mask).
            * ``sparse=True`` (needs ``learnable=False``): (torch sparse CSR float tensor of the
              effective weights, torch sparse CSR bool mask with the same pattern). Sparse tensors
              have no ``.float().mean()``; use ``mask.to_dense()`` or :meth:`sparsity`.
        Raises:
            DataError: unknown layer, a modulatory presynaptic layer (no Dale sign), NaN counts.
            ConfigError: unknown init, bad gain, ``sparse=True`` with ``learnable=True``.
        """
        if sparse and learnable:
            raise ConfigError("sparse=True gives fixed weights; pass learnable=False "
                              "(trainable sign/mask-constrained weights use the dense ConstrainedWeight)")
        pre_layer, post_layer = canonical_layer(pre_layer), canonical_layer(post_layer)
        counts = connectivity_data.count_matrix(pre_layer, post_layer)
        sign = np.asarray(connectivity_data.presynaptic_sign(pre_layer), dtype=np.float64)
        mag = self.magnitudes(counts, init=init, normalize=normalize, gain=gain)
        mask = counts > 0
        dtype = torch.get_default_dtype()
        if learnable:
            w = ConstrainedWeight(torch.as_tensor(mag, dtype=dtype), torch.as_tensor(sign, dtype=dtype),
                                  torch.as_tensor(mask))
            return w, w.mask.clone()
        eff = torch.as_tensor(mag * sign[None, :], dtype=dtype)
        mask_t = torch.as_tensor(mask)
        if sparse:
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                return eff.to_sparse_csr(), mask_t.to_sparse_csr()
        return eff, mask_t

    @staticmethod
    def sparsity(mask) -> float:
        """Fraction of absent edges of a dense or sparse mask."""
        if isinstance(mask, torch.Tensor) and mask.layout != torch.strided:
            n = mask.shape[0] * mask.shape[1]
            return 1.0 - int(mask.values().count_nonzero()) / max(1, n)
        return float(1 - torch.as_tensor(mask).float().mean())


__all__ = ["ConstrainedWeight", "AdjacencyMatrixGenerator", "as_bool_mask", "inverse_softplus", "INITS"]
