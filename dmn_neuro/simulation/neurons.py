"""Leaky integrate-and-fire populations: the one torch LIF step and :class:`LIFCell`.

:func:`lif_step` is the single torch definition of the dynamics of
:mod:`dmn_neuro.simulation.semantics` (one step, state passed explicitly, one
autograd node with a hand-written backward); :class:`Surrogate` is the single
definition of the surrogate gradient of the spike. :class:`LIFCell`, the
circuit's per-step path and the engine's reference
(:func:`dmn_neuro.simulation.engine.run_reference`) all step through
:func:`lif_step`. The fused scans of :mod:`dmn_neuro.simulation.engine` keep their
own in-place loops for speed and are tested against it (spikes bit for bit,
gradients within float tolerance); the surrogate formulas are those of
``snntorch.surrogate.FastSigmoid`` and ``ATan``, and the tests check
:func:`lif_step` against snnTorch's ``Leaky`` with :func:`make_surrogate`.

Parameterisation (what training changes):

* decay ``beta = sigmoid(raw_beta)`` -- one per population, so that it maps
  onto one Lava LIF process; ``tau_ms = dt / (1 - beta)``;
* threshold ``theta = softplus(raw_threshold)`` -- one per neuron, > 0, in the
  normalised voltage unit (see :func:`dmn_neuro.simulation.semantics.normalise_threshold`:
  physiological ``threshold_mv``/``rest_mv`` enter only there).
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dmn_neuro.simulation import semantics
from dmn_neuro.errors import ConfigError

SURROGATES = ("fast_sigmoid", "atan")
#: Surrogate gradient used when none is given (circuit, training config, engine).
DEFAULT_SURROGATE: str = "fast_sigmoid"
#: Steepness of the default surrogate, in the normalised voltage unit.
DEFAULT_SURROGATE_SLOPE: float = 5.0


def check_surrogate(kind: str) -> None:
    """One-line :class:`~dmn_neuro.errors.ConfigError` for an unknown surrogate."""
    if kind not in SURROGATES:
        raise ConfigError(f"unknown surrogate {kind!r}; choose one of {SURROGATES}")


class Surrogate(NamedTuple):
    """The surrogate derivative ``dS/dv = sigma'(x)`` at ``x = v - theta``, written
    as ``numerator / denominator(x)`` (the operation order of snnTorch's surrogates):

    * ``fast_sigmoid``: ``1 / (slope |x| + 1)^2``;
    * ``atan``: ``(slope / 2) / (1 + (pi/2 slope x)^2)``.

    The forward of the spike is the Heaviside step ``x > 0`` for both.
    """

    kind: str = DEFAULT_SURROGATE
    slope: float = DEFAULT_SURROGATE_SLOPE

    @property
    def numerator(self) -> float:
        return 1.0 if self.kind == "fast_sigmoid" else self.slope / 2

    def denominator_(self, x: torch.Tensor) -> torch.Tensor:
        """In place: ``x`` -> the denominator (the engine's chunked backward uses this form)."""
        if self.kind == "fast_sigmoid":
            return x.abs_().mul_(self.slope).add_(1.0).square_()
        if self.kind == "atan":
            return x.mul_(math.pi / 2 * self.slope).square_().add_(1.0)
        check_surrogate(self.kind)
        raise AssertionError("unreachable")  # pragma: no cover

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """``sigma'(x)`` as a new tensor."""
        d = self.denominator_(x.clone()).reciprocal_()
        return d if self.numerator == 1.0 else d.mul_(self.numerator)


def surrogate_derivative(x: torch.Tensor, kind: str, slope: float) -> torch.Tensor:
    """dS/dv of the surrogate ``kind`` at ``x = v - theta`` (:meth:`Surrogate.derivative`)."""
    check_surrogate(kind)
    return Surrogate(kind, float(slope)).derivative(x)


def make_surrogate(kind: str, slope: float):
    """snnTorch's spike function with the same surrogate (Heaviside forward,
    :class:`Surrogate` backward) -- for snnTorch models and as the tests' oracle."""
    from snntorch import surrogate as snn_surrogate

    check_surrogate(kind)
    if kind == "fast_sigmoid":
        return snn_surrogate.fast_sigmoid(slope=slope)
    return snn_surrogate.atan(alpha=slope)


class _LIFStep(torch.autograd.Function):
    """One LIF step as one autograd node. Because the reset is detached, the
    backward is ``a = g_s sigma'(v - theta) + (1 - s) g_vr`` and
    ``dL/dI = a``, ``dL/dmem = beta a``, ``dL/dbeta = a mem``, ``dL/dtheta = -g_s sigma'``."""

    @staticmethod
    def forward(ctx, current, mem, beta, threshold, surrogate: Surrogate):
        v = beta * mem + current  # mul, then add: the rounding of every other implementation
        s = v > threshold
        ctx.surrogate = surrogate
        ctx.save_for_backward(v, mem, beta, threshold)
        return s.to(current.dtype), v.masked_fill(s, 0.0)

    @staticmethod
    def backward(ctx, g_s, g_m):
        v, mem, beta, threshold = ctx.saved_tensors
        x = v - threshold
        a = None
        gt = None
        if g_s is not None:
            a = g_s * ctx.surrogate.derivative(x)
            gt = (-a).sum_to_size(threshold.shape) if ctx.needs_input_grad[3] else None
        if g_m is not None:
            hm = g_m.masked_fill(x > 0, 0.0)
            a = hm if a is None else a + hm
        if a is None:
            return None, None, None, None, None
        g_mem = a * beta if ctx.needs_input_grad[1] else None
        g_beta = (a * mem).sum_to_size(beta.shape) if ctx.needs_input_grad[2] else None
        return a, g_mem, g_beta, gt, None


def _like(value, ref: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(value, device=ref.device)
    return t if t.dtype == ref.dtype else t.to(ref.dtype)


def lif_step(
    current: torch.Tensor, mem: torch.Tensor, beta, threshold,
    surrogate: str = DEFAULT_SURROGATE, slope: float = DEFAULT_SURROGATE_SLOPE,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step of the dynamics of :mod:`dmn_neuro.simulation.semantics`::

        v = beta * mem + current;  s = v > threshold;  mem' = v with v[s] = 0

    Returns ``(spikes, membrane after reset)`` in the dtype of ``current``.
    ``current``/``mem``: ``[..., N]``; ``beta`` 0-d; ``threshold`` ``[N]`` (or 0-d).
    The reset is detached in the backward pass; the spike's gradient is the
    surrogate ``surrogate`` with steepness ``slope`` (:class:`Surrogate`).
    """
    check_surrogate(surrogate)
    return _LIFStep.apply(current, mem, _like(beta, current), _like(threshold, current),
                          Surrogate(surrogate, float(slope)))


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    y = torch.as_tensor(y, dtype=torch.get_default_dtype())
    return torch.where(y > 20, y, torch.log(torch.expm1(y.clamp_min(1e-6))))


def _check_device(device, who: str) -> Optional[torch.device]:
    """``device`` as a :class:`torch.device`; a one-line ConfigError when it
    names an unknown device. CUDA on a machine without it falls back to the CPU
    with a :class:`RuntimeWarning` (so library code written for a GPU, like the
    design document's ``LIFCell(..., device='cuda')``, runs anywhere; the CLI's
    ``--device cuda`` is stricter and refuses)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{who}: invalid device {device!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"{who}: device {str(device)!r} requested but CUDA is not available; using the CPU",
                      RuntimeWarning, stacklevel=3)
        return torch.device("cpu")
    return dev


class LIFCell(nn.Module):
    """A population of LIF neurons (one decay per population, one threshold per neuron).

    Args:
        n_neurons: population size.
        tau_ms: membrane time constant (ms); mapped to ``beta = 1 - dt/tau``.
        threshold_mv: firing threshold in mV (scalar or per neuron); with
            ``rest_mv`` it maps to the normalised threshold via
            :func:`dmn_neuro.simulation.semantics.normalise_threshold`.
        rest_mv: resting (and reset) potential in mV.
        learnable_tau / learnable_threshold: whether training may change them.
        dt_ms: simulation step (ms).
        reset: only ``"zero"`` (the semantics every exporter reproduces exactly).
        surrogate: ``"fast_sigmoid"`` or ``"atan"``; ``slope`` its steepness
            (:class:`Surrogate`).
        device: where parameters live; ``"cuda"`` without CUDA is a :class:`~dmn_neuro.errors.ConfigError`.
    """

    def __init__(
        self,
        n_neurons: int,
        tau_ms: float = 10.0,
        threshold_mv: float | torch.Tensor = -45.0,
        learnable_tau: bool = True,
        learnable_threshold: bool = True,
        dt_ms: float = semantics.DEFAULT_DT_MS,
        reset: str = semantics.RESET_MODE,
        surrogate: str = DEFAULT_SURROGATE,
        slope: float = DEFAULT_SURROGATE_SLOPE,
        device: Optional[torch.device | str] = None,
        name: str = "",
        rest_mv: float = -60.0,
    ) -> None:
        super().__init__()
        if n_neurons <= 0:
            raise ConfigError(f"LIFCell {name}: n_neurons must be positive, got {n_neurons}")
        if reset != semantics.RESET_MODE:
            raise ConfigError(f"LIFCell {name}: reset {reset!r} not supported; use {semantics.RESET_MODE!r}")
        check_surrogate(surrogate)
        device = _check_device(device, f"LIFCell {name}".rstrip())
        self.n_neurons = int(n_neurons)
        self.dt_ms = float(dt_ms)
        self.name = name
        self.surrogate = surrogate
        self.slope = float(slope)
        beta0 = semantics.tau_to_beta(float(tau_ms), self.dt_ms)
        raw_beta = torch.tensor(semantics.beta_to_logit(beta0), device=device)
        thr_mv = torch.as_tensor(threshold_mv, dtype=torch.float64).reshape(-1)
        if not torch.all(torch.isfinite(thr_mv)) or torch.any(thr_mv <= rest_mv):
            raise ConfigError(f"LIFCell {name}: thresholds must be finite and above rest ({rest_mv} mV)")
        thr = torch.tensor([semantics.normalise_threshold(float(t), float(rest_mv)) for t in thr_mv],
                           dtype=torch.get_default_dtype(), device=device)
        thr = thr.expand(self.n_neurons).clone() if thr.numel() == 1 else thr
        if thr.shape != (self.n_neurons,):
            raise ConfigError(f"LIFCell {name}: threshold has {thr.numel()} values for {self.n_neurons} neurons")
        raw_thr = inverse_softplus(thr).to(device)
        if learnable_tau:
            self.raw_beta = nn.Parameter(raw_beta)
        else:
            self.register_buffer("raw_beta", raw_beta)
        if learnable_threshold:
            self.raw_threshold = nn.Parameter(raw_thr)
        else:
            self.register_buffer("raw_threshold", raw_thr)

    # -- parameters in physical / normalised units -------------------------
    @property
    def beta(self) -> torch.Tensor:
        return torch.sigmoid(self.raw_beta)

    @property
    def threshold(self) -> torch.Tensor:
        return F.softplus(self.raw_threshold)

    @property
    def tau_ms(self) -> torch.Tensor:
        return self.dt_ms / (1.0 - self.beta)

    def init_state(self, like: torch.Tensor) -> torch.Tensor:
        """Zero membrane (rest) ``like.shape[:-1] + (n,)`` on the device/dtype of ``like``."""
        return torch.zeros(like.shape[:-1] + (self.n_neurons,), device=like.device, dtype=like.dtype)

    def forward(
        self, current: torch.Tensor, mem: Optional[torch.Tensor] = None, beta: torch.Tensor | None = None,
        threshold: torch.Tensor | None = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One step (:func:`lif_step`): ``(spikes, membrane after reset)``.

        ``current``: ``[..., n]`` (e.g. ``[n]`` or ``[batch, n]``); ``mem``: the
        post-reset membrane of the previous step, or ``None`` to start from rest.
        Pass precomputed ``beta``/``threshold`` in loops to avoid recomputing them
        every step.
        """
        if current.shape[-1:] != (self.n_neurons,):
            raise ConfigError(f"LIFCell {self.name}: current has shape {list(current.shape)}, "
                              f"expected [..., {self.n_neurons}]")
        if mem is None:
            mem = self.init_state(current)
        return lif_step(current, mem, self.beta if beta is None else beta,
                        self.threshold if threshold is None else threshold, self.surrogate, self.slope)

    def extra_repr(self) -> str:
        return f"{self.name or 'LIF'}: n={self.n_neurons}, dt={self.dt_ms} ms, surrogate={self.surrogate}({self.slope})"
