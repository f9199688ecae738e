"""Verification core: compare the spikes of a reference and an exported model.

Used by ``dmn-neuro verify``. The pieces:

* :func:`compare_spikes` -- per-population statistics of two spike records
  ``{population: bool [T, B, n]}`` after aligning a known lag.
* :class:`Tolerance` and :data:`TOLERANCES` -- the pass rules per target
  (``nir`` and ``lava``: exact; ``lava-fixed``: bounded mismatch in KC, MBON,
  DN plus an optional closed-loop navigation gate).
* :func:`evaluate` -- ``(passed, reasons)`` of a comparison under a tolerance.
* :class:`VerificationResult` -- what ``verify --json`` prints (one object).
* :func:`verify_spikes` and :func:`verify_nir` -- the whole check for spikes at
  hand, and the NIR round trip (export -> write -> read -> execute -> compare).
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from dmn_neuro.errors import ConfigError, ExportError

logger = logging.getLogger(__name__)

#: Default number of compared steps below which a verification cannot pass.
MIN_STEPS_DEFAULT = 1000


# -- comparison -------------------------------------------------------------------------
def _as_tbn(name: str, which: str, arr: Any) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[:, None, :]
    if a.ndim != 3:
        raise ExportError(f"{which} spikes of {name} must be [T, batch, n], got shape {list(a.shape)}")
    if a.dtype != bool:
        if not np.all(np.isin(a, (0, 1))):
            raise ExportError(f"{which} spikes of {name} are not binary")
        a = a.astype(bool)
    return a


def _first_spike(s: np.ndarray) -> np.ndarray:
    """First spike step per (batch, neuron) of ``s`` [T, B, n]; -1 if silent."""
    any_ = s.any(axis=0)
    first = np.argmax(s, axis=0)
    return np.where(any_, first, -1)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 1.0 for identical vectors (even constant ones),
    NaN when one side is constant and they differ, or fewer than 2 elements."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size and np.array_equal(a, b):
        return 1.0
    if a.size < 2:
        return float("nan")
    da, db = a - a.mean(), b - b.mean()
    den = math.sqrt(float(da @ da) * float(db @ db))
    if den == 0.0:
        return float("nan")
    return float(np.clip((da @ db) / den, -1.0, 1.0))


def compare_spikes(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    lag: int = 0,
    populations: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Compare spike records ``{population: bool [T, B, n]}``.

    The candidate is taken to lag the reference by ``lag`` steps (a Lava export
    lags by ``LAVA_INPUT_DELAY_STEPS``): ``reference[t]`` is compared with
    ``candidate[t + lag]`` for ``t = 0 .. T - lag - 1``, i.e. the last ``lag``
    steps of the reference and the first ``lag`` steps of the candidate are
    dropped. Both records must have the same ``T``, ``B`` and ``n``.

    Returns ``{"steps", "batch", "lag", "populations": {name: stats}, "total":
    stats}``; per population: ``mismatch_fraction`` (mismatched entries /
    entries), ``n_mismatched``, ``n_entries``, ``spike_count_reference``,
    ``spike_count_candidate``, ``spike_count_difference`` (candidate -
    reference), ``first_spike_timing_error_steps`` (mean |difference of first
    spike step| over (batch, neuron) pairs that spike in both; NaN if none),
    ``n_first_spike_pairs``, ``first_spike_missing`` (pairs that spike in only
    one), ``rate_correlation`` (Pearson over neurons of spike counts summed over
    time and batch; 1.0 if the counts are identical, NaN if undefined).
    """
    lag = int(lag)
    if lag < 0:
        raise ExportError(f"lag must be >= 0, got {lag}")
    if populations is None:
        populations = [p for p in reference if p in candidate and not str(p).endswith("_mem")]
        if not populations:
            raise ExportError(f"no population in common: reference {sorted(reference)}, candidate {sorted(candidate)}")
    populations = list(populations)
    for p in populations:
        for which, rec in (("reference", reference), ("candidate", candidate)):
            if p not in rec:
                raise ExportError(f"population {p!r} missing from the {which} spikes (has {sorted(rec)})")
    stats: Dict[str, Dict[str, Any]] = {}
    steps = batch = None
    tot = dict(n_mismatched=0, n_entries=0, spike_count_reference=0, spike_count_candidate=0)
    for p in populations:
        ref = _as_tbn(p, "reference", reference[p])
        cand = _as_tbn(p, "candidate", candidate[p])
        if ref.shape != cand.shape:
            raise ExportError(f"population {p}: reference spikes {list(ref.shape)} vs candidate {list(cand.shape)}")
        T, B, n = ref.shape
        if lag >= T:
            raise ExportError(f"lag {lag} leaves no steps to compare (T={T})")
        r = ref[: T - lag]
        c = cand[lag:]
        steps, batch = T - lag, B
        mism = int(np.count_nonzero(r != c))
        entries = int(r.size)
        fr, fc = _first_spike(r), _first_spike(c)
        both = (fr >= 0) & (fc >= 0)
        timing = float(np.abs(fr[both] - fc[both]).mean()) if both.any() else float("nan")
        cr = r.sum(axis=(0, 1)).astype(np.int64)
        cc = c.sum(axis=(0, 1)).astype(np.int64)
        stats[p] = {
            "mismatch_fraction": (mism / entries) if entries else 0.0,
            "n_mismatched": mism,
            "n_entries": entries,
            "n_neurons": int(n),
            "spike_count_reference": int(cr.sum()),
            "spike_count_candidate": int(cc.sum()),
            "spike_count_difference": int(cc.sum() - cr.sum()),
            "first_spike_timing_error_steps": timing,
            "n_first_spike_pairs": int(both.sum()),
            "first_spike_missing": int(((fr >= 0) ^ (fc >= 0)).sum()),
            "rate_correlation": _pearson(cr, cc),
        }
        tot["n_mismatched"] += mism
        tot["n_entries"] += entries
        tot["spike_count_reference"] += int(cr.sum())
        tot["spike_count_candidate"] += int(cc.sum())
    total = dict(tot)
    total["mismatch_fraction"] = tot["n_mismatched"] / tot["n_entries"] if tot["n_entries"] else 0.0
    total["spike_count_difference"] = tot["spike_count_candidate"] - tot["spike_count_reference"]
    return {"steps": int(steps), "batch": int(batch), "lag": lag, "populations": stats, "total": total}


# -- pass rules -------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """Pass rules of one verification target.

    ``max_mismatch_fraction`` gates the named populations (0.0 means exact: no
    mismatched spike at all); ``default_max_mismatch_fraction`` gates every
    other compared population (``None``: reported, not gated). Success rates
    are fractions in [0, 1]; ``max_success_rate_difference=0.05`` is 5
    percentage points. The navigation gate applies when both rates are set;
    ``require_navigation`` makes missing rates a failure.
    """

    target: str
    max_mismatch_fraction: Mapping[str, float] = field(default_factory=dict)
    default_max_mismatch_fraction: Optional[float] = None
    min_steps: int = MIN_STEPS_DEFAULT
    success_rate_reference: Optional[float] = None
    success_rate_candidate: Optional[float] = None
    max_success_rate_difference: float = 0.05
    require_navigation: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_mismatch_fraction", dict(self.max_mismatch_fraction))
        for name, v in list(self.max_mismatch_fraction.items()) + [("default", self.default_max_mismatch_fraction)]:
            if v is not None and not (0.0 <= float(v) <= 1.0):
                raise ConfigError(f"tolerance {self.target}: max mismatch fraction for {name} must be in [0, 1], got {v}")
        if int(self.min_steps) < 1:
            raise ConfigError(f"tolerance {self.target}: min_steps must be >= 1, got {self.min_steps}")
        for key in ("success_rate_reference", "success_rate_candidate"):
            v = getattr(self, key)
            if v is not None and not (0.0 <= float(v) <= 1.0):
                raise ConfigError(f"tolerance {self.target}: {key} must be a fraction in [0, 1], got {v}")
        if not (0.0 <= self.max_success_rate_difference <= 1.0):
            raise ConfigError(f"tolerance {self.target}: max_success_rate_difference must be in [0, 1]")

    def limit(self, population: str) -> Optional[float]:
        return self.max_mismatch_fraction.get(population, self.default_max_mismatch_fraction)

    def with_navigation(self, success_rate_reference: float, success_rate_candidate: float) -> "Tolerance":
        """A copy with the closed-loop success rates filled in (gate active)."""
        return replace(self, success_rate_reference=success_rate_reference, success_rate_candidate=success_rate_candidate)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "target": self.target,
            "max_mismatch_fraction": dict(self.max_mismatch_fraction),
            "default_max_mismatch_fraction": self.default_max_mismatch_fraction,
            "min_steps": int(self.min_steps),
            "max_success_rate_difference": self.max_success_rate_difference,
            "require_navigation": self.require_navigation,
        }


#: Pass rules per target. ``nir`` and ``lava``: exact in every population;
#: ``lava-fixed``: <= 1 % in KC and MBON, <= 2 % in DN, others reported only.
TOLERANCES: Dict[str, Tolerance] = {
    "nir": Tolerance("nir", default_max_mismatch_fraction=0.0),
    "lava": Tolerance("lava", default_max_mismatch_fraction=0.0),
    "lava-fixed": Tolerance("lava-fixed", {"KC": 0.01, "MBON": 0.01, "DN": 0.02}),
}


def tolerance_for(target: str, **overrides: Any) -> Tolerance:
    """The registered :class:`Tolerance` of ``target`` with fields overridden."""
    try:
        base = TOLERANCES[target]
    except KeyError:
        raise ConfigError(f"unknown verification target {target!r}; known: {', '.join(sorted(TOLERANCES))}") from None
    unknown = set(overrides) - set(Tolerance.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown tolerance field(s) {sorted(unknown)}")
    return replace(base, **overrides) if overrides else base


def evaluate(comparison: Mapping[str, Any], tolerance: Tolerance) -> Tuple[bool, List[str]]:
    """Apply ``tolerance`` to a :func:`compare_spikes` result.

    Returns ``(passed, reasons)``; ``reasons`` lists every failed rule (empty
    when passed).
    """
    reasons: List[str] = []
    pops = comparison["populations"]
    if comparison["steps"] < tolerance.min_steps:
        reasons.append(f"only {comparison['steps']} steps compared; at least {tolerance.min_steps} required")
    for name in tolerance.max_mismatch_fraction:
        if name not in pops:
            reasons.append(f"{name}: gated population missing from the comparison")
    for name, st in pops.items():
        limit = tolerance.limit(name)
        if limit is None:
            continue
        if limit == 0.0:
            if st["n_mismatched"] != 0:
                reasons.append(f"{name}: {st['n_mismatched']} mismatched spikes of {st['n_entries']} (exact match required)")
        elif st["mismatch_fraction"] > limit:
            reasons.append(f"{name}: mismatch fraction {st['mismatch_fraction']:.4%} > {limit:.2%}")
    ref, cand = tolerance.success_rate_reference, tolerance.success_rate_candidate
    if ref is not None and cand is not None:
        diff = abs(float(cand) - float(ref))
        if diff > tolerance.max_success_rate_difference + 1e-12:
            reasons.append(
                f"navigation success {cand:.1%} vs reference {ref:.1%}: differs by {100 * diff:.1f} points "
                f"> {100 * tolerance.max_success_rate_difference:.1f}"
            )
    elif tolerance.require_navigation:
        reasons.append("navigation success rates missing (closed-loop check required)")
    return (not reasons), reasons


# -- result -----------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class VerificationResult:
    """Outcome of one verification; :meth:`to_json` is what ``verify --json`` prints."""

    target: str
    passed: bool
    comparison: Dict[str, Any]
    reasons: List[str] = field(default_factory=list)
    tolerance: Optional[Tolerance] = None
    closed_loop: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return int(self.comparison["steps"])

    @property
    def lag(self) -> int:
        return int(self.comparison["lag"])

    @property
    def mismatch_fraction(self) -> Dict[str, float]:
        return {k: float(v["mismatch_fraction"]) for k, v in self.comparison["populations"].items()}

    def to_dict(self) -> Dict[str, Any]:
        """One JSON-safe object (NaN -> null)."""
        out: Dict[str, Any] = {
            "target": self.target,
            "passed": bool(self.passed),
            "steps": self.steps,
            "batch": int(self.comparison.get("batch", 1)),
            "lag": self.lag,
            "mismatch_fraction": self.mismatch_fraction,
            "populations": self.comparison["populations"],
            "total": self.comparison.get("total", {}),
            "reasons": list(self.reasons),
        }
        if self.tolerance is not None:
            out["tolerance"] = self.tolerance.to_dict()
            if self.tolerance.success_rate_reference is not None:
                out["success_rate_reference"] = self.tolerance.success_rate_reference
            if self.tolerance.success_rate_candidate is not None:
                out["success_rate_candidate"] = self.tolerance.success_rate_candidate
        for key, value in list(self.closed_loop.items()) + list(self.extra.items()):
            if key in out:
                raise ExportError(f"verification field {key!r} would overwrite a standard field")
            out[key] = value
        return _json_safe(out)

    def to_json(self, indent: Optional[int] = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def verify_spikes(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    target: str,
    lag: int = 0,
    tolerance: Optional[Tolerance] = None,
    populations: Optional[Sequence[str]] = None,
    closed_loop: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> VerificationResult:
    """Compare, apply the target's tolerance, and wrap the outcome."""
    tol = tolerance if tolerance is not None else tolerance_for(target)
    comparison = compare_spikes(reference, candidate, lag=lag, populations=populations)
    passed, reasons = evaluate(comparison, tol)
    return VerificationResult(target, passed, comparison, reasons, tol, dict(closed_loop or {}), dict(extra or {}))


def verify_nir(
    spec,
    x: np.ndarray,
    nir_path: Optional[os.PathLike] = None,
    reference: Optional[Mapping[str, np.ndarray]] = None,
    tolerance: Optional[Tolerance] = None,
) -> Tuple[VerificationResult, Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """The NIR round trip: ``spec`` -> NIR file -> :func:`nir.read` ->
    :func:`~exporters.nir_import.run_nir` on ``x`` -> compare with ``reference``
    (default: :func:`dmn_neuro.simulation.spec.simulate` of ``spec``), lag 0.

    ``nir_path``: an existing NIR file to verify (it is not rewritten); when
    ``None`` the spec is exported to a temporary file first. Returns
    ``(result, reference_spikes, candidate_spikes)``.
    """
    from dmn_neuro.simulation.spec import simulate

    from exporters.nir_import import run_nir

    if reference is None:
        reference = simulate(spec, x)
    if nir_path is None:
        with tempfile.TemporaryDirectory(prefix="dmn-neuro-nir-") as tmp:
            candidate, _ = run_target(spec, x, "nir", tmp)
    else:
        candidate = run_nir(nir_path, x)
    pops = [p for p in spec.population_names]
    result = verify_spikes(reference, candidate, "nir", lag=0, tolerance=tolerance, populations=pops)
    return result, {p: np.asarray(reference[p]) for p in pops}, {p: candidate[p] for p in pops}


def run_target(spec, x: np.ndarray, target: str, workdir: os.PathLike) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """Export ``spec`` for ``target`` into ``workdir`` and run it there on ``x``.

    Returns ``(spikes, info)``: the target simulator's spikes per population
    (model time) and, for ``lava-fixed``, ``info['quantisation']`` (the report)
    and ``info['fixed_point_spec']`` (for the closed-loop gate).
    """
    workdir = Path(workdir)
    tolerance_for(target)  # refuses an unknown target with the registry's message
    if target == "nir":
        from exporters.nir_export import export_nir
        from exporters.nir_import import run_nir

        return run_nir(export_nir(spec, workdir / "model.nir"), x), {}
    from exporters.lava_export import export_lava
    from exporters.lava_runner import run_lava

    fixed = target == "lava-fixed"
    res = export_lava(spec, workdir / ("lava_fixed" if fixed else "lava_float"), fixed_point=fixed)
    info = {"quantisation": res["quantisation"], "fixed_point_spec": res["fixed_point_spec"]} if fixed else {}
    return run_lava(res["graph_dir"], x, fixed_point=fixed), info
