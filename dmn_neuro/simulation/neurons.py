"""Leaky integrate-and-fire populations on snnTorch ``Leaky``.

:class:`LIFCell` is the reference implementation of the dynamics defined in
:mod:`dmn_neuro.simulation.semantics` (one step at a time, state passed explicitly). The
fused engine (:mod:`dmn_neuro.simulation.engine`) must reproduce its spikes exactly and
its gradients within float tolerance.

Parameterisation (what training changes):

* decay ``beta = sigmoid(raw_beta)`` -- one per population, so that it maps
  onto one Lava LIF process; ``tau_ms = dt / (1 - beta)``;
* threshold ``theta = softplus(raw_threshold)`` -- one per neuron, > 0, in the
  normalised voltage unit (see :func:`dmn_neuro.simulation.semantics.normalise_threshold`:
  physiological ``threshold_mv``/``rest_mv`` enter only there).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import snntorch as snn
import torch
import torch.nn.functional as F
from snntorch import surrogate as snn_surrogate
from torch import nn

from dmn_neuro.simulation import semantics
from dmn_neuro.errors import ConfigError

SURROGATES = ("fast_sigmoid", "atan")


def make_surrogate(kind: str, slope: float):
    """snnTorch surrogate spike function (Heaviside forward, smooth backward)."""
    if kind == "fast_sigmoid":
        return snn_surrogate.fast_sigmoid(slope=slope)
    if kind == "atan":
        return snn_surrogate.atan(alpha=slope)
    raise ConfigError(f"unknown surrogate {kind!r}; choose one of {SURROGATES}")


def surrogate_derivative(x: torch.Tensor, kind: str, slope: float) -> torch.Tensor:
    """dS/dv of the surrogates above, evaluated at ``x = v - theta``.

    Exactly the formulas of ``snntorch.surrogate.FastSigmoid`` and ``ATan`` so
    that the fused engine's hand-written backward matches the reference.
    """
    if kind == "fast_sigmoid":
        return 1.0 / (slope * x.abs() + 1.0) ** 2
    if kind == "atan":
        return slope / 2 / (1 + (math.pi / 2 * slope * x) ** 2)
    raise ConfigError(f"unknown surrogate {kind!r}; choose one of {SURROGATES}")


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    y = torch.as_tensor(y, dtype=torch.get_default_dtype())
    return torch.where(y > 20, y, torch.log(torch.expm1(y.clamp_min(1e-6))))


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
        surrogate: ``"fast_sigmoid"`` or ``"atan"``; ``slope`` its steepness.
        device: where parameters live.
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
        surrogate: str = "fast_sigmoid",
        slope: float = 5.0,
        device: Optional[torch.device | str] = None,
        name: str = "",
        rest_mv: float = -60.0,
    ) -> None:
        super().__init__()
        if n_neurons <= 0:
            raise ConfigError(f"LIFCell {name}: n_neurons must be positive, got {n_neurons}")
        if reset != semantics.RESET_MODE:
            raise ConfigError(f"LIFCell {name}: reset {reset!r} not supported; use {semantics.RESET_MODE!r}")
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
        # The snnTorch neuron: integrates and fires; the zero reset is applied
        # here (detached) so that the backward is the documented linear
        # recurrence. beta/threshold buffers are overwritten with the
        # parameterised values at each call and kept out of state_dict.
        self.leaky = snn.Leaky(
            beta=1.0, threshold=1.0, spike_grad=make_surrogate(surrogate, self.slope),
            init_hidden=False, reset_mechanism="none", learn_beta=False, learn_threshold=False,
        )
        for buf in ("beta", "threshold", "graded_spikes_factor", "reset_mechanism_val"):
            if buf in self.leaky._buffers:
                self.leaky._non_persistent_buffers_set.add(buf)

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
        """Zero membrane ``[batch, n]`` on the device/dtype of ``like``."""
        return torch.zeros(like.shape[:-1] + (self.n_neurons,), device=like.device, dtype=like.dtype)

    def forward(
        self, current: torch.Tensor, mem: torch.Tensor, beta: torch.Tensor | None = None,
        threshold: torch.Tensor | None = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One step: ``(spikes, membrane after reset)``. Pass precomputed
        ``beta``/``threshold`` in loops to avoid recomputing them every step."""
        self.leaky.beta = self.beta if beta is None else beta
        self.leaky.threshold = self.threshold if threshold is None else threshold
        spk, v = self.leaky(current, mem)
        spk = spk.to(current.dtype)
        return spk, v * (1.0 - spk.detach())

    def extra_repr(self) -> str:
        return f"{self.name or 'LIF'}: n={self.n_neurons}, dt={self.dt_ms} ms, surrogate={self.surrogate}({self.slope})"
