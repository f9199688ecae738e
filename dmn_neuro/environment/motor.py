"""The arena's motor model taken from a body calibration (``dmn-neuro embody calibrate``).

A :class:`MotorTable` holds the NeuroMechFly body's measured forward speed
(mm/s) and turning rate (rad/s, counter-clockwise = left turn) on a grid of the
two-sided descending drive ``(d_left, d_right)`` of its hybrid turning
controller.  With ``ArenaConfig.motor_table`` set, the arena replaces its
``tanh`` motor model by a common and a differential drive, with the gains of the
``tanh`` model (``m`` = filtered DN rate of each side, Hz)::

    common = drive_max * tanh(speed_gain * (m_left + m_right) / 2)
    diff   = (drive_max - drive_min) * tanh(turn_gain * (m_left - m_right))
    d_left, d_right = clamp(common +- diff / 2, drive_min, drive_max)
    speed, omega = bilinear interpolation of the table at (d_left, d_right)

where ``drive_min <= 0 < drive_max`` are the ends of the grid.  A negative drive
makes that side's legs step backwards (flygym's hybrid turning controller), so a
grid reaching below 0 lets the fly turn on the spot: with drives ``>= 0`` only the
body's tightest turn has a radius of ~2.6 mm, close to the plume's length scale.  (One gain for both sides'
drives, ``drive = drive_max tanh(speed_gain m)``, made turning ~25x less sensitive
to a left-right difference than in the ``tanh`` model: the shipped navigator,
whose DN rates differ by a few Hz between sides, did not turn in the body's arena.)  Motor index 0 is the
body's *left* drive; in the body, lowering one side's drive turns the fly
towards that side, which the measured table carries (no sign convention is
assumed here).  The same :meth:`MotorTable.drive` turns DN activity into the
body's action in :mod:`dmn_neuro.embodiment`, so a model trained on the table
sends the body the drives it was trained with.  Interpolation is differentiable
in the drives (piecewise linear), so BPTT runs through it.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from connectome.errors import ConfigError

#: the keys of a motor table (the arena config keeps exactly these, JSON-safe)
TABLE_KEYS = ("drives", "speed_mm_s", "omega_rad_s")


class MotorTable:
    """Speed and turning rate on a ``drives x drives`` grid (rows = left drive)."""

    def __init__(self, drives: Sequence[float], speed_mm_s, omega_rad_s) -> None:
        g = [float(d) for d in drives]
        n = len(g)
        if n < 2 or any(not math.isfinite(d) for d in g) or any(b <= a for a, b in zip(g, g[1:])) or g[-1] <= 0 \
                or g[0] > 0:
            raise ConfigError(f"motor_table.drives must be >= 2 increasing finite values from <= 0 to > 0, "
                              f"got {list(drives)}")
        self.drives = g
        self.tables = {}
        for name, tab in (("speed_mm_s", speed_mm_s), ("omega_rad_s", omega_rad_s)):
            rows = [[float(v) for v in row] for row in tab] if isinstance(tab, (list, tuple)) else None
            if rows is None or len(rows) != n or any(len(r) != n for r in rows) or \
                    any(not math.isfinite(v) for r in rows for v in r):
                raise ConfigError(f"motor_table.{name} must be a finite {n}x{n} table (rows = left drive)")
            self.tables[name] = rows

    @classmethod
    def from_dict(cls, d) -> "MotorTable":
        if not isinstance(d, dict):
            raise ConfigError(f"motor_table must be a mapping with keys {TABLE_KEYS}, got {type(d).__name__}")
        missing = [k for k in TABLE_KEYS if k not in d]
        if missing:
            raise ConfigError(f"motor_table lacks {missing[0]!r} (keys: {list(TABLE_KEYS)})")
        return cls(d["drives"], d["speed_mm_s"], d["omega_rad_s"])

    def to_dict(self) -> dict:
        return {"drives": list(self.drives), **{k: [list(r) for r in v] for k, v in self.tables.items()}}

    @property
    def drive_max(self) -> float:
        return self.drives[-1]

    @property
    def drive_min(self) -> float:
        return self.drives[0]

    def drive(self, motor: torch.Tensor, speed_gain: float, turn_gain: float) -> torch.Tensor:
        """Body drives ``[B, 2]`` (left, right) from the filtered DN rates ``motor [B, 2]`` (Hz)."""
        common = self.drive_max * torch.tanh(speed_gain * motor.mean(-1))
        diff = (self.drive_max - self.drive_min) * torch.tanh(turn_gain * (motor[:, 0] - motor[:, 1]))
        return torch.stack([common + 0.5 * diff, common - 0.5 * diff], dim=-1).clamp(self.drive_min, self.drive_max)

    def kinematics(self, drive: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(speed [B], omega [B])`` at drives ``[B, 2]`` (clamped to the grid)."""
        g = torch.tensor(self.drives, dtype=drive.dtype, device=drive.device)
        d = drive.clamp(g[0], g[-1])
        idx = (torch.bucketize(d.detach().contiguous(), g, right=True) - 1).clamp(0, len(self.drives) - 2)
        lo, hi = g[idx], g[idx + 1]
        w = (d - lo) / (hi - lo)  # [B, 2]
        i, j = idx[:, 0], idx[:, 1]
        u, v = w[:, 0], w[:, 1]
        out = []
        for name in ("speed_mm_s", "omega_rad_s"):
            t = torch.tensor(self.tables[name], dtype=drive.dtype, device=drive.device)
            out.append((1 - u) * (1 - v) * t[i, j] + u * (1 - v) * t[i + 1, j]
                       + (1 - u) * v * t[i, j + 1] + u * v * t[i + 1, j + 1])
        return out[0], out[1]


__all__ = ["MotorTable", "TABLE_KEYS"]
