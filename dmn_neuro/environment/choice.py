"""The odor-choice task: two sources, a target odor and a distractor; reach the target.

The approach task (:class:`~dmn_neuro.environment.arena.OdorArena`) can be
solved by climbing any odor gradient; this one needs odor *identity*, the
mushroom body's job. Model (lengths in mm; the rest of the arena -- plumes,
antennae, motor, walls -- is the approach arena's, see its module docstring):

* **Episodes.** The midpoint of the two sources is ``goal_mm`` plus a uniform
  offset in a square of half-width ``midpoint_jitter_mm``; the separation is
  uniform in ``separation_mm``, the axis direction uniform in 360 degrees, and
  target and distractor sit at ``midpoint ± separation / 2`` along it (which
  end is the target is therefore uniform too). The fly starts at a uniform
  distance in the arena's ``start_distance_mm`` *from the midpoint*, in a
  uniform direction, facing the bearing to the midpoint plus a uniform offset
  in ``± start_heading_offset_deg`` (clamped 1 mm inside the walls). Nothing in
  the geometry tells the sources apart: a fly without odor identity reaches the
  target in at most about half of the episodes it ends at a source.
* **Odors.** The target odor is fixed (``target_odor``); the distractor of each
  episode is drawn uniformly from ``distractors``. ``held_out_distractors`` are
  never drawn by the arena (an odor in both lists, or the target in either, is
  a :class:`~connectome.errors.ConfigError`); they are for evaluation only.
* **Plumes.** Each source has its own plume, the arena's (both share one
  episode's drawn conditions when the arena randomises them). At each antenna
  the concentrations of the two odors are kept apart (``[B, 2 antennae, 2
  sources]``, target first) and the encoder adds their responses:
  ``rate = spontaneous + sum_odor f(c_odor) * response(odor)`` (mixtures add,
  see :mod:`dmn_neuro.environment.odors`); an adapting encoder's level is the
  mean over antennae of the summed ``f(c)``.
* **Choice** of an episode (:func:`choices`): *target* if the final position
  is within the success radius of the target, *distractor* if within that of
  the distractor, *none* otherwise (the separation is larger than two radii).
  The training loss is the approach task's, towards the target
  (``EnvState.source`` is the target), so a training episode's "success" is a
  correct choice. With the arena's ``stop_at_source`` the fly stops within the
  radius of *either* source, so its choice is the first source it reaches (the
  trap assay's rule: a fly that enters a trap stays there).
* **Similarity** of two odors (:func:`odor_similarity`): the Pearson
  correlation of their Hallem & Carlson response vectors (spike-rate changes
  at 10^-2 over the 24 receptors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from connectome.errors import ConfigError

from dmn_neuro.environment.arena import (
    START_MARGIN_MM, ArenaConfig, EnvState, EpisodeConditions, OdorArena, _canonical_odor,
)
from dmn_neuro.simulation.semantics import DEFAULT_DT_MS

TASKS = ("approach", "choice")
#: Choice codes of :func:`choices`.
CHOICE_NONE, CHOICE_TARGET, CHOICE_DISTRACTOR = 0, 1, 2


def canonical_odor(name: str, what: str) -> str:
    """The Hallem & Carlson name of ``name`` (aliases, case); unknown names are a ConfigError naming ``what``."""
    return _canonical_odor(name, strict=True, what=what)


def _names(value, what: str) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{what} must be a list of odor names, got {value!r}")
    out = tuple(canonical_odor(v, what) for v in value)
    if len(set(out)) != len(out):
        raise ConfigError(f"{what} lists an odor twice: {list(value)}")
    return out


@dataclass
class ChoiceConfig:
    """Choice-task parameters (``environment.choice``; see the module docstring).

    Odor names are stored as their Hallem & Carlson names.
    """

    target_odor: str = "isopentyl acetate"
    distractors: Tuple[str, ...] = ("ethyl acetate",)
    held_out_distractors: Tuple[str, ...] = ()
    separation_mm: Tuple[float, float] = (20.0, 30.0)
    midpoint_jitter_mm: float = 10.0

    def __post_init__(self) -> None:
        s = "environment.choice."
        if not isinstance(self.target_odor, str):
            raise ConfigError(f"{s}target_odor must be one odor name, got {self.target_odor!r}")
        self.target_odor = canonical_odor(self.target_odor, f"{s}target_odor")
        self.distractors = _names(self.distractors, f"{s}distractors")
        if not self.distractors:
            raise ConfigError(f"{s}distractors is empty")
        self.held_out_distractors = _names(self.held_out_distractors, f"{s}held_out_distractors")
        for name, odors in (("distractors", self.distractors), ("held_out_distractors", self.held_out_distractors)):
            if self.target_odor in odors:
                raise ConfigError(f"{s}{name} lists the target odor {self.target_odor!r}")
        both = [o for o in self.held_out_distractors if o in self.distractors]
        if both:
            raise ConfigError(f"odor {both[0]!r} is both a training distractor (distractors) and held out "
                              "(held_out_distractors); a held-out odor must never be used in training")
        try:
            lo, hi = (float(v) for v in self.separation_mm)
        except (TypeError, ValueError):
            raise ConfigError(f"{s}separation_mm must be two numbers [low, high], got {self.separation_mm!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise ConfigError(f"{s}separation_mm must satisfy 0 < low <= high, got {self.separation_mm!r}")
        self.separation_mm = (lo, hi)
        j = self.midpoint_jitter_mm
        if isinstance(j, bool) or not isinstance(j, (int, float)) or not (math.isfinite(j) and j >= 0):
            raise ConfigError(f"{s}midpoint_jitter_mm must be a number >= 0, got {j!r}")
        self.midpoint_jitter_mm = float(j)

    def check_arena(self, arena: ArenaConfig) -> None:
        """Both sources inside the arena, and apart by more than two success radii."""
        w, h = arena.arena_size_mm
        gx, gy, _ = arena.goal_mm
        reach = self.midpoint_jitter_mm + self.separation_mm[1] / 2
        if not (gx - reach >= 0 and gx + reach <= w and gy - reach >= 0 and gy + reach <= h):
            raise ConfigError(f"environment.choice: sources (midpoint {arena.goal_mm[:2]} ± {reach:g} mm) must lie "
                              f"inside the arena {arena.arena_size_mm}")
        if self.separation_mm[0] <= 2 * arena.success_radius:
            raise ConfigError(f"environment.choice.separation_mm: the sources must be more than two success radii "
                              f"({2 * arena.success_radius:g} mm) apart, got {self.separation_mm[0]:g}")

    def conditions(self) -> dict:
        """JSON-safe summary for reports."""
        return {"task": "choice", "target_odor": self.target_odor, "distractors": list(self.distractors),
                "held_out_distractors": list(self.held_out_distractors), "separation_mm": list(self.separation_mm),
                "midpoint_jitter_mm": self.midpoint_jitter_mm}


class ChoiceConditions(NamedTuple):
    """``EnvState.conditions`` of a choice episode: the distractor and the shared plume conditions."""

    distractor: torch.Tensor               # [B, 3] mm
    plume: Optional[EpisodeConditions]     # drawn plume conditions (None: the arena's fixed plume)


class ChoiceArena(OdorArena):
    """The arena with a target and a distractor source (see the module docstring).

    ``EnvState.source`` is the target, ``EnvState.odor`` ``[B, 2]`` the (target,
    distractor) odor indices, ``EnvState.conditions`` a :class:`ChoiceConditions`.
    The arena config's own ``odors`` / ``held_out_odors`` are not used.
    """

    def __init__(self, config: Optional[ArenaConfig] = None, choice: Optional[ChoiceConfig] = None,
                 dt_ms: float = DEFAULT_DT_MS, encoder=None) -> None:
        config = config if config is not None else ArenaConfig()
        self.choice = choice if choice is not None else ChoiceConfig()
        if not isinstance(self.choice, ChoiceConfig):
            raise ConfigError(f"choice must be a ChoiceConfig, got {type(self.choice).__name__}")
        self.choice.check_arena(config)
        super().__init__(config, dt_ms=dt_ms, encoder=encoder)
        if encoder is not None:
            index = encoder.odor_index
        else:
            from dmn_neuro.environment.odors import OdorEncoder, load_hallem_carlson

            names = load_hallem_carlson().odors
            index = lambda n: OdorEncoder._lookup(n, names)  # noqa: E731
        self.target_index = index(self.choice.target_odor)
        self.distractor_indices = [index(n) for n in self.choice.distractors]

    def reset(self, batch_size: int, generator: torch.Generator, device: Union[str, torch.device, None] = None,
              dtype: torch.dtype = torch.float32) -> EnvState:
        """New episodes (seeded): midpoint, separation, axis, start pose and distractor per episode."""
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(generator, torch.Generator):
            raise ConfigError("reset needs a torch.Generator (seeded episodes)")
        cfg, ch, B, gdev = self.config, self.choice, int(batch_size), generator.device
        u = torch.rand(B, 7, generator=generator, device=gdev, dtype=torch.float64)
        pick = torch.randint(len(self.distractor_indices), (B,), generator=generator, device=gdev)
        gx, gy, gz = cfg.goal_mm
        w, h = cfg.arena_size_mm
        j = ch.midpoint_jitter_mm
        mx, my = gx + (2 * u[:, 0] - 1) * j, gy + (2 * u[:, 1] - 1) * j
        lo, hi = ch.separation_mm
        half = 0.5 * (lo + u[:, 2] * (hi - lo))
        axis = 2 * math.pi * u[:, 3]
        ax, ay = half * torch.cos(axis), half * torch.sin(axis)
        lo, hi = cfg.start_distance_mm
        dist = lo + u[:, 4] * (hi - lo)
        phi = 2 * math.pi * u[:, 5]
        px = (mx + dist * torch.cos(phi)).clamp(START_MARGIN_MM, w - START_MARGIN_MM)
        py = (my + dist * torch.sin(phi)).clamp(START_MARGIN_MM, h - START_MARGIN_MM)
        heading = torch.atan2(my - py, mx - px) + (2 * u[:, 6] - 1) * math.radians(cfg.start_heading_offset_deg)
        z = torch.full_like(mx, gz)
        target = torch.stack([mx + ax, my + ay, z], dim=-1)
        distractor = torch.stack([mx - ax, my - ay, z], dim=-1)
        pos = torch.stack([px, py, z], dim=-1)
        table = torch.tensor(self.distractor_indices, dtype=torch.long, device=gdev)
        odor = torch.stack([torch.full((B,), self.target_index, dtype=torch.long, device=gdev), table[pick]], dim=-1)
        dev = torch.device(device) if device is not None else gdev
        plume = self._draw_conditions(B, generator, dev, dtype) if cfg.randomised else None
        cast = dict(device=dev, dtype=dtype)
        return EnvState(pos=pos.to(**cast), heading=heading.to(**cast), motor=torch.zeros(B, 2, **cast),
                        source=target.to(**cast), odor=odor.to(dev), start_pos=pos.to(**cast).clone(), step=0,
                        conditions=ChoiceConditions(distractor=distractor.to(**cast), plume=plume))

    def concentration(self, state: EnvState) -> torch.Tensor:
        """Concentrations ``[B, 2 antennae, 2 sources]`` (antenna 0 = left; source 0 = target); zero if ``odor_removed``."""
        points = self.antenna_positions(state)
        cond = state.conditions
        c = torch.stack([self.field(points, state.source, cond.plume),
                         self.field(points, cond.distractor, cond.plume)], dim=-1)
        return c * 0.0 if self.config.odor_removed else c

    def at_source(self, state: EnvState) -> torch.Tensor:
        """Within the success radius of the target *or* the distractor (the trap rule stops the fly at either)."""
        d = torch.linalg.vector_norm(state.pos[:, :2] - state.conditions.distractor[:, :2], dim=-1)
        return super().at_source(state) | (d <= self.success_radius)

    def choices(self, final_pos: torch.Tensor, state: EnvState) -> torch.Tensor:
        """Choice code per episode (:data:`CHOICE_TARGET` / ``_DISTRACTOR`` / ``_NONE``) of final positions ``[B, 3]``."""
        return choices(final_pos, state.source, state.conditions.distractor, self.success_radius)


def choices(final_pos, target, distractor, radius: float) -> torch.Tensor:
    """``[B]`` codes: target if within ``radius`` of the target, distractor if within it of the distractor, else none."""
    final_pos, target, distractor = (torch.as_tensor(x)[..., :2] for x in (final_pos, target, distractor))
    near_t = (final_pos - target).norm(dim=-1) <= radius
    near_d = (final_pos - distractor).norm(dim=-1) <= radius
    out = torch.full(near_t.shape, CHOICE_NONE, dtype=torch.long)
    out[near_d.cpu()] = CHOICE_DISTRACTOR
    out[near_t.cpu()] = CHOICE_TARGET
    return out


def choice_metrics(codes: Sequence[int]) -> Dict[str, float]:
    """Rates of correct / wrong / no choice over all episodes, and the accuracy among episodes that chose."""
    c = np.asarray(torch.as_tensor(codes).cpu().numpy() if isinstance(codes, torch.Tensor) else codes, dtype=int)
    n = int(c.size)
    correct, wrong = int((c == CHOICE_TARGET).sum()), int((c == CHOICE_DISTRACTOR).sum())
    chose = correct + wrong
    return {"n": n, "correct_rate": correct / n if n else float("nan"), "wrong_rate": wrong / n if n else float("nan"),
            "none_rate": (n - chose) / n if n else float("nan"),
            "accuracy_among_chosen": correct / chose if chose else None}


def odor_similarity(a: str, b: str, data=None) -> float:
    """Pearson correlation of the Hallem & Carlson response vectors (24 receptors, 10^-2) of odors ``a`` and ``b``."""
    from dmn_neuro.environment.odors import OdorEncoder, load_hallem_carlson

    data = data if data is not None else load_hallem_carlson()
    ra = data.responses[OdorEncoder._lookup(a, data.odors)]
    rb = data.responses[OdorEncoder._lookup(b, data.odors)]
    return float(np.corrcoef(ra, rb)[0, 1])


__all__ = ["TASKS", "ChoiceConfig", "ChoiceConditions", "ChoiceArena", "choices", "choice_metrics",
           "odor_similarity", "canonical_odor", "CHOICE_NONE", "CHOICE_TARGET", "CHOICE_DISTRACTOR"]
