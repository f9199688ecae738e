"""Loihi 2 fixed-point quantisation of a :class:`~dmn_neuro.simulation.spec.CircuitSpec`.

The fixed-point model is the one Lava runs with ``select_tag="fixed_pt"``
(``PyLifModelBitAcc`` + ``PyDenseModelBitAcc``), per step and population::

    a   = sum_q W_q @ s_q[t-1]                 (int32, 8-bit weights, weight_exp 0)
    u   = wrap24(a << 6)                       (du = 4095: no synaptic filter)
    v   = clip24(trunc(v * (4096 - dv) / 4096) + u + (bias_mant << bias_exp))
    s   = v > (vth << 6);  v[s] = 0

Quantisation choices (each made once, here):

* Per-neuron thresholds are folded into the incoming rows and the bias
  (``W'_ij = W_ij / theta_i``, threshold 1), so ``vth`` is one integer per
  population. ``vth`` is the largest integer for which every incoming folded
  weight fits the 8-bit synapse (mixed sign: even values in -256..254; single
  sign: 0..255 or -255..0), capped so that ``v`` has ``v_headroom`` thresholds
  of room inside Loihi's 24-bit state. The weight exponent is 0 everywhere and
  the bias exponent is 6, which makes the file exactly expressible in lava-dl's
  netx format (netx fixes ``bias_exp = 6`` and has no dense weight exponent).
* ``dv = round((1 - beta) * 4096)`` clamped to ``[1, 4095]`` (:data:`DV_MIN`: ``dv = 0``
  would be ``beta = 1``), ``du = 4095`` (``u = a_in << 6``).
* The graded ORN input enters through a source and an identity ``Dense``
  (weight 1, 24-bit messages): ``x_int = clip(rint(x * input_scale))`` with
  ``input_scale_i = vth_ORN / theta_i``.

:func:`simulate_fixed` is a bit-accurate NumPy emulation of that Lava graph
(in model time: Lava's extra input hop is removed) and
:class:`FixedPointStepper` the same arithmetic in torch, step by step.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from dmn_neuro.errors import ExportError
from dmn_neuro.simulation.spec import CircuitSpec, PopulationLookup

logger = logging.getLogger(__name__)

# -- the fixed-point table -------------------------------------------------------------
# Every Loihi 2 constant, rounding, clamp and integer update of dmn-neuro is defined here
# once; the quantiser, the emulators (NumPy and torch), QAT (dmn_neuro.training.qat) and
# the Lava exporter read them from here. The functions take NumPy arrays, Python numbers
# or torch tensors and compute with that library (:func:`_xp`), so one definition serves
# the NumPy emulator, the torch stepper and the fake quantisation of training.
# The Lava worker (exporters/lava_worker, Python 3.10 without dmn_neuro) receives every
# integer from the exported graph; the only formula it repeats is :func:`quantise_input`.

#: Loihi 2 constants (PyLifModelBitAcc / PyDenseModelBitAcc).
DECAY_SHIFT = 12
DECAY_UNITY = 1 << DECAY_SHIFT  # 4096
#: Lava's ``du``/``dv`` are 12-bit unsigned registers: 0..4095. ``dv`` enters the
#: voltage decay as ``4096 - dv`` (``dm_offset = 0``), ``du`` as ``4096 - (du + 1)``
#: (``ds_offset = 1``).
DECAY_REG_MAX = DECAY_UNITY - 1
DU_NO_FILTER = DECAY_REG_MAX  # du = 4095 -> decay constant 4096 -> u = a_in << 6
#: Range of ``dv`` that :func:`quantize` (and QAT) emit. Lava accepts ``dv = 0`` (no leak,
#: beta = 1), but the float model cannot represent it (``beta < 1``: finite tau, NIR's
#: forward Euler, ``sigmoid`` in training; :func:`dmn_neuro.training.qat.dequantize`
#: refuses it), so the decay is clamped to ``[1, 4095]``: every quantised circuit has an
#: exact float counterpart. (A decay that rounds to ``dv = 0`` needs ``tau > 8192 dt``.)
DV_MIN, DV_MAX = 1, DECAY_REG_MAX
ACT_SHIFT = 6
VTH_SHIFT = 6
UV_BITS = 24
MAX_UV = 1 << (UV_BITS - 1)  # 2**23
#: The membrane saturates at these values (PyLifModelBitAcc's clip).
V_MIN, V_MAX = -MAX_UV + 1, MAX_UV - 1
VTH_MAX = (1 << 17) - 1
BIAS_MANT_MIN, BIAS_MANT_MAX = -(1 << 12), (1 << 12) - 1
#: lava-dl's netx builds every LIF with bias_exp = 6 (and multiplies the file's bias by 64).
NETX_BIAS_EXP = 6
#: The bias exponent used everywhere: netx's, which keeps the netx file exact.
BIAS_EXP = NETX_BIAS_EXP
#: Largest |a| that survives ``a << 6`` inside the 24-bit current without wrapping.
MAX_ACTIVATION = (1 << (UV_BITS - 1 - ACT_SHIFT)) - 1
SIGN_MODES = ("MIXED", "EXCITATORY", "INHIBITORY")


def _xp(x):
    """The array library of ``x``: ``torch`` for tensors, else ``numpy``."""
    if type(x).__module__.split(".")[0] == "torch":
        import torch

        return torch
    return np


def round_half_even(x):
    """Round to the nearest integer, ties to even (``np.rint`` / ``torch.round``); same type as ``x``."""
    return _xp(x).round(x)


def clamp(x, lo, hi):
    return _xp(x).clip(x, lo, hi)


def decay_to_dv(beta):
    """Float decay ``beta`` -> Loihi's ``dv = round((1 - beta) 4096)`` in ``[DV_MIN, DV_MAX]`` (still a float)."""
    return clamp(round_half_even((1.0 - beta) * DECAY_UNITY), DV_MIN, DV_MAX)


def dv_to_beta(dv):
    """The float decay a ``dv`` represents exactly: ``1 - dv / 4096``."""
    return 1.0 - dv / DECAY_UNITY


def bias_to_mant(bias_vth):
    """Bias in membrane units of ``vth`` (``bias / theta * vth``) -> the 13-bit mantissa (float; with
    ``bias_exp = 6`` one mantissa step is one threshold / vth)."""
    return clamp(round_half_even(bias_vth), BIAS_MANT_MIN, BIAS_MANT_MAX)


def weight_step(sign_mode: str, bits: int) -> int:
    """Spacing of the integer weight grid (mixed-sign weights lose one bit to the sign)."""
    return 1 << (8 - bits + (1 if sign_mode == "MIXED" else 0))


def weight_range(sign_mode: str, bits: int) -> Tuple[int, int]:
    """Smallest and largest integer weight of the grid."""
    step = weight_step(sign_mode, bits)
    if sign_mode == "MIXED":
        return -256, 256 - step
    top = (255 // step) * step
    return (0, top) if sign_mode == "EXCITATORY" else (-top, 0)


def round_weight(w_vth, sign_mode: str, bits: int):
    """Folded weights in membrane units of ``vth`` (``w / theta * vth``) -> integers on the grid (float)."""
    step = weight_step(sign_mode, bits)
    lo, hi = weight_range(sign_mode, bits)
    return clamp(round_half_even(w_vth / step) * step, lo, hi)


def int_to_weight(w_int, theta_over_vth, weight_exp: int = 0):
    """The float weight an integer synapse represents: ``w_int 2^weight_exp theta / vth``
    (activations enter as ``a << ACT_SHIFT``, the threshold is ``vth << VTH_SHIFT``)."""
    return w_int * (2.0 ** (weight_exp + ACT_SHIFT - VTH_SHIFT)) * theta_over_vth


def int_to_bias(effective_bias, theta_over_vth):
    """The float bias an effective bias ``bias_mant << bias_exp`` represents: ``b / 2^VTH_SHIFT theta / vth``."""
    return effective_bias / float(1 << VTH_SHIFT) * theta_over_vth


def membrane_lsb(vth):
    """One step of Loihi's membrane, in thresholds: ``1 / (vth << VTH_SHIFT)``."""
    return 1.0 / ((1 << VTH_SHIFT) * float(vth))


def sign_mode_of(w: np.ndarray) -> str:
    """Same rule as ``lava.utils.weightutils.determine_sign_mode``."""
    if w.size == 0 or w.min() >= 0:
        return "EXCITATORY"
    if w.max() <= 0:
        return "INHIBITORY"
    return "MIXED"


def vth_limit(folded: np.ndarray, sign_mode: str, bits: int) -> float:
    """Largest scale s such that every folded weight ``w / theta * s`` fits the synapse range."""
    lo, hi = weight_range(sign_mode, bits)
    lim = np.inf
    pos, neg = folded.max(initial=0.0), -folded.min(initial=0.0)
    if pos > 0:
        lim = min(lim, hi / pos)
    if neg > 0:
        lim = min(lim, -lo / neg)
    return lim


def below_vth(folded: np.ndarray, vth: int, sign_mode: str, bits: int) -> np.ndarray:
    """Where a folded weight would bound :func:`vth_limit` below ``vth`` (so :func:`quantize`
    would pick a smaller ``vth``); element-wise form of ``vth_limit(folded) < vth``."""
    lo, hi = weight_range(sign_mode, bits)
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = hi / np.where(folded > 0, folded, 1.0)
        neg = -lo / np.where(folded < 0, -folded, 1.0)
    return ((folded > 0) & (pos < vth)) | ((folded < 0) & (neg < vth))


def quantise_input(x, scale, limit: int):
    """Real-valued ORN current -> graded integer messages ``clip(rint(x * scale), -limit, limit)``
    (float64; int32 for NumPy input, int64 for torch). The Lava worker repeats this formula."""
    if _xp(x) is np:
        xs = np.asarray(x, dtype=np.float64) * np.asarray(scale, dtype=np.float64)
        return clamp(round_half_even(xs), -limit, limit).astype(np.int32)
    import torch

    return clamp(round_half_even(x.to(torch.float64) * scale), -limit, limit).to(torch.int64)


# -- the integer update (PyLifModelBitAcc with du = 4095), NumPy or torch int64 ---------
def wrap_int32(x):
    """Reinterpret int64 values modulo 2**32 as int32 (NumPy's int32 cast, Lava's int32 shifts)."""
    return ((x + (1 << 31)) % (1 << 32)) - (1 << 31)


def wrap24(x):
    """PyLifModelBitAcc's current wrap: ``where(x > 2**23, x - 2**24, x)``, then
    ``where(w <= -2**23, x + 2**24, w)``."""
    xp = _xp(x)
    w = xp.where(x > MAX_UV, x - 2 * MAX_UV, x)
    return xp.where(w <= -MAX_UV, x + 2 * MAX_UV, w)


def decay_trunc(v, dv):
    """``trunc(v * (4096 - dv) / 4096)`` (towards zero), as Lava's int32 result."""
    xp = _xp(v)
    prod = v * (DECAY_UNITY - dv)
    return wrap_int32(xp.sign(prod) * (xp.abs(prod) >> DECAY_SHIFT))


def apply_weight_exp(acc, weight_exp: int):
    """Dense's ``acc << weight_exp`` (right shift for negative exponents)."""
    return (acc << weight_exp) if weight_exp > 0 else (acc >> -weight_exp)


def lif_step_fixed(v, a, dv: int, bias, vth: int):
    """One Loihi 2 LIF step (du = 4095: no synaptic filter) on int64 arrays or tensors::

        u = wrap24(int32(a << 6));  v = clip(trunc(v (4096 - dv) / 4096) + u + bias, V_MIN, V_MAX)
        s = v > (vth << 6);  v[s] = 0

    ``bias`` is the effective bias ``bias_mant << bias_exp``. Returns ``(v, s)``.
    """
    xp = _xp(v)
    u = wrap24(wrap_int32(a << ACT_SHIFT))
    vn = clamp(decay_trunc(v, dv) + u + bias, V_MIN, V_MAX)
    s = vn > (int(vth) << VTH_SHIFT)
    return xp.where(s, xp.zeros_like(vn), vn), s


@dataclass
class FixedPopulation:
    name: str
    n: int
    du: int
    dv: int
    vth: int
    bias_mant: np.ndarray  # int32 [n]
    bias_exp: np.ndarray  # int32 [n]
    beta: float
    threshold: np.ndarray  # float64 [n], original
    cell_types: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bias_mant = np.asarray(self.bias_mant, dtype=np.int32).reshape(-1)
        self.bias_exp = np.asarray(self.bias_exp, dtype=np.int32).reshape(-1)
        self.threshold = np.asarray(self.threshold, dtype=np.float64).reshape(-1)
        for key in ("bias_mant", "bias_exp", "threshold"):
            if getattr(self, key).shape != (self.n,):
                raise ExportError(f"fixed-point population {self.name}: {key} has shape {getattr(self, key).shape}, expected ({self.n},)")
        if not 0 <= self.du <= DECAY_REG_MAX or not 0 <= self.dv <= DECAY_REG_MAX:
            raise ExportError(f"fixed-point population {self.name}: du={self.du}, dv={self.dv} outside the 12-bit range")
        if not 1 <= self.vth <= VTH_MAX:
            raise ExportError(f"fixed-point population {self.name}: vth={self.vth} outside 1..{VTH_MAX}")

    @property
    def effective_bias(self) -> np.ndarray:
        return np.left_shift(self.bias_mant.astype(np.int64), self.bias_exp)


@dataclass
class FixedProjection:
    pre: str
    post: str
    weight: np.ndarray  # int32 [n_post, n_pre]
    sign_mode: str
    weight_exp: int = 0
    num_weight_bits: int = 8

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, dtype=np.int32)
        if self.sign_mode not in SIGN_MODES:
            raise ExportError(f"projection {self.name}: unknown sign mode {self.sign_mode!r}; known: {SIGN_MODES}")
        lo, hi = weight_range(self.sign_mode, self.num_weight_bits)
        if self.weight.size and (self.weight.min() < lo or self.weight.max() > hi):
            raise ExportError(f"projection {self.name}: weights outside {lo}..{hi} for sign mode {self.sign_mode}")
        if np.any(self.weight % weight_step(self.sign_mode, self.num_weight_bits)):
            raise ExportError(f"projection {self.name}: weights not on the {self.num_weight_bits}-bit grid")

    @property
    def name(self) -> str:
        return f"{self.pre}->{self.post}"


@dataclass
class FixedPointSpec(PopulationLookup):
    """A circuit in Loihi 2 fixed point, plus the quantisation report."""

    lookup_error = ExportError

    populations: List[FixedPopulation]
    projections: List[FixedProjection]
    input_population: str
    output_population: str
    input_scale: np.ndarray  # float64 [n_input]: x_int = clip(rint(x * input_scale))
    input_limit: int = MAX_ACTIVATION
    dt_ms: float = 1.0
    report: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [p.name for p in self.populations]
        if self.input_population not in names or self.output_population not in names:
            raise ExportError(f"fixed-point spec: input/output population not in {names}")
        sizes = {p.name: p.n for p in self.populations}
        self.input_scale = np.asarray(self.input_scale, dtype=np.float64).reshape(-1)
        if self.input_scale.shape != (sizes[self.input_population],):
            raise ExportError(f"fixed-point spec: input_scale has shape {self.input_scale.shape}, expected ({sizes[self.input_population]},)")
        for q in self.projections:
            if q.pre not in sizes or q.post not in sizes:
                raise ExportError(f"fixed-point projection {q.name}: unknown population; known: {names}")
            if q.weight.shape != (sizes[q.post], sizes[q.pre]):
                raise ExportError(f"fixed-point projection {q.name}: weight {q.weight.shape}, expected {(sizes[q.post], sizes[q.pre])}")


    def quantise_input(self, x: np.ndarray) -> np.ndarray:
        """Real-valued ORN current ``[..., n_in]`` -> the int32 graded messages Lava receives."""
        return quantise_input(x, self.input_scale, self.input_limit)


def quantize(spec: CircuitSpec, weight_bits: int = 8, v_headroom: float = 16.0, vth_max: Optional[int] = None) -> FixedPointSpec:
    """Quantise ``spec`` to Loihi 2 fixed point.

    ``weight_bits``: synapse precision (Lava ``num_weight_bits``; mixed-sign
    projections lose one more bit to the sign). ``v_headroom``: the membrane may
    reach this many thresholds (and the ORN input this many thresholds per step)
    before Loihi's 24-bit state saturates; it caps ``vth``. ``vth_max``: an
    optional further cap on every population's ``vth``.

    The returned spec's ``report`` holds, per population, ``vth``, ``dv``, the
    decay error ``|beta_q - beta|`` and the bias error (threshold units), and per
    projection the relative Frobenius weight error, the largest absolute weight
    error (threshold units) and the fraction of nonzero weights rounded to 0.
    """
    if not 1 <= int(weight_bits) <= 8:
        raise ExportError(f"weight_bits={weight_bits} must be in 1..8")
    if not v_headroom >= 1.0:
        raise ExportError(f"v_headroom={v_headroom} must be >= 1 threshold")
    bits = int(weight_bits)
    cap = min(VTH_MAX, int((MAX_UV - 1) // ((1 << VTH_SHIFT) * v_headroom)))
    if vth_max is not None:
        cap = min(cap, int(vth_max))
    pops: List[FixedPopulation] = []
    projs: List[FixedProjection] = []
    report: Dict[str, object] = {"weight_bits": bits, "v_headroom": v_headroom, "weight_exp": 0, "bias_exp": BIAS_EXP,
                                 "du": DU_NO_FILTER, "populations": {}, "projections": {}}
    folded: Dict[int, np.ndarray] = {}
    modes: Dict[int, str] = {}
    for i, q in enumerate(spec.projections):
        theta = spec.population(q.post).threshold
        folded[i] = q.weight / theta[:, None]
        modes[i] = sign_mode_of(folded[i])
    for p in spec.populations:
        limits = [vth_limit(folded[i], modes[i], bits) for i, q in enumerate(spec.projections) if q.post == p.name]
        lim = min([cap] + limits)
        vth = int(np.floor(lim))
        if vth < 1:
            raise ExportError(
                f"population {p.name}: incoming weights exceed {weight_range('MIXED', bits)[1]} thresholds, "
                "not representable with weight exponent 0 (clip them first: `dmn-neuro quantize --clip-weights`, "
                "deployment.clip_weight_thresholds)")
        dv = int(decay_to_dv(p.beta))
        b = p.bias / p.threshold * vth  # in units of (1 << BIAS_EXP) / 64 = 1 mantissa step
        clipped = int(np.count_nonzero((round_half_even(b) < BIAS_MANT_MIN) | (round_half_even(b) > BIAS_MANT_MAX)))
        mant = bias_to_mant(b).astype(np.int32)
        pops.append(FixedPopulation(p.name, p.n, DU_NO_FILTER, dv, vth, mant, np.full(p.n, BIAS_EXP, np.int32),
                                    p.beta, p.threshold.copy(), list(p.cell_types)))
        beta_q = dv_to_beta(dv)
        report["populations"][p.name] = {
            "vth": vth, "dv": dv, "beta": p.beta, "beta_q": beta_q, "decay_error": abs(beta_q - p.beta),
            "bias_error_max": float(np.max(np.abs(mant / vth - p.bias / p.threshold), initial=0.0)),
            "bias_clipped": clipped, "vth_limited_by": "headroom" if lim == cap else "weights",
        }
    vth_of = {fp.name: fp.vth for fp in pops}
    for i, q in enumerate(spec.projections):
        w_s = folded[i] * vth_of[q.post]
        w_int = round_weight(w_s, modes[i], bits).astype(np.int32)
        projs.append(FixedProjection(q.pre, q.post, w_int, modes[i], 0, bits))
        err = w_int / vth_of[q.post] - folded[i]
        norm = np.linalg.norm(folded[i])
        nz = folded[i] != 0
        report["projections"][q.name] = {
            "sign_mode": modes[i], "rel_weight_error": float(np.linalg.norm(err) / norm) if norm > 0 else 0.0,
            "max_abs_weight_error": float(np.max(np.abs(err), initial=0.0)),
            "zeroed_fraction": float(np.count_nonzero(nz & (w_int == 0)) / max(1, np.count_nonzero(nz))),
            "max_weight_int": int(np.max(np.abs(w_int), initial=0)),
        }
    inp = spec.population(spec.input_population)
    input_scale = vth_of[inp.name] / inp.threshold
    report["input"] = {"scale_min": float(input_scale.min()), "scale_max": float(input_scale.max()),
                       "limit": MAX_ACTIVATION, "resolution_thresholds": 1.0 / vth_of[inp.name]}
    fps = FixedPointSpec(pops, projs, spec.input_population, spec.output_population, input_scale,
                         MAX_ACTIVATION, spec.semantics.dt_ms, report)
    logger.info("quantised %d populations, %d projections to %d-bit weights", len(pops), len(projs), bits)
    return fps


# -- bit-accurate emulation -------------------------------------------------
class FixedPointState(NamedTuple):
    """Membranes (int64, post-reset) and last spikes (bool), ordered as ``fps.populations``."""

    v: Tuple["object", ...]
    spikes: Tuple["object", ...]


class _Circuit:
    """The integers of ``fps`` indexed by population, for :func:`circuit_step_fixed`."""

    def __init__(self, fps: FixedPointSpec):
        self.names = fps.population_names
        idx = {n: i for i, n in enumerate(self.names)}
        self.input = idx[fps.input_population]
        self.dv = [int(p.dv) for p in fps.populations]
        self.vth = [int(p.vth) for p in fps.populations]
        self.proj = [(idx[q.pre], idx[q.post], int(q.weight_exp)) for q in fps.projections]


def circuit_step_fixed(c: _Circuit, state: FixedPointState, x_int, bias, spike_sum) -> FixedPointState:
    """One step of the whole fixed-point circuit (NumPy or torch, by the type of ``state.v``).

    ``x_int``: quantised ORN messages (int64, through the identity Dense: weight 1,
    weight_exp 0); ``bias[k]``: effective biases; ``spike_sum(j, s)``: the int64
    ``s @ W_j.T`` of projection ``j``. Every projection reads the spikes of the
    previous step (one step per hop).
    """
    xp = _xp(state.v[0])
    a = [xp.zeros_like(v) for v in state.v]
    a[c.input] = a[c.input] + x_int
    for j, (i_pre, i_post, e) in enumerate(c.proj):
        a[i_post] = a[i_post] + apply_weight_exp(spike_sum(j, state.spikes[i_pre]), e)
    out = [lif_step_fixed(state.v[k], a[k], c.dv[k], bias[k], c.vth[k]) for k in range(len(c.names))]
    return FixedPointState(tuple(v for v, _ in out), tuple(s for _, s in out))


def simulate_fixed(fps: FixedPointSpec, x: np.ndarray, record_membrane: bool = False) -> Dict[str, np.ndarray]:
    """Bit-accurate NumPy emulation of the fixed-point Lava graph, in model time.

    ``x`` is the real-valued ORN input ``[T, B, n_in]``; it is quantised exactly
    as the worker quantises it. Returns ``{population: bool [T, B, n]}`` (and
    ``{population + '_mem': int [T, B, n]}`` with ``record_membrane``).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x[:, None, :]
    n_in = fps.population(fps.input_population).n
    if x.ndim != 3 or x.shape[2] != n_in:
        raise ExportError(f"input must be [T, batch, {n_in}], got {list(x.shape)}")
    T, B, _ = x.shape
    c = _Circuit(fps)
    xq = fps.quantise_input(x).astype(np.int64)
    w_t = [q.weight.astype(np.int64).T for q in fps.projections]
    bias = [p.effective_bias for p in fps.populations]
    state = FixedPointState(tuple(np.zeros((B, p.n), np.int64) for p in fps.populations),
                            tuple(np.zeros((B, p.n), bool) for p in fps.populations))
    out = {p.name: np.zeros((T, B, p.n), bool) for p in fps.populations}
    mem = {p.name: np.zeros((T, B, p.n), np.int64) for p in fps.populations} if record_membrane else None

    def spike_sum(j, s):
        return s.astype(np.int64) @ w_t[j]

    for t in range(T):
        state = circuit_step_fixed(c, state, xq[t], bias, spike_sum)
        for k, name in enumerate(c.names):
            out[name][t] = state.spikes[k]
            if mem is not None:
                mem[name][t] = state.v[k]
    if mem is not None:
        out.update({k + "_mem": m for k, m in mem.items()})
    return out


class FixedPointStepper:
    """The fixed-point circuit in torch, one step at a time: :func:`circuit_step_fixed`, as in
    :func:`simulate_fixed`, on tensors (so bit-identical to it).

    ``state = stepper.init_state(batch)``; ``spikes, state = stepper.step(state, x_t)``
    with ``x_t`` the real-valued ORN input ``[batch, n_in]``. Spike sums are
    computed with float32 matmuls, which are exact for integer sums below 2**24
    (checked at construction), so the stepper runs on CPU or GPU.
    """

    def __init__(self, fps: FixedPointSpec, device=None):
        import torch

        self.fps = fps
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._c = _Circuit(fps)
        self.names = self._c.names
        self._w = []
        for q in fps.projections:
            bound = int(np.abs(q.weight.astype(np.int64)).sum(axis=1).max(initial=0))
            if bound >= 1 << 24:
                raise ExportError(f"projection {q.name}: integer sums up to {bound} are not exact in float32")
            self._w.append(torch.as_tensor(q.weight.T.astype(np.float32), device=self.device))
        self._bias = [torch.as_tensor(p.effective_bias, dtype=torch.int64, device=self.device) for p in fps.populations]
        self._scale = torch.as_tensor(fps.input_scale, dtype=torch.float64, device=self.device)

    def init_state(self, batch: int) -> FixedPointState:
        import torch

        v = tuple(torch.zeros(batch, p.n, dtype=torch.int64, device=self.device) for p in self.fps.populations)
        s = tuple(torch.zeros(batch, p.n, dtype=torch.bool, device=self.device) for p in self.fps.populations)
        return FixedPointState(v, s)

    def quantise_input(self, x_t):
        import torch

        return quantise_input(torch.as_tensor(x_t, device=self.device), self._scale, self.fps.input_limit)

    def _spike_sum(self, j, s):
        import torch

        return torch.round(s.to(torch.float32) @ self._w[j]).to(torch.int64)

    def step(self, state: FixedPointState, x_t):
        state = circuit_step_fixed(self._c, state, self.quantise_input(x_t), self._bias, self._spike_sum)
        return dict(zip(self.names, state.spikes)), state

    def run(self, x):
        """Loop :meth:`step` over ``x`` ``[T, B, n_in]``; returns ``{population: bool [T, B, n]}``."""
        import torch

        x = torch.as_tensor(x, device=self.device)
        if x.dim() == 2:
            x = x[:, None, :]
        state = self.init_state(x.shape[1])
        outs: Dict[str, list] = {n: [] for n in self.names}
        for t in range(x.shape[0]):
            spk, state = self.step(state, x[t])
            for n in self.names:
                outs[n].append(spk[n])
        return {n: torch.stack(v) for n, v in outs.items()}
