"""``dmn-neuro evaluate`` condition flags: each one changes what the arena does, the JSON
reports the checkpoint's training/held-out odors and the conditions, and results go
to ./evaluation/ (never into the checkpoint). Bad values are in test_bad_input.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from dmn_neuro.cli import cli
from dmn_neuro.cli.train import checkpoint_name, condition_tag
from dmn_neuro.experiments.conditions import evaluation_config
from dmn_neuro.training.checkpoint import load_circuit
from dmn_neuro.training.config import TrainingConfig
from dmn_neuro.training.optimizer import build_components

REPO = Path(__file__).resolve().parent.parent
TINY_YAML = REPO / "examples" / "configs" / "tiny.yaml"
HELD_OUT = ["1-hexanol", "butyl acetate"]
SHORT = ["--episodes", 3, "--steps", 20, "--device", "cpu", "--json"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """An untrained tiny checkpoint whose config declares training and held-out odors."""
    d = tmp_path_factory.mktemp("evalcond")
    cfg = yaml.safe_load(TINY_YAML.read_text())
    cfg["environment"]["arena"].update(odors=["isopentyl acetate", "ethyl acetate"], held_out_odors=HELD_OUT)
    (d / "c.yaml").write_text(yaml.safe_dump(cfg))
    res = invoke("train", "--config", d / "c.yaml", "--episodes", 0, "--eval-episodes", 0, "--out", d / "run")
    assert res.exit_code == 0, res.output
    return d / "run" / "checkpoints" / "last"


def _components(ck, **conditions):
    circuit, meta = load_circuit(ck)
    cfg = TrainingConfig.from_dict(meta["meta"]["config"]).replace(device="cpu")
    cfg, mixture = evaluation_config(cfg, **conditions)
    return build_components(cfg, circuit=circuit)


def _evaluate(ck, tmp_path, *flags):
    res = invoke("evaluate", ck, *SHORT, *flags, "--out", tmp_path / "e")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_json_reports_declared_odor_sets_and_conditions(ck, tmp_path):
    obj = _evaluate(ck, tmp_path)
    assert obj["train_odors"] == ["isopentyl acetate", "ethyl acetate"] and obj["held_out_odors"] == HELD_OUT
    c = obj["conditions"]
    assert c["odors"] == ["isopentyl acetate", "ethyl acetate"] and c["concentration"] == 1.0
    assert c["plume"] == "gaussian" and c["episode_length_steps"] == 20 and c["odor_removed"] is False
    assert {"success_rate", "final_distance_to_goal_mean", "kc_sparsity", "n_episodes"} <= set(obj)


def test_undeclared_sets_are_empty(tmp_path):
    obj = _evaluate(REPO / "examples" / "pretrained" / "flywire_mb_navigator", tmp_path)
    assert obj["train_odors"] == ["isopentyl acetate"] and obj["held_out_odors"] == []


def test_odor_changes_the_odor_identity_the_arena_uses(ck, tmp_path):
    _, encoder, arena, _, _ = _components(ck, odors=("1-hexanol",))  # a held-out odor may be evaluated
    s = arena.reset(16, torch.Generator().manual_seed(0))
    assert set(s.odor.tolist()) == {encoder.odor_index("1-hexanol")}
    obj = _evaluate(ck, tmp_path, "--odor", "1-Hexanol")
    assert obj["conditions"]["odors"] == ["1-hexanol"] and obj["held_out_odors"] == HELD_OUT


def test_odor_mixture_is_one_odor_with_summed_responses(ck, tmp_path):
    obj = _evaluate(ck, tmp_path, "--odor", "ethyl acetate", "--odor", "isoamyl acetate")
    assert obj["conditions"]["odors"] == ["ethyl acetate + isopentyl acetate"]


def test_concentration_zero_behaves_like_odor_removed(ck, tmp_path):
    a = _evaluate(ck, tmp_path / "a", "--concentration", 0)
    b = _evaluate(ck, tmp_path / "b", "--odor-removed")
    keys = ("success_rate", "final_distance_to_goal_mean", "mean_distance_to_goal_mean", "kc_sparsity")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    _, _, arena, _, _ = _components(ck, concentration=0.0)
    s = arena.reset(4, torch.Generator().manual_seed(0))
    assert torch.all(arena.concentration(s) == 0)


def test_concentration_scales_the_plume(ck):
    _, _, one, _, _ = _components(ck)
    _, _, half, _, _ = _components(ck, concentration=0.5)
    s = one.reset(4, torch.Generator().manual_seed(0))
    assert torch.allclose(half.concentration(s), 0.5 * one.concentration(s))


def test_plume_and_plume_length_change_the_plume(ck):
    pts = torch.tensor([[[60.0, 50.0, 0.0]]])
    src = torch.tensor([[50.0, 50.0, 0.0]])
    fields = {p: float(_components(ck, plume=p, plume_length=10.0)[2].field(pts, src))
              for p in ("exponential", "gaussian", "inverse_square")}
    assert fields["gaussian"] == pytest.approx(torch.exp(torch.tensor(-0.5)).item(), rel=1e-5)
    assert fields["inverse_square"] == pytest.approx(0.5, rel=1e-5)
    assert fields["exponential"] == pytest.approx(torch.exp(torch.tensor(-1.0)).item(), rel=1e-3)
    longer = float(_components(ck, plume="gaussian", plume_length=20.0)[2].field(pts, src))
    assert longer > fields["gaussian"]


def test_wind_shifts_the_plume_downwind(ck):
    _, _, calm, _, _ = _components(ck)
    _, _, windy, _, _ = _components(ck, wind=10.0)
    src = torch.tensor([[50.0, 50.0, 0.0]])
    down, up = torch.tensor([[[60.0, 50.0, 0.0]]]), torch.tensor([[[40.0, 50.0, 0.0]]])
    assert float(windy.field(down, src)) > float(calm.field(down, src))  # wind along +x stretches the plume there
    assert float(windy.field(up, src)) == pytest.approx(float(calm.field(up, src)))
    assert windy.config.wind == (10.0, 0.0)


def test_start_distance_keeps_the_success_radius(ck, tmp_path):
    _, _, base, _, _ = _components(ck)
    _, _, near, _, _ = _components(ck, start_distance=(5.0, 6.0))
    s = near.reset(64, torch.Generator().manual_seed(0))
    d = (s.pos - s.source)[:, :2].norm(dim=-1)
    assert torch.all(d <= 6.0 + 1e-4) and torch.all(d >= 5.0 - 1e-4)
    assert near.success_radius == base.success_radius
    obj = _evaluate(ck, tmp_path, "--start-distance", 5, 6)
    assert obj["conditions"]["start_distance_mm"] == [5.0, 6.0] and obj["success_radius_mm"] == base.success_radius


def test_start_heading_bounds_the_start_offset_from_the_bearing(ck, tmp_path):
    import math

    for deg in (0.0, 30.0, 180.0):
        _, _, arena, _, _ = _components(ck, start_heading=deg)
        s = arena.reset(256, torch.Generator().manual_seed(1))
        bearing = torch.atan2(s.source[:, 1] - s.pos[:, 1], s.source[:, 0] - s.pos[:, 0])
        off = torch.remainder(s.heading - bearing + math.pi, 2 * math.pi) - math.pi
        assert off.abs().max() <= math.radians(deg) + 1e-5
        if deg == 180.0:
            assert off.abs().max() > math.radians(150)  # any direction, facing away included
    obj = _evaluate(ck, tmp_path, "--start-heading", 30)
    assert obj["conditions"]["start_heading_offset_deg"] == 30.0
    assert condition_tag(start_heading=30.0) == "heading-30deg"
    res = invoke("evaluate", ck, *SHORT, "--start-heading", 181, "--out", tmp_path / "bad")
    assert res.exit_code == 2 and "--start-heading" in res.output and not (tmp_path / "bad").exists()
    res = invoke("evaluate", ck, "--table", "--start-heading", 30, "--out", tmp_path / "t")
    assert res.exit_code == 2 and "--start-heading" in res.output


def test_stop_at_source_flag_overrides_the_checkpoints_rule(ck, tmp_path):
    for flag in (True, False):
        _, _, arena, _, _ = _components(ck, stop_at_source=flag)
        assert arena.config.stop_at_source is flag
    _, _, arena, _, _ = _components(ck)
    assert arena.config.stop_at_source is False  # the checkpoint's (tiny.yaml's default)
    runs = {f: _evaluate(ck, tmp_path / f, f"--{f}", "--start-distance", 1, 3) for f in ("stop-at-source", "no-stop-at-source")}
    assert runs["stop-at-source"]["conditions"]["stop_at_source"] is True
    assert runs["no-stop-at-source"]["conditions"]["stop_at_source"] is False
    # same episodes: every fly within the radius at the end was also there at some step
    assert runs["stop-at-source"]["success_rate"] >= runs["no-stop-at-source"]["success_rate"]
    assert condition_tag(stop_at_source=True) == "stop_at_source"
    res = invoke("evaluate", ck, "--table", "--stop-at-source", "--out", tmp_path / "t")
    assert res.exit_code == 2 and "--stop-at-source" in res.output


def test_steps_sets_the_episode_length(ck, tmp_path):
    obj = _evaluate(ck, tmp_path, "--steps", 7)
    assert obj["episode_length_steps"] == 7 and obj["conditions"]["episode_length_steps"] == 7


def test_results_default_to_the_current_directory_not_the_checkpoint(ck, tmp_path, monkeypatch):
    before = sorted(p.relative_to(ck.parent) for p in ck.parent.rglob("*"))
    monkeypatch.chdir(tmp_path)
    res = invoke("evaluate", ck, *SHORT, "--odor", "ethyl acetate", "--concentration", 2)
    assert res.exit_code == 0, res.output
    out = tmp_path / "evaluation" / "run_last_odor-ethyl_acetate_conc-2_steps-20"
    assert (out / "evaluation.json").is_file() and (out / "evaluation_trajectories.png").is_file()
    assert sorted(p.relative_to(ck.parent) for p in ck.parent.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["evaluation"]


def test_condition_tags_and_checkpoint_names():
    assert condition_tag() == "default"
    assert condition_tag(("ethyl acetate",), 0.5, "gaussian", 12.5, 3.0, (10.0, 20.0), 100, True) == \
        "odor-ethyl_acetate_conc-0.5_gaussian_length-12.5mm_wind-3_start-10-20mm_steps-100_odor_removed"
    assert checkpoint_name("runs/quick/checkpoints/best") == "quick_best"
    assert checkpoint_name("examples/pretrained/flywire_mb_navigator/") == "flywire_mb_navigator"
    assert checkpoint_name("x/model.pt") == "model"


def test_table_evaluates_every_standard_condition(ck, tmp_path):
    res = invoke("evaluate", ck, "--table", "--episodes", 2, "--device", "cpu", "--json", "--out", tmp_path / "t")
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    names = [r["condition"] for r in obj["rows"]]
    assert names[0] == "training conditions" and names[-2:] == ["odor removed", "untrained"]
    assert [n for n in names if n.startswith("held-out odor")] == [f"held-out odor: {o}" for o in HELD_OUT]
    assert sum(n.startswith("concentration") for n in names) == 4 and sum(n.startswith("plume") for n in names) == 3
    rows = {r["condition"]: r for r in obj["rows"]}
    assert rows["held-out odor: 1-hexanol"]["conditions"]["odors"] == ["1-hexanol"]
    assert rows["concentration x0.25"]["conditions"]["concentration"] == 0.25
    assert rows["concentration x0.25"]["conditions"]["odors"] == ["isopentyl acetate", "ethyl acetate"]
    assert rows["plume: gaussian"]["conditions"]["plume"] == "gaussian"
    assert rows["odor removed"]["conditions"]["odor_removed"] is True
    # the fixture is `train --episodes 0`: its circuit is the untrained one, rebuilt here from the seed
    assert rows["untrained"]["final_distance_mm"] == rows["training conditions"]["final_distance_mm"]
    assert all(r["n_episodes"] == 2 and 0.0 <= r["success_rate"] <= 1.0 for r in obj["rows"])
    assert set(obj["acceptance"]) == {"training", "held_out_odors_mean", "each_concentration_min", "each_plume_min",
                                      "odor_removed", "untrained"}
    on_disk = json.loads((tmp_path / "t" / "conditions.json").read_text())
    assert on_disk["rows"] == obj["rows"]
    assert (tmp_path / "t" / "conditions.png").stat().st_size > 0
    assert "| untrained |" in (tmp_path / "t" / "conditions.md").read_text()


def test_table_refuses_condition_flags(ck, tmp_path):
    res = invoke("evaluate", ck, "--table", "--plume", "gaussian", "--out", tmp_path / "t")
    assert res.exit_code == 2 and "--table" in res.output and "--plume" in res.output
    assert not (tmp_path / "t").exists()
