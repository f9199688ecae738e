"""Training configuration: one validated dataclass per pipeline stage, loadable from YAML.

The sections mirror the stages of the design document::

    connectome:   ConnectomeConfig    which connectome and how to read it
    circuit:      CircuitConfig       neurons, surrogate gradient, projection gains, engine
    environment:  EnvironmentConfig   odor encoding, closed loop, arena (an ArenaConfig)
    loss:         LossConfig          the CombinedLoss weights
    optimisation: OptimisationConfig  optimiser, learning rate schedule, clipping, TBPTT

plus the run settings at the top level of :class:`TrainingConfig`
(``num_episodes``, ``episode_length_steps``, ``batch_size``, ``seed``,
``device``, ``checkpoint_every``, ``eval_episodes``).

YAML keys are the constructor arguments: a section is a nested mapping whose
keys are that section's fields. An unknown key is an error naming the key and
its section (no silent fallbacks); every section validates its own values
with a one-line :class:`~dmn_neuro.errors.ConfigError`.

Flat spellings. ``TrainingConfig(...)``, ``TrainingConfig.from_dict`` and
``TrainingConfig.replace`` also accept every field of every section as a flat
keyword (``TrainingConfig(learning_rate=1e-3, optimizer="adam",
energy_weight=0.1)``; field names are unique across sections) and the alias
``nav_weight`` for ``navigation_weight`` (the design document's spelling).
That flat form is the configuration format before the sections existed
(checkpoints written then, old YAML files); :func:`migrate_flat_config` turns it
into the nested form. One flat key keeps its old meaning: a flat ``arena``
mapping overrides the *old* ArenaConfig defaults (:data:`LEGACY_ARENA_DEFAULTS`),
as it did when it was written, whereas ``environment: {arena: {...}}``
overrides today's defaults (the arena the shipped models were trained with).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import yaml

from dmn_neuro.environment.arena import ArenaConfig
from dmn_neuro.environment.choice import TASKS, ChoiceConfig
from dmn_neuro.errors import ConfigError, DataError
from dmn_neuro.simulation import semantics
from dmn_neuro.simulation.neurons import DEFAULT_SURROGATE, DEFAULT_SURROGATE_SLOPE, SURROGATES

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")
ENCODINGS = ("rate", "poisson")
ENGINES = ("snntorch", "fused")

#: ArenaConfig defaults before they became the arena of the shipped model; a flat
#: (old-format) ``arena`` mapping is read on top of these, so old configs and
#: checkpoints keep the arena they were trained in.
LEGACY_ARENA_DEFAULTS = {"plume": "gaussian", "plume_d0_mm": 10.0, "motor_tau_ms": 50.0, "antenna_lateral_mm": 1.0}


# -- validation helpers ------------------------------------------------------------------
def _is_number(val: Any) -> bool:
    return isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val)


def _check_number(obj: Any, section: str, name: str, integer: bool = False, allow_zero: bool = False,
                  optional: bool = False, maximum: Optional[float] = None) -> None:
    val = getattr(obj, name)
    if optional and val is None:
        return
    ok = _is_number(val) and (val >= 0 if allow_zero else val > 0)
    if integer:
        ok = ok and float(val).is_integer()
    if not ok:
        kind = f"{'non-negative' if allow_zero else 'positive'} {'integer' if integer else 'number'}"
        raise ConfigError(f"config: {section}{name} must be a {kind}{' or null' if optional else ''}, got {val!r}")
    if maximum is not None and val > maximum:
        raise ConfigError(f"config: {section}{name} must be <= {maximum:,}, got {val!r}")
    if integer:
        setattr(obj, name, int(val))


def _check_choice(obj: Any, section: str, name: str, choices: Tuple[str, ...]) -> None:
    val = getattr(obj, name)
    if val not in choices:
        raise ConfigError(f"config: {section}{name} must be one of {choices}, got {val!r}")


def _check_bool(obj: Any, section: str, name: str) -> None:
    if not isinstance(getattr(obj, name), bool):
        raise ConfigError(f"config: {section}{name} must be true or false, got {getattr(obj, name)!r}")


def _check_mapping(obj: Any, section: str, name: str, optional: bool = False) -> None:
    val = getattr(obj, name)
    if optional and val is None:
        return
    if not isinstance(val, Mapping):
        raise ConfigError(f"config: {section}{name} must be a mapping{' or null' if optional else ''}, got {val!r}")
    setattr(obj, name, dict(val))


def _check_number_mapping(obj: Any, section: str, name: str, optional: bool = False) -> None:
    """A mapping of names (populations, projections) to finite numbers."""
    _check_mapping(obj, section, name, optional)
    val = getattr(obj, name)
    for k, v in (val or {}).items():
        if not _is_number(v):
            raise ConfigError(f"config: {section}{name}[{k!r}] must be a number, got {v!r}")


def _section_from_dict(cls, d: Any, section: str):
    """Build section ``cls`` from a mapping; unknown keys are named with their section."""
    if isinstance(d, cls):
        return d
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"config: {section} must be a mapping of keys to values, got {d!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(d) - known)
    if unknown:
        raise ConfigError(f"config: unknown key(s) in {section}: {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(known))})")
    return cls(**d)


def _subsection(cls, value: Any, name: str):
    """A dataclass inside a section (``environment.arena``), given as itself or as a mapping of its fields;
    its validation errors become one ``config: name: ...`` line."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"config: {name} must be a mapping of {cls.__name__} fields, got {value!r}")
    try:
        return _section_from_dict(cls, value, name)
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith("config:") else f"config: {msg}" if msg.startswith(name)
                          else f"config: {name}: {msg}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config: {name}: {exc}") from None


# -- sections ----------------------------------------------------------------------------
#: Upper bounds of the run settings: beyond them a run cannot fit this kind of
#: machine (the closed loop keeps T x B x neurons states), or a seed overflows torch.
LIMITS: Dict[str, int] = {"num_episodes": 10_000_000, "episode_length_steps": 1_000_000, "batch_size": 4096,
                          "eval_episodes": 100_000, "seed": 2**63 - 1}


@dataclass
class ConnectomeConfig:
    """Stage 1: which connectome (``dmn-neuro connectome sources``) and its reader options.

    ``source_options`` are the source's own (each source accepts different ones;
    ``connectome.sources.SOURCES[name].options``). ``None`` (the default) means
    the source's training defaults: ``{orn_per_glomerulus: 8, n_dn: 16}`` for
    the bundled and synthetic sources (the shipped models' circuit), none for
    codex and cave, which read the real ORNs and DNs. A mapping is used as
    given, so a config or checkpoint that spells its options out keeps its
    meaning. An option the source does not accept is an error here.

    ``variant`` rewires the connectome before the circuit is built
    (:mod:`connectome.variants`): ``None`` (the real wiring), or e.g.
    ``{kind: shuffled, seed: 3}``, ``{kind: random, seed: 3}``,
    ``{kind: ablate, cell_types: [APL], transmitters: ["MBON:gaba"]}``. It is
    stored in canonical form; checkpoint validation rebuilds the same variant.
    """

    source: str = "flywire_v783_mb"
    source_options: Optional[Dict[str, Any]] = None
    variant: Optional[Dict[str, Any]] = None

    def __post_init__(self) -> None:
        from connectome.sources import check_source_options

        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"config: connectome.source must be a non-empty string, got {self.source!r}")
        _check_mapping(self, "connectome.", "source_options", optional=True)
        try:
            check_source_options(self.source, self.source_options or {})
        except DataError as exc:
            raise ConfigError(f"config: connectome: {exc}") from None
        from connectome.variants import normalize_variant

        try:
            self.variant = normalize_variant(self.variant)
        except DataError as exc:
            raise ConfigError(f"config: {exc}") from None

    def resolved_source_options(self) -> Dict[str, Any]:
        """The options the circuit is built with: ``source_options``, or the source's training defaults."""
        from connectome.sources import training_options

        return training_options(self.source, self.source_options)


@dataclass
class CircuitConfig:
    """Stage 3: the differentiable circuit (DifferentiableOlfactoryCircuit.from_connectome arguments)."""

    dt_ms: float = semantics.DEFAULT_DT_MS
    surrogate: str = DEFAULT_SURROGATE
    surrogate_slope: float = DEFAULT_SURROGATE_SLOPE
    learnable_tau: bool = True
    learnable_threshold: bool = True
    projection_gains: Dict[str, float] = field(default_factory=dict)
    bias: Optional[Dict[str, float]] = None
    threshold_jitter: Optional[Dict[str, float]] = None
    engine: str = "fused"

    def __post_init__(self) -> None:
        s = "circuit."
        _check_number(self, s, "dt_ms")
        _check_choice(self, s, "surrogate", SURROGATES)
        _check_number(self, s, "surrogate_slope")
        _check_bool(self, s, "learnable_tau")
        _check_bool(self, s, "learnable_threshold")
        _check_number_mapping(self, s, "projection_gains")
        _check_number_mapping(self, s, "bias", optional=True)
        _check_number_mapping(self, s, "threshold_jitter", optional=True)
        _check_choice(self, s, "engine", ENGINES)


@dataclass
class EnvironmentConfig:
    """Odor input and closed loop: OdorEncoder, NavigationAgent and the arena.

    ``arena`` is an :class:`~dmn_neuro.environment.arena.ArenaConfig`; in YAML a
    mapping of its fields, each overriding ArenaConfig's default. ``odors``
    (empty = the encoder's full odor table) also becomes the arena's odor set
    unless ``arena.odors`` is given explicitly.

    Training distribution: the arena's odor set is the *training* set
    (:attr:`train_odors`); ``arena.held_out_odors`` declares odors kept for
    evaluation only (:attr:`held_out_odors`). Training and validation (model
    selection) episodes both come from the training arena, so they never see a
    held-out odor; an odor in both sets is a one-line ConfigError. Per-episode
    concentration, plume type, plume length and wind ranges are ArenaConfig
    fields (``concentration_range``, ``plumes``, ``plume_length_range_mm``,
    ``wind_speed_range``); all are off by default.

    Task: ``task: approach`` (default) reaches the one source of the arena;
    ``task: choice`` puts a target and a distractor source in the arena and
    rewards reaching the target (:mod:`dmn_neuro.environment.choice`), with
    ``choice`` a mapping of :class:`~dmn_neuro.environment.choice.ChoiceConfig`
    fields (target odor, training and held-out distractors, geometry). Then
    ``odors`` must stay empty (the encoder covers every odor) and
    :attr:`train_odors` / :attr:`held_out_odors` are the target + training
    distractors / the held-out distractors.
    """

    encoding: str = "poisson"
    current_per_hz: Optional[float] = None
    hill_k: Optional[float] = None
    adaptation_tau_ms: Optional[float] = None
    adaptation_floor: float = 0.01
    adaptation_level: float = 1.0
    contralateral_fraction: float = 0.0
    crossed_motor: bool = True
    odors: Tuple[str, ...] = ()
    arena: ArenaConfig = field(default_factory=ArenaConfig)
    task: str = "approach"
    choice: Optional[ChoiceConfig] = None

    def __post_init__(self) -> None:
        s = "environment."
        _check_choice(self, s, "encoding", ENCODINGS)
        _check_number(self, s, "current_per_hz", optional=True)
        _check_number(self, s, "hill_k", optional=True)
        _check_number(self, s, "adaptation_tau_ms", optional=True)
        _check_number(self, s, "adaptation_floor")
        _check_number(self, s, "adaptation_level")
        cf = self.contralateral_fraction
        if not (_is_number(cf) and 0.0 <= cf <= 0.5):
            raise ConfigError(f"config: environment.contralateral_fraction must be in [0, 0.5], got {cf!r}")
        _check_bool(self, s, "crossed_motor")
        if isinstance(self.odors, str):
            self.odors = (self.odors,)
        if not isinstance(self.odors, (list, tuple)):
            raise ConfigError(f"config: environment.odors must be a list of odor names, got {self.odors!r}")
        self.odors = tuple(str(o) for o in self.odors)
        self.arena = _subsection(ArenaConfig, self.arena, "environment.arena")
        if self.arena.held_out_odors:
            try:  # the effective training set may come from ``odors``
                self.arena_config()
            except ConfigError as exc:
                raise ConfigError(f"config: environment: {exc}") from None
        self._check_task()

    def _check_task(self) -> None:
        _check_choice(self, "environment.", "task", TASKS)
        if self.task == "approach":
            if self.choice is not None:
                raise ConfigError("config: environment.choice is only used with environment.task: choice")
            return
        if self.odors:
            raise ConfigError("config: environment.odors must be empty for task: choice (the encoder covers every "
                              "odor; the target and distractors are declared in environment.choice)")
        self.choice = _subsection(ChoiceConfig, {} if self.choice is None else self.choice, "environment.choice")
        try:
            self.choice.check_arena(self.arena)
        except ConfigError as exc:
            raise ConfigError(f"config: {exc}") from None

    @property
    def train_odors(self) -> Tuple[str, ...]:
        """The odors training (and validation) episodes draw from (choice: the target and the distractors)."""
        if self.task == "choice":
            return (self.choice.target_odor, *self.choice.distractors)
        return tuple(self.arena_config().odors)

    @property
    def held_out_odors(self) -> Tuple[str, ...]:
        """Declared held-out odors (choice: held-out distractors; empty when none are declared)."""
        if self.task == "choice":
            return tuple(self.choice.held_out_distractors)
        return tuple(self.arena.held_out_odors)

    def arena_config(self) -> ArenaConfig:
        """The arena to build: ``arena`` with ``odors`` filled in when the arena names none explicitly."""
        if self.odors and self.arena.odors == ArenaConfig.odors:
            return dataclasses.replace(self.arena, odors=tuple(self.odors))
        return self.arena


@dataclass
class LossConfig:
    """Stage 4 loss: the :class:`~dmn_neuro.training.loss_functions.CombinedLoss` arguments."""

    navigation_weight: float = 1.0
    energy_weight: float = 0.01
    sparsity_weight: float = 0.1
    activity_weight: float = 0.01
    kc_sparsity_target: float = 0.02
    log_distance_weight: float = 0.0

    def __post_init__(self) -> None:
        for w in ("navigation_weight", "energy_weight", "sparsity_weight", "activity_weight", "log_distance_weight"):
            _check_number(self, "loss.", w, allow_zero=True)
        _check_number(self, "loss.", "kc_sparsity_target")


@dataclass
class OptimisationConfig:
    """Stage 4 optimiser: BPTT updates (see :class:`~dmn_neuro.training.optimizer.DMNTrainer`)."""

    learning_rate: float = 3e-3
    optimizer: str = "adam"
    lr_schedule: str = "constant"
    lr_final_fraction: float = 0.1
    grad_clip: Optional[float] = 1.0
    tbptt_window: Optional[int] = None

    def __post_init__(self) -> None:
        s = "optimisation."
        _check_number(self, s, "learning_rate")
        _check_choice(self, s, "optimizer", OPTIMIZERS)
        _check_choice(self, s, "lr_schedule", LR_SCHEDULES)
        f = self.lr_final_fraction
        if not (_is_number(f) and 0 < f <= 1):
            raise ConfigError(f"config: optimisation.lr_final_fraction must be in (0, 1], got {f!r}")
        _check_number(self, s, "grad_clip", optional=True)
        _check_number(self, s, "tbptt_window", integer=True, optional=True)


@dataclass
class DeploymentConfig:
    """After training: make the model deployable on Loihi 2 as part of the run.

    With ``loihi: true`` the run fine-tunes its best checkpoint with fake
    quantisation for ``qat_episodes`` episodes, snaps it onto the fixed-point
    grid (``weight_bits``-bit weights; :mod:`dmn_neuro.training.qat`), saves it
    as ``checkpoints/loihi`` and reports held-out success of the float model and
    of the fixed-point emulator on ``check_episodes`` episodes.
    ``clip_weight_thresholds`` first clips weights to that many postsynaptic
    thresholds (:func:`dmn_neuro.training.qat.clip_weights`; None: no clipping).
    """

    loihi: bool = False
    qat_episodes: int = 20
    weight_bits: int = 8
    check_episodes: int = 50
    clip_weight_thresholds: Optional[float] = None

    def __post_init__(self) -> None:
        s = "deployment."
        _check_bool(self, s, "loihi")
        _check_number(self, s, "qat_episodes", integer=True, allow_zero=True, maximum=1_000_000)
        _check_number(self, s, "check_episodes", integer=True, allow_zero=True, maximum=100_000)
        if not (_is_number(self.weight_bits) and float(self.weight_bits).is_integer() and 2 <= self.weight_bits <= 8):
            raise ConfigError(f"config: deployment.weight_bits must be an integer in 2..8, got {self.weight_bits!r}")
        self.weight_bits = int(self.weight_bits)
        c = self.clip_weight_thresholds
        if c is not None:
            if not (_is_number(c) and math.isfinite(c) and c > 0):
                raise ConfigError(f"config: deployment.clip_weight_thresholds must be a number > 0 or null, got {c!r}")
            self.clip_weight_thresholds = float(c)


SECTIONS: Dict[str, type] = {
    "connectome": ConnectomeConfig, "circuit": CircuitConfig, "environment": EnvironmentConfig,
    "loss": LossConfig, "optimisation": OptimisationConfig, "deployment": DeploymentConfig,
}
#: Run settings at the top level of TrainingConfig.
RUN_FIELDS = ("num_episodes", "episode_length_steps", "batch_size", "seed", "device", "checkpoint_every",
              "eval_episodes")
#: Flat (pre-section) key -> its section; every section field has exactly one.
FLAT_KEYS: Dict[str, str] = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
#: Other accepted flat spellings -> field name.
ALIASES = {"nav_weight": "navigation_weight"}


def _plain(value: Any) -> Any:
    """Tuples -> lists, dataclasses -> dicts, recursively (YAML/JSON-safe)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def migrate_flat_config(d: Mapping[str, Any]) -> Dict[str, Any]:
    """Flat (pre-section) config -> nested config dict; the one place the old format is read.

    Accepts the flat ``TrainingConfig`` dict stored in checkpoints and YAML files
    written before the sections existed (and the flat keyword spellings, which
    may be mixed with section mappings). Run settings stay at the top level,
    every other flat key moves into its section, ``nav_weight`` becomes
    ``loss.navigation_weight``, and a flat ``arena`` mapping is completed with
    :data:`LEGACY_ARENA_DEFAULTS` so it keeps the arena it meant when written.
    Unknown keys are all named in one :class:`ConfigError`; a value given both
    flat and in its section is an error too. Values are not validated here.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"config must be a mapping of keys to values, got {type(d).__name__}")
    out: Dict[str, Any] = {}
    sections: Dict[str, Dict[str, Any]] = {}
    flat_from: Dict[Tuple[str, str], str] = {}
    unknown = []
    for key, value in d.items():
        if key in SECTIONS:
            if isinstance(value, Mapping):
                for k, v in value.items():
                    if (key, k) in flat_from:
                        raise ConfigError(f"config: {key}.{k} given twice (also as flat key {flat_from[key, k]})")
                    sections.setdefault(key, {})[k] = v
                    flat_from[key, k] = f"{key}.{k}"
            else:
                out[key] = value  # a section object, or a bad value the section reports
        elif key in RUN_FIELDS:
            out[key] = value
        elif key in FLAT_KEYS or key in ALIASES:
            name = ALIASES.get(key, key)
            section = FLAT_KEYS[name]
            if (section, name) in flat_from or (section in out and not isinstance(out[section], Mapping)):
                raise ConfigError(f"config: {section}.{name} given twice ({key} and "
                                  f"{flat_from.get((section, name), section)})")
            if name == "arena" and isinstance(value, Mapping):
                value = {**LEGACY_ARENA_DEFAULTS, **value}
            sections.setdefault(section, {})[name] = value
            flat_from[section, name] = key
        else:
            unknown.append(str(key))
    if unknown:
        raise ConfigError(f"config: unknown key(s) {', '.join(sorted(unknown))}")
    for name, values in sections.items():
        out[name] = values
    return out


def _merge(base: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Nested dicts: ``overrides`` replaces values of ``base`` key by key (section mappings merge
    one level deep; ``environment.arena`` is replaced whole, as any other value)."""
    out = dict(base)
    for k, v in overrides.items():
        if k in SECTIONS and isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


# -- the whole run -----------------------------------------------------------------------
@dataclass(init=False)
class TrainingConfig:
    """Everything a training run needs; saved verbatim in every checkpoint.

    Episode semantics: one *training episode* is one optimiser step on a batch
    of ``batch_size`` simulated arena episodes of ``episode_length_steps``.

    Construct with sections (instances or mappings) and run settings, and/or
    with flat keywords for any section field (see the module docstring)::

        TrainingConfig(learning_rate=0.001, optimizer="adam", num_episodes=100,
                       episode_length_steps=5000, nav_weight=1.0, energy_weight=0.1)
        TrainingConfig(optimisation={"learning_rate": 0.001}, loss=LossConfig(energy_weight=0.1))

    Section fields can also be read flat (``config.learning_rate`` is
    ``config.optimisation.learning_rate``); the flat ``config.arena`` is the
    arena as a plain dict (``config.environment.arena`` is the ArenaConfig).
    """

    num_episodes: int = 100
    episode_length_steps: int = 5000
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 10
    eval_episodes: int = 0
    connectome: ConnectomeConfig = field(default_factory=ConnectomeConfig)
    circuit: CircuitConfig = field(default_factory=CircuitConfig)
    environment: EnvironmentConfig = field(default_factory=EnvironmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimisation: OptimisationConfig = field(default_factory=OptimisationConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)

    def __init__(self, **kwargs: Any) -> None:
        nested = migrate_flat_config(kwargs)
        for f in dataclasses.fields(self):
            if f.name in SECTIONS:
                setattr(self, f.name, _section_from_dict(SECTIONS[f.name], nested.get(f.name), f.name))
            else:
                setattr(self, f.name, nested.get(f.name, f.default))
        self._validate()

    def _validate(self) -> None:
        _check_number(self, "", "num_episodes", integer=True, allow_zero=True, maximum=LIMITS["num_episodes"])
        _check_number(self, "", "episode_length_steps", integer=True, maximum=LIMITS["episode_length_steps"])
        _check_number(self, "", "batch_size", integer=True, maximum=LIMITS["batch_size"])
        _check_number(self, "", "checkpoint_every", integer=True)
        _check_number(self, "", "eval_episodes", integer=True, allow_zero=True, maximum=LIMITS["eval_episodes"])
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= LIMITS["seed"]:
            raise ConfigError(f"config: seed must be an integer in 0..2**63-1, got {self.seed!r}")
        _check_choice(self, "", "device", DEVICES)

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not attributes: flat reads of section fields.
        section = FLAT_KEYS.get(ALIASES.get(name, name))
        obj = self.__dict__.get(section) if section is not None else None
        if obj is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = getattr(obj, ALIASES.get(name, name))
        return _plain(value) if name == "arena" else value

    def to_dict(self) -> Dict[str, Any]:
        """Nested, YAML/JSON-safe dict; ``from_dict`` of it gives an equal config."""
        return _plain(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainingConfig":
        """From a nested dict, an old flat dict (checkpoints before the sections) or a mix."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"config must be a mapping of keys to values, got {type(d).__name__}")
        try:
            return cls(**{str(k): v for k, v in d.items()})
        except TypeError as exc:
            raise ConfigError(f"config: {exc}") from None

    @classmethod
    def from_yaml(cls, path) -> "TrainingConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"config file {path} must be a mapping of keys to values, got {type(data).__name__}")
        return cls.from_dict(data)

    def with_values(self, **overrides: Any) -> "TrainingConfig":
        """A copy with ``overrides`` (flat or section spellings) applied, ``None`` included."""
        return TrainingConfig.from_dict(_merge(self.to_dict(), migrate_flat_config(overrides)))

    def replace(self, **overrides: Any) -> "TrainingConfig":
        """Like :meth:`with_values`, but ``None`` means "not overridden" (command-line options)."""
        return self.with_values(**{k: v for k, v in overrides.items() if v is not None})


def resolve_device(name: str):
    """'auto' -> cuda if available else cpu; 'cuda' without CUDA -> one-line error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available (use --device auto or cpu)")
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {DEVICES}, got {name!r}")
    return torch.device(name)
