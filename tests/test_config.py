"""Nested TrainingConfig: sections, YAML round trip, migration of the old flat
format (old YAML files, checkpoints written before the sections), the design
document's flat spellings, and one default arena."""
from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from dmn_neuro.environment.arena import ArenaConfig
from dmn_neuro.errors import ConfigError
from dmn_neuro.training.config import (
    ALIASES, FLAT_KEYS, LEGACY_ARENA_DEFAULTS, RUN_FIELDS, SECTIONS, CircuitConfig, ConnectomeConfig,
    EnvironmentConfig, LossConfig, OptimisationConfig, TrainingConfig, migrate_flat_config,
)

from _helpers import REPO

CONFIGS = sorted((REPO / "examples" / "configs").glob("*.yaml"))
#: The shipped navigators saved with the flat config (the choice and body models, newer, have the nested one).
PRETRAINED = [REPO / "examples" / "pretrained" / name / "checkpoint.json"
              for name in ("flywire_mb_navigator", "flywire_mb_navigator_loihi")]

#: A complete config in the flat format checkpoints were written in before the sections.
FLAT = {
    "learning_rate": 0.005, "optimizer": "adamw", "lr_schedule": "cosine", "lr_final_fraction": 0.2,
    "num_episodes": 7, "episode_length_steps": 50, "batch_size": 3, "grad_clip": None, "tbptt_window": 20,
    "seed": 4, "device": "cpu", "engine": "snntorch", "checkpoint_every": 2, "dt_ms": 2.0,
    "surrogate": "fast_sigmoid", "surrogate_slope": 4.0, "learnable_tau": False, "learnable_threshold": True,
    "source": "synthetic", "source_options": {"n_dn": 8}, "variant": None, "projection_gains": {"ORN->PN": 3.0},
    "encoding": "rate", "current_per_hz": 0.5, "hill_k": 2.0, "contralateral_fraction": 0.1,
    "crossed_motor": False, "bias": {"DN": 0.5}, "threshold_jitter": {"DN": 0.3}, "odors": ["1-hexanol"],
    "arena": {"speed_gain": 0.015}, "navigation_weight": 2.0, "energy_weight": 0.02, "sparsity_weight": 0.3,
    "activity_weight": 0.04, "kc_sparsity_target": 0.05, "eval_episodes": 5,
}
NESTED = {
    "num_episodes": 7, "episode_length_steps": 50, "batch_size": 3, "seed": 4, "device": "cpu",
    "checkpoint_every": 2, "eval_episodes": 5,
    "connectome": {"source": "synthetic", "source_options": {"n_dn": 8}, "variant": None},
    "circuit": {"dt_ms": 2.0, "surrogate": "fast_sigmoid", "surrogate_slope": 4.0, "learnable_tau": False,
                "learnable_threshold": True, "projection_gains": {"ORN->PN": 3.0}, "bias": {"DN": 0.5},
                "threshold_jitter": {"DN": 0.3}, "engine": "snntorch"},
    "environment": {"encoding": "rate", "current_per_hz": 0.5, "hill_k": 2.0, "contralateral_fraction": 0.1,
                    "crossed_motor": False, "odors": ["1-hexanol"],
                    "arena": {**LEGACY_ARENA_DEFAULTS, "speed_gain": 0.015}},
    "loss": {"navigation_weight": 2.0, "energy_weight": 0.02, "sparsity_weight": 0.3, "activity_weight": 0.04,
             "kc_sparsity_target": 0.05},
    "optimisation": {"learning_rate": 0.005, "optimizer": "adamw", "lr_schedule": "cosine",
                     "lr_final_fraction": 0.2, "grad_clip": None, "tbptt_window": 20},
}


#: Section fields that came after the flat configs (no old file can hold them).
NEWER_KEYS = {"variant", "loihi", "qat_episodes", "weight_bits", "check_episodes", "adaptation_tau_ms",
              "adaptation_floor", "adaptation_level", "task", "choice", "clip_weight_thresholds",
              "log_distance_weight"}


def test_every_old_flat_key_has_one_section():
    assert set(FLAT) | NEWER_KEYS == set(FLAT_KEYS) | set(RUN_FIELDS)
    assert not set(FLAT_KEYS) & set(RUN_FIELDS)
    assert set(SECTIONS) == {"connectome", "circuit", "environment", "loss", "optimisation", "deployment"}


def test_flat_dict_migrates_to_the_nested_config():
    assert migrate_flat_config(FLAT) == NESTED
    cfg = TrainingConfig.from_dict(FLAT)
    assert cfg == TrainingConfig.from_dict(NESTED)
    assert cfg.optimisation == OptimisationConfig(learning_rate=0.005, optimizer="adamw", lr_schedule="cosine",
                                                  lr_final_fraction=0.2, grad_clip=None, tbptt_window=20)
    assert cfg.environment.arena == ArenaConfig(**LEGACY_ARENA_DEFAULTS, speed_gain=0.015)
    # flat reads still work for code written against the flat config
    assert cfg.learning_rate == 0.005 and cfg.dt_ms == 2.0 and cfg.odors == ("1-hexanol",)
    assert ArenaConfig(**cfg.arena) == cfg.environment.arena
    with pytest.raises(AttributeError):
        cfg.learnin_rate  # noqa: B018


def test_nested_yaml_round_trip(tmp_path):
    cfg = TrainingConfig.from_dict(NESTED)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    text = yaml.safe_load(p.read_text())
    assert set(text) == set(RUN_FIELDS) | set(SECTIONS)
    assert set(text["environment"]["arena"]) == {f.name for f in dataclasses.fields(ArenaConfig)}
    assert TrainingConfig.from_yaml(p) == cfg
    assert TrainingConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # a partial section keeps the defaults of the rest
    partial = TrainingConfig.from_dict({"optimisation": {"learning_rate": 0.1}, "environment": {"arena": {"speed_gain": 0.1}}})
    assert partial.optimisation == OptimisationConfig(learning_rate=0.1)
    assert partial.environment.arena == ArenaConfig(speed_gain=0.1)
    assert partial.loss == LossConfig() and partial.circuit == CircuitConfig()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_configs_are_nested(path):
    d = yaml.safe_load(path.read_text())
    assert set(d) <= set(RUN_FIELDS) | set(SECTIONS), "example configs use the sectioned form"
    TrainingConfig.from_dict(d)


@pytest.mark.parametrize("meta_path", PRETRAINED, ids=[p.parent.name for p in PRETRAINED])
def test_shipped_flat_checkpoint_configs_load_with_the_default_arena(meta_path):
    flat = json.loads(meta_path.read_text())["config"]
    assert "learning_rate" in flat, "the shipped checkpoints keep the flat (format 1) config"
    cfg = TrainingConfig.from_dict(flat)
    # one default arena: the one the shipped models were trained in
    assert cfg.environment.arena == ArenaConfig()
    # both were made with finetune2.yaml (the Loihi one then by `dmn-neuro quantize`, on the CPU)
    assert cfg.replace(device="auto") == TrainingConfig.from_yaml(REPO / "examples" / "configs" / "finetune2.yaml")


def test_design_document_spellings():
    cfg = TrainingConfig(learning_rate=0.001, optimizer="adam", num_episodes=100, episode_length_steps=5000,
                         nav_weight=1.0, energy_weight=0.1)
    assert cfg.optimisation.learning_rate == 0.001 and cfg.num_episodes == 100
    assert cfg.loss.navigation_weight == 1.0 and cfg.loss.energy_weight == 0.1
    assert cfg == TrainingConfig(optimisation={"learning_rate": 0.001}, loss=LossConfig(energy_weight=0.1),
                                 num_episodes=100, episode_length_steps=5000)
    assert ALIASES == {"nav_weight": "navigation_weight"}
    assert cfg.nav_weight == 1.0
    # sections as instances
    c2 = TrainingConfig(connectome=ConnectomeConfig(source="synthetic"), environment=EnvironmentConfig(encoding="rate"))
    assert c2.connectome.source == "synthetic" and c2.environment.encoding == "rate"


def test_replace_and_with_values():
    cfg = TrainingConfig()
    r = cfg.replace(learning_rate=0.5, seed=None, engine="snntorch")
    assert r.optimisation.learning_rate == 0.5 and r.seed == cfg.seed and r.circuit.engine == "snntorch"
    assert r.circuit.dt_ms == cfg.circuit.dt_ms
    assert cfg.with_values(grad_clip=None).optimisation.grad_clip is None
    assert cfg.replace(loss={"energy_weight": 0.5}).loss == LossConfig(energy_weight=0.5)


@pytest.mark.parametrize("bad, match", [
    ({"optimisation": {"learnin_rate": 0.1}}, r"unknown key\(s\) in optimisation: learnin_rate"),
    ({"circuit": {"dt": 1.0}}, r"in circuit: dt\b"),
    ({"environment": {"arena": {"speed_gainn": 0.1}}}, r"in environment\.arena: speed_gainn"),
    ({"loss": {"nav_weight": 1.0}}, r"in loss: nav_weight"),
    ({"connectome": {"sorce": "x"}}, r"in connectome: sorce"),
    ({"optimisation": {"learning_rate": -1}}, r"optimisation\.learning_rate must be a positive number"),
    ({"circuit": {"engine": "jax"}}, r"circuit\.engine must be one of"),
    ({"environment": {"contralateral_fraction": 0.9}}, r"environment\.contralateral_fraction must be in \[0, 0\.5\]"),
    ({"environment": {"arena": {"plume": "smoke"}}}, r"environment\.arena: ArenaConfig\.plume"),
    ({"loss": {"kc_sparsity_target": 0}}, r"loss\.kc_sparsity_target"),
    ({"circuit": {"learnable_tau": "yes"}}, r"circuit\.learnable_tau must be true or false"),
    ({"circuit": {"bias": {"DN": "high"}}}, r"circuit\.bias\['DN'\] must be a number"),
    ({"optimisation": 5}, r"optimisation must be a mapping"),
    ({"learning_rate": 0.1, "optimisation": {"learning_rate": 0.2}}, "given twice"),
    ({"nav_weight": 1.0, "navigation_weight": 2.0}, "given twice"),
])
def test_section_errors_are_one_line_and_name_the_section(bad, match):
    with pytest.raises(ConfigError, match=match) as exc:
        TrainingConfig.from_dict(bad)
    assert "\n" not in str(exc.value)


def test_sections_validate_on_their_own():
    with pytest.raises(ConfigError, match="circuit.dt_ms"):
        CircuitConfig(dt_ms=0)
    with pytest.raises(ConfigError, match="optimisation.optimizer"):
        OptimisationConfig(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="loss.energy_weight"):
        LossConfig(energy_weight=-1)
    with pytest.raises(ConfigError, match="loss.log_distance_weight"):
        LossConfig(log_distance_weight=-0.5)
    assert EnvironmentConfig(arena={"speed_gain": 0.1}).arena == ArenaConfig(speed_gain=0.1)


def test_odors_fill_the_arena_unless_it_names_its_own():
    env = EnvironmentConfig(odors=["1-hexanol", "ethyl acetate"])
    assert env.arena_config().odors == ("1-hexanol", "ethyl acetate")
    own = EnvironmentConfig(odors=["1-hexanol", "ethyl acetate"], arena={"odors": ["1-hexanol"]})
    assert own.arena_config().odors == ("1-hexanol",)
    assert EnvironmentConfig().arena_config() == ArenaConfig()


# -- connectome.source_options: per source ---------------------------------------------
def test_source_options_default_to_each_sources_training_defaults():
    assert ConnectomeConfig().source_options is None
    assert ConnectomeConfig().resolved_source_options() == {"orn_per_glomerulus": 8, "n_dn": 16}
    for source in ("hemibrain_v1.2.1_mb", "synthetic"):
        assert ConnectomeConfig(source=source).resolved_source_options() == {"orn_per_glomerulus": 8, "n_dn": 16}
    assert ConnectomeConfig(source="cave").resolved_source_options() == {}
    assert ConnectomeConfig(source="codex:/data/codex").resolved_source_options() == {}
    # what `train --source X` does to the default config
    for source in ("cave", "codex:/data/codex", "synthetic", "hemibrain_v1.2.1_mb"):
        cfg = TrainingConfig().replace(source=source)
        assert cfg.connectome.source == source and cfg.connectome.source_options is None
    # None survives the YAML / checkpoint round trip
    cfg = TrainingConfig().replace(source="cave")
    assert TrainingConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("meta_path", PRETRAINED, ids=[p.parent.name for p in PRETRAINED])
def test_explicit_source_options_keep_their_meaning(meta_path):
    flat = json.loads(meta_path.read_text())["config"]
    assert flat["source"] == "flywire_v783_mb" and flat["source_options"] == {"orn_per_glomerulus": 8, "n_dn": 16}
    cfg = TrainingConfig.from_dict(flat)
    assert cfg.connectome.resolved_source_options() == {"orn_per_glomerulus": 8, "n_dn": 16}
    # an explicit mapping is used as given: tiny.yaml's ORNs without the default DN count
    tiny = TrainingConfig.from_yaml(REPO / "examples" / "configs" / "tiny.yaml")
    assert tiny.connectome.resolved_source_options() == {"orn_per_glomerulus": 8}
    assert ConnectomeConfig(source="synthetic", source_options={}).resolved_source_options() == {}


@pytest.mark.parametrize("kwargs, match", [
    ({"source": "cave", "source_options": {"n_dn": 16}},
     r"^config: connectome: source cave: unknown option 'n_dn'; accepted: all_alpn, batch_size, .*side$"),
    ({"source": "codex:/d", "source_options": {"orn_per_glomerulus": 8}},
     r"^config: connectome: source codex: unknown option 'orn_per_glomerulus'; accepted: all_alpn, "),
    ({"source_options": {"bogus": 1}},
     r"^config: connectome: source flywire_v783_mb: unknown option 'bogus'; accepted: data_dir, dn_synapses, "),
    ({"source": "flywire"}, r"^config: connectome: unknown source 'flywire'"),
    ({"source_options": [1]}, r"connectome\.source_options must be a mapping or null"),
])
def test_source_options_are_checked_at_config_time(kwargs, match):
    with pytest.raises(ConfigError, match=match) as exc:
        ConnectomeConfig(**kwargs)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match=match):
        TrainingConfig(connectome=kwargs)


# -- training distribution and held-out odors ---------------------------------------------
def test_training_and_held_out_odors_are_recorded_in_the_config():
    cfg = TrainingConfig(environment={"arena": {"odors": ["isopentyl acetate", "ethyl acetate"],
                                                "held_out_odors": ["1-hexanol"], "concentration_range": [0.25, 4.0],
                                                "plumes": ["gaussian", "exponential"],
                                                "plume_length_range_mm": [10, 20], "wind_speed_range": [0, 5]}})
    env = cfg.environment
    assert env.train_odors == ("isopentyl acetate", "ethyl acetate") and env.held_out_odors == ("1-hexanol",)
    d = cfg.to_dict()
    assert d["environment"]["arena"]["held_out_odors"] == ["1-hexanol"]
    again = TrainingConfig.from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d and again.environment.arena.concentration_range == (0.25, 4.0)


def test_defaults_declare_no_held_out_odors_and_no_distribution():
    env = TrainingConfig().environment
    assert env.train_odors == ("isopentyl acetate",) and env.held_out_odors == ()
    assert not env.arena.randomised


@pytest.mark.parametrize("environment", [
    {"arena": {"odors": ["ethyl acetate"], "held_out_odors": ["Ethyl Acetate"]}},
    {"odors": ["ethyl acetate", "1-hexanol"], "arena": {"held_out_odors": ["1-hexanol"]}},  # training set from odors
])
def test_an_odor_both_trained_and_held_out_is_a_one_line_error(environment):
    with pytest.raises(ConfigError, match="both a training odor") as exc:
        TrainingConfig(environment=environment)
    assert "\n" not in str(exc.value) and str(exc.value).startswith("config: environment")


def test_generalise_example_declares_a_stratified_third_held_out():
    """examples/configs/generalise.yaml holds out exactly the documented, seeded split."""
    from dmn_neuro.environment.odors import held_out_split, well_driving_odors

    cfg = TrainingConfig.from_yaml(REPO / "examples" / "configs" / "generalise.yaml")
    split = held_out_split(seed=0)
    env = cfg.environment
    assert list(env.train_odors) == split["train"] and list(env.held_out_odors) == split["held_out"]
    assert len(env.held_out_odors) >= len(well_driving_odors()) / 3
    assert "isopentyl acetate" in env.train_odors and env.arena.randomised
