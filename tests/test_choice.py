"""The odor-choice task: config (held-out distractors never drawn), symmetric geometry,
the two sources' responses adding at each antenna, the blocked loop's spikes, choice
metrics on hand-built trajectories, and `evaluate --distractor / --choice-gradient`."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import yaml
from click.testing import CliRunner

from dmn_neuro.cli import cli
from dmn_neuro.environment.arena import ArenaConfig
from dmn_neuro.environment.choice import (
    CHOICE_DISTRACTOR, CHOICE_NONE, CHOICE_TARGET, ChoiceArena, ChoiceConfig, choice_metrics, choices,
    odor_similarity,
)
from dmn_neuro.environment.odors import held_out_split, load_hallem_carlson
from dmn_neuro.errors import ConfigError
from dmn_neuro.training.config import TrainingConfig
from dmn_neuro.training.optimizer import episode_generator

from _helpers import REPO, TINY_YAML, assert_one_line_error, make_trainer, tiny_config

CHOICE_YAML = REPO / "examples" / "configs" / "choice.yaml"
TRAIN_D = ["ethyl acetate", "1-octanol"]
HELD_D = ["1-hexanol", "butyl acetate"]
TINY_CHOICE = {"task": "choice", "choice": {"target_odor": "isoamyl acetate", "distractors": TRAIN_D,
                                            "held_out_distractors": HELD_D}}


def tiny_choice(**env):
    return tiny_config(environment={**tiny_config().environment.__dict__, **TINY_CHOICE, **env})


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


# ------------------------------------------------------------------ config
def test_choice_yaml_declares_the_generalise_split():
    cfg = TrainingConfig.from_yaml(CHOICE_YAML)
    split = held_out_split(seed=0)
    ch = cfg.environment.choice
    assert cfg.environment.task == "choice" and ch.target_odor == "isopentyl acetate"
    assert list(ch.distractors) == [o for o in split["train"] if o != "isopentyl acetate"]
    assert list(ch.held_out_distractors) == split["held_out"]
    assert cfg.environment.adaptation_tau_ms is None  # off: it cost the choice model 35 points (README)
    assert cfg.environment.held_out_odors == tuple(split["held_out"])
    assert TrainingConfig.from_dict(cfg.to_dict()) == cfg  # stored in checkpoints like everything else


def test_old_configs_are_the_approach_task():
    cfg = tiny_config()
    assert cfg.environment.task == "approach" and cfg.environment.choice is None
    assert cfg.to_dict()["environment"]["task"] == "approach"


@pytest.mark.parametrize("choice, env, match", [
    ({"distractors": ["1-hexanol"], "held_out_distractors": ["1-Hexanol"]}, {}, "both a training distractor"),
    ({"distractors": ["isoamyl acetate"]}, {}, "lists the target odor"),
    ({"distractors": ["dragon breath"]}, {}, "unknown odor"),
    ({"distractors": []}, {}, "distractors is empty"),
    ({"separation_mm": [30, 20]}, {}, "separation_mm"),
    ({"separation_mm": [20, 95]}, {}, "inside the arena"),
    ({"separation_mm": [3, 4]}, {}, "two success radii"),
    ({"colour": "red"}, {}, "unknown key(s) in environment.choice: colour"),
    ({}, {"odors": ["1-hexanol"]}, "environment.odors must be empty"),
    ({}, {"task": "approach"}, "only used with environment.task: choice"),
    ({}, {"task": "forage"}, "environment.task must be one of"),
])
def test_bad_choice_configs_are_one_line_errors(choice, env, match):
    d = {"environment": {"task": "choice", "choice": {"distractors": ["ethyl acetate"], **choice}, **env}}
    with pytest.raises(ConfigError) as exc:
        TrainingConfig.from_dict(d)
    assert match in str(exc.value) and "\n" not in str(exc.value)


# ---------------------------------------------------------------- geometry
def test_geometry_is_symmetric_and_held_out_distractors_are_never_drawn():
    cfg = TrainingConfig.from_yaml(CHOICE_YAML).replace(device="cpu")
    names = load_hallem_carlson().odors
    arena = ChoiceArena(cfg.environment.arena, cfg.environment.choice)
    ch, ac = arena.choice, arena.config
    s = arena.reset(4000, episode_generator(0, 3), dtype=torch.float64)
    tgt, dis, start = s.source[:, :2], s.conditions.distractor[:, :2], s.pos[:, :2]
    mid = (tgt + dis) / 2
    sep = (tgt - dis).norm(dim=-1)
    assert torch.all((mid - torch.tensor(ac.goal_mm[:2], dtype=torch.float64)).abs() <= ch.midpoint_jitter_mm + 1e-9)
    assert sep.min() >= ch.separation_mm[0] - 1e-9 and sep.max() <= ch.separation_mm[1] + 1e-9
    w, h = ac.arena_size_mm
    for p in (tgt, dis, start):
        assert torch.all(p >= 0) and torch.all(p[:, 0] <= w) and torch.all(p[:, 1] <= h)
    r = (start - mid).norm(dim=-1)
    assert r.min() >= ac.start_distance_mm[0] - 1e-6 and r.max() <= ac.start_distance_mm[1] + 1e-6
    # nothing but identity tells the sources apart: the target is on the left as often as on the right,
    # nearer as often as farther, and the heading points at the midpoint on average
    hv = torch.stack([torch.cos(s.heading), torch.sin(s.heading)], -1)
    cross = lambda a, b: a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]  # noqa: E731
    left = (cross(hv, tgt - start) > 0).double().mean()
    nearer = ((tgt - start).norm(dim=-1) < (dis - start).norm(dim=-1)).double().mean()
    assert abs(left - 0.5) < 0.03 and abs(nearer - 0.5) < 0.03
    # odors: target fixed, distractors from the training set only, each drawn
    assert torch.all(s.odor[:, 0] == names.index("isopentyl acetate"))
    drawn = {names[i] for i in s.odor[:, 1].tolist()}
    assert drawn == set(ch.distractors) and not drawn & set(ch.held_out_distractors)


def test_training_and_validation_episodes_never_use_a_held_out_distractor():
    tr = make_trainer(tiny_choice())
    held = {tr.encoder.odor_index(n) for n in HELD_D}
    for stream in (0, 2):
        for k in range(20):
            s = tr.environment.reset(8, episode_generator(0, k, stream))
            assert not set(s.odor[:, 1].tolist()) & held


# ---------------------------------------------------------------- sensing
@pytest.mark.parametrize("adapting", [False, True])
def test_each_antenna_gets_the_sum_of_both_odors_responses(adapting):
    env = {"encoding": "rate", "adaptation_tau_ms": 500.0 if adapting else None}
    tr = make_trainer(tiny_choice(**env))
    enc, arena = tr.encoder, tr.environment
    s = arena.reset(5, episode_generator(1, 0))
    c = arena.concentration(s)  # [B, antenna, source]
    assert c.shape == (5, 2, 2) and torch.all(c > 0)
    tc = torch.stack([arena.field(arena.antenna_positions(s), s.source), arena.field(arena.antenna_positions(s),
                                                                                      s.conditions.distractor)], -1)
    assert torch.equal(c, tc)
    level = c.sum(-1).mean(-1) if adapting else None
    scale = 1.0 / (level + enc.adaptation_floor) if adapting else torch.ones(5)
    for a in range(2):
        want = enc.spontaneous + scale[:, None] * (c[:, a, :1] * enc.response[s.odor[:, 0]]
                                                   + c[:, a, 1:] * enc.response[s.odor[:, 1]])
        got = enc.rates(s.odor, c[:, a], level)
        torch.testing.assert_close(got, want.clamp(min=0))
    assert torch.allclose(enc.adaptation_step(None, c), c.sum(-1).mean(-1)) if adapting else True
    # and a single-odor episode is the approach encoder unchanged
    one = enc.rates(s.odor[:, :1], c[:, 0, :1], level)
    torch.testing.assert_close(one, enc.rates(s.odor[:, 0], c[:, 0, 0], level))


def test_blocked_rollout_has_the_per_step_spikes():
    tr = make_trainer(tiny_choice(adaptation_tau_ms=500.0))
    ro = {m: tr.agent.rollout(3, 37, episode_generator(5, 1), closed_loop=m) for m in ("stepped", "blocked")}
    a, b = ro["stepped"], ro["blocked"]
    for k in a.activations:
        assert torch.equal(a.activations[k], b.activations[k]), k
    assert a.activations["KC"].sum() > 0 and a.concentration.shape == (37, 3, 2, 2)
    for f in ("positions", "concentration", "source", "odor"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


# ---------------------------------------------------------------- metrics
def test_choices_on_hand_built_trajectories():
    target = torch.tensor([[40.0, 50.0, 0], [40.0, 50, 0], [40.0, 50, 0], [40.0, 50, 0]])
    distractor = torch.tensor([[60.0, 50.0, 0]]).expand(4, 3)
    final = torch.tensor([[41.0, 50.5, 0], [59.0, 51, 0], [50.0, 50, 0], [37.9, 50, 0]])
    codes = choices(final, target, distractor, radius=2.25)
    assert codes.tolist() == [CHOICE_TARGET, CHOICE_DISTRACTOR, CHOICE_NONE, CHOICE_TARGET]
    m = choice_metrics(codes)
    assert m == {"n": 4, "correct_rate": 0.5, "wrong_rate": 0.25, "none_rate": 0.25,
                 "accuracy_among_chosen": pytest.approx(2 / 3)}
    assert choice_metrics([CHOICE_NONE])["accuracy_among_chosen"] is None


def test_stop_at_source_traps_the_fly_at_either_source():
    """Trap-assay rule: with stop_at_source a fly walking straight through the distractor stops
    there (choice: distractor), and one walking through the target stops at the target."""
    cfg = TrainingConfig.from_yaml(CHOICE_YAML).replace(device="cpu")
    codes = {}
    for stop in (False, True):
        arena_cfg = dataclasses.replace(cfg.environment.arena, stop_at_source=stop, success_radius_mm=2.0)
        arena = ChoiceArena(arena_cfg, cfg.environment.choice)
        s = arena.reset(2, episode_generator(0, 3))
        on_axis = torch.stack([s.conditions.distractor[0], s.source[1]])  # fly 0 heads at the distractor, 1 at the target
        start = on_axis.clone()
        start[:, 0] -= 10.0
        s = s._replace(pos=start, start_pos=start.clone(), heading=torch.zeros(2))
        for _ in range(1000):  # 1 s at 40 mm/s: far past either source without stopping
            s, _ = arena.move(s, torch.full((2,), 40.0), torch.zeros(2))
        codes[stop] = arena.choices(s.pos, s).tolist()
        gone = (s.pos[:, :2] - on_axis[:, :2]).norm(dim=-1)
        assert torch.all(gone <= 2.0) if stop else torch.all(gone > 20.0)
    assert codes[True] == [CHOICE_DISTRACTOR, CHOICE_TARGET]


def test_similarity_is_the_pearson_correlation_of_hallem_responses():
    import numpy as np

    d = load_hallem_carlson()
    a, b = d.responses[d.odors.index("isopentyl acetate")], d.responses[d.odors.index("1-hexanol")]
    assert odor_similarity("isoamyl acetate", "1-hexanol") == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert odor_similarity("1-hexanol", "1-hexanol") == pytest.approx(1.0)
    assert len(a) == 24


def test_validation_success_is_the_correct_rate():
    tr = make_trainer(tiny_choice())
    res = tr.evaluate(4, batch_size=2, episode_length=20)
    c = res["choice"]
    assert c["n"] == 4 and c["correct_rate"] == res["success_rate"]
    assert c["correct_rate"] + c["wrong_rate"] + c["none_rate"] == pytest.approx(1.0)


# --------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cks(tmp_path_factory):
    d = tmp_path_factory.mktemp("choiceck")
    cfg = yaml.safe_load(TINY_YAML.read_text())
    cfg["environment"].update(TINY_CHOICE)
    (d / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = {}
    for name, path in (("choice", d / "c.yaml"), ("approach", TINY_YAML)):
        res = invoke("train", "--config", path, "--episodes", 0, "--eval-episodes", 0, "--out", d / name)
        assert res.exit_code == 0, res.output
        out[name] = d / name / "checkpoints" / "last"
    return out


def test_evaluate_reports_choices_and_fixes_the_distractor(cks, tmp_path):
    res = invoke("evaluate", cks["choice"], "--episodes", 3, "--steps", 10, "--device", "cpu", "--json",
                 "--distractor", "1-Hexanol", "--out", tmp_path / "e")
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    assert obj["choice"]["n"] == 3 and obj["success_rate"] == obj["choice"]["correct_rate"]
    c = obj["conditions"]
    assert c["task"] == "choice" and c["distractors"] == ["1-hexanol"] and c["target_odor"] == "isopentyl acetate"
    assert obj["train_odors"] == ["isopentyl acetate", *TRAIN_D] and obj["held_out_odors"] == HELD_D
    assert (tmp_path / "e" / "evaluation.json").is_file()


def test_choice_gradient_writes_json_and_figure(cks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("evaluate", cks["choice"], "--episodes", 2, "--steps", 10, "--device", "cpu", "--choice-gradient")
    assert res.exit_code == 0, res.output
    out = tmp_path / "evaluation" / "choice_last_choice_gradient"
    obj = json.loads((out / "choice_gradient.json").read_text())
    assert (out / "choice_gradient.png").stat().st_size > 0
    rows = {r["odor"]: r for r in obj["distractors"]}
    assert list(rows) == HELD_D + TRAIN_D
    assert [rows[o]["held_out"] for o in rows] == [True, True, False, False]
    for o, r in rows.items():
        assert r["n"] == 2 and r["similarity"] == pytest.approx(odor_similarity("isopentyl acetate", o))
        assert r["correct_rate"] + r["wrong_rate"] + r["none_rate"] == pytest.approx(1.0)
    below = [r for r in rows.values() if r["held_out"] and r["similarity"] < 0.8]
    assert [r["odor"] for r in below] == ["1-hexanol"]  # butyl acetate is 0.93 alike
    assert obj["acceptance"]["mean_correct_rate"] == rows["1-hexanol"]["correct_rate"]
    assert obj["summary"]["held_out_below_threshold"]["odors"] == ["1-hexanol"]
    assert "Pearson" in obj["similarity_definition"] and obj["episodes_per_distractor"] == 2
    assert "mean correct rate" in res.stdout


@pytest.mark.parametrize("which, flags, match", [
    ("approach", ["--distractor", "1-hexanol"], "--distractor needs a choice-task checkpoint"),
    ("approach", ["--choice-gradient"], "--choice-gradient needs a choice-task checkpoint"),
    ("choice", ["--distractor", "dragon breath"], "unknown odor"),
    ("choice", ["--distractor", "1-hexanl"], "close matches: 1-hexanol"),
    ("choice", ["--distractor", "isoamyl acetate"], "is the checkpoint's target odor"),
    ("choice", ["--odor", "1-hexanol"], "use --distractor"),
    ("choice", ["--choice-gradient", "--distractor", "1-hexanol"], "leave out --distractor"),
])
def test_bad_choice_flags_are_one_line_errors(cks, tmp_path, which, flags, match):
    o = tmp_path / "e"
    res = invoke("evaluate", cks[which], "--episodes", 1, "--steps", 5, "--device", "cpu", *flags, "--out", o)
    assert_one_line_error(res, contains=match, absent=[o])


def test_choice_arena_keeps_the_approach_arena_for_other_tasks():
    # the approach arena is untouched by the choice task: same episodes as before
    from dmn_neuro.environment.arena import OdorArena

    a = OdorArena(ArenaConfig())
    s = a.reset(3, torch.Generator().manual_seed(0))
    assert s.odor.shape == (3,) and s.conditions is None and a.concentration(s).shape == (3, 2)
    with pytest.raises(ConfigError, match="ChoiceConfig"):
        ChoiceArena(ArenaConfig(), choice=dataclasses.asdict(ChoiceConfig()))
    assert math.isfinite(ChoiceArena().success_radius)
