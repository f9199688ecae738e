"""Experiment grids: the experiment file, a real grid on the process pool that is killed
with SIGKILL mid-grid and rerun (only the missing cells run), and the report's statistics."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from dmn_neuro.cli import cli
from dmn_neuro.experiments.report import holm, pairwise, summarize, t_ci
from dmn_neuro.experiments.spec import load_spec, spec_from_dict

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "examples" / "experiments" / "smoke.yaml"
HEADLINE = REPO / "examples" / "experiments" / "headline.yaml"
TINY = REPO / "examples" / "configs" / "tiny.yaml"


# -- the experiment file ----------------------------------------------------------
def test_cells_merge_overrides_and_seed_the_variant():
    spec = spec_from_dict({
        "base": str(TINY), "seeds": [3, 5], "set": {"num_episodes": 4, "loss": {"energy_weight": 0.5}},
        "conditions": {"real": {}, "shuf": {"connectome.variant": {"kind": "shuffled"}},
                       "fixed": {"connectome": {"variant": {"kind": "random", "seed": 9}}},
                       "energy": {"loss.energy_weight": 0.1, "environment.arena.speed_gain": 0.02}},
    }, REPO)
    cells = {c.key: c.config for c in spec.cells()}
    assert sorted(cells) == sorted(f"{c}__seed{s}" for c in ("real", "shuf", "fixed", "energy") for s in (3, 5))
    assert cells["real__seed5"]["seed"] == 5 and cells["real__seed5"]["num_episodes"] == 4
    assert cells["real__seed3"]["connectome"]["variant"] is None
    assert cells["shuf__seed5"]["connectome"]["variant"] == {"kind": "shuffled", "seed": 5, "projections": None}
    assert cells["fixed__seed5"]["connectome"]["variant"]["seed"] == 9
    assert cells["energy__seed3"]["loss"]["energy_weight"] == 0.1 and cells["real__seed3"]["loss"]["energy_weight"] == 0.5
    arena = cells["energy__seed3"]["environment"]["arena"]
    assert arena["speed_gain"] == 0.02 and arena["plume"] == "gaussian"  # one arena key changed, the rest kept
    assert cells["energy__seed3"]["connectome"]["source_options"] == {"orn_per_glomerulus": 8}


def test_shipped_experiment_files_are_valid():
    head = load_spec(HEADLINE)
    assert len(head.seeds) >= 5 and {"real", "shuffled", "random"} <= set(head.conditions)
    assert any(c.config["connectome"]["variant"] and c.config["connectome"]["variant"]["kind"] == "ablate"
               for c in head.cells())
    smoke = load_spec(SMOKE)
    assert set(smoke.conditions) == set(head.conditions)


# -- a real grid, killed and resumed ---------------------------------------------
def _cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "dmn_neuro.cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The smoke experiment killed (SIGKILL, driver and workers) after its first finished cell, then rerun."""
    out = tmp_path_factory.mktemp("exp") / "smoke"
    args = ["experiment", "run", SMOKE, "--out", out, "--workers", "1"]
    proc = _cli(args, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list((out / "results").glob("*.json")):
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.read_bytes() for p in (out / "results").glob("*.json")}
    metrics_mtime = {p: (out / json.loads(b)["run_dir"] / "metrics.jsonl").stat().st_mtime_ns
                     for p, b in finished.items()}
    rerun = _cli(args)
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    return {"out": out, "finished": finished, "mtime": metrics_mtime, "summary": json.loads(stdout), "stderr": stderr}


def test_rerun_after_kill_runs_only_the_missing_cells(grid):
    out, finished = grid["out"], grid["finished"]
    n = len(load_spec(SMOKE).cells())
    assert 1 <= len(finished) < n
    assert grid["summary"] == {"cells": n, "reused": len(finished), "ran": n - len(finished), "out": str(out)}
    assert f"reusing {len(finished)} finished cells; running {n - len(finished)}" in grid["stderr"]
    for name, data in finished.items():  # the finished cells were not run again
        assert (out / "results" / name).read_bytes() == data
        run_dir = out / json.loads(data)["run_dir"]
        assert (run_dir / "metrics.jsonl").stat().st_mtime_ns == grid["mtime"][name]
    results = [json.loads(p.read_text()) for p in (out / "results").glob("*.json")]
    assert len(results) == n and len({r["pid"] for r in results if r["pid"]}) >= 2
    assert not list(out.rglob(".*tmp-*"))  # no torn temporary files
    for r in results:
        assert r["learning_curve"]["episode"] == [0, 1]
        for part in ("evaluation", "odor_removed"):
            ev = r[part]
            assert ev["n_episodes"] == 2 and 0 <= ev["success_rate"] <= 1
            assert ev["mean_speed_mm_s"] > 0 and ev["path_length_mm"] > 0 and ev["turning_rate_rad_s"] >= 0
    # a third run has nothing to do
    third = _cli(["experiment", "run", SMOKE, "--out", out, "--workers", "1"])
    stdout, _ = third.communicate(timeout=300)
    assert json.loads(stdout)["ran"] == 0


def test_variant_cells_trained_their_variant(grid):
    from dmn_neuro.training.checkpoint import load_circuit

    out = grid["out"]
    real, _ = load_circuit(out / "runs/real/seed0/checkpoints/last")
    shuf, _ = load_circuit(out / "runs/shuffled/seed1/checkpoints/last")
    noapl, _ = load_circuit(out / "runs/no_apl/seed0/checkpoints/last")
    assert shuf.structure.version == "v783+shuffled(seed=1)"
    pk_r, pk_s = real.weight("PN", "KC").mask, shuf.weight("PN", "KC").mask
    assert pk_r.sum() == pk_s.sum() and not bool((pk_r == pk_s).all())
    assert not noapl.weight("APL", "KC").mask.any()


def test_report_json_has_per_condition_statistics_and_pairwise_tests(grid):
    res = CliRunner().invoke(cli, ["experiment", "report", str(grid["out"]), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["conditions"] == ["real", "shuffled", "random", "no_apl"]
    for c in rep["conditions"]:
        for m in ("success_rate", "final_distance_mm", "kc_sparsity", "learning_curve_area", "mean_speed_mm_s"):
            s = rep["per_condition"][c][m]
            assert s["n"] == 2 and len(s["ci95"]) == 2 and s["ci95"][0] <= s["mean"] <= s["ci95"][1]
    for m in ("success_rate", "final_distance_mm", "kc_sparsity", "learning_curve_area"):
        rows = rep["pairwise"][m]
        assert len(rows) == 6 and all({"U", "p", "p_holm", "rank_biserial"} <= set(r) for r in rows)
    for name in ("report.md", "report.json", "learning_curves.png", "metrics.png"):
        assert (grid["out"] / name).is_file()
    assert "| KC sparsity | no_apl | 2 |" in (grid["out"] / "report.md").read_text()


# -- statistics -------------------------------------------------------------------
def test_t_ci_and_holm():
    s = t_ci([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == 2.0 and np.allclose(s["ci95"], [2 - 4.302653 / np.sqrt(3), 2 + 4.302653 / np.sqrt(3)])
    assert t_ci([5.0])["ci95"] is None and t_ci([None, 1.0])["n"] == 1
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == [1.0, 1.0]


def test_pairwise_mann_whitney_and_rank_biserial():
    rows = pairwise({"hi": [5.0, 6.0, 7.0, 8.0, 9.0], "lo": [0.0, 1.0, 2.0, 3.0, 4.0], "same": [0.0, 1.0, 2.0, 3.0, 4.0]})
    hi_lo = next(r for r in rows if (r["a"], r["b"]) == ("hi", "lo"))
    assert hi_lo["U"] == 25 and hi_lo["rank_biserial"] == 1.0 and hi_lo["p"] == pytest.approx(2 / 252)
    assert hi_lo["p_holm"] == pytest.approx(min(1, 3 * 2 / 252))
    lo_same = next(r for r in rows if (r["a"], r["b"]) == ("lo", "same"))
    assert lo_same["rank_biserial"] == 0.0 and lo_same["p_holm"] == 1.0


def test_summary_learning_curve_bands():
    results = [{"condition": "a", "seed": s, "learning_curve": {"success_rate": [0.0, 0.5 + 0.1 * s]},
                "evaluation": {"success_rate": 0.5}} for s in range(3)]
    rep = summarize(results)
    cur = rep["learning_curves"]["a"]
    assert cur["mean"] == pytest.approx([0.0, 0.6]) and cur["ci95"][0] == pytest.approx([0.0, 0.0])
    assert rep["per_condition"]["a"]["learning_curve_area"]["mean"] == pytest.approx(0.3)
