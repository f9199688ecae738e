"""Ray scale-out (opt-in: ``make test-cluster``, which builds .venv-cluster with dmn-neuro[cluster]).

Starts a local Ray instance in this process, runs the smoke grid's real/shuffled
cells through ``dmn-neuro experiment run --ray-address ADDR`` (each cell a Ray task,
results written by the driver), and reports on them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "examples" / "experiments" / "smoke.yaml"


@pytest.fixture(scope="module")
def head():
    import ray  # in .venv-cluster (make test-cluster); a missing Ray there is an error, not a skip

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()  # stops the instance this process started


def test_tiny_grid_through_ray(head, tmp_path):
    spec = yaml.safe_load(SMOKE.read_text())
    spec["base"] = str((SMOKE.parent / spec["base"]).resolve())
    spec["conditions"] = {k: spec["conditions"][k] for k in ("real", "shuffled")}
    f = tmp_path / "grid.yaml"
    f.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dmn_neuro.cli", "experiment", "run", str(f), "--out", str(out), "--ray-address", head]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"cells": 4, "reused": 0, "ran": 4, "out": str(out)}
    results = [json.loads(p.read_text()) for p in (out / "results").glob("*.json")]
    assert sorted((r["condition"], r["seed"]) for r in results) == [("real", 0), ("real", 1), ("shuffled", 0),
                                                                    ("shuffled", 1)]
    assert all(0 <= r["evaluation"]["success_rate"] <= 1 for r in results)
    rep = subprocess.run([sys.executable, "-m", "dmn_neuro.cli", "experiment", "report", str(out), "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    assert json.loads(rep.stdout)["per_condition"]["shuffled"]["success_rate"]["n"] == 2
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout)["ran"] == 0
