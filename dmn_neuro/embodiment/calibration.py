"""``dmn-neuro embody calibrate``: measure the body the arena should imitate.

For each pair ``(d_left, d_right)`` on a grid of the hybrid turning controller's
descending drive, the body walks ``settle_s`` to leave the transient, then
``measure_s`` during which its mean forward speed (displacement along the
heading / time) and mean turning rate (unwrapped heading change / time) are
recorded.  The odor sensors' positions in the body frame (forward, lateral, and
height above the floor; mean over the straight-walking pair) are measured too.
The result is a JSON table (format ``dmn-neuro-body-calibration``) whose
``motor_table`` (the measured table made mirror-symmetric, :func:`symmetrised`;
the raw one is ``motor_table_measured``) goes into ``environment.arena.motor_table`` of a training config
and whose ``arena`` block gives the antenna geometry (:func:`arena_overrides`).

Then :func:`compare` drives the body and the calibrated arena with the same drive
sequences and draws both trajectories side by side (``calibration.png``).

Pairs run in a local process pool (one body per pair: a pair's result does not
depend on the order of the others).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from dmn_neuro.errors import DMNError

FORMAT = "dmn-neuro-body-calibration"
DEFAULT_DRIVES = (-0.4, 0.0, 0.3, 0.6, 0.9, 1.2)
#: drive sequences for the arena-vs-body figure: (name, [(seconds, d_left, d_right), ...])
TEST_SEQUENCES = (
    ("straight", [(1.0, 1.0, 1.0)]),
    ("left then right", [(0.5, 0.4, 1.1), (0.5, 1.1, 0.4)]),
    ("slow arc", [(1.0, 0.6, 0.9)]),
)


def _walk(drive_seq, seconds_settle: float = 0.0, record_sensors: bool = False):
    """Run one body with a drive sequence; returns times, x, y, unwrapped heading (and sensors)."""
    from dmn_neuro.embodiment.body import PHYSICS_TIMESTEP_S, body_pose, make_body, sensor_positions

    sim = make_body(None)
    obs, _ = sim.reset(seed=0)
    rows, sens = [], []
    t = 0.0
    wall = time.perf_counter()
    for seconds, dl, dr in drive_seq:
        action = np.array([dl, dr], dtype=float)
        for _ in range(int(round(seconds / PHYSICS_TIMESTEP_S))):
            obs, *_ = sim.step(action)
            t += PHYSICS_TIMESTEP_S
            if len(rows) == 0 or t - rows[-1][0] >= 0.004 - 1e-9:
                x, y, h = body_pose(obs)
                rows.append((t, x, y, h))
                if record_sensors and t >= seconds_settle:
                    p = sensor_positions(sim)
                    rel = p[:, :2] - np.array([x, y])
                    fwd = rel @ np.array([math.cos(h), math.sin(h)])
                    lat = rel @ np.array([-math.sin(h), math.cos(h)])
                    sens.append(np.stack([fwd, lat, p[:, 2]], axis=1))
    wall = time.perf_counter() - wall
    a = np.array(rows)
    a[:, 3] = np.unwrap(a[:, 3])
    return a, (np.mean(sens, axis=0) if sens else None), wall, t


def _measure_pair(args):
    dl, dr, settle_s, measure_s = args
    a, sens, wall, sim_t = _walk([(settle_s + measure_s, dl, dr)], settle_s, record_sensors=(dl == dr and dl > 0))
    m = a[a[:, 0] >= settle_s - 1e-9]
    dt = m[-1, 0] - m[0, 0]
    step = np.diff(m[:, 1:3], axis=0)
    mid_h = 0.5 * (m[1:, 3] + m[:-1, 3])
    forward = np.sum(step[:, 0] * np.cos(mid_h) + step[:, 1] * np.sin(mid_h))
    return {"d_left": dl, "d_right": dr, "speed_mm_s": float(forward / dt), "omega_rad_s": float((m[-1, 3] - m[0, 3]) / dt),
            "sensors": None if sens is None else sens.tolist(), "wall_s": wall, "sim_s": sim_t}


def calibrate(drives: Sequence[float] = DEFAULT_DRIVES, settle_s: float = 0.3, measure_s: float = 0.5,
              workers: int = 2, progress: Optional[Callable[[int, int], None]] = None) -> Dict:
    """Measure the motor table and sensor geometry; returns the calibration mapping."""
    from dmn_neuro.embodiment.body import SENSOR_ORDER, map_bodies, require_flygym
    from dmn_neuro.environment.motor import MotorTable

    require_flygym()
    drives = [float(d) for d in drives]
    MotorTable(drives, [[0.0] * len(drives)] * len(drives), [[0.0] * len(drives)] * len(drives))  # validates the grid
    if not (settle_s >= 0 and measure_s > 0):
        raise DMNError(f"settle_s must be >= 0 and measure_s > 0, got {settle_s}, {measure_s}")
    jobs = [(dl, dr, settle_s, measure_s) for dl in drives for dr in drives]
    results: List[dict] = map_bodies(_measure_pair, jobs, workers, progress)
    n = len(drives)
    speed = [[0.0] * n for _ in range(n)]
    omega = [[0.0] * n for _ in range(n)]
    for r in results:
        i, j = drives.index(r["d_left"]), drives.index(r["d_right"])
        speed[i][j] = r["speed_mm_s"]
        omega[i][j] = r["omega_rad_s"]
    measured = {"drives": drives, "speed_mm_s": speed, "omega_rad_s": omega}
    sens = np.mean([r["sensors"] for r in results if r["sensors"] is not None], axis=0)  # [4, 3]
    sites = {name: {"forward_mm": float(s[0]), "lateral_mm": float(s[1]), "height_mm": float(s[2])}
             for name, s in zip(SENSOR_ORDER, sens)}
    sim_s = sum(r["sim_s"] for r in results)
    wall_s = sum(r["wall_s"] for r in results)
    return {
        "format": FORMAT, "format_version": 1,
        "body": {"simulator": "flygym-gymnasium 1.3.2 HybridTurningController", "physics_timestep_s": 1e-4,
                 "settle_s": settle_s, "measure_s": measure_s},
        "motor_table": symmetrised(measured),
        "motor_table_measured": measured,
        "sensors": {"sites": sites, "height_mm": float(sens[:, 2].mean())},
        "arena": arena_overrides_from_sites(sites),
        "pairs": [{k: v for k, v in r.items() if k != "sensors"} for r in results],
        "sim_s_per_wall_s": sim_s / wall_s if wall_s > 0 else None,
    }


def symmetrised(table: Dict) -> Dict:
    """The table with the body's mirror symmetry imposed: ``speed(l, r) = speed(r, l)``,
    ``omega(l, r) = -omega(r, l)`` (averages of the two measurements; the body
    model is bilaterally symmetric, its gait-phase drift over one measurement is
    not a property of the drive pair)."""
    s, o = np.array(table["speed_mm_s"]), np.array(table["omega_rad_s"])
    return {"drives": list(table["drives"]), "speed_mm_s": (0.5 * (s + s.T)).tolist(),
            "omega_rad_s": (0.5 * (o - o.T)).tolist()}


def arena_overrides_from_sites(sites: dict) -> Dict[str, Dict[str, float]]:
    """Model antenna geometry per sensor set (mean of the two sides' |lateral|)."""
    def geo(names):
        fwd = float(np.mean([sites[n]["forward_mm"] for n in names]))
        lat = float(np.mean([abs(sites[n]["lateral_mm"]) for n in names]))
        return {"antenna_forward_mm": fwd, "antenna_lateral_mm": lat}

    return {"antennae": geo(["left antenna", "right antenna"]), "palps": geo(["left palp", "right palp"]),
            "both": geo(list(sites))}


def load_calibration(path) -> Dict:
    """Read and check a calibration file (one-line :class:`DMNError` on anything wrong)."""
    import json
    from pathlib import Path

    from connectome.errors import ConfigError
    from dmn_neuro.environment.motor import MotorTable

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DMNError(f"calibration file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DMNError(f"calibration file {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DMNError(f"{path} is not a body calibration (format {FORMAT!r})")
    try:
        MotorTable.from_dict(data.get("motor_table"))
        float(data["sensors"]["height_mm"])
        for name, geo in data.get("arena", {}).items():  # the model-antenna position of each sensor set
            if not all(math.isfinite(float(geo[k])) for k in ("antenna_forward_mm", "antenna_lateral_mm")):
                raise ValueError(f"arena.{name} has a non-finite sensor position")
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DMNError(f"calibration file {path}: {exc}") from None
    return data


def arena_path(motor_table: Dict, drive_seq, x: float, y: float, heading: float, dt_ms: float = 4.0) -> List:
    """``[(t, x, y), ...]`` of the calibrated arena driven by ``drive_seq`` ((seconds,
    d_left, d_right), ...) from a pose: the table's kinematics and :meth:`OdorArena.move`."""
    import torch

    from dmn_neuro.environment.arena import ArenaConfig, OdorArena

    far = 1e4  # walls far away: the comparison paths start anywhere
    arena = OdorArena(ArenaConfig(motor_table=motor_table, arena_size_mm=(2 * far, 2 * far), goal_mm=(far, far, 0.0)),
                      dt_ms=dt_ms)
    st = arena.reset(1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    st = st._replace(pos=torch.tensor([[far + x, far + y, 0.0]], dtype=torch.float64),
                     heading=torch.tensor([heading], dtype=torch.float64))
    path, t = [(0.0, x, y)], 0.0
    for seconds, dl, dr in drive_seq:
        speed, omega = arena.motor_table.kinematics(torch.tensor([[dl, dr]], dtype=torch.float64))
        for _ in range(int(round(seconds / arena.dt_s))):
            st, _ = arena.move(st, speed, omega)
            t += arena.dt_s
            path.append((t, float(st.pos[0, 0]) - far, float(st.pos[0, 1]) - far))
    return path


def compare(calibration: Dict, dt_ms: float = 4.0, workers: int = 2) -> Dict:
    """Body and calibrated-arena trajectories for :data:`TEST_SEQUENCES` (same drives)."""
    from dmn_neuro.embodiment.body import map_bodies

    body = map_bodies(_walk, [s for _, s in TEST_SEQUENCES], workers)
    out = {}
    for (name, seq), (a, _, wall, sim_t) in zip(TEST_SEQUENCES, body):
        traj = arena_path(calibration["motor_table"], seq, a[0, 1], a[0, 2], a[0, 3], dt_ms)
        out[name] = {"body": a[:, :3].tolist(), "arena": traj, "drives": seq, "body_wall_s": wall, "body_sim_s": sim_t}
    return out


def plot_calibration(calibration: Dict, comparison: Dict, path) -> None:
    """Speed and turning-rate tables (heat maps) and body vs arena trajectories."""
    from dmn_neuro.analysis.plots import _plt, _save

    plt = _plt()
    tab = calibration["motor_table"]
    d = tab["drives"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, key, title, cmap in ((axes[0], "speed_mm_s", "forward speed (mm/s)", "viridis"),
                                 (axes[1], "omega_rad_s", "turning rate (rad/s, + = left)", "coolwarm")):
        v = np.array(tab[key])
        lim = np.abs(v).max() or 1.0
        im = ax.imshow(v, origin="lower", cmap=cmap, vmin=(-lim if key == "omega_rad_s" else 0), vmax=lim)
        for i in range(len(d)):
            for j in range(len(d)):
                ax.text(j, i, f"{v[i, j]:.1f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(d)), [f"{x:g}" for x in d])
        ax.set_yticks(range(len(d)), [f"{x:g}" for x in d])
        ax.set_xlabel("right drive")
        ax.set_ylabel("left drive")
        ax.set_title(f"body: {title}", fontsize=9)
        fig.colorbar(im, ax=ax)
    ax = axes[2]
    for k, (name, c) in enumerate(comparison.items()):
        b, a = np.array(c["body"]), np.array(c["arena"])
        gap = float(np.hypot(b[-1, 1] - a[-1, 1], b[-1, 2] - a[-1, 2]))
        ax.plot(b[:, 1] - b[0, 1], b[:, 2] - b[0, 2], "-", color=f"C{k}", label=f"{name}: body")
        ax.plot(a[:, 1] - a[0, 1], a[:, 2] - a[0, 2], "--", color=f"C{k}", label=f"{name}: arena (end {gap:.1f} mm apart)")
    ax.set_aspect("equal")
    ax.set_xlabel("x (mm)")
    ax.set_ylabel("y (mm)")
    ax.set_title("same drives: body (solid) vs calibrated arena (dashed)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2)
    _save(fig, Path(path))


__all__ = ["DEFAULT_DRIVES", "FORMAT", "TEST_SEQUENCES", "arena_overrides_from_sites", "arena_path", "calibrate",
           "compare",
           "load_calibration", "plot_calibration", "symmetrised"]
