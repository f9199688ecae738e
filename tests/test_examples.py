"""examples/: the seed's workflow script runs end to end at tiny size, and the
example configs are valid TrainingConfigs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nir
import pytest

from dmn_neuro.training.config import TrainingConfig

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.mark.parametrize("path", sorted((EXAMPLES / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    TrainingConfig.from_yaml(path)


def test_seed_workflow_runs_at_tiny_size(tmp_path):
    out = tmp_path / "seed_out"
    env = dict(os.environ, DMN_NEURO_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    cmd = [sys.executable, str(EXAMPLES / "seed_workflow.py"), "--config", str(EXAMPLES / "configs" / "tiny.yaml"),
           "--episodes", "2", "--steps", "40", "--batch-size", "2", "--eval-episodes", "2",
           "--verify-odors", "1", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    # every stage reported, in order
    stages = [ln.split("]")[0] + "]" for ln in res.stdout.splitlines() if ln.startswith("[")]
    order = ["[connectome]", "[circuit]", "[task]", "[train]", "[evaluate]", "[export]", "[verify]"]
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == order
    assert "% sparse" in res.stdout and "NIR PASSED" in res.stdout

    conn = json.loads((out / "connectome.json").read_text())
    assert {"ORN", "PN", "KC", "APL", "MBON", "DN"} <= set(conn["layer_sizes"])
    assert all(0.0 <= v <= 1.0 for v in conn["sparsity"].values()) and "PN->KC" in conn["sparsity"]
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in recs] == [0, 1]
    meta = json.loads((out / "checkpoints" / "last" / "checkpoint.json").read_text())
    assert meta["episode"] == 2 and meta["config"]["episode_length_steps"] == 40 and meta["config"]["batch_size"] == 2
    ev = json.loads((out / "evaluation.json").read_text())
    for phase in ("before", "after"):
        assert {"success_rate", "final_distance_to_goal_mean", "exploration_area_mean", "kc_sparsity"} <= set(ev[phase])
    graph = nir.read(str(out / "model.nir"))
    assert sum(isinstance(n, nir.LIF) for n in graph.nodes.values()) == 6
    ver = json.loads((out / "verification.json").read_text())
    assert ver["passed"] is True and ver["steps"] == 1000
    assert all(v == 0.0 for v in ver["mismatch_fraction"].values())


def test_seed_workflow_bad_config_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learnin_rate: 0.1\n")
    env = dict(os.environ, DMN_NEURO_CACHE=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, str(EXAMPLES / "seed_workflow.py"), "--config", str(bad), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 1 and lines == ["Error: config: unknown key(s) learnin_rate"]
    assert not (tmp_path / "o").exists()


def test_generalisation_failure_breakdown_runs_on_a_randomised_checkpoint(tmp_path):
    """examples/experiments/generalisation_attempts/failures.py: one row per held-out episode,
    success consistent with the closest approach, and the per-plume counts add up."""
    import yaml

    from dmn_neuro.training.optimizer import DMNTrainer, build_components

    d = yaml.safe_load((EXAMPLES / "configs" / "tiny.yaml").read_text())
    d["environment"]["arena"].update(odors=["isopentyl acetate", "ethyl acetate"], concentration_range=[0.25, 4.0],
                                     plumes=["exponential", "gaussian", "inverse_square"],
                                     plume_length_range_mm=[10.0, 25.0], wind_speed_range=[0.0, 5.0])
    cfg = TrainingConfig.from_dict({**d, "episode_length_steps": 20, "batch_size": 2, "eval_episodes": 0,
                                    "device": "cpu"})
    circuit, encoder, arena, _, loss_fn = build_components(cfg)
    trainer = DMNTrainer(circuit, loss_fn, cfg, environment=arena, encoder=encoder)
    ck = trainer.save_checkpoint(tmp_path / "ck")
    env = dict(os.environ, DMN_NEURO_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    script = EXAMPLES / "experiments" / "generalisation_attempts" / "failures.py"
    res = subprocess.run([sys.executable, str(script), str(ck), "--episodes", "30", "--out", str(tmp_path / "f")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "f" / "failures.json").read_text())
    rows = out["episodes"]
    assert len(rows) == 30 and out["stream"] == "evaluation"
    assert all(r["reached"] == (r["closest_mm"] <= out["success_radius_mm"]) for r in rows)
    assert all(10.0 <= r["length_mm"] <= 25.0 and 0.25 <= r["peak"] <= 4.0 for r in rows)
    s = out["summary"]
    assert sum(v["n"] for v in s["by_plume"].values()) == 30
    assert s["all"]["success_rate"] == sum(r["reached"] for r in rows) / 30
    assert (tmp_path / "f" / "failures.png").stat().st_size > 0
