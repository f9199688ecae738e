"""The experiment file: a grid of named conditions x seeds over one base training config.

::

    name: headline
    base: ../configs/tiny.yaml        # a TrainingConfig YAML, relative to this file (default: TrainingConfig())
    set: {num_episodes: 300}          # overrides of every cell (nested or dotted keys)
    seeds: 5                          # 0..4, or a list [0, 7, 9]
    conditions:                       # name -> overrides (any config key)
      real: {}
      shuffled: {connectome.variant: {kind: shuffled}}   # variant seed: the cell's seed unless given
      no_apl: {connectome.variant: {kind: ablate, cell_types: [APL]}}
      energy_0.1: {loss.energy_weight: 0.1}
    evaluate:                         # after training, on the checkpoint named here
      episodes: 50                    # held-out episodes (evaluate_agent's stream, seed below)
      seed: 12345
      odor_removed: true              # also evaluate with the odor removed (control)
      checkpoint: last                # or best
    train:
      figure_episodes: 20             # as `dmn-neuro train --figure-episodes`

Overrides merge key by key into the base config (``connectome.variant`` is
replaced whole); the cell's ``seed`` is set last. Every cell's config is
validated when the file is read, so a bad condition fails before anything runs.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping

import yaml

from dmn_neuro.errors import ConfigError, DMNError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
TOP_KEYS = {"name", "base", "set", "seeds", "conditions", "evaluate", "train"}
EVAL_DEFAULTS = {"episodes": 50, "seed": 12345, "odor_removed": True, "checkpoint": "last"}
TRAIN_DEFAULTS = {"figure_episodes": 20}
MAX_SEEDS = 10_000


@dataclass
class Cell:
    """One training run of the grid."""

    condition: str
    seed: int
    config: Dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.condition}__seed{self.seed}"

    @property
    def run_dir(self) -> str:
        """Relative to the experiment directory."""
        return f"runs/{self.condition}/seed{self.seed}"

    @property
    def result_path(self) -> str:
        return f"results/{self.key}.json"


@dataclass
class ExperimentSpec:
    name: str
    conditions: Dict[str, Dict[str, Any]]
    seeds: List[int]
    base: Dict[str, Any]
    set: Dict[str, Any] = field(default_factory=dict)
    evaluate: Dict[str, Any] = field(default_factory=lambda: dict(EVAL_DEFAULTS))
    train: Dict[str, Any] = field(default_factory=lambda: dict(TRAIN_DEFAULTS))

    def cells(self) -> List[Cell]:
        return [Cell(c, s, cell_config(self.base, self.set, over, s, c)) for c, over in self.conditions.items()
                for s in self.seeds]

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "seeds": list(self.seeds), "conditions": copy.deepcopy(self.conditions),
                "set": copy.deepcopy(self.set), "evaluate": dict(self.evaluate), "train": dict(self.train)}


def _expand(over: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """Dotted keys (``loss.energy_weight``) -> nested mappings."""
    if not isinstance(over, Mapping):
        raise ConfigError(f"{where} must be a mapping of config keys to values, got {over!r}")
    out: Dict[str, Any] = {}
    for k, v in over.items():
        parts = str(k).split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: {k} conflicts with another key")
        node[parts[-1]] = _expand(v, where) if isinstance(v, Mapping) and parts[-1] != "variant" else v
    return out


def _deep_merge(base: Dict[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and k != "variant":
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def cell_config(base: Dict[str, Any], common: Mapping[str, Any], over: Mapping[str, Any], seed: int,
                condition: str = "?") -> Dict[str, Any]:
    """The validated config dict of one cell (see the module docstring)."""
    from dmn_neuro.training.config import TrainingConfig

    d = _deep_merge(_deep_merge(base, common), over)
    d["seed"] = int(seed)
    variant = (d.get("connectome") or {}).get("variant")
    given = (over.get("connectome") or {}).get("variant") or (common.get("connectome") or {}).get("variant")
    if isinstance(variant, Mapping) and variant.get("kind") in ("shuffled", "random") \
            and not (isinstance(given, Mapping) and "seed" in given):
        d["connectome"] = {**d["connectome"], "variant": {**variant, "seed": int(seed)}}
    try:
        return TrainingConfig.from_dict(d).to_dict()
    except DMNError as exc:
        raise ConfigError(f"condition {condition}: {exc}") from None


def _seeds(val: Any) -> List[int]:
    if isinstance(val, int) and not isinstance(val, bool):
        if not 1 <= val <= MAX_SEEDS:
            raise ConfigError(f"seeds must be 1..{MAX_SEEDS} or a list of seeds, got {val}")
        return list(range(val))
    if isinstance(val, list) and val and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63
                                             for s in val):
        if len(set(val)) != len(val):
            raise ConfigError(f"seeds repeat a seed: {val}")
        return list(val)
    raise ConfigError(f"seeds must be a count or a non-empty list of non-negative integers, got {val!r}")


def _section(d: Mapping[str, Any], key: str, defaults: Dict[str, Any]) -> Dict[str, Any]:
    val = d.get(key) or {}
    if not isinstance(val, Mapping):
        raise ConfigError(f"{key} must be a mapping, got {val!r}")
    unknown = sorted(set(val) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown key(s) in {key}: {', '.join(map(str, unknown))} (known: {', '.join(defaults)})")
    return {**defaults, **val}


def _check_evaluate(ev: Dict[str, Any]) -> None:
    n = ev["episodes"]
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 100_000:
        raise ConfigError(f"evaluate.episodes must be an integer in 0..100000, got {n!r}")
    s = ev["seed"]
    if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < 2**63:
        raise ConfigError(f"evaluate.seed must be a non-negative integer, got {s!r}")
    if not isinstance(ev["odor_removed"], bool):
        raise ConfigError(f"evaluate.odor_removed must be true or false, got {ev['odor_removed']!r}")
    if ev["checkpoint"] not in ("last", "best"):
        raise ConfigError(f"evaluate.checkpoint must be last or best, got {ev['checkpoint']!r}")


def load_spec(path) -> ExperimentSpec:
    """Read and validate an experiment file; every problem is a one-line ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"experiment file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return spec_from_dict(d, path.parent, default_name=path.stem)
    except ConfigError as exc:
        raise ConfigError(f"experiment file {path}: {exc}") from None


def spec_from_dict(d: Any, root: Path, default_name: str = "experiment") -> ExperimentSpec:
    from dmn_neuro.training.config import TrainingConfig

    if not isinstance(d, Mapping):
        raise ConfigError(f"must be a mapping with conditions and seeds, got {type(d).__name__}")
    unknown = sorted(str(k) for k in set(d) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(TOP_KEYS))})")
    name = str(d.get("name") or default_name)
    if "base" in d and d["base"] is not None:
        base_path = Path(str(d["base"]))
        base_path = base_path if base_path.is_absolute() else root / base_path
        base = TrainingConfig.from_yaml(base_path).to_dict()
    else:
        base = TrainingConfig().to_dict()
    conditions = d.get("conditions")
    if not isinstance(conditions, Mapping) or not conditions:
        raise ConfigError(f"conditions must be a non-empty mapping of names to config overrides, got {conditions!r}")
    conds: Dict[str, Dict[str, Any]] = {}
    for cname, over in conditions.items():
        cname = str(cname)
        if not NAME_RE.match(cname):
            raise ConfigError(f"condition name {cname!r} must be 1-64 letters, digits, _ . + -")
        conds[cname] = _expand(over or {}, f"condition {cname}")
    if "seeds" not in d:
        raise ConfigError("seeds missing (a count, or a list of seeds)")
    spec = ExperimentSpec(name=name, conditions=conds, seeds=_seeds(d["seeds"]), base=base,
                          set=_expand(d.get("set") or {}, "set"),
                          evaluate=_section(d, "evaluate", EVAL_DEFAULTS), train=_section(d, "train", TRAIN_DEFAULTS))
    _check_evaluate(spec.evaluate)
    fe = spec.train["figure_episodes"]
    if not isinstance(fe, int) or isinstance(fe, bool) or not 0 <= fe <= 10_000:
        raise ConfigError(f"train.figure_episodes must be an integer in 0..10000, got {fe!r}")
    spec.cells()  # validates every cell's config
    return spec


__all__ = ["Cell", "ExperimentSpec", "load_spec", "spec_from_dict", "cell_config"]
