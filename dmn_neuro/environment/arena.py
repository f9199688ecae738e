"""A batched, differentiable odor-navigation arena in torch.

Pure functions of explicit state (:class:`EnvState`), the same shape as the
neuron step functions: ``state = arena.reset(B, generator)``, then every step
``c = arena.concentration(state)`` (what the antennae smell) and
``state, velocity = arena.step(state, dn_left, dn_right)``.  Everything is
differentiable, so a loss on positions back-propagates into the DN spike tensors.

Model (all lengths in mm, times in s unless named ``_ms``; positions are 3-D with
``z`` fixed at the plane of the goal):

* **Episodes.** The source is ``goal_mm`` plus a uniform offset in a square of
  half-width ``source_jitter_mm``; the fly starts at a uniform distance in
  ``start_distance_mm`` from the source in a uniform direction, facing the
  bearing to the source plus a uniform offset in ``±start_heading_offset_deg``
  (sources lie both left and right of the initial heading).  Starts are clamped
  1 mm inside the walls.  The odor identity is drawn uniformly from ``odors``.
* **Plume.** ``'gaussian'``: ``c = peak * exp(-r^2 / (2 sigma^2))``;
  ``'inverse_square'``: ``c = peak / (1 + r^2 / d0^2)``;
  ``'exponential'``: ``c = peak * exp(-sqrt(r^2 + eps^2) / d0)`` (constant
  log-gradient ``1/d0``: the same bilateral contrast far and near, and a sharp
  peak that marks the source; ``eps = 0.1 mm`` keeps it differentiable there).  ``c = 1`` corresponds to
  the Hallem 10^-2 dilution (see :mod:`dmn_neuro.environment.odors`).  *Wind* (mm/s)
  stretches the plume downwind: the downwind coordinate ``u`` of ``r`` is scaled
  by ``L / (L + |wind| * plume_age_s)`` for ``u > 0`` (``L`` = sigma or d0), a
  cheap stand-in for an advected, diffusing plume whose peak stays at the source.
* **Antennae** (model-scale assumption): ``antenna_forward_mm`` ahead of the body
  centre and ``antenna_lateral_mm`` to each side (real antennae are ~0.3 mm
  apart; the model scale gives a usable bilateral contrast).  Index 0 = left.
* **Motor.** Each side's DN spikes are averaged over its ``n_dn`` neurons,
  converted to Hz and low-pass filtered (``motor_tau_ms``, exponential)::

      speed = v_max * tanh(speed_gain * (m_left + m_right) / 2)        [mm/s]
      omega = omega_max * tanh(turn_gain * (m_left - m_right))          [rad/s]

  positive ``omega`` is counter-clockwise, i.e. a **left** turn: more left-DN
  activity turns the fly to its left (ipsilateral turning, as the DNa02
  left/right asymmetry does in flies).  No DN activity -> the fly stands still.
  With ``motor_table`` (a body calibration, :mod:`dmn_neuro.environment.motor`)
  speed and omega come from the NeuroMechFly body's measured table instead.
  Heading (rad, counter-clockwise from +x) is integrated first, then the
  position with the new heading; the heading is not wrapped.
* **Walls.** ``x, y`` are clamped to ``[0, arena_size]``.
* **Success** (for metrics): within ``success_radius_mm`` of the source at the
  end of the episode; the default radius is 10 % of the mean start distance.
  With ``stop_at_source`` the fly stops once within that radius (the task is
  reaching the source, as in the body's episodes, which end there).
* **Training distribution** (all off by default, which is the fixed arena
  above): ``concentration_range`` draws each episode's peak concentration
  log-uniformly from ``[low, high]`` (replacing ``peak_concentration``);
  ``plumes`` draws the plume type uniformly from that list (replacing
  ``plume``); ``plume_length_range_mm`` draws the length scale (sigma or d0)
  uniformly (replacing ``plume_sigma_mm`` / ``plume_d0_mm``);
  ``wind_speed_range`` draws a wind speed uniformly and a direction uniformly
  in 360 degrees (replacing ``wind``).  These draws come after the ones of the
  fixed arena on the same generator, and only when one of them is on, so the
  fixed arena's episodes are unchanged.  ``held_out_odors`` declares odors that
  the arena never draws (an odor in both ``odors`` and ``held_out_odors`` is a
  :class:`ConfigError`); it is a record for evaluation, kept in the checkpoint
  with the config.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from connectome.errors import ConfigError

from dmn_neuro.environment.motor import MotorTable
from dmn_neuro.simulation.semantics import DEFAULT_DT_MS

PLUMES = ("gaussian", "inverse_square", "exponential")
EXP_PLUME_EPS_MM = 0.1
START_MARGIN_MM = 1.0


def _tuple(value, n: int, name: str) -> Tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except TypeError as exc:
        raise ConfigError(f"ArenaConfig.{name} must be a sequence of {n} numbers, got {value!r}") from exc
    if len(out) != n:
        raise ConfigError(f"ArenaConfig.{name} must have {n} values, got {len(out)}")
    if not all(math.isfinite(v) for v in out):
        raise ConfigError(f"ArenaConfig.{name} must be finite, got {out}")
    return out


@dataclass
class ArenaConfig:
    """Arena parameters (validated; see the module docstring for the model).

    The defaults are the arena the shipped models were trained in: exponential plume
    (constant bilateral contrast, sharp peak at the source), smoothed motor command,
    model-scale antennae 3 mm apart (the older defaults: ``LEGACY_ARENA_DEFAULTS`` in
    ``dmn_neuro.training.config``).
    """

    arena_size_mm: Tuple[float, float] = (100.0, 100.0)
    goal_mm: Tuple[float, float, float] = (50.0, 50.0, 0.0)
    source_jitter_mm: float = 15.0
    start_distance_mm: Tuple[float, float] = (15.0, 30.0)
    start_heading_offset_deg: float = 120.0
    plume: str = "exponential"
    plume_sigma_mm: float = 20.0
    plume_d0_mm: float = 15.0
    peak_concentration: float = 1.0
    wind: Tuple[float, float] = (0.0, 0.0)
    plume_age_s: float = 1.0
    antenna_forward_mm: float = 1.0
    antenna_lateral_mm: float = 1.5
    motor_tau_ms: float = 100.0
    v_max_mm_s: float = 20.0
    omega_max_rad_s: float = 6.0
    speed_gain: float = 0.05
    turn_gain: float = 0.2
    odors: Tuple[str, ...] = ("isopentyl acetate",)
    odor_removed: bool = False
    success_radius_mm: Optional[float] = None
    held_out_odors: Tuple[str, ...] = ()
    concentration_range: Optional[Tuple[float, float]] = None
    plumes: Tuple[str, ...] = ()
    plume_length_range_mm: Optional[Tuple[float, float]] = None
    wind_speed_range: Optional[Tuple[float, float]] = None
    motor_table: Optional[dict] = None
    stop_at_source: bool = False

    def __post_init__(self) -> None:
        self.arena_size_mm = _tuple(self.arena_size_mm, 2, "arena_size_mm")
        self.goal_mm = _tuple(self.goal_mm, 3, "goal_mm")
        self.start_distance_mm = _tuple(self.start_distance_mm, 2, "start_distance_mm")
        self.wind = _tuple(self.wind, 2, "wind")
        if isinstance(self.odors, str):
            self.odors = (self.odors,)
        self.odors = tuple(str(o) for o in self.odors)
        if not self.odors:
            raise ConfigError("ArenaConfig.odors is empty")
        if self.plume not in PLUMES:
            raise ConfigError(f"ArenaConfig.plume {self.plume!r} unknown; choose one of {PLUMES}")
        self._check_distribution()
        for name in ("odor_removed", "stop_at_source"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"ArenaConfig.{name} must be a bool, got {getattr(self, name)!r}")
        w, h = self.arena_size_mm
        if not (w > 0 and h > 0):
            raise ConfigError(f"ArenaConfig.arena_size_mm must be positive, got {self.arena_size_mm}")
        gx, gy, _ = self.goal_mm
        j = float(self.source_jitter_mm)
        if not (math.isfinite(j) and j >= 0):
            raise ConfigError(f"ArenaConfig.source_jitter_mm must be >= 0, got {self.source_jitter_mm}")
        if not (0 <= gx - j and gx + j <= w and 0 <= gy - j and gy + j <= h):
            raise ConfigError(
                f"ArenaConfig: sources (goal {self.goal_mm[:2]} ± {j} mm) must lie inside the arena {self.arena_size_mm}"
            )
        lo, hi = self.start_distance_mm
        if not (0 < lo <= hi):
            raise ConfigError(f"ArenaConfig.start_distance_mm must satisfy 0 < low <= high, got {self.start_distance_mm}")
        pc = float(self.peak_concentration)
        if not (math.isfinite(pc) and pc >= 0):
            raise ConfigError(f"ArenaConfig.peak_concentration must be >= 0, got {self.peak_concentration}")
        self.peak_concentration = pc
        positive = (
            "plume_sigma_mm", "plume_d0_mm", "motor_tau_ms",
            "v_max_mm_s", "omega_max_rad_s", "speed_gain", "turn_gain",
        )
        for name in positive:
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"ArenaConfig.{name} must be positive, got {getattr(self, name)}")
            setattr(self, name, v)
        for name in ("plume_age_s", "antenna_forward_mm", "antenna_lateral_mm", "start_heading_offset_deg"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"ArenaConfig.{name} must be >= 0, got {getattr(self, name)}")
            setattr(self, name, v)
        if self.antenna_lateral_mm == 0:
            raise ConfigError("ArenaConfig.antenna_lateral_mm must be > 0 (the two antennae must differ)")
        if self.motor_table is not None:
            self.motor_table = MotorTable.from_dict(self.motor_table).to_dict()
        if self.success_radius_mm is not None:
            r = float(self.success_radius_mm)
            if not (math.isfinite(r) and r > 0):
                raise ConfigError(f"ArenaConfig.success_radius_mm must be positive, got {self.success_radius_mm}")
            self.success_radius_mm = r

    def _check_distribution(self) -> None:
        """Validate the training-distribution fields and the held-out odor set."""
        if isinstance(self.held_out_odors, str):
            self.held_out_odors = (self.held_out_odors,)
        if not isinstance(self.held_out_odors, (list, tuple)):
            raise ConfigError(f"ArenaConfig.held_out_odors must be a list of odor names, got {self.held_out_odors!r}")
        self.held_out_odors = tuple(str(o) for o in self.held_out_odors)
        if isinstance(self.plumes, str):
            self.plumes = (self.plumes,)
        if not isinstance(self.plumes, (list, tuple)):
            raise ConfigError(f"ArenaConfig.plumes must be a list of plume types, got {self.plumes!r}")
        self.plumes = tuple(str(p) for p in self.plumes)
        bad = [p for p in self.plumes if p not in PLUMES]
        if bad:
            raise ConfigError(f"ArenaConfig.plumes: {bad[0]!r} unknown; choose from {PLUMES}")
        if len(set(self.plumes)) != len(self.plumes):
            raise ConfigError(f"ArenaConfig.plumes lists a plume twice: {list(self.plumes)}")
        for name, low_ok in (("concentration_range", "> 0"), ("plume_length_range_mm", "> 0"),
                             ("wind_speed_range", ">= 0")):
            val = getattr(self, name)
            if val is None:
                continue
            lo, hi = _tuple(val, 2, name)
            if not ((lo > 0 if low_ok == "> 0" else lo >= 0) and lo <= hi):
                raise ConfigError(f"ArenaConfig.{name} must satisfy low {low_ok} and low <= high, got {[lo, hi]}")
            setattr(self, name, (lo, hi))
        if self.held_out_odors:
            train = {_canonical_odor(o, strict=False): o for o in self.odors}
            held = [_canonical_odor(o, strict=True) for o in self.held_out_odors]
            if len(set(held)) != len(held):
                raise ConfigError(f"ArenaConfig.held_out_odors lists an odor twice: {list(self.held_out_odors)}")
            both = [h for h in held if h in train]
            if both:
                raise ConfigError(f"odor {both[0]!r} is both a training odor (odors) and held out (held_out_odors); "
                                  "a held-out odor must never be used in training")

    @property
    def randomised(self) -> bool:
        """True when any per-episode condition (concentration, plume, length, wind) is drawn."""
        return bool(self.concentration_range or self.plumes or self.plume_length_range_mm or self.wind_speed_range)

    def conditions(self) -> dict:
        """The conditions episodes are drawn under (JSON-safe), for reports."""
        length = self.plume_sigma_mm if self.plume == "gaussian" else self.plume_d0_mm
        return {
            "odors": list(self.odors),
            "concentration": None if self.concentration_range else self.peak_concentration,
            "concentration_range": list(self.concentration_range) if self.concentration_range else None,
            "plume": None if self.plumes else self.plume,
            "plumes": list(self.plumes) or None,
            "plume_length_mm": None if self.plume_length_range_mm else length,
            "plume_length_range_mm": list(self.plume_length_range_mm) if self.plume_length_range_mm else None,
            "wind_mm_s": None if self.wind_speed_range else list(self.wind),
            "wind_speed_range_mm_s": list(self.wind_speed_range) if self.wind_speed_range else None,
            "start_distance_mm": list(self.start_distance_mm), "start_heading_offset_deg": self.start_heading_offset_deg,
            "success_radius_mm": self.success_radius,
            "odor_removed": self.odor_removed,
            "stop_at_source": self.stop_at_source,
        }

    @property
    def mean_start_distance_mm(self) -> float:
        return 0.5 * (self.start_distance_mm[0] + self.start_distance_mm[1])

    @property
    def success_radius(self) -> float:
        """Effective success radius (mm): the configured one or 10 % of the mean start distance."""
        if self.success_radius_mm is not None:
            return self.success_radius_mm
        return 0.1 * self.mean_start_distance_mm


def _canonical_odor(name: str, strict: bool, what: str = "ArenaConfig.held_out_odors") -> str:
    """The Hallem & Carlson name of ``name`` (aliases, case); unknown names raise
    :class:`ConfigError` (naming ``what``) if ``strict``, else come back normalised."""
    from dmn_neuro.environment.odors import OdorEncoder, load_hallem_carlson

    names = load_hallem_carlson().odors
    try:
        return names[OdorEncoder._lookup(name, names)]
    except Exception as exc:  # DataError: unknown odor
        if strict:
            raise ConfigError(f"{what}: {' '.join(str(exc).split())}") from None
        return " ".join(str(name).split()).lower()


class EpisodeConditions(NamedTuple):
    """Per-episode plume conditions of a randomised arena (``[B]`` / ``[B, 2]`` tensors)."""

    peak: torch.Tensor    # [B] peak concentration (relative to the Hallem 10^-2 dilution)
    plume: torch.Tensor   # [B] long, index into PLUMES
    length: torch.Tensor  # [B] mm, sigma (gaussian) or d0
    wind: torch.Tensor    # [B, 2] mm/s


class EnvState(NamedTuple):
    """State of a batch of episodes (all tensors on one device/dtype).

    ``conditions`` is ``None`` for the fixed arena, else the episodes' drawn
    :class:`EpisodeConditions`.
    """

    pos: torch.Tensor        # [B, 3] mm
    heading: torch.Tensor    # [B] rad, counter-clockwise from +x, unwrapped
    motor: torch.Tensor      # [B, 2] filtered DN rate (Hz), 0 = left, 1 = right
    source: torch.Tensor     # [B, 3] mm
    odor: torch.Tensor       # [B] long, index into the encoder's odor list
    start_pos: torch.Tensor  # [B, 3] mm
    step: int
    conditions: Optional[EpisodeConditions] = None


class OdorArena:
    """Batched differentiable arena.

    Args:
        config: :class:`ArenaConfig` (default: defaults).
        dt_ms: step (default :data:`~dmn_neuro.simulation.semantics.DEFAULT_DT_MS`).
        encoder: an :class:`~dmn_neuro.environment.odors.OdorEncoder` used to turn the
            ``config.odors`` names into indices; without one, indices refer to
            the full Hallem list (which is what ``OdorEncoder(odors=None)`` uses).
    """

    def __init__(self, config: Optional[ArenaConfig] = None, dt_ms: float = DEFAULT_DT_MS, encoder=None) -> None:
        self.config = config if config is not None else ArenaConfig()
        if not isinstance(self.config, ArenaConfig):
            raise ConfigError(f"config must be an ArenaConfig, got {type(self.config).__name__}")
        if not (math.isfinite(dt_ms) and dt_ms > 0):
            raise ConfigError(f"dt_ms must be positive, got {dt_ms}")
        self.dt_ms = float(dt_ms)
        self.dt_s = self.dt_ms * 1e-3
        self.motor_decay = math.exp(-self.dt_ms / self.config.motor_tau_ms)
        self.motor_table = None if self.config.motor_table is None else MotorTable.from_dict(self.config.motor_table)
        if encoder is not None:
            self.odor_indices = [encoder.odor_index(n) for n in self.config.odors]
        else:
            from dmn_neuro.environment.odors import OdorEncoder, load_hallem_carlson

            names = load_hallem_carlson().odors
            self.odor_indices = [OdorEncoder._lookup(n, names) for n in self.config.odors]

    @property
    def success_radius(self) -> float:
        return self.config.success_radius

    # ------------------------------------------------------------------ reset
    def reset(
        self,
        batch_size: int,
        generator: torch.Generator,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
    ) -> EnvState:
        """New episodes: seeded source position, start pose and odor per episode.

        Random numbers are drawn on ``generator``'s device and then moved to
        ``device``, so a CPU generator gives the same episodes on CPU and CUDA.
        """
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(generator, torch.Generator):
            raise ConfigError("reset needs a torch.Generator (seeded episodes)")
        cfg = self.config
        B = int(batch_size)
        gdev = generator.device
        u = torch.rand(B, 6, generator=generator, device=gdev, dtype=torch.float64)
        odor_pick = torch.randint(len(self.odor_indices), (B,), generator=generator, device=gdev)
        gx, gy, gz = cfg.goal_mm
        w, h = cfg.arena_size_mm
        j = cfg.source_jitter_mm
        sx = gx + (2 * u[:, 0] - 1) * j
        sy = gy + (2 * u[:, 1] - 1) * j
        lo, hi = cfg.start_distance_mm
        dist = lo + u[:, 2] * (hi - lo)
        phi = 2 * math.pi * u[:, 3]
        px = (sx + dist * torch.cos(phi)).clamp(START_MARGIN_MM, w - START_MARGIN_MM)
        py = (sy + dist * torch.sin(phi)).clamp(START_MARGIN_MM, h - START_MARGIN_MM)
        bearing = torch.atan2(sy - py, sx - px)
        offset = math.radians(cfg.start_heading_offset_deg)
        heading = bearing + (2 * u[:, 4] - 1) * offset
        z = torch.full_like(sx, gz)
        source = torch.stack([sx, sy, z], dim=-1)
        pos = torch.stack([px, py, z], dim=-1)
        table = torch.tensor(self.odor_indices, dtype=torch.long, device=gdev)
        dev = torch.device(device) if device is not None else gdev
        conditions = self._draw_conditions(B, generator, dev, dtype) if cfg.randomised else None
        return EnvState(
            pos=pos.to(device=dev, dtype=dtype),
            heading=heading.to(device=dev, dtype=dtype),
            motor=torch.zeros(B, 2, device=dev, dtype=dtype),
            source=source.to(device=dev, dtype=dtype),
            odor=table[odor_pick].to(dev),
            start_pos=pos.to(device=dev, dtype=dtype).clone(),
            step=0,
            conditions=conditions,
        )

    def _draw_conditions(self, B: int, generator: torch.Generator, dev, dtype) -> EpisodeConditions:
        """Per-episode peak, plume type, length and wind (drawn after the fixed arena's numbers)."""
        cfg = self.config
        gdev = generator.device
        v = torch.rand(B, 4, generator=generator, device=gdev, dtype=torch.float64)
        plumes = cfg.plumes or (cfg.plume,)
        pick = torch.randint(len(plumes), (B,), generator=generator, device=gdev)
        plume = torch.tensor([PLUMES.index(p) for p in plumes], dtype=torch.long, device=gdev)[pick]
        if cfg.concentration_range:
            lo, hi = cfg.concentration_range
            peak = torch.exp(math.log(lo) + v[:, 0] * (math.log(hi) - math.log(lo)))
        else:
            peak = torch.full((B,), cfg.peak_concentration, dtype=torch.float64, device=gdev)
        if cfg.plume_length_range_mm:
            lo, hi = cfg.plume_length_range_mm
            length = lo + v[:, 1] * (hi - lo)
        else:
            fixed = torch.tensor([cfg.plume_sigma_mm if p == "gaussian" else cfg.plume_d0_mm for p in plumes],
                                 dtype=torch.float64, device=gdev)
            length = fixed[pick]
        if cfg.wind_speed_range:
            lo, hi = cfg.wind_speed_range
            speed = lo + v[:, 2] * (hi - lo)
            angle = 2 * math.pi * v[:, 3]
            wind = torch.stack([speed * torch.cos(angle), speed * torch.sin(angle)], dim=-1)
        else:
            wind = torch.tensor(cfg.wind, dtype=torch.float64, device=gdev).expand(B, 2)
        return EpisodeConditions(peak=peak.to(device=dev, dtype=dtype), plume=plume.to(dev),
                                 length=length.to(device=dev, dtype=dtype), wind=wind.to(device=dev, dtype=dtype))

    # ---------------------------------------------------------------- sensing
    def antenna_positions(self, state: EnvState) -> torch.Tensor:
        """Antenna tips ``[B, 2, 3]`` (index 0 = left, 1 = right)."""
        cfg = self.config
        c, s = torch.cos(state.heading), torch.sin(state.heading)
        zero = torch.zeros_like(c)
        fwd = torch.stack([c, s, zero], dim=-1)
        left = torch.stack([-s, c, zero], dim=-1)
        base = state.pos + cfg.antenna_forward_mm * fwd
        return torch.stack([base + cfg.antenna_lateral_mm * left, base - cfg.antenna_lateral_mm * left], dim=1)

    def field(self, points: torch.Tensor, source: torch.Tensor,
              conditions: Optional[EpisodeConditions] = None) -> torch.Tensor:
        """Concentration at ``points [B, k, 3]`` of sources ``[B, 3]`` -> ``[B, k]``
        (per-episode plumes when ``conditions`` is given, else the configured one)."""
        cfg = self.config
        d = points[..., :2] - source[:, None, :2]
        if conditions is not None:
            return self._episode_field(d, conditions)
        length = cfg.plume_sigma_mm if cfg.plume == "gaussian" else cfg.plume_d0_mm
        wx, wy = cfg.wind
        speed = math.hypot(wx, wy)
        if speed > 0 and cfg.plume_age_s > 0:
            ex, ey = wx / speed, wy / speed
            u = d[..., 0] * ex + d[..., 1] * ey          # downwind coordinate
            v = -d[..., 0] * ey + d[..., 1] * ex         # crosswind coordinate
            stretch = length / (length + speed * cfg.plume_age_s)
            u = torch.where(u > 0, u * stretch, u)
            r2 = u * u + v * v
        else:
            r2 = (d * d).sum(-1)
        if cfg.plume == "gaussian":
            return cfg.peak_concentration * torch.exp(-r2 / (2.0 * length * length))
        if cfg.plume == "exponential":
            return cfg.peak_concentration * torch.exp(-torch.sqrt(r2 + EXP_PLUME_EPS_MM ** 2) / length)
        return cfg.peak_concentration / (1.0 + r2 / (length * length))

    def _episode_field(self, d: torch.Tensor, cond: EpisodeConditions) -> torch.Tensor:
        """The plume of each episode from its own conditions; ``d [B, k, 2]`` = point - source."""
        length = cond.length.to(d.dtype)[:, None]
        wind = cond.wind.to(d.dtype)
        speed = wind.norm(dim=-1)[:, None]
        moving = speed > 0
        safe = torch.where(moving, speed, torch.ones_like(speed))
        ex = torch.where(moving, wind[:, 0:1] / safe, torch.ones_like(speed))
        ey = torch.where(moving, wind[:, 1:2] / safe, torch.zeros_like(speed))
        u = d[..., 0] * ex + d[..., 1] * ey
        v = -d[..., 0] * ey + d[..., 1] * ex
        stretch = length / (length + speed * self.config.plume_age_s)
        u = torch.where(u > 0, u * stretch, u)
        r2 = u * u + v * v
        kind = cond.plume[:, None]
        c = torch.where(
            kind == PLUMES.index("gaussian"), torch.exp(-r2 / (2.0 * length * length)),
            torch.where(kind == PLUMES.index("exponential"),
                        torch.exp(-torch.sqrt(r2 + EXP_PLUME_EPS_MM ** 2) / length),
                        1.0 / (1.0 + r2 / (length * length))))
        return cond.peak.to(d.dtype)[:, None] * c

    def concentration(self, state: EnvState) -> torch.Tensor:
        """Concentration at the two antennae ``[B, 2]`` (0 = left); zero if ``odor_removed``."""
        c = self.field(self.antenna_positions(state), state.source, state.conditions)
        if self.config.odor_removed:
            return c * 0.0
        return c

    def odor_rates(self, state: EnvState, encoder) -> torch.Tensor:
        """ORN rates (Hz) at each antenna ``[B, 2, n_orn]``."""
        return encoder.rates(state.odor, self.concentration(state))

    def hemisphere_rates(self, state: EnvState, encoder, contralateral_fraction: float = 0.0) -> torch.Tensor:
        """ORN rates for the two mirrored hemispheres stacked along batch ``[2B, n_orn]``.

        Rows ``0..B-1`` are the left hemisphere (fed by the left antenna),
        ``B..2B-1`` the right; ``contralateral_fraction`` mixes in the other
        antenna's rates: ``(1 - f) r_ipsi + f r_contra``.
        """
        f = float(contralateral_fraction)
        if not 0.0 <= f <= 1.0:
            raise ConfigError(f"contralateral_fraction must be in [0, 1], got {contralateral_fraction}")
        r = self.odor_rates(state, encoder)
        left = (1 - f) * r[:, 0] + f * r[:, 1]
        right = (1 - f) * r[:, 1] + f * r[:, 0]
        return torch.cat([left, right], dim=0)

    # ------------------------------------------------------------------- step
    def step(self, state: EnvState, dn_left: torch.Tensor, dn_right: torch.Tensor) -> Tuple[EnvState, torch.Tensor]:
        """Advance one step from the DN spikes of this step.

        Args:
            dn_left, dn_right: ``[B, n_dn]`` spikes (0/1, float, may carry
                gradients) of the left / right hemisphere's DNs.

        Returns:
            ``(new_state, velocity)``; ``velocity [B, 3]`` (mm/s) is the commanded
            velocity of this step (before the wall clamp).
        """
        if dn_left.shape != dn_right.shape or dn_left.dim() != 2 or dn_left.shape[0] != state.pos.shape[0]:
            raise ValueError(
                f"dn_left/dn_right must both be [B={state.pos.shape[0]}, n_dn], "
                f"got {tuple(dn_left.shape)} and {tuple(dn_right.shape)}"
            )
        motor = self.motor_update(state.motor, dn_left, dn_right)
        speed, omega = self.kinematics(motor)
        return self.move(state._replace(motor=motor), speed, omega)

    def motor_update(self, motor: torch.Tensor, dn_left: torch.Tensor, dn_right: torch.Tensor) -> torch.Tensor:
        """The filtered DN rate ``[B, 2]`` (Hz) after this step's spikes."""
        drive = torch.stack([dn_left.mean(-1), dn_right.mean(-1)], dim=-1).to(motor.dtype) / self.dt_s
        return self.motor_decay * motor + (1.0 - self.motor_decay) * drive

    def kinematics(self, motor: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(speed [B] mm/s, omega [B] rad/s)`` for the filtered DN rates: the ``tanh``
        model, or the body calibration's table (:mod:`dmn_neuro.environment.motor`)."""
        cfg = self.config
        if self.motor_table is not None:
            return self.motor_table.kinematics(self.motor_table.drive(motor, cfg.speed_gain, cfg.turn_gain))
        speed = cfg.v_max_mm_s * torch.tanh(cfg.speed_gain * motor.mean(-1))
        omega = cfg.omega_max_rad_s * torch.tanh(cfg.turn_gain * (motor[:, 0] - motor[:, 1]))
        return speed, omega

    def at_source(self, state: EnvState) -> torch.Tensor:
        """``[B]`` bool: the fly is within the success radius of a source (``stop_at_source`` stops it there)."""
        return torch.linalg.vector_norm(state.pos[:, :2] - state.source[:, :2], dim=-1) <= self.success_radius

    def move(self, state: EnvState, speed: torch.Tensor, omega: torch.Tensor) -> Tuple[EnvState, torch.Tensor]:
        """Turn, then walk with the new heading for one step; clamp to the walls."""
        cfg = self.config
        if cfg.stop_at_source:  # a fly within the success radius stays there
            speed = torch.where(self.at_source(state), torch.zeros_like(speed), speed)
        heading = state.heading + omega * self.dt_s
        velocity = torch.stack([speed * torch.cos(heading), speed * torch.sin(heading), torch.zeros_like(speed)], dim=-1)
        moved = state.pos + velocity * self.dt_s
        w, h = cfg.arena_size_mm
        pos = torch.stack([moved[:, 0].clamp(0.0, w), moved[:, 1].clamp(0.0, h), state.pos[:, 2]], dim=-1)
        return state._replace(pos=pos, heading=heading, step=state.step + 1), velocity

    def rollout_kinematics(
        self, dn_left: torch.Tensor, dn_right: torch.Tensor, state: EnvState
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Open-loop kinematics for DN spike trains ``[T, B, n_dn]``.

        Returns positions ``[T+1, B, 3]`` (including the start) and velocities ``[T, B, 3]``.
        """
        if dn_left.dim() != 3 or dn_left.shape != dn_right.shape:
            raise ValueError(f"dn_left/dn_right must be [T, B, n_dn], got {tuple(dn_left.shape)}, {tuple(dn_right.shape)}")
        positions, velocities = [state.pos], []
        for t in range(dn_left.shape[0]):
            state, v = self.step(state, dn_left[t], dn_right[t])
            positions.append(state.pos)
            velocities.append(v)
        return torch.stack(positions), torch.stack(velocities) if velocities else state.pos.new_zeros(0, *state.pos.shape)


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def plot_trajectories(
    positions,
    sources,
    path: Union[str, Path],
    title: str = "Trajectories",
    success_radius: Optional[float] = None,
    arena_size_mm: Optional[Sequence[float]] = None,
    max_episodes: int = 32,
) -> Path:
    """Plot ``positions [T, B, 3]`` (or ``[T, 3]``) and ``sources [B, 3]`` to a PNG, written atomically.

    Starts are circles, ends crosses, sources stars with the success radius as a
    dashed circle.  Uses the Agg canvas directly (no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, Rectangle

    pos = _np(positions)
    if pos.ndim == 2:
        pos = pos[:, None, :]
    if pos.ndim != 3 or pos.shape[-1] < 2:
        raise ValueError(f"positions must be [T, B, 3] or [T, 3], got {pos.shape}")
    src = _np(sources).reshape(-1, _np(sources).shape[-1])
    if src.shape[0] == 1 and pos.shape[1] > 1:
        src = np.repeat(src, pos.shape[1], axis=0)
    if src.shape[0] != pos.shape[1]:
        raise ValueError(f"sources has {src.shape[0]} rows for {pos.shape[1]} trajectories")
    B = min(pos.shape[1], int(max_episodes))
    stride = max(1, pos.shape[0] // 2000)
    fig = Figure(figsize=(6, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    colors = [cmap(i % 10) for i in range(B)]
    for b in range(B):
        tr = pos[::stride, b]
        tr = np.concatenate([tr, pos[-1:, b]], axis=0)
        col = colors[b]
        ax.plot(tr[:, 0], tr[:, 1], "-", lw=1.0, color=col, alpha=0.85)
        ax.plot(tr[0, 0], tr[0, 1], "o", ms=4, color=col)
        ax.plot(tr[-1, 0], tr[-1, 1], "x", ms=6, color=col)
        ax.plot(src[b, 0], src[b, 1], "*", ms=10, color=col, markeredgecolor="k", markeredgewidth=0.5)
        if success_radius:
            ax.add_patch(Circle((src[b, 0], src[b, 1]), float(success_radius), fill=False, ls="--", lw=0.7, color=col))
    if arena_size_mm is not None:
        w, h = float(arena_size_mm[0]), float(arena_size_mm[1])
        ax.add_patch(Rectangle((0, 0), w, h, fill=False, lw=1.0, color="k"))
        ax.set_xlim(-2, w + 2)
        ax.set_ylim(-2, h + 2)
    ax.set_aspect("equal")
    ax.set_xlabel("x (mm)")
    ax.set_ylabel("y (mm)")
    ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


__all__ = ["ArenaConfig", "EnvState", "EpisodeConditions", "OdorArena", "plot_trajectories", "PLUMES"]
