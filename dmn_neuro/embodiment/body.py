"""The NeuroMechFly body (flygym-gymnasium 1.3.2) behind the arena's interface.

:class:`BodyArena` has the methods :class:`~dmn_neuro.environment.arena.OdorArena`
offers the closed loop (``reset``, ``concentration``, ``step``, ``success_radius``),
so :class:`~dmn_neuro.environment.agent.NavigationAgent` runs the trained circuit
in the body with the same code as in the arena (its stepped loop, batch of one):

* **Odor.** flygym's ``OdorArena`` with one source at the episode's source
  position, raised to the calibrated height of the odor sensors, and a
  ``diffuse_func`` that is the training arena's own plume (:meth:`OdorArena.field`
  evaluated along a ray), so a sensor at planar distance ``r`` smells what a
  model antenna at ``r`` smelled in training.  Each side's concentration is the
  mean of that side's palp and antenna (``sensors="both"``) or one of them.
* **Motor.** The DN spikes go through the arena's motor filter
  (:meth:`OdorArena.motor_update`) and the calibrated drive map
  (:class:`~dmn_neuro.environment.motor.MotorTable.drive`); the two drives are the
  hybrid turning controller's descending action ``[left, right]``, held for the
  ``dt / timestep`` physics steps of one circuit step.
* **State.** Position and heading are the body's (thorax position, heading from
  ``fly_orientation``); ``velocity`` is the displacement over the step.

flygym is imported only here (``make embody-env``); without it,
:func:`require_flygym` raises a one-line :class:`~dmn_neuro.errors.DMNError`.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch

from dmn_neuro.errors import DMNError
from dmn_neuro.environment.arena import EnvState, OdorArena
from dmn_neuro.environment.motor import MotorTable

#: flygym's sensor order in ``obs["odor_intensity"]`` and the sensor sites
SENSOR_ORDER = ("left palp", "right palp", "left antenna", "right antenna")
SENSOR_SETS = ("both", "antennae", "palps")
PHYSICS_TIMESTEP_S = 1e-4
_CONTACT = [f"{leg}{seg}" for leg in ("LF", "LM", "LH", "RF", "RM", "RH")
            for seg in ("Tibia", "Tarsus1", "Tarsus2", "Tarsus3", "Tarsus4", "Tarsus5")]


def require_flygym():
    """Import flygym-gymnasium (headless rendering by EGL unless MUJOCO_GL is set)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import flygym_gymnasium  # noqa: F401
        from flygym_gymnasium.examples.locomotion import HybridTurningController  # noqa: F401
    except ImportError as exc:
        raise DMNError(f"the NeuroMechFly body needs flygym-gymnasium 1.3.2 (`make embody-env`, then run with "
                       f".venv-embody/bin/dmn-neuro): {exc}") from None
    import flygym_gymnasium

    return flygym_gymnasium


def make_body(source_xyz=None, diffuse_func=None, spawn_xy=(0.0, 0.0), heading=0.0, video: bool = False,
              camera_height_mm: float = 45.0, camera_center=None):
    """A flygym hybrid-turning-controller simulation with an odor arena
    (``source_xyz`` ``[3]``; no odor source when None) and optionally a top camera."""
    fg = require_flygym()
    from flygym_gymnasium.arena import FlatTerrain, OdorArena as FlyOdorArena
    from flygym_gymnasium.examples.locomotion import HybridTurningController

    if source_xyz is None:
        arena = FlatTerrain()
    else:
        arena = FlyOdorArena(odor_source=np.asarray([source_xyz], dtype=float), peak_odor_intensity=np.array([[1.0]]),
                             diffuse_func=diffuse_func, marker_size=0.3)
    fly = fg.Fly(spawn_pos=(float(spawn_xy[0]), float(spawn_xy[1]), 0.2), spawn_orientation=(0.0, 0.0, float(heading)),
                 contact_sensor_placements=_CONTACT, enable_olfaction=True, enable_adhesion=True,
                 draw_adhesion=False)
    cameras = []
    if video:
        cx, cy = camera_center if camera_center is not None else spawn_xy
        cameras = [fg.Camera(attachment_point=arena.root_element.worldbody, camera_name="top_cam",
                             timestamp_text=True, play_speed=0.2, fps=25, window_size=(480, 480),
                             camera_parameters={"mode": "fixed", "pos": (float(cx), float(cy), camera_height_mm),
                                                "euler": (0, 0, 0), "fovy": 45})]
    sim = HybridTurningController(fly=fly, arena=arena, cameras=cameras, timestep=PHYSICS_TIMESTEP_S)
    return sim


def map_bodies(fn, jobs, workers: int = 2, progress=None) -> list:
    """``[fn(job) for job in jobs]`` in a local process pool (each job builds its own
    body), in order, calling ``progress(done, total)`` as results arrive."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = list(jobs)
    out = []
    if progress:
        progress(0, len(jobs))
    with ProcessPoolExecutor(max_workers=max(1, int(workers))) as pool:
        for r in pool.map(fn, jobs):
            out.append(r)
            if progress:
                progress(len(out), len(jobs))
    return out


def trained_sensors(calibration: dict, arena_config) -> Optional[str]:
    """The calibration's sensor set (``palps``, ``antennae``, ``both``) at whose measured
    position the checkpoint's model antennae sat in training (within 1 um), else None."""
    for name, geo in sorted(calibration.get("arena", {}).items()):
        if abs(geo["antenna_forward_mm"] - arena_config.antenna_forward_mm) < 1e-3 and \
                abs(geo["antenna_lateral_mm"] - arena_config.antenna_lateral_mm) < 1e-3:
            return name
    return None


def body_pose(obs):
    """``(x, y, heading)`` of the thorax from a flygym observation."""
    p, o = obs["fly"][0], obs["fly_orientation"]
    return float(p[0]), float(p[1]), math.atan2(float(o[1]), float(o[0]))


def sensor_positions(sim) -> np.ndarray:
    """World positions ``[4, 3]`` of the odor sensors, in :data:`SENSOR_ORDER`."""
    return np.asarray(sim.physics.bind(sim.fly._antennae_sensors).sensordata, dtype=float).reshape(-1, 3)


def combine_sensors(intensity, sensors: str) -> np.ndarray:
    """``[left, right]`` from flygym's four intensities (palp L, palp R, antenna L, antenna R)."""
    v = np.asarray(intensity, dtype=float).reshape(-1)
    if sensors == "palps":
        return v[[0, 1]]
    if sensors == "antennae":
        return v[[2, 3]]
    return 0.5 * (v[[0, 1]] + v[[2, 3]])


class BodyArena:
    """One episode at a time in the NeuroMechFly body, with the arena's interface.

    ``arena``: the checkpoint's :class:`OdorArena` (its config must carry the
    ``motor_table`` of a body calibration; episodes are drawn by its ``reset``);
    ``calibration``: the calibration mapping (for the sensor height);
    ``sensors``: which odor sensors make each side (:data:`SENSOR_SETS`, or ``auto``:
    :func:`trained_sensors`);
    ``body_factory``: :func:`make_body` (default) or a stand-in with its signature.
    """

    def __init__(self, arena: OdorArena, calibration: dict, sensors: str = "both", video: bool = False,
                 body_factory=None) -> None:
        cfg = arena.config
        if cfg.motor_table is None:
            raise DMNError("this checkpoint was trained without a body calibration (environment.arena.motor_table); "
                           "train with one from `dmn-neuro embody calibrate` to run it in the body")
        if cfg.randomised or any(cfg.wind):
            raise DMNError("the body runs isotropic plumes only: the checkpoint's arena has wind or per-episode conditions")
        if sensors == "auto":
            sensors = trained_sensors(calibration, cfg)
            if sensors is None:
                raise DMNError("the checkpoint's model antennae (ArenaConfig antenna_forward_mm / antenna_lateral_mm) "
                               "sit at none of the calibration's sensor positions; pass --sensors palps, antennae or both")
        if sensors not in SENSOR_SETS:
            raise DMNError(f"sensors must be one of {SENSOR_SETS} or 'auto', got {sensors!r}")
        self.arena = arena
        self.config = cfg
        self.dt_ms, self.dt_s = arena.dt_ms, arena.dt_s
        self.motor = MotorTable.from_dict(cfg.motor_table)
        self.sensors = sensors
        self.sensor_height_mm = float(calibration["sensors"]["height_mm"])
        self.substeps = int(round(self.dt_s / PHYSICS_TIMESTEP_S))
        if abs(self.substeps * PHYSICS_TIMESTEP_S - self.dt_s) > 1e-9:
            raise DMNError(f"the circuit step {self.dt_ms} ms is not a whole number of physics steps")
        self.video = video
        self.body_factory = body_factory or make_body  # tests pass a stand-in with flygym's interface
        self.sim = None
        self._obs = None
        self.wall_physics_s = 0.0

    @property
    def success_radius(self) -> float:
        return self.arena.success_radius

    def diffuse_func(self, source: torch.Tensor):
        """flygym's ``diffuse_func(distance)``: the training arena's plume along a ray."""
        src = source.detach().double().reshape(1, 3)

        def f(d):
            d = np.asarray(d, dtype=float)
            pts = torch.zeros(1, d.size, 3, dtype=torch.float64)
            pts[0, :, 0] = src[0, 0] + torch.from_numpy(d.reshape(-1))
            pts[0, :, 1] = src[0, 1]
            pts[0, :, 2] = src[0, 2]
            return self.arena.field(pts, src, None).numpy().reshape(d.shape)

        return f

    def reset(self, batch_size: int, generator: torch.Generator, device=None) -> EnvState:
        if batch_size != 1:
            raise DMNError("the body runs one episode at a time (batch_size 1)")
        return self.start(self.arena.reset(1, generator=generator, device=device))

    def start(self, env: EnvState) -> EnvState:
        """Build the body at ``env``'s start pose, with the odor at ``env``'s source."""
        src = env.source[0].double()
        source_xyz = (float(src[0]), float(src[1]), self.sensor_height_mm)
        start = env.pos[0].double()
        center = (0.5 * (float(start[0]) + float(src[0])), 0.5 * (float(start[1]) + float(src[1])))
        self.sim = self.body_factory(source_xyz, self.diffuse_func(src), spawn_xy=(float(start[0]), float(start[1])),
                             heading=float(env.heading[0]), video=self.video, camera_center=center)
        self._obs, _ = self.sim.reset(seed=0)
        self.dtype = env.pos.dtype
        x, y, h = body_pose(self._obs)
        pos = torch.tensor([[x, y, float(env.pos[0, 2])]], dtype=self.dtype)
        return env._replace(pos=pos, start_pos=pos.clone(), heading=torch.tensor([h], dtype=self.dtype),
                            motor=torch.zeros(1, 2, dtype=self.dtype))

    def concentration(self, state: EnvState) -> torch.Tensor:
        """``[1, 2]`` (left, right) from the body's odor sensors."""
        c = combine_sensors(self._obs["odor_intensity"][0], self.sensors)
        out = torch.tensor(c, dtype=self.dtype).reshape(1, 2)
        return out * 0.0 if self.config.odor_removed else out

    def step(self, state: EnvState, dn_left: torch.Tensor, dn_right: torch.Tensor):
        import time

        motor = self.arena.motor_update(state.motor, dn_left.detach(), dn_right.detach())
        action = self.motor.drive(motor, self.config.speed_gain, self.config.turn_gain)[0].double().numpy().copy()
        t0 = time.perf_counter()
        for _ in range(self.substeps):
            self._obs, *_ = self.sim.step(action)
            if self.video:
                self.sim.render()
        self.wall_physics_s += time.perf_counter() - t0
        x, y, h = body_pose(self._obs)
        pos = torch.tensor([[x, y, float(state.pos[0, 2])]], dtype=self.dtype)
        velocity = (pos - state.pos) / self.dt_s
        return state._replace(pos=pos, heading=torch.tensor([h], dtype=self.dtype), motor=motor,
                              step=state.step + 1), velocity

    def save_video(self, path) -> None:
        if self.sim is not None and self.video:
            self.sim.cameras[0].save_video(path)


__all__ = ["BodyArena", "SENSOR_ORDER", "SENSOR_SETS", "body_pose", "combine_sensors", "make_body", "map_bodies",
           "require_flygym", "sensor_positions", "trained_sensors"]
