"""Verification core: compare_spikes golden cases, tolerances, result JSON, report files."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dmn_neuro.errors import ConfigError, ExportError
from exporters.report import format_table, write_report
from exporters.verify import (
    TOLERANCES,
    Tolerance,
    compare_spikes,
    evaluate,
    tolerance_for,
    verify_nir,
    verify_spikes,
)


def record(seed=0, T=1000, B=2, sizes=(("KC", 40), ("MBON", 5), ("DN", 3), ("PN", 6)), p=0.05):
    rng = np.random.default_rng(seed)
    return {name: rng.random((T, B, n)) < p for name, n in sizes}


def test_identical_records_give_zero():
    ref = record()
    cmp = compare_spikes(ref, {k: v.copy() for k, v in ref.items()})
    assert cmp["steps"] == 1000 and cmp["batch"] == 2 and cmp["lag"] == 0
    for name, st in cmp["populations"].items():
        assert st["n_mismatched"] == 0 and st["mismatch_fraction"] == 0.0
        assert st["spike_count_difference"] == 0
        assert st["spike_count_reference"] == int(ref[name].sum())
        assert st["first_spike_timing_error_steps"] == 0.0
        assert st["rate_correlation"] == 1.0
    assert cmp["total"]["n_mismatched"] == 0
    assert cmp["total"]["n_entries"] == 1000 * 2 * (40 + 5 + 3 + 6)


def test_one_flipped_spike_gives_exact_fraction():
    ref = record()
    cand = {k: v.copy() for k, v in ref.items()}
    was = cand["MBON"][10, 1, 3]
    cand["MBON"][10, 1, 3] = not was
    cmp = compare_spikes(ref, cand)
    st = cmp["populations"]["MBON"]
    assert st["n_mismatched"] == 1
    assert st["mismatch_fraction"] == 1 / (1000 * 2 * 5)
    assert st["spike_count_difference"] == (-1 if was else 1)
    assert cmp["populations"]["KC"]["n_mismatched"] == 0
    assert cmp["total"]["n_mismatched"] == 1
    assert cmp["total"]["mismatch_fraction"] == 1 / (1000 * 2 * 54)


def test_lag_alignment():
    ref = record(T=200)
    lag = 3
    # Candidate = reference delayed by `lag` steps; its first steps hold junk.
    cand = {}
    for k, v in ref.items():
        c = np.zeros_like(v)
        c[lag:] = v[:-lag]
        c[:lag] = True
        cand[k] = c
    cmp = compare_spikes(ref, cand, lag=lag)
    assert cmp["steps"] == 197
    assert all(st["n_mismatched"] == 0 for st in cmp["populations"].values())
    assert cmp["populations"]["KC"]["n_entries"] == 197 * 2 * 40
    unaligned = compare_spikes(ref, cand, lag=0)
    assert unaligned["populations"]["KC"]["n_mismatched"] > 0


def test_first_spike_timing_and_correlation_golden():
    ref = np.zeros((10, 1, 3), dtype=bool)
    cand = np.zeros_like(ref)
    ref[2, 0, 0] = ref[5, 0, 1] = True          # neuron 2 silent in both
    cand[4, 0, 0] = cand[5, 0, 1] = cand[6, 0, 1] = True
    st = compare_spikes({"X": ref}, {"X": cand})["populations"]["X"]
    assert st["first_spike_timing_error_steps"] == pytest.approx(1.0)  # (|2-4| + |5-5|) / 2
    assert st["n_first_spike_pairs"] == 2
    assert st["n_mismatched"] == 3
    # counts ref [1, 1, 0], cand [1, 2, 0]
    a, b = np.array([1, 1, 0.0]), np.array([1, 2, 0.0])
    assert st["rate_correlation"] == pytest.approx(np.corrcoef(a, b)[0, 1])
    silent = compare_spikes({"X": ref}, {"X": np.zeros_like(ref)})["populations"]["X"]
    assert math.isnan(silent["first_spike_timing_error_steps"]) and math.isnan(silent["rate_correlation"])


def test_compare_refuses_bad_input():
    ref = record(T=20)
    with pytest.raises(ExportError, match="KC"):
        compare_spikes(ref, {"KC": ref["KC"][:10]}, populations=["KC"])
    with pytest.raises(ExportError, match="missing"):
        compare_spikes(ref, {"KC": ref["KC"]}, populations=["KC", "DN"])
    with pytest.raises(ExportError, match="lag"):
        compare_spikes(ref, ref, lag=20)


def test_exact_targets_fail_on_one_spike():
    ref = record()
    cand = {k: v.copy() for k, v in ref.items()}
    for target in ("nir", "lava"):
        ok, reasons = evaluate(compare_spikes(ref, cand), tolerance_for(target))
        assert ok and reasons == []
    cand["PN"][0, 0, 0] ^= True
    ok, reasons = evaluate(compare_spikes(ref, cand), tolerance_for("nir"))
    assert not ok and len(reasons) == 1 and reasons[0].startswith("PN: 1 mismatched")


def test_lava_fixed_limits():
    ref = record()
    tol = tolerance_for("lava-fixed")
    cand = {k: v.copy() for k, v in ref.items()}
    # KC: 40 neurons * 2 * 1000 = 80000 entries -> 1% = 800 flips allowed.
    flat = cand["KC"].reshape(-1)
    flat[:800] ^= True
    cand["PN"][:] = ~cand["PN"]  # ungated population: reported only
    ok, reasons = evaluate(compare_spikes(ref, cand), tol)
    assert ok, reasons
    flat[800] ^= True
    ok, reasons = evaluate(compare_spikes(ref, cand), tol)
    assert not ok and reasons[0].startswith("KC: mismatch fraction")
    # DN gets 2 %: 6000 entries -> 120 flips pass, 121 fail.
    cand = {k: v.copy() for k, v in ref.items()}
    cand["DN"].reshape(-1)[:120] ^= True
    assert evaluate(compare_spikes(ref, cand), tol)[0]
    cand["DN"].reshape(-1)[120] ^= True
    assert not evaluate(compare_spikes(ref, cand), tol)[0]
    # configurable: gate PN too
    strict = tolerance_for("lava-fixed", max_mismatch_fraction={"KC": 0.01, "MBON": 0.01, "DN": 0.02, "PN": 0.0})
    assert not evaluate(compare_spikes(ref, {k: v.copy() for k, v in ref.items()} | {"PN": ~ref["PN"]}), strict)[0]


def test_navigation_gate_and_min_steps():
    ref = record()
    cmp = compare_spikes(ref, ref)
    tol = tolerance_for("lava-fixed")
    assert evaluate(cmp, tol.with_navigation(0.80, 0.76))[0]
    ok, reasons = evaluate(cmp, tol.with_navigation(0.80, 0.74))
    assert not ok and "navigation" in reasons[0]
    ok, reasons = evaluate(cmp, tolerance_for("lava-fixed", require_navigation=True))
    assert not ok and "missing" in reasons[0]
    short = compare_spikes(record(T=100), record(T=100))
    ok, reasons = evaluate(short, tolerance_for("nir"))
    assert not ok and "100 steps" in reasons[0]
    assert evaluate(short, tolerance_for("nir", min_steps=100))[0]


def test_tolerance_validation():
    assert set(TOLERANCES) == {"nir", "lava", "lava-fixed"}
    with pytest.raises(ConfigError, match="unknown verification target 'loihi'"):
        tolerance_for("loihi")
    with pytest.raises(ConfigError, match="unknown tolerance field"):
        tolerance_for("nir", max_mismatch=0.1)
    with pytest.raises(ConfigError, match="KC"):
        Tolerance("x", {"KC": 1.5})
    with pytest.raises(ConfigError, match="fraction"):
        Tolerance("x", success_rate_reference=80.0)


def test_result_json_is_one_object():
    ref = record()
    cand = {k: v.copy() for k, v in ref.items()}
    cand["DN"][:] = False
    tol = tolerance_for("lava-fixed").with_navigation(0.9, 0.88)
    res = verify_spikes(ref, cand, "lava-fixed", tolerance=tol, closed_loop={"episodes": 50})
    d = json.loads(res.to_json())
    assert d["target"] == "lava-fixed" and d["passed"] is False
    assert d["steps"] == 1000 and d["lag"] == 0
    assert set(d["mismatch_fraction"]) == {"KC", "MBON", "DN", "PN"}
    assert d["mismatch_fraction"]["KC"] == 0.0 and d["mismatch_fraction"]["DN"] > 0.02
    assert d["populations"]["DN"]["rate_correlation"] is None  # NaN -> null
    assert d["success_rate_reference"] == 0.9 and d["episodes"] == 50
    assert any(r.startswith("DN") for r in d["reasons"])
    table = format_table(res)
    assert "FAILED" in table and "DN" in table and "FAIL: DN" in table


def test_report_files_written(tmp_path):
    ref = record(T=300)
    cand = {k: v.copy() for k, v in ref.items()}
    cand["KC"][5, 0, 2] ^= True
    res = verify_spikes(ref, cand, "nir", tolerance=tolerance_for("nir", min_steps=1))
    paths = write_report(res, ref, cand, tmp_path / "rep")
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["verification.json", "verification.png"]
    assert json.loads(paths["json"].read_text())["passed"] is False
    assert paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verify_nir_end_to_end(tmp_path):
    import importlib.util
    from pathlib import Path

    loc = importlib.util.spec_from_file_location("_nir_roundtrip_fixture", Path(__file__).with_name("test_nir_roundtrip.py"))
    mod = importlib.util.module_from_spec(loc)
    loc.loader.exec_module(mod)
    spec = mod.make_spec(3)
    x = np.random.default_rng(4).uniform(0.0, 0.6, (1000, 1, 8))
    res, ref, cand = verify_nir(spec, x)
    assert res.passed, res.reasons
    assert set(res.mismatch_fraction) == set(spec.population_names)
    assert all(v == 0.0 for v in res.mismatch_fraction.values())
    assert "PASSED" in format_table(res)
