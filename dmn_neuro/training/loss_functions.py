"""Task losses and trajectory metrics.

:class:`CombinedLoss` returns the seed's four terms, each dimensionless and of
order one at its worst, plus their weighted sum::

    total = navigation_weight * navigation + energy_weight * energy
          + sparsity_weight * sparsity + activity_weight * activity

* **navigation** -- distances to the goal normalised by each episode's start
  distance ``d0`` (``n_t = |p_t - goal| / d0``), averaged over the batch:
  a time-weighted mean of ``n_t`` whose weights grow linearly with time
  (``w_t ∝ t + 1``, so the end of the episode counts most) + the final ``n_T``
  + ``no_progress_weight * (relu(n_T - 1) + mean_t g_t (1 - p_t))``: it penalises
  ending no closer than the start, and every step without progress, where
  ``p_t = (d_{t-1} - d_t) / (velocity_scale * dt)`` is the approach speed
  relative to the reference speed and ``g_t = [d_{t-1} > arrival_fraction * d0]``
  switches the per-step penalty off once the fly has arrived (so stopping at the
  source is not penalised). The per-step term gives every step a gradient
  through the heading, which the distance terms alone give only weakly.
  With ``log_distance_weight`` > 0 it adds that weight times the same time-weighted
  mean of ``log((d_t + 1 mm) / (d0 + 1 mm))``: a fly 3.5 mm from the source then
  costs about as much more than one at 2 mm as one at 20 mm does than one at 11 mm,
  so the last millimetres of the approach carry gradient (0 = off, the default).
* **energy** -- ``mean_t,b |v_t|^2 / velocity_scale^2`` (∝ Σ‖v‖²; 1 = moving at
  the reference speed all the time).
* **sparsity** -- ``((s - target) / target)^2`` with ``s`` the KC population
  sparsity of :func:`kc_population_sparsity` (fraction of KCs active at least
  once per ``sparsity_window_ms`` window; the target 0.02 refers to that definition).
* **activity** -- averaged over populations: L1 on spikes expressed as the mean
  rate over the upper rate bound (``mean(s) / (rate_hi * dt_s)``) plus squared
  hinge penalties on each neuron's mean rate outside ``rate_bounds_hz``,
  relative to ``rate_hi``.

:class:`TrajectoryAnalyzer` computes the reported behaviour metrics.
"""
from __future__ import annotations

import functools
import math
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from connectome.errors import ConfigError

from dmn_neuro.simulation.semantics import DEFAULT_DT_MS

#: Default window over which KC population sparsity is measured.
DEFAULT_SPARSITY_WINDOW_MS: float = 50.0
LOSS_TERMS = ("navigation", "energy", "sparsity", "activity")
#: Offset (mm) of the log-distance navigation part: finite at the source, ~1/d beyond a few mm.
LOG_DISTANCE_OFFSET_MM: float = 1.0


def _window_steps(window_ms: float, dt_ms: float) -> int:
    if not (window_ms > 0 and dt_ms > 0):
        raise ConfigError(f"window_ms and dt_ms must be positive, got {window_ms}, {dt_ms}")
    return max(1, int(round(window_ms / dt_ms)))


class _WindowAny(torch.autograd.Function):
    """``1 - prod_w (1 - s[:, w])`` for binary ``s [k, W, B, n]``.

    With 0/1 entries the product of the others is exactly 0 or 1: the gradient
    w.r.t. ``s_i`` is 1 where the window holds no spike, or where ``s_i`` is its
    only spike, else 0 -- bit for bit what autograd through ``torch.prod`` gives
    (its backward takes a slow zero-safe path whenever a factor is 0).
    """

    @staticmethod
    def forward(ctx, s):
        count = s.sum(dim=1)
        ctx.save_for_backward((count == 0), (count == 1)[:, None] & (s == 1))
        return (count > 0).to(s.dtype)

    @staticmethod
    def backward(ctx, g):
        none, only = ctx.saved_tensors
        return g[:, None] * (none[:, None] | only).to(g.dtype)


def kc_population_sparsity(
    spikes: torch.Tensor,
    window_ms: float = DEFAULT_SPARSITY_WINDOW_MS,
    dt_ms: float = DEFAULT_DT_MS,
    skip_steps: int = 0,
    reduce: bool = True,
) -> torch.Tensor:
    """KC population sparsity: mean fraction of KCs active per time window.

    ``spikes [T, B, n]`` (0/1, float, may carry gradients) are cut into
    consecutive windows of ``W = round(window_ms / dt_ms)`` steps (after
    dropping ``skip_steps`` leading steps; a trailing partial window is dropped,
    a run shorter than ``W`` forms one window).  A KC is *active* in a window if
    it spikes at least once, computed as ``1 - prod(1 - s)`` (exact for binary
    spikes, smooth and differentiable for rates in [0, 1]).  The result is the
    fraction of active KCs averaged over windows (and, if ``reduce``, episodes):
    a scalar, or ``[B]`` when ``reduce=False``.
    """
    if spikes.dim() != 3:
        raise ValueError(f"spikes must be [T, B, n], got shape {tuple(spikes.shape)}")
    s = spikes[int(skip_steps):]
    T, B, n = s.shape
    if T == 0 or n == 0:
        out = s.new_zeros(B)
        return out.mean() if reduce else out
    W = min(_window_steps(window_ms, dt_ms), T)
    k = T // W
    s = s[: k * W].reshape(k, W, B, n).clamp(0.0, 1.0)
    if bool(((s == 0) | (s == 1)).all()):
        active = _WindowAny.apply(s)  # binary spikes: the same values and gradients, without prod's zero-safe backward
    else:
        active = 1.0 - torch.prod(1.0 - s, dim=1)  # [k, B, n]
    frac = active.mean(dim=-1).mean(dim=0)  # [B]
    return frac.mean() if reduce else frac


def _check_weight(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"CombinedLoss.{name} must be a finite number >= 0, got {value}")
    return value


class CombinedLoss(nn.Module):
    """The seed's four-term loss (see the module docstring for each term).

    Args:
        navigation_weight, energy_weight, sparsity_weight, activity_weight: term weights (>= 0).
        goal_position: fallback goal (mm) when ``forward`` gets no per-episode goal.
        kc_sparsity_target: target KC population sparsity in (0, 1).
        rate_bounds_hz: ``(low, high)`` mean-rate bounds per neuron.
        dt_ms: simulation step.
        no_progress_weight: weight of the no-progress penalties inside the navigation term.
        arrival_fraction: distance (fraction of the start distance) below which
            the per-step no-progress penalty is off.
        kc_population: key of the KC spikes in ``activations``.
        sparsity_window_ms: window of :func:`kc_population_sparsity`.
        sparsity_skip_ms: leading time ignored by the sparsity term (before KCs can respond).
        velocity_scale_mm_s: reference speed of the energy term.
        min_start_distance_mm: floor of ``d0`` (avoids dividing by ~0).
        activity_populations: populations in the activity term (``None`` = all given).
        log_distance_weight: weight of the log-distance part of the navigation term.
    """

    def __init__(
        self,
        navigation_weight: float = 1.0,
        energy_weight: float = 0.01,
        sparsity_weight: float = 0.1,
        activity_weight: float = 0.01,
        goal_position: Sequence[float] = (50.0, 50.0, 0.0),
        kc_sparsity_target: float = 0.02,
        rate_bounds_hz: Tuple[float, float] = (0.0, 200.0),
        dt_ms: float = DEFAULT_DT_MS,
        no_progress_weight: float = 1.0,
        arrival_fraction: float = 0.1,
        kc_population: str = "KC",
        sparsity_window_ms: float = DEFAULT_SPARSITY_WINDOW_MS,
        sparsity_skip_ms: float = 0.0,
        velocity_scale_mm_s: float = 20.0,
        min_start_distance_mm: float = 1.0,
        activity_populations: Optional[Sequence[str]] = None,
        log_distance_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.navigation_weight = _check_weight("navigation_weight", navigation_weight)
        self.energy_weight = _check_weight("energy_weight", energy_weight)
        self.sparsity_weight = _check_weight("sparsity_weight", sparsity_weight)
        self.activity_weight = _check_weight("activity_weight", activity_weight)
        self.no_progress_weight = _check_weight("no_progress_weight", no_progress_weight)
        self.arrival_fraction = _check_weight("arrival_fraction", arrival_fraction)
        self.log_distance_weight = _check_weight("log_distance_weight", log_distance_weight)
        goal = tuple(float(g) for g in goal_position)
        if len(goal) != 3 or not all(math.isfinite(g) for g in goal):
            raise ConfigError(f"CombinedLoss.goal_position must be 3 finite numbers, got {goal_position}")
        target = float(kc_sparsity_target)
        if not 0.0 < target < 1.0:
            raise ConfigError(f"CombinedLoss.kc_sparsity_target must be in (0, 1), got {kc_sparsity_target}")
        lo, hi = (float(v) for v in rate_bounds_hz)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi):
            raise ConfigError(f"CombinedLoss.rate_bounds_hz must satisfy 0 <= low < high, got {rate_bounds_hz}")
        for name, v in (("dt_ms", dt_ms), ("sparsity_window_ms", sparsity_window_ms),
                        ("velocity_scale_mm_s", velocity_scale_mm_s), ("min_start_distance_mm", min_start_distance_mm)):
            if not (math.isfinite(float(v)) and float(v) > 0):
                raise ConfigError(f"CombinedLoss.{name} must be positive, got {v}")
        if not (math.isfinite(float(sparsity_skip_ms)) and float(sparsity_skip_ms) >= 0):
            raise ConfigError(f"CombinedLoss.sparsity_skip_ms must be >= 0, got {sparsity_skip_ms}")
        self.kc_sparsity_target = target
        self.rate_bounds_hz = (lo, hi)
        self.dt_ms = float(dt_ms)
        self.kc_population = str(kc_population)
        self.sparsity_window_ms = float(sparsity_window_ms)
        self.sparsity_skip_steps = int(round(float(sparsity_skip_ms) / self.dt_ms))
        self.velocity_scale_mm_s = float(velocity_scale_mm_s)
        self.min_start_distance_mm = float(min_start_distance_mm)
        self.activity_populations = None if activity_populations is None else tuple(activity_populations)
        self.register_buffer("goal_position", torch.tensor(goal, dtype=torch.float32))

    def kc_population_sparsity(self, spikes: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """:func:`kc_population_sparsity` with this loss's window, dt and skip (the reported metric)."""
        return kc_population_sparsity(
            spikes, self.sparsity_window_ms, self.dt_ms, self.sparsity_skip_steps, reduce=reduce
        )

    # ----------------------------------------------------------------- terms
    def navigation_loss(
        self, positions: torch.Tensor, goal: torch.Tensor, start_positions: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        T = positions.shape[0]
        start = positions[0] if start_positions is None else start_positions
        d0 = torch.linalg.vector_norm(start - goal, dim=-1).clamp(min=self.min_start_distance_mm)  # [B]
        n = torch.linalg.vector_norm(positions - goal[None], dim=-1) / d0[None]  # [T, B]
        w = torch.arange(1, T + 1, device=positions.device, dtype=positions.dtype)
        w = w / w.sum()
        weighted = (w[:, None] * n).sum(0)
        final = n[-1]
        d = n * d0[None]
        d_prev = torch.cat([torch.linalg.vector_norm(start - goal, dim=-1)[None], d[:-1]], dim=0)
        progress = (d_prev - d) / (self.velocity_scale_mm_s * self.dt_ms * 1e-3)
        gate = (d_prev > self.arrival_fraction * d0[None]).to(d.dtype).detach()
        stalled = (gate * (1.0 - progress)).mean(0)
        total = weighted + final + self.no_progress_weight * (torch.relu(final - 1.0) + stalled)
        if self.log_distance_weight > 0:
            log_d = torch.log((d + LOG_DISTANCE_OFFSET_MM) / (d0[None] + LOG_DISTANCE_OFFSET_MM))
            total = total + self.log_distance_weight * (w[:, None] * log_d).sum(0)
        return total.mean()

    def energy_loss(self, velocities: torch.Tensor) -> torch.Tensor:
        if velocities.numel() == 0:
            return velocities.new_zeros(())
        return (velocities * velocities).sum(-1).mean() / self.velocity_scale_mm_s ** 2

    def sparsity_loss(self, kc_spikes: torch.Tensor) -> torch.Tensor:
        s = self.kc_population_sparsity(kc_spikes)
        return ((s - self.kc_sparsity_target) / self.kc_sparsity_target) ** 2

    def activity_loss(self, activations: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        names = list(activations) if self.activity_populations is None else list(self.activity_populations)
        missing = [n for n in names if n not in activations]
        if missing:
            raise ConfigError(f"activations lack populations {missing} (have: {sorted(activations)})")
        lo, hi = self.rate_bounds_hz
        dt_s = self.dt_ms * 1e-3
        terms = []
        for name in names:
            s = activations[name]
            if s.dim() != 3:
                raise ValueError(f"activations[{name!r}] must be [T, B, n], got shape {tuple(s.shape)}")
            if s.numel() == 0:
                continue
            rate = s.mean(dim=0) / dt_s  # [B, n] Hz
            l1 = s.abs().mean() / (hi * dt_s)
            hinge = (torch.relu(lo - rate) / hi) ** 2 + (torch.relu(rate - hi) / hi) ** 2
            terms.append(l1 + hinge.mean())
        if not terms:
            return like.new_zeros(())
        return torch.stack(terms).mean()

    def _as_batch(self, positions, velocities, activations):
        """The design document's single-trajectory form -> the batched form.

        ``positions``/``velocities`` ``[T, 3]`` become ``[T, 1, 3]``; spikes
        ``[T, n]`` become ``[T, 1, n]``; boolean spikes become float; population
        keys of the KC and activity populations match case-insensitively (``'kc'`` is ``'KC'``).
        """
        positions, velocities = torch.as_tensor(positions), torch.as_tensor(velocities)
        single = positions.dim() == 2
        if single:
            positions = positions[:, None, :]
            if velocities.dim() == 2:
                velocities = velocities[:, None, :]
        if not positions.is_floating_point():
            positions = positions.to(torch.get_default_dtype())
        velocities = velocities.to(positions.dtype)
        canon = {n.lower(): n for n in (self.kc_population, *(self.activity_populations or ()))}
        out = {}
        for name, s in (activations or {}).items():
            key = canon.get(str(name).lower(), str(name))
            if key in out:
                raise ConfigError(f"activations name population {key!r} twice (keys differ only in case)")
            s = torch.as_tensor(s)
            if not s.is_floating_point():
                s = s.to(positions.dtype)
            if single and s.dim() == 2:
                s = s[:, None, :]
            out[key] = s
        return positions, velocities, out

    def forward(
        self,
        positions: torch.Tensor,
        velocities: torch.Tensor,
        activations: Optional[Mapping[str, torch.Tensor]] = None,
        goal: Optional[torch.Tensor] = None,
        start_positions: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Loss terms for a batch of episodes.

        Args:
            positions: ``[T, B, 3]`` mm, or ``[T, 3]`` for one trajectory (the
                first row is taken as the start when ``start_positions`` is not given).
            velocities: ``[T', B, 3]`` (or ``[T', 3]``) mm/s.
            activations: population name (``'kc'`` matches ``kc_population``) -> spikes
                ``[T, B', n]`` (or ``[T, n]`` with ``[T, 3]`` positions), float or
                bool; B' may be 2B for stacked hemispheres: every term averages over it.
            goal: per-episode goal ``[B, 3]`` or ``[3]``; default ``goal_position``.
            start_positions: ``[B, 3]``.

        Returns:
            ``{'navigation', 'energy', 'sparsity', 'activity', 'total'}``, 0-d
            tensors (unweighted terms; ``total`` is the weighted sum).
        """
        positions, velocities, activations = self._as_batch(positions, velocities, activations)
        if positions.dim() != 3 or positions.shape[-1] != 3 or positions.shape[0] < 1:
            raise ValueError(f"positions must be [T, 3] or [T, B, 3], got shape {tuple(positions.shape)}")
        if velocities.dim() != 3 or velocities.shape[-1] != 3:
            raise ValueError(f"velocities must be [T, 3] or [T, B, 3], got shape {tuple(velocities.shape)}")
        B = positions.shape[1]
        if goal is None:
            goal = self.goal_position
        goal = goal.to(device=positions.device, dtype=positions.dtype)
        if goal.dim() == 1:
            goal = goal.expand(B, 3)
        if goal.shape != (B, 3):
            raise ValueError(f"goal must be [B={B}, 3] or [3], got shape {tuple(goal.shape)}")
        if start_positions is not None:
            start_positions = start_positions.to(device=positions.device, dtype=positions.dtype)
            if start_positions.shape != (B, 3):
                raise ValueError(f"start_positions must be [B={B}, 3], got {tuple(start_positions.shape)}")
        activations = {} if activations is None else activations
        zero = positions.new_zeros(())
        nav = self.navigation_loss(positions, goal, start_positions)
        energy = self.energy_loss(velocities)
        if self.kc_population in activations:
            sparsity = self.sparsity_loss(activations[self.kc_population])
        elif self.sparsity_weight > 0:
            raise ConfigError(
                f"activations lack the KC population {self.kc_population!r} (have: {sorted(activations)}); "
                "set kc_population or sparsity_weight=0"
            )
        else:
            sparsity = zero
        activity = self.activity_loss(activations, positions) if activations else zero
        total = (
            self.navigation_weight * nav
            + self.energy_weight * energy
            + self.sparsity_weight * sparsity
            + self.activity_weight * activity
        )
        return {"navigation": nav, "energy": energy, "sparsity": sparsity, "activity": activity, "total": total}


# ------------------------------------------------------------------ metrics
ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]


def _as_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


class _ClassOrInstanceMethod:
    """A method callable on an instance or on the class; on the class it runs
    on a default instance (``TrajectoryAnalyzer.compute_trajectory_metrics(...)``
    as the design document calls it)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, obj, cls):
        return functools.partial(self.fn, obj if obj is not None else cls())


class TrajectoryAnalyzer:
    """Behaviour metrics of trajectories (numpy or torch inputs, no gradients).

    ``compute_trajectory_metrics`` works on an instance (``grid_mm`` of the
    exploration area set there) or on the class (default 1 mm grid).
    """

    def __init__(self, grid_mm: float = 1.0) -> None:
        if not (math.isfinite(grid_mm) and grid_mm > 0):
            raise ConfigError(f"grid_mm must be positive, got {grid_mm}")
        self.grid_mm = float(grid_mm)

    @_ClassOrInstanceMethod
    def compute_trajectory_metrics(
        self,
        positions: ArrayLike,
        velocities: Optional[ArrayLike],
        goal: ArrayLike,
        success_radius_mm: Optional[float] = None,
        dt_ms: float = DEFAULT_DT_MS,
    ) -> Dict[str, object]:
        """Metrics of ``positions [T, 3]`` or ``[T, B, 3]`` (row ``t`` at time ``t * dt_ms``).

        * ``final_distance_to_goal`` (mm), ``mean_distance_to_goal`` (mm, over all rows).
        * ``exploration_area`` (mm^2): number of distinct ``grid_mm x grid_mm``
          cells of the x-y plane that contain a sampled position, times
          ``grid_mm^2`` (1 mm grid by default).
        * ``path_length`` (mm): sum of distances between consecutive positions.
        * ``time_to_goal`` (ms): first ``t * dt_ms`` with distance <= radius, NaN if never.
        * ``success``: distance <= radius at the last row.
        * ``mean_speed`` (mm/s, from ``velocities`` if given, else from positions).

        ``success_radius_mm`` defaults to 10 % of the mean start distance (the
        arena's default rule).  For ``[T, B, 3]`` each metric is a ``[B]`` array
        and ``<name>_mean`` is its mean (``time_to_goal_mean`` over episodes that
        reached the goal, NaN if none), plus ``success_rate``; for ``[T, 3]``
        they are floats / a bool.
        """
        pos = _as_np(positions)
        single = pos.ndim == 2
        if single:
            pos = pos[:, None, :]
        if pos.ndim != 3 or pos.shape[-1] != 3 or pos.shape[0] < 1:
            raise ValueError(f"positions must be [T, 3] or [T, B, 3], got shape {pos.shape}")
        if not (math.isfinite(dt_ms) and dt_ms > 0):
            raise ValueError(f"dt_ms must be positive, got {dt_ms}")
        T, B, _ = pos.shape
        g = _as_np(goal)
        if g.shape == (3,):
            g = np.broadcast_to(g, (B, 3))
        if g.shape != (B, 3):
            raise ValueError(f"goal must be [3] or [B={B}, 3], got shape {g.shape}")
        dist = np.linalg.norm(pos - g[None], axis=-1)  # [T, B]
        if success_radius_mm is None:
            radius = 0.1 * float(dist[0].mean())
        else:
            radius = float(success_radius_mm)
            if not radius > 0:
                raise ValueError(f"success_radius_mm must be positive, got {success_radius_mm}")
        steps = np.linalg.norm(np.diff(pos, axis=0), axis=-1)  # [T-1, B]
        path_length = steps.sum(axis=0)
        within = dist <= radius
        reached = within.any(axis=0)
        first = np.argmax(within, axis=0)
        time_to_goal = np.where(reached, first * float(dt_ms), np.nan)
        cells = np.floor(pos[..., :2] / self.grid_mm).astype(np.int64)
        area = np.array([len({(int(a), int(b)) for a, b in cells[:, i]}) for i in range(B)], dtype=np.float64)
        area *= self.grid_mm ** 2
        if velocities is not None:
            vel = _as_np(velocities)
            if single and vel.ndim == 2:
                vel = vel[:, None, :]
            if vel.ndim != 3 or vel.shape[1:] != (B, 3):
                raise ValueError(f"velocities must match positions' batch: got shape {vel.shape}")
            mean_speed = np.linalg.norm(vel, axis=-1).mean(axis=0) if vel.shape[0] else np.zeros(B)
        else:
            duration_s = max(T - 1, 1) * dt_ms * 1e-3
            mean_speed = path_length / duration_s
        per = {
            "final_distance_to_goal": dist[-1],
            "mean_distance_to_goal": dist.mean(axis=0),
            "exploration_area": area,
            "path_length": path_length,
            "time_to_goal": time_to_goal,
            "success": within[-1],
            "mean_speed": mean_speed,
        }
        if single:
            out: Dict[str, object] = {k: (bool(v[0]) if k == "success" else float(v[0])) for k, v in per.items()}
            out["success_radius_mm"] = radius
            return out
        out = dict(per)
        for k, v in per.items():
            if k == "time_to_goal":
                out[k + "_mean"] = float(np.nanmean(v)) if np.any(np.isfinite(v)) else float("nan")
            elif k == "success":
                continue
            else:
                out[k + "_mean"] = float(np.mean(v))
        out["success_rate"] = float(np.mean(within[-1]))
        out["success_radius_mm"] = radius
        return out


__all__ = ["CombinedLoss", "TrajectoryAnalyzer", "kc_population_sparsity", "LOSS_TERMS", "DEFAULT_SPARSITY_WINDOW_MS"]
