"""Put a trained circuit on the Loihi 2 fixed-point grid, and fine-tune it there.

:func:`dmn_neuro.simulation.fixed_point.quantize` rounds a float circuit onto Loihi's
integer grid (8-bit weights, 12-bit decays, 13-bit bias mantissas). The
rounding changes the model: a tonic DN whose bias moves by half a mantissa step
drifts in phase, and every later spike mismatches. This module removes that
source of mismatch by moving the *float* model onto the grid instead:

* :func:`dequantize` -- the float :class:`~dmn_neuro.simulation.spec.CircuitSpec` that a
  :class:`~dmn_neuro.simulation.fixed_point.FixedPointSpec` represents exactly
  (``w = w_int 2^weight_exp theta_i / vth``, ``beta = 1 - dv / 4096``,
  ``bias = (bias_mant << bias_exp) theta_i / (64 vth)``, thresholds unchanged).
* :func:`compensated_spec` -- :func:`dequantize` plus sub-LSB corrections for
  Loihi's membrane arithmetic (decay truncation towards zero, ties at ``vth``),
  all inside the rounding slack, so that ``quantize`` returns the same integers.
* :func:`snap_circuit_to_grid` -- quantise a circuit, take the compensated
  spec, and write it back into the circuit's raw parameters, so that the
  trained model *is* the fixed-point model up to the truncation noise and the
  ORN input rounding. ``quantize(circuit.to_spec())`` afterwards gives the same
  integers (idempotent; checked before returning), and a second snap changes
  nothing.
* :class:`FakeQuantization` and :func:`qat_finetune` -- quantisation-aware
  fine-tuning with a straight-through estimator: the forward pass sees the
  parameters on the grid, the backward pass treats the rounding as identity.

Representation choices (made once, here):

* Thresholds are not quantised: the fixed-point model folds ``theta_i`` into
  the weights and bias, so any float threshold is exact.
* A synapse on the mask whose weight rounds to 0 cannot be written as 0
  (``magnitude = softplus(raw) > 0``): its magnitude becomes
  :data:`ZERO_MAGNITUDE` (1e-12 in normalised voltage units, i.e. ~1e-12
  thresholds, four orders below the smallest Loihi membrane step of any
  population), which quantises to 0 again and keeps the projection's sign mode
  (an all-excitatory row with a vanished inhibitory synapse stays MIXED).
  ``zero_policy="raise"`` refuses instead. Masked-out entries stay exactly 0
  (``ConstrainedWeight.magnitude`` ignores ``raw`` off the mask) and signs are
  the fixed presynaptic signs; a weight that would need the other sign raises.
* Parameters are stored in the circuit's dtype (float32 by default). The float
  model then lies on the grid to float32 precision; where that precision alone
  would make ``quantize`` pick a smaller ``vth`` (``floor(254 / (254/vth))``
  evaluating to ``vth - 1``), the limiting weights are moved down by one ulp
  of ``raw`` until the integers reproduce ("nudges" in the report).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from dmn_neuro.errors import ConfigError, ExportError
from dmn_neuro.simulation.semantics import NeuronSemantics
from dmn_neuro.simulation.spec import CircuitSpec, PopulationSpec, ProjectionSpec

from dmn_neuro.simulation.fixed_point import (BIAS_EXP, DECAY_UNITY, DU_NO_FILTER, DV_MIN, FixedPointSpec, below_vth,
                                              bias_to_mant, decay_to_dv, dv_to_beta, int_to_bias, int_to_weight,
                                              membrane_lsb, quantize, round_weight, weight_step)

logger = logging.getLogger(__name__)

#: Magnitude written for a synapse on the mask whose weight rounds to 0 (see module docstring).
ZERO_MAGNITUDE = 1e-12
ZERO_POLICIES = ("epsilon", "raise")
#: Outer quantise -> dequantise -> write rounds before giving up (vth may rise once or twice).
MAX_SNAP_ROUNDS = 8
#: One-ulp moves of the limiting weights per round (float32 rounding of vth's bound).
MAX_NUDGES = 64


# -- dequantisation ---------------------------------------------------------------------
def dequantize(fps: FixedPointSpec, like: Optional[CircuitSpec] = None) -> CircuitSpec:
    """The float circuit that ``fps`` represents exactly (in float64).

    Per population ``p`` (``vth``, ``dv``, ``bias_mant``, ``bias_exp``) and
    neuron ``i`` (float threshold ``theta_i`` kept by the fixed-point spec):
    ``beta = 1 - dv / 4096``, ``bias_i = (bias_mant_i << bias_exp_i) theta_i /
    (64 vth)``, threshold ``theta_i``; per projection ``w_ij = w_int_ij
    2^weight_exp theta_i / vth``. ``like`` (the spec that was quantised)
    supplies what the fixed-point spec does not carry: semantics, root ids,
    provenance and metadata. The ORN input quantisation (``input_scale``) has no
    float counterpart and is not represented.
    """
    pops: List[PopulationSpec] = []
    for p in fps.populations:
        if p.du != DU_NO_FILTER:
            raise ExportError(f"population {p.name}: du={p.du} (a synaptic filter) has no counterpart in the float model")
        if p.dv < DV_MIN:
            raise ExportError(f"population {p.name}: dv=0 means beta=1, which the float model cannot represent")
        src = like.population(p.name) if like is not None else None
        scale = p.threshold / float(p.vth)
        bias = int_to_bias(p.effective_bias.astype(np.float64), scale)
        pops.append(PopulationSpec(
            name=p.name, n=p.n, beta=dv_to_beta(p.dv), threshold=p.threshold.copy(), bias=bias,
            cell_types=list(p.cell_types) or (list(src.cell_types) if src is not None else ()),
            root_ids=None if src is None else src.root_ids.copy(),
            provenance="model" if src is None else src.provenance,
        ))
    vth = {p.name: p for p in fps.populations}
    projs: List[ProjectionSpec] = []
    for q in fps.projections:
        post = vth[q.post]
        w = int_to_weight(q.weight.astype(np.float64), (post.threshold / float(post.vth))[:, None], q.weight_exp)
        w = _guard_vth(w, post.threshold, post.vth, q.sign_mode, q.num_weight_bits)
        prov = "model"
        if like is not None:
            for lq in like.projections:
                if lq.pre == q.pre and lq.post == q.post:
                    prov = lq.provenance
        projs.append(ProjectionSpec(pre=q.pre, post=q.post, weight=w, provenance=prov))
    semantics = like.semantics if like is not None else NeuronSemantics(dt_ms=fps.dt_ms)
    meta = dict(like.metadata) if like is not None else {}
    meta["dequantized_from"] = "loihi2-fixed-point"
    return CircuitSpec(pops, projs, semantics, fps.input_population, fps.output_population, meta)


def _guard_vth(w: np.ndarray, theta: np.ndarray, vth: int, sign_mode: str, bits: int) -> np.ndarray:
    """Move weights that sit exactly on ``vth``'s bound by one ulp towards 0 where float rounding
    would make :func:`quantize`'s ``floor(bound / max(w / theta))`` return ``vth - 1``."""
    for _ in range(MAX_NUDGES):
        bad = below_vth(w / theta[:, None], vth, sign_mode, bits)
        if not np.any(bad):
            return w
        w = np.where(bad, np.nextafter(w, 0.0), w)
    raise ExportError(f"cannot represent integer weights on vth={vth} in float64")


def fixed_point_differences(a: FixedPointSpec, b: FixedPointSpec) -> List[str]:
    """What differs between two fixed-point specs, integer content only (empty when equal)."""
    out: List[str] = []
    if a.population_names != b.population_names:
        return [f"populations {a.population_names} vs {b.population_names}"]
    for pa in a.populations:
        pb = b.population(pa.name)
        for key in ("du", "dv", "vth"):
            if getattr(pa, key) != getattr(pb, key):
                out.append(f"{pa.name}.{key}: {getattr(pa, key)} vs {getattr(pb, key)}")
        for key in ("bias_mant", "bias_exp"):
            n = int(np.count_nonzero(getattr(pa, key) != getattr(pb, key)))
            if n:
                out.append(f"{pa.name}.{key}: {n} differ")
    if [q.name for q in a.projections] != [q.name for q in b.projections]:
        return out + ["projection lists differ"]
    for qa, qb in zip(a.projections, b.projections):
        if (qa.sign_mode, qa.weight_exp, qa.num_weight_bits) != (qb.sign_mode, qb.weight_exp, qb.num_weight_bits):
            out.append(f"{qa.name}: mode {qa.sign_mode}/{qa.weight_exp}/{qa.num_weight_bits} vs "
                       f"{qb.sign_mode}/{qb.weight_exp}/{qb.num_weight_bits}")
        n = int(np.count_nonzero(qa.weight != qb.weight))
        if n:
            out.append(f"{qa.name}.weight: {n} differ")
    if not np.array_equal(a.input_scale, b.input_scale):
        out.append("input_scale differs")
    return out


# -- truncation compensation -----------------------------------------------------------
#: Defaults of :func:`compensated_spec`, in LSB = theta_i / (64 vth) (one step of Loihi's membrane);
#: chosen on the smoke checkpoint by counting teacher-forced spike errors per population
#: (PN/KC/MBON errors fell from 45/318/141 without compensation to 13/81/37).
TRUNCATION_BIAS_LSB = 0.25
THRESHOLD_MARGIN_LSB = 0.5
LEAK_LSB = 0.5
#: Fraction of a rounding step that compensation may use (so that ``quantize`` still rounds back).
_SLACK = 0.45


def compensated_spec(fps: FixedPointSpec, like: Optional[CircuitSpec] = None,
                     truncation_bias_lsb: float = TRUNCATION_BIAS_LSB,
                     threshold_margin_lsb: float = THRESHOLD_MARGIN_LSB, leak_lsb: float = LEAK_LSB) -> CircuitSpec:
    """:func:`dequantize`, then sub-LSB corrections for Loihi's membrane arithmetic.

    Loihi truncates ``v * (4096 - dv) / 4096`` towards zero every step, so its
    membrane runs up to ``1 / (1 - beta)`` LSB below (above, for negative ``v``)
    the exact float model, and an exact tie ``v == vth << 6`` does not spike.
    Inside every rounding slack (so ``quantize`` returns the same integers), each
    non-input population gets, in LSB of that neuron:

    * ``truncation_bias_lsb``: a bias current ``-b`` per step (the mean truncation);
    * ``leak_lsb``: ``beta`` lowered by ``leak / (64 vth)`` (truncation is a leak:
      zero at ``v = 0``, towards zero for either sign), at most 0.45 / 4096;
    * ``threshold_margin_lsb``: weights and bias of row ``i`` divided by ``1 + h_i``
      (the threshold raised by ``margin`` LSB, so ties resolve as on Loihi), ``h_i``
      capped so that no integer weight or bias mantissa rounds differently.

    All zero gives :func:`dequantize` exactly.
    """
    spec = dequantize(fps, like=like)
    for fp in fps.populations:
        if fp.name == fps.input_population:
            continue  # the input is real-valued and rounded on Loihi; it cannot be scaled here
        sp = spec.population(fp.name)
        lsb = membrane_lsb(fp.vth)
        # quantize rounds the bias in mantissa units of 2**bias_exp LSB
        b_off = float(truncation_bias_lsb) / np.exp2(fp.bias_exp.astype(np.float64))
        if np.any(b_off >= _SLACK) or truncation_bias_lsb < 0:
            raise ExportError(f"truncation_bias_lsb={truncation_bias_lsb} outside the bias rounding slack")
        hmax = (_SLACK - b_off) / np.maximum(1.0, np.abs(fp.bias_mant.astype(np.float64)))
        for q in fps.projections:
            if q.post == fp.name and q.weight.size:
                step = float(weight_step(q.sign_mode, q.num_weight_bits))
                hmax = np.minimum(hmax, _SLACK * step / np.maximum(1.0, np.abs(q.weight).max(axis=1)))
        h = np.clip(np.minimum(hmax, float(threshold_margin_lsb) * lsb), 0.0, None)
        sp.bias = (sp.bias - float(truncation_bias_lsb) * lsb * sp.threshold) / (1.0 + h)
        for q in spec.projections:
            if q.post == fp.name:
                q.weight = q.weight / (1.0 + h)[:, None]
        sp.beta = sp.beta - min(_SLACK / DECAY_UNITY, float(leak_lsb) * lsb)
    return spec


# -- writing a float spec back into the circuit -------------------------------------------
def _inverse_softplus64(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(y > 30.0, y, y + np.log(-np.expm1(-np.maximum(y, 1e-300))))


def _logit64(b: float) -> float:
    return math.log(b) - math.log1p(-b)


def _write_(t: torch.Tensor, value: np.ndarray) -> None:
    with torch.no_grad():
        t.copy_(torch.as_tensor(np.asarray(value), dtype=t.dtype, device=t.device).reshape(t.shape))


def _write_spec(circuit, target: CircuitSpec, zero_policy: str, add_bias: bool = True) -> Dict[str, object]:
    """Write decays, biases and weights of ``target`` into ``circuit`` (thresholds are left alone)."""
    counts: Dict[str, object] = {"epsilon": 0, "biases_added": []}
    for p in target.populations:
        cell = circuit.cells[p.name]
        _write_(cell.raw_beta, np.float64(_logit64(p.beta)))
        b = circuit.bias(p.name)
        if b is None and np.any(p.bias != 0):
            if not add_bias:
                raise ExportError(f"population {p.name}: the snapped model needs a bias but the circuit has none "
                                  "(add_bias=False)")
            ref = cell.raw_threshold
            circuit.biases[p.name] = nn.Parameter(torch.zeros(p.n, dtype=ref.dtype, device=ref.device))
            circuit.bias_init[p.name] = 0.0  # recorded in the checkpoint's constructor arguments
            counts["biases_added"].append(p.name)
            b = circuit.bias(p.name)
        if b is not None:
            _write_(b, p.bias)
    for q in target.projections:
        cw = circuit.weight(q.pre, q.post)
        mask = cw.mask.detach().cpu().numpy()
        sign = cw.sign.detach().cpu().numpy().astype(np.float64)
        w = q.weight
        if np.any(w[~mask] != 0):
            raise ExportError(f"projection {q.name}: the fixed-point model has a synapse off the connectome mask")
        flip = mask & (w * sign[None, :] < 0)
        if np.any(flip):
            i, j = np.argwhere(flip)[0]
            raise ExportError(f"projection {q.name}: weight [{i}, {j}] would need a sign flip (Dale's law)")
        mag = np.abs(w)
        zero = mask & (mag == 0)
        if np.any(zero):
            if zero_policy == "raise":
                raise ExportError(f"projection {q.name}: {int(zero.sum())} synapses round to 0, which softplus "
                                  "cannot represent (zero_policy='raise')")
            mag = np.where(zero, ZERO_MAGNITUDE, mag)
            counts["epsilon"] += int(zero.sum())
        raw = cw.raw.detach().cpu().double().numpy()
        _write_(cw.raw, np.where(mask, _inverse_softplus64(np.where(mask, mag, 1.0)), raw))
    return counts


def _nudge_limiting_weights(circuit, target_fps: FixedPointSpec, names: Sequence[str]) -> int:
    """Move (one ulp of raw) every weight whose float32 value makes ``quantize`` see a bound above ``vth``."""
    spec = circuit.to_spec()
    moved = 0
    for q in target_fps.projections:
        if q.post not in names:
            continue
        folded = spec.projections[[p.name for p in spec.projections].index(q.name)].weight \
            / spec.population(q.post).threshold[:, None]
        bad = below_vth(folded, target_fps.population(q.post).vth, q.sign_mode, q.num_weight_bits)
        if not np.any(bad):
            continue
        cw = circuit.weight(q.pre, q.post)
        with torch.no_grad():
            idx = torch.as_tensor(bad, device=cw.raw.device)
            down = torch.nextafter(cw.raw, torch.full_like(cw.raw, -math.inf))
            cw.raw.copy_(torch.where(idx, down, cw.raw))
        moved += int(bad.sum())
    return moved


def clip_weights(circuit, max_thresholds: float) -> Dict[str, int]:
    """Clip every weight's magnitude to ``max_thresholds`` postsynaptic thresholds, in place.

    Loihi 2's weights (exponent 0) reach at most 254-255 ``vth`` units, and one
    population's ``vth`` is shared by all its inputs, so a few huge weights
    coarsen the grid of every other input (or, above 254 thresholds, cannot be
    represented). Returns the number of clipped synapses per projection; the
    rest of the circuit is untouched.
    """
    if not (isinstance(max_thresholds, (int, float)) and math.isfinite(max_thresholds) and max_thresholds > 0):
        raise ExportError(f"clip_weight_thresholds={max_thresholds!r} must be a finite number > 0")
    spec = circuit.to_spec()
    clipped: Dict[str, int] = {}
    for q in spec.projections:
        cap = float(max_thresholds) * np.broadcast_to(spec.population(q.post).threshold[:, None], q.weight.shape)
        over = np.abs(q.weight) > cap
        clipped[q.name] = int(over.sum())
        if over.any():
            cw = circuit.weight(q.pre, q.post)
            raw = cw.raw.detach().cpu().double().numpy()
            _write_(cw.raw, np.where(over, _inverse_softplus64(np.where(over, cap, 1.0)), raw))
    return clipped


def snap_circuit_to_grid(circuit, zero_policy: str = "epsilon", add_bias: bool = True,
                         truncation_bias_lsb: float = TRUNCATION_BIAS_LSB,
                         threshold_margin_lsb: float = THRESHOLD_MARGIN_LSB, leak_lsb: float = LEAK_LSB,
                         **quantize_options) -> Dict[str, object]:
    """Move ``circuit``'s decays, biases and weights onto the Loihi fixed-point grid, in place.

    Writes :func:`compensated_spec` of ``quantize(circuit.to_spec(),
    **quantize_options)`` back into the raw parameters (float64 inverse
    softplus / logit, stored in the parameters' dtype); thresholds are kept.
    ``quantize_options`` must be the ones the export will use. Afterwards
    ``quantize(circuit.to_spec(), **quantize_options)`` reproduces the integers
    of the snapped model exactly (checked; :class:`ExportError` otherwise), and
    snapping again changes nothing.

    ``add_bias``: the truncation bias needs a bias parameter in every non-input
    population; where the circuit has none, one is added (``circuit.biases``
    and ``circuit.bias_init``, so checkpoints record it). With
    ``truncation_bias_lsb=0`` no bias is added.

    Returns a report: ``rounds`` and ``nudges`` (see the module docstring),
    ``epsilon_synapses`` (on-mask synapses written as :data:`ZERO_MAGNITUDE`),
    ``biases_added``, ``compensation`` (the three LSB settings), per population
    ``vth``, ``dv``, ``beta_before``/``beta_after`` and the largest bias change
    (thresholds), per projection the largest weight change (thresholds), the
    relative Frobenius change and the number of synapses that became 0, and
    ``quantisation`` (the final :func:`quantize` report).
    """
    if zero_policy not in ZERO_POLICIES:
        raise ExportError(f"unknown zero_policy {zero_policy!r}; choose one of {ZERO_POLICIES}")
    comp = {"truncation_bias_lsb": float(truncation_bias_lsb), "threshold_margin_lsb": float(threshold_margin_lsb),
            "leak_lsb": float(leak_lsb)}
    for key, val in comp.items():
        if not (math.isfinite(val) and val >= 0):
            raise ExportError(f"{key}={val} must be a finite number >= 0")
    before = circuit.to_spec()
    target_fps = quantize(before, **quantize_options)
    nudges, rounds = 0, 0
    written: Dict[str, object] = {"epsilon": 0, "biases_added": []}
    added: List[str] = []
    final = None
    for rounds in range(1, MAX_SNAP_ROUNDS + 1):
        target = compensated_spec(target_fps, like=before, **comp)
        written = _write_spec(circuit, target, zero_policy, add_bias)
        added += list(written["biases_added"])
        for _ in range(MAX_NUDGES):
            got = quantize(circuit.to_spec(), **quantize_options)
            low = [p.name for p in target_fps.populations if got.population(p.name).vth < p.vth]
            if not low:
                break
            nudges += _nudge_limiting_weights(circuit, target_fps, low)
        diffs = fixed_point_differences(target_fps, got)
        if not diffs:
            final = got
            break
        logger.info("snap round %d: re-quantising (%s)", rounds, "; ".join(diffs[:3]))
        target_fps = got
    if final is None:
        raise ExportError(f"snapping to the fixed-point grid did not converge in {MAX_SNAP_ROUNDS} rounds")
    rep = _snap_report(before, circuit.to_spec(), final, rounds, nudges, int(written["epsilon"]))
    rep["biases_added"] = added
    rep["compensation"] = comp
    return rep


def _snap_report(before: CircuitSpec, after: CircuitSpec, fps: FixedPointSpec, rounds: int, nudges: int,
                 eps: int) -> Dict[str, object]:
    pops, projs = {}, {}
    for p in before.populations:
        a = after.population(p.name)
        fp = fps.population(p.name)
        pops[p.name] = {
            "vth": int(fp.vth), "dv": int(fp.dv), "beta_before": p.beta, "beta_after": a.beta,
            "beta_delta": a.beta - p.beta,
            "bias_max_abs_delta_thresholds": float(np.max(np.abs((a.bias - p.bias) / p.threshold), initial=0.0)),
        }
    for q in before.projections:
        qa = after.projections[[x.name for x in after.projections].index(q.name)]
        theta = before.population(q.post).threshold[:, None]
        d = (qa.weight - q.weight) / theta
        norm = np.linalg.norm(q.weight / theta)
        projs[q.name] = {
            "max_abs_delta_thresholds": float(np.max(np.abs(d), initial=0.0)),
            "rel_delta": float(np.linalg.norm(d) / norm) if norm > 0 else 0.0,
            "became_zero": int(np.count_nonzero((q.weight != 0) & (np.abs(qa.weight) <= ZERO_MAGNITUDE))),
        }
    return {"rounds": rounds, "nudges": nudges, "epsilon_synapses": eps, "idempotent": True,
            "populations": pops, "projections": projs, "quantisation": fps.report}


# -- quantisation-aware fine-tuning (straight-through estimator) ---------------------------
class _FakeQuantBeta(nn.Module):
    """``raw_beta -> raw`` whose sigmoid is ``1 - dv/4096``; identity gradient (STE)."""

    def __init__(self, fq: "FakeQuantization") -> None:
        super().__init__()
        self._fq = [fq]  # a list: not registered as a submodule, no reference cycle in the module tree

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        if not self._fq[0].active:
            return raw
        with torch.no_grad():
            # beta as to_spec() hands it to quantize: the circuit's sigmoid, then float64
            bq = dv_to_beta(decay_to_dv(torch.sigmoid(raw).double()))
            raw_q = (torch.log(bq) - torch.log1p(-bq)).to(raw.dtype)
        return raw + (raw_q - raw).detach()


class _FakeQuantBias(nn.Module):
    """Bias on the 13-bit mantissa grid ``mant * theta_i / vth``; identity gradient (STE)."""

    def __init__(self, fq: "FakeQuantization", name: str) -> None:
        super().__init__()
        self._fq = [fq]
        self.name = name

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        fq = self._fq[0]
        if not fq.active:
            return b
        with torch.no_grad():
            theta = fq.circuit.cells[self.name].threshold.detach().to(b.dtype)
            vth = float(fq.vth[self.name])
            bq = int_to_bias(bias_to_mant(b / theta * vth) * (1 << BIAS_EXP), theta / vth)  # quantize, dequantize
        return b + (bq - b).detach()


class FakeQuantization:
    """Context manager: the circuit's forward sees decays, biases and weights on the Loihi grid.

    Straight-through estimator: every rounding is identity in the backward pass.
    The grid (``vth`` per population and each projection's sign mode) is that of
    :func:`quantize` for the parameters at the last :meth:`refresh`; call it after
    every optimiser step (:func:`qat_finetune` does) so that the forward pass is
    exactly ``dequantize(quantize(circuit.to_spec()))``. Thresholds are not
    quantised (see the module docstring).

    Decays and biases use ``torch.nn.utils.parametrize`` on ``raw_beta`` and
    ``biases[pop]``; weights replace each ``ConstrainedWeight``'s ``forward``
    on the instance (``w + (w_q - w).detach()``, so a synapse rounded to 0 keeps
    its gradient and can grow back). While active, ``circuit.state_dict()``
    has parametrisation keys: save checkpoints only after leaving the context.
    """

    def __init__(self, circuit, **quantize_options) -> None:
        self.circuit = circuit
        self.options = dict(quantize_options)
        self.vth: Dict[str, int] = {}
        self.modes: Dict[str, tuple] = {}
        self.fps: Optional[FixedPointSpec] = None
        self._active = False
        self._patched: List[object] = []

    @property
    def active(self) -> bool:
        return self._active

    # The grid --------------------------------------------------------------------------
    def refresh(self) -> FixedPointSpec:
        """Recompute ``vth`` and sign modes from the current (unquantised) parameters."""
        was = self._active
        self._active = False
        try:
            with torch.no_grad():
                spec = self.circuit.to_spec()
            self.fps = quantize(spec, **self.options)
        finally:
            self._active = was
        self.vth = {p.name: int(p.vth) for p in self.fps.populations}
        self.modes = {q.name: (q.sign_mode, int(q.num_weight_bits)) for q in self.fps.projections}
        return self.fps

    def _weight_forward(self, cw, orig: Callable[[], torch.Tensor], name: str, post: str):
        def forward() -> torch.Tensor:
            w = orig()
            if not self._active:
                return w
            mode, bits = self.modes[name]
            with torch.no_grad():
                vth = float(self.vth[post])
                theta = self.circuit.cells[post].threshold.detach().to(w.dtype)[:, None]
                wq = int_to_weight(round_weight(w / theta * vth, mode, bits), theta / vth)  # quantize, dequantize
            return w + (wq - w).detach()
        return forward

    # Installing ------------------------------------------------------------------------
    def __enter__(self) -> "FakeQuantization":
        c = self.circuit
        self.refresh()
        for name in c.population_names:
            parametrize.register_parametrization(c.cells[name], "raw_beta", _FakeQuantBeta(self))
            self._patched.append(("beta", name))
            if name in c.biases:
                parametrize.register_parametrization(c.biases, name, _FakeQuantBias(self, name))
                self._patched.append(("bias", name))
        for pre, post in c.projection_pairs:
            cw = c.weight(pre, post)
            cw.forward = self._weight_forward(cw, type(cw).forward.__get__(cw), f"{pre}->{post}", post)
            self._patched.append(("weight", (pre, post)))
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        c = self.circuit
        self._active = False
        for kind, key in reversed(self._patched):
            if kind == "beta":
                parametrize.remove_parametrizations(c.cells[key], "raw_beta", leave_parametrized=False)
            elif kind == "bias":
                parametrize.remove_parametrizations(c.biases, key, leave_parametrized=False)
            else:
                del c.weight(*key).forward
        self._patched.clear()


def qat_finetune(trainer, episodes: int, progress: Optional[Callable[[Dict[str, float]], None]] = None,
                 snap_options: Optional[Dict[str, object]] = None, **quantize_options) -> Dict[str, object]:
    """Fine-tune ``trainer.circuit`` for ``episodes`` optimiser steps with fake-quantised
    parameters (STE), then snap it to the grid.

    Uses :meth:`dmn_neuro.training.optimizer.DMNTrainer.train_episode` (its loss,
    optimiser, gradient clipping and NaN checks) one episode at a time, refreshing
    the grid before each. The forward pass sees the exact grid
    (:func:`dequantize`); the sub-LSB truncation compensation is applied only by
    the final :func:`snap_circuit_to_grid` (``snap_options`` go there). No
    checkpoints are written during fine-tuning; the caller saves the snapped
    circuit. Returns ``{"records": [...], "snap": report}``.
    """
    if int(episodes) < 0:
        raise ExportError(f"episodes must be >= 0, got {episodes}")
    records: List[Dict[str, float]] = []
    if int(episodes) > 0:
        with FakeQuantization(trainer.circuit, **quantize_options) as fq:
            for _ in range(int(episodes)):
                fq.refresh()
                records.extend(trainer.train_episode(1, out_dir=None, progress=progress))
    snap = snap_circuit_to_grid(trainer.circuit, **dict(snap_options or {}), **quantize_options)
    return {"records": records, "snap": snap}


def _quantisation_summary(rep: Dict[str, Any]) -> Dict[str, Any]:
    pops = {k: {"vth": v["vth"], "dv": v["dv"], "decay_error": v["decay_error"], "bias_error_max": v["bias_error_max"]}
            for k, v in rep["populations"].items()}
    projs = {k: {"rel_weight_error": v["rel_weight_error"], "max_abs_weight_error": v["max_abs_weight_error"],
                 "zeroed_fraction": v["zeroed_fraction"]} for k, v in rep["projections"].items()}
    return {"populations": pops, "projections": projs}


def quantize_checkpoint(checkpoint, out, finetune_episodes: int = 0, weight_bits: int = 8,
                        snap_options: Dict[str, Any] = None, progress=None,
                        clip_weight_thresholds: Optional[float] = None) -> Dict[str, Any]:
    """Load ``checkpoint``, optionally fine-tune with fake quantisation, snap, save to ``out``.

    Returns the report printed by the command: ``quantisation_before`` (the
    rounding error of the loaded model, per population/projection),
    ``quantisation_after`` (of the saved one), ``snap`` (parameter changes,
    see :func:`dmn_neuro.training.qat.snap_circuit_to_grid`) and ``finetune`` (episode
    losses). The optimiser state is not carried over (the parameters moved).
    ``clip_weight_thresholds``: first :func:`clip_weights` (``clipped`` in the report).
    """
    from dmn_neuro.simulation.fixed_point import quantize
    from dmn_neuro.training.checkpoint import load_circuit, save_checkpoint
    from dmn_neuro.training.config import TrainingConfig

    if finetune_episodes < 0:
        raise ConfigError(f"finetune_episodes must be >= 0, got {finetune_episodes}")
    circuit, ck = load_circuit(checkpoint)
    meta = ck["meta"]
    cfg = TrainingConfig.from_dict(meta["config"]).replace(device="cpu")
    qopts = {"weight_bits": int(weight_bits)}
    clipped = None if clip_weight_thresholds is None else clip_weights(circuit, clip_weight_thresholds)
    before = _quantisation_summary(quantize(circuit.to_spec(), **qopts).report)
    records = []
    episode = int(meta.get("episode", 0))
    if finetune_episodes > 0:
        from dmn_neuro.training.optimizer import DMNTrainer, build_components

        circuit, _, _, _, loss_fn = build_components(cfg, circuit=circuit)
        trainer = DMNTrainer(circuit, loss_fn, cfg)
        trainer.episode = episode
        res = qat_finetune(trainer, finetune_episodes, progress=progress, snap_options=snap_options, **qopts)
        snap, records, episode = res["snap"], res["records"], trainer.episode
        circuit = trainer.circuit
    else:
        snap = snap_circuit_to_grid(circuit, **dict(snap_options or {}), **qopts)
    history = list(meta.get("loss_history", [])) + [{"episode": r["episode"], "total": r["total"]} for r in records]
    extra = dict(meta.get("extra", {}))
    extra["fixed_point_snap"] = {"source": str(checkpoint), "finetune_episodes": int(finetune_episodes),
                                 "weight_bits": int(weight_bits), "compensation": snap["compensation"],
                                 "biases_added": snap["biases_added"], "clip_weight_thresholds": clip_weight_thresholds,
                                 "clipped": clipped}
    path = save_checkpoint(out, circuit.float(), cfg, episode, None, history, meta.get("metrics", {}), None, extra)
    return {"checkpoint": str(path), "source": str(checkpoint), "finetune_episodes": int(finetune_episodes),
            "finetune": [{k: r[k] for k in ("episode", "total") if k in r} for r in records], "clipped": clipped,
            "quantisation_before": before, "quantisation_after": _quantisation_summary(snap["quantisation"]),
            "snap": {k: v for k, v in snap.items() if k != "quantisation"}}
