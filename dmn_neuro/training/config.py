"""Training configuration: one validated dataclass, loadable from YAML.

Config keys mirror constructor arguments; an unknown key is an error that
names it (no silent fallbacks).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import yaml

from dmn_neuro.simulation import semantics
from dmn_neuro.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
#: Arena settings the shipped model was trained with (overrides of ArenaConfig's
#: defaults): exponential plume (constant bilateral contrast, sharp peak at the
#: source), smoothed motor command, model-scale antennae 3 mm apart.
DEFAULT_ARENA = {"plume": "exponential", "plume_d0_mm": 15.0, "motor_tau_ms": 100.0, "antenna_lateral_mm": 1.5}
DEVICES = ("auto", "cpu", "cuda")
ENCODINGS = ("rate", "poisson")


@dataclass
class TrainingConfig:
    """Everything a training run needs; saved verbatim in every checkpoint.

    Episode semantics: one *training episode* is one optimiser step on a batch
    of ``batch_size`` simulated arena episodes of ``episode_length_steps``.
    """

    # optimisation
    learning_rate: float = 3e-3
    optimizer: str = "adam"
    lr_schedule: str = "constant"
    lr_final_fraction: float = 0.1
    num_episodes: int = 100
    episode_length_steps: int = 5000
    batch_size: int = 8
    grad_clip: Optional[float] = 1.0
    tbptt_window: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    engine: str = "fused"
    checkpoint_every: int = 10
    # neurons and circuit
    dt_ms: float = semantics.DEFAULT_DT_MS
    surrogate: str = "fast_sigmoid"
    surrogate_slope: float = 5.0
    learnable_tau: bool = True
    learnable_threshold: bool = True
    source: str = "flywire_v783_mb"
    source_options: Dict[str, Any] = field(default_factory=lambda: {"orn_per_glomerulus": 8, "n_dn": 16})
    projection_gains: Dict[str, float] = field(default_factory=dict)
    # sensory input and agent
    encoding: str = "poisson"
    current_per_hz: Optional[float] = None
    hill_k: Optional[float] = None
    contralateral_fraction: float = 0.0
    crossed_motor: bool = True
    bias: Optional[Dict[str, float]] = None
    threshold_jitter: Optional[Dict[str, float]] = None
    odors: Tuple[str, ...] = ()
    arena: Dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ARENA))
    # loss weights (CombinedLoss)
    navigation_weight: float = 1.0
    energy_weight: float = 0.01
    sparsity_weight: float = 0.1
    activity_weight: float = 0.01
    kc_sparsity_target: float = 0.02
    # validation during training (model selection for checkpoints/best)
    eval_episodes: int = 0

    def __post_init__(self) -> None:
        def positive(name: str, integer: bool = False, allow_zero: bool = False) -> None:
            val = getattr(self, name)
            ok = isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val)
            ok = ok and (val >= 0 if allow_zero else val > 0)
            if integer:
                ok = ok and float(val).is_integer()
            if not ok:
                raise ConfigError(f"config: {name} must be a {'non-negative' if allow_zero else 'positive'} {'integer' if integer else 'number'}, got {val!r}")

        positive("learning_rate")
        positive("num_episodes", integer=True, allow_zero=True)
        positive("episode_length_steps", integer=True)
        positive("batch_size", integer=True)
        positive("checkpoint_every", integer=True)
        positive("dt_ms")
        positive("surrogate_slope")
        positive("kc_sparsity_target")
        positive("eval_episodes", integer=True, allow_zero=True)
        for w in ("navigation_weight", "energy_weight", "sparsity_weight", "activity_weight"):
            positive(w, allow_zero=True)
        if self.grad_clip is not None:
            positive("grad_clip")
        if self.tbptt_window is not None:
            positive("tbptt_window", integer=True)
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"config: lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not (isinstance(self.lr_final_fraction, (int, float)) and 0 < self.lr_final_fraction <= 1):
            raise ConfigError(f"config: lr_final_fraction must be in (0, 1], got {self.lr_final_fraction!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"config: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"config: device must be one of {DEVICES}, got {self.device!r}")
        if self.engine not in ("snntorch", "fused"):
            raise ConfigError(f"config: engine must be 'snntorch' or 'fused', got {self.engine!r}")
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"config: encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.hill_k is not None:
            positive("hill_k")
        if self.current_per_hz is not None:
            positive("current_per_hz")
        try:
            cf = float(self.contralateral_fraction)
        except (TypeError, ValueError):
            cf = math.nan
        if not 0.0 <= cf <= 0.5:
            raise ConfigError(f"config: contralateral_fraction must be in [0, 0.5], got {self.contralateral_fraction!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"config: seed must be an integer, got {self.seed!r}")
        for name in ("source_options", "projection_gains", "arena"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"config: {name} must be a mapping, got {getattr(self, name)!r}")
        from dmn_neuro.environment.arena import ArenaConfig

        unknown = sorted(set(self.arena) - {f.name for f in dataclasses.fields(ArenaConfig)})
        if unknown:
            raise ConfigError(f"config: unknown arena key(s) {', '.join(map(str, unknown))}")
        self.odors = tuple(str(o) for o in self.odors)
        self.num_episodes = int(self.num_episodes)
        self.episode_length_steps = int(self.episode_length_steps)
        self.batch_size = int(self.batch_size)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["odors"] = list(self.odors)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainingConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a mapping of keys to values, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"config: unknown key(s) {', '.join(unknown)}")
        try:
            return cls(**d)
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
        return cls.from_dict(data)

    def replace(self, **overrides: Any) -> "TrainingConfig":
        d = self.to_dict()
        d.update({k: v for k, v in overrides.items() if v is not None})
        return TrainingConfig.from_dict(d)


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
