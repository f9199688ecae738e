"""The single source of truth for neuron semantics.

Every part of dmn-neuro that steps a neuron -- the snnTorch reference path, the
fused training engine, the NIR exporter/importer, the Lava exporter (float and
fixed point), the Lava worker and the verifier -- reads the discrete dynamics
from here. Nothing else defines dt, decay, threshold, reset or delay.

Discrete dynamics of one population ``p`` at step ``t`` (``t = 0 .. T-1``)::

    I_p[t]  = x_p[t]                                   (external input, ORN only)
            + sum_{q -> p} W_pq @ S_q[t - DELAY]       (one step per synaptic hop)
    v_p[t]  = beta_p * v_p[t-1] + I_p[t] + bias_p      (v_p[-1] = 0, S_q[t<0] = 0)
    S_p[t]  = v_p[t] > theta_p                         (strict, as Lava)
    v_p[t]  = 0 where S_p[t]                           (zero reset, same step)

* ``beta = 1 - dt / tau`` -- forward-Euler discretisation of NIR's
  ``tau dv/dt = (v_leak - v) + r I`` with ``v_leak = 0`` and ``r = tau / dt``.
* The reset is *detached* in the backward pass (the gradient does not flow
  through the reset), which makes the LIF backward a linear reverse recurrence.
* ``DELAY = 1``: every synaptic hop takes one step, exactly as Lava's Dense and
  Sparse processes do, so a trained model and its Lava export agree spike for
  spike without any re-alignment inside the network.
* The external input enters the ORN population without delay in PyTorch and
  NIR. In Lava it passes one Dense hop (``LAVA_INPUT_DELAY_STEPS``), so every
  Lava population lags the model by exactly that constant.

Physiological parameters (ms, mV) from ``connectome/cell_types.yaml`` map onto
these normalised dynamics only through :func:`tau_to_beta`,
:func:`normalise_threshold` and :class:`NeuronSemantics`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Mapping

from connectome.errors import ConfigError

#: Steps of delay added by one synaptic hop (Lava Dense/Sparse semantics).
SYNAPTIC_DELAY_STEPS: int = 1
#: Steps by which a Lava export lags the model at every population (input hop).
LAVA_INPUT_DELAY_STEPS: int = 1
#: Reset mode: membrane set to this value in the step of the spike.
RESET_MODE: str = "zero"
RESET_VALUE: float = 0.0
#: Spike condition: strict ``v > threshold`` (Lava's LIF and NIR's LIF agree).
SPIKE_CONDITION: str = "v > threshold"
#: Discretisation of the continuous LIF used everywhere (recorded in NIR metadata).
DISCRETISATION: str = "forward-euler"
#: Default simulation step.
DEFAULT_DT_MS: float = 1.0
#: Voltage unit of the normalised dynamics: ``v = (V - V_rest) / VOLTAGE_UNIT_MV``.
#: Surrogate-gradient slopes and weights are expressed in this unit.
VOLTAGE_UNIT_MV: float = 10.0


def tau_to_beta(tau_ms: float, dt_ms: float) -> float:
    """Membrane time constant (ms) -> per-step decay factor ``beta = 1 - dt/tau``."""
    if not (tau_ms > 0 and dt_ms > 0):
        raise ConfigError(f"tau_ms and dt_ms must be positive, got tau_ms={tau_ms}, dt_ms={dt_ms}")
    if tau_ms <= dt_ms:
        raise ConfigError(f"tau_ms={tau_ms} must exceed dt_ms={dt_ms} for a stable forward-Euler step "
                          "(choose a smaller dt_ms)")
    return 1.0 - dt_ms / tau_ms


def beta_to_tau(beta: float, dt_ms: float) -> float:
    """Inverse of :func:`tau_to_beta`: ``tau = dt / (1 - beta)``."""
    if not 0.0 <= beta < 1.0:
        raise ConfigError(f"beta must be in [0, 1), got {beta}")
    return dt_ms / (1.0 - beta)


def beta_to_logit(beta: float) -> float:
    """The unconstrained parameter that training stores for a decay (``beta = sigmoid(raw)``)."""
    beta = min(max(beta, 1e-6), 1 - 1e-6)
    return math.log(beta / (1.0 - beta))


def normalise_threshold(threshold_mv: float, rest_mv: float) -> float:
    """Physiological threshold (mV) -> normalised threshold.

    The discrete model measures the membrane relative to rest in units of
    :data:`VOLTAGE_UNIT_MV`, so a neuron at rest has ``v = 0``, the reset value
    (rest) is 0, and a threshold 15 mV above rest is 1.5.
    """
    theta = threshold_mv - rest_mv
    if not theta > 0:
        raise ConfigError(f"threshold {threshold_mv} mV must lie above rest {rest_mv} mV")
    return float(theta) / VOLTAGE_UNIT_MV


def nir_lif_parameters(beta: float, threshold: float, dt_s: float) -> Dict[str, float]:
    """NIR LIF parameters that reproduce one population's discrete dynamics.

    With forward Euler, ``v <- (1 - dt/tau) v + (dt/tau) r I``; ``r = tau/dt``
    makes the input gain 1, so the step equals ``v <- beta v + I``.
    """
    tau = dt_s / (1.0 - beta)
    return {"tau": tau, "r": tau / dt_s, "v_leak": 0.0, "v_threshold": threshold, "v_reset": RESET_VALUE}


def lava_lif_parameters(beta: float) -> Dict[str, float]:
    """Lava LIF (float) decays for one population: current-based input without
    a synaptic filter (``du = 1``: ``u = a_in``) and ``dv = 1 - beta``."""
    return {"du": 1.0, "dv": 1.0 - beta}


@dataclass(frozen=True)
class NeuronSemantics:
    """Per-run constants shared by the trainer, exporters and the verifier."""

    dt_ms: float = DEFAULT_DT_MS
    delay_steps: int = SYNAPTIC_DELAY_STEPS
    reset: str = RESET_MODE
    spike_condition: str = SPIKE_CONDITION
    discretisation: str = DISCRETISATION
    lava_input_delay_steps: int = LAVA_INPUT_DELAY_STEPS
    extra: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.dt_ms > 0:
            raise ConfigError(f"dt_ms must be positive, got {self.dt_ms}")
        if self.delay_steps != SYNAPTIC_DELAY_STEPS:
            raise ConfigError(f"delay_steps must be {SYNAPTIC_DELAY_STEPS} (per-hop delay of Lava's Dense)")
        if self.reset != RESET_MODE:
            raise ConfigError(f"unsupported reset {self.reset!r}; only {RESET_MODE!r} is exact on Lava and NIR")

    @property
    def dt_s(self) -> float:
        return self.dt_ms * 1e-3

    def beta(self, tau_ms: float) -> float:
        return tau_to_beta(tau_ms, self.dt_ms)

    def tau_ms(self, beta: float) -> float:
        return beta_to_tau(beta, self.dt_ms)

    def to_dict(self) -> Dict[str, object]:
        return {
            "dt_ms": self.dt_ms,
            "delay_steps": self.delay_steps,
            "reset": self.reset,
            "reset_value": RESET_VALUE,
            "spike_condition": self.spike_condition,
            "discretisation": self.discretisation,
            "lava_input_delay_steps": self.lava_input_delay_steps,
            "beta": "1 - dt/tau",
        }
