"""The body's side of the loop without the body: the calibrated motor table, the arena
that uses it, the closed loop through :class:`BodyArena` (with a stand-in body that
walks by the table, so the body's loop must reproduce the arena's), and the
``embody`` command's refusals. The real NeuroMechFly body is in test_embodied.py
(``make test-embodied``)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from connectome.errors import ConfigError
from dmn_neuro.cli import cli
from dmn_neuro.embodiment.body import PHYSICS_TIMESTEP_S, BodyArena, combine_sensors
from dmn_neuro.embodiment.calibration import FORMAT, load_calibration, symmetrised
from dmn_neuro.environment.arena import ArenaConfig, OdorArena
from dmn_neuro.environment.motor import MotorTable
from dmn_neuro.errors import DMNError
from dmn_neuro.training.checkpoint import load_circuit
from dmn_neuro.training.config import TrainingConfig
from dmn_neuro.training.optimizer import build_components, episode_generator
from _helpers import assert_one_line_error

REPO = Path(__file__).resolve().parent.parent
TINY_YAML = REPO / "examples" / "configs" / "tiny.yaml"
DRIVES = [0.0, 0.5, 1.0]
SPEED = [[0.0, 2.0, 6.0], [2.0, 5.0, 9.0], [6.0, 9.0, 14.0]]
OMEGA = [[0.0, 1.0, 3.0], [-1.0, 0.0, 1.5], [-3.0, -1.5, 0.0]]
TABLE = {"drives": DRIVES, "speed_mm_s": SPEED, "omega_rad_s": OMEGA}
GEOMETRY = {"left palp": (0.6, 0.3), "right palp": (0.6, -0.3), "left antenna": (1.0, 0.09),
            "right antenna": (1.0, -0.09)}
HEIGHT = 0.7


def calibration_dict():
    sites = {k: {"forward_mm": f, "lateral_mm": l, "height_mm": HEIGHT} for k, (f, l) in GEOMETRY.items()}
    arena = {"palps": {"antenna_forward_mm": 0.6, "antenna_lateral_mm": 0.3},
             "antennae": {"antenna_forward_mm": 1.0, "antenna_lateral_mm": 0.09},
             "both": {"antenna_forward_mm": 0.8, "antenna_lateral_mm": 0.195}}
    return {"format": FORMAT, "format_version": 1, "motor_table": TABLE, "sensors": {"sites": sites, "height_mm": HEIGHT},
            "arena": arena}


# -------------------------------------------------------------- motor table
def test_table_interpolates_bilinearly_and_clamps():
    t = MotorTable.from_dict(TABLE)
    d = torch.tensor([[0.0, 1.0], [1.0, 0.5], [0.25, 0.75], [2.0, -1.0]])
    speed, omega = t.kinematics(d)
    assert speed[:2].tolist() == [6.0, 9.0] and omega[:2].tolist() == [3.0, -1.5]  # grid points exactly
    # (0.25, 0.75): the mean of the four corners of its cell
    assert speed[2].item() == pytest.approx(np.mean([SPEED[0][1], SPEED[0][2], SPEED[1][1], SPEED[1][2]]), rel=1e-6)
    assert omega[2].item() == pytest.approx(np.mean([OMEGA[0][1], OMEGA[0][2], OMEGA[1][1], OMEGA[1][2]]), rel=1e-6)
    assert speed[3].item() == SPEED[2][0] and omega[3].item() == OMEGA[2][0]  # clamped to the grid


def test_table_gradient_matches_finite_differences():
    t = MotorTable.from_dict(TABLE)
    d = torch.tensor([[0.3, 0.8]], dtype=torch.float64, requires_grad=True)
    speed, omega = t.kinematics(d)
    (g,) = torch.autograd.grad(speed.sum() + 2 * omega.sum(), d)
    eps = 1e-6
    for k in range(2):
        e = torch.zeros_like(d)
        e[0, k] = eps
        hi = sum(x.sum() * w for x, w in zip(t.kinematics(d.detach() + e), (1, 2)))
        lo = sum(x.sum() * w for x, w in zip(t.kinematics(d.detach() - e), (1, 2)))
        assert g[0, k].item() == pytest.approx(((hi - lo) / (2 * eps)).item(), rel=1e-6)
    motor = torch.tensor([[10.0, 40.0]], requires_grad=True)
    (gm,) = torch.autograd.grad(t.kinematics(t.drive(motor, 0.05, 0.2))[0].sum(), motor)
    assert torch.isfinite(gm).all() and (gm > 0).all()  # more DN activity on either side = faster


@pytest.mark.parametrize("bad, what", [
    ({**TABLE, "drives": [0.0, 0.5, 0.5]}, "increasing"),
    ({**TABLE, "speed_mm_s": SPEED[:2]}, "3x3"),
    ({**TABLE, "drives": [0.1, 0.5, 1.0]}, "from <= 0"),
    ({**TABLE, "omega_rad_s": [[float("nan")] * 3] * 3}, "finite"),
    ({"drives": DRIVES, "speed_mm_s": SPEED}, "omega_rad_s"),
    ([1, 2, 3], "mapping"),
])
def test_bad_tables_are_config_errors(bad, what):
    with pytest.raises(ConfigError, match=what):
        ArenaConfig(motor_table=bad)


def test_symmetrised_table_is_mirror_symmetric():
    raw = {"drives": DRIVES, "speed_mm_s": [[0, 2, 7], [1, 5, 9], [5, 8, 14]],
           "omega_rad_s": [[0.1, 1, 3.2], [-0.8, 0.2, 1.5], [-2.8, -1.4, -0.1]]}
    s = symmetrised(raw)
    sp, om = np.array(s["speed_mm_s"]), np.array(s["omega_rad_s"])
    assert np.allclose(sp, sp.T) and np.allclose(om, -om.T) and np.allclose(np.diag(om), 0)
    assert sp[0, 2] == pytest.approx(6.0) and om[0, 2] == pytest.approx(3.0)


# ---------------------------------------------------- arena with the table
def test_negative_drives_let_one_side_step_backwards():
    """With a grid from -0.5, a large left-right difference drives one side below 0."""
    t = MotorTable.from_dict({"drives": [-0.5] + DRIVES[1:], "speed_mm_s": SPEED, "omega_rad_s": OMEGA})
    d = t.drive(torch.tensor([[0.0, 20.0], [30.0, 30.0]]), 0.05, 0.2)
    # common = tanh(0.5) = 0.46, diff = -1.5 tanh(4): left 0.46 - 0.75 < 0, right clamped to 1.0
    assert -0.5 <= d[0, 0].item() < -0.2 and d[0, 1].item() == 1.0
    assert d[1, 0].item() == d[1, 1].item() > 0  # no difference: both sides alike


def test_arena_walks_by_the_table():
    arena = OdorArena(ArenaConfig(motor_table=TABLE, motor_tau_ms=1e-6), dt_ms=4.0)
    st = arena.reset(2, generator=torch.Generator().manual_seed(0))
    # 16 DNs per side; (k/16 spikes per 4 ms step) -> rate 250 k/16 Hz -> drive 1.0 * tanh(gain * rate)
    left = torch.zeros(2, 16)
    right = torch.zeros(2, 16)
    left[0, :8], right[0, :] = 1, 1
    new, vel = arena.step(st, left, right)
    drive = MotorTable.from_dict(TABLE).drive(new.motor, arena.config.speed_gain, arena.config.turn_gain)
    speed, omega = MotorTable.from_dict(TABLE).kinematics(drive)
    assert torch.allclose(vel[:, :2].norm(dim=-1), speed, atol=1e-5)
    assert torch.allclose(new.heading - st.heading, omega * 0.004, atol=1e-6)
    assert omega[0] > 0 and speed[1] == 0  # left drive lower -> turns left (this table); no DN activity -> stands


def test_motor_table_survives_the_config_round_trip(tmp_path):
    cfg = yaml.safe_load(TINY_YAML.read_text())
    cfg["environment"]["arena"]["motor_table"] = TABLE
    tc = TrainingConfig.from_dict(cfg)
    again = TrainingConfig.from_dict(json.loads(json.dumps(tc.to_dict())))
    assert again.environment.arena_config().motor_table == MotorTable.from_dict(TABLE).to_dict()


# ---------------------------------------- the closed loop through BodyArena
class StandInBody:
    """flygym's interface (reset/step/physics-free obs) walking by the table on the
    physics timestep, with odor sensors at GEOMETRY smelling ``diffuse_func``."""

    def __init__(self, source_xyz, diffuse_func, spawn_xy, heading, **_):
        self.src = np.asarray(source_xyz, dtype=float)
        self.f = diffuse_func
        self.x, self.y, self.h = float(spawn_xy[0]), float(spawn_xy[1]), float(heading)
        self.table = MotorTable.from_dict(TABLE)
        self.cameras = []

    def _obs(self):
        c, s = math.cos(self.h), math.sin(self.h)
        pts = [(self.x + f * c - l * s, self.y + f * s + l * c) for f, l in GEOMETRY.values()]
        d = [math.hypot(px - self.src[0], py - self.src[1]) for px, py in pts]
        return {"fly": np.array([[self.x, self.y, 1.0]]), "fly_orientation": np.array([c, s, 0.0]),
                "odor_intensity": np.asarray(self.f(np.array(d)), dtype=float).reshape(1, 4)}

    def reset(self, seed=None):
        return self._obs(), {}

    def step(self, action):
        sp, om = self.table.kinematics(torch.as_tensor(np.asarray(action, dtype=float)[None]))
        self.h += float(om) * PHYSICS_TIMESTEP_S
        self.x += float(sp) * math.cos(self.h) * PHYSICS_TIMESTEP_S
        self.y += float(sp) * math.sin(self.h) * PHYSICS_TIMESTEP_S
        return self._obs(), 0.0, False, False, {}


@pytest.fixture(scope="module")
def body_ck(tmp_path_factory):
    """A tiny checkpoint trained 0 episodes in an arena with the table and the palp geometry."""
    d = tmp_path_factory.mktemp("embody")
    cfg = yaml.safe_load(TINY_YAML.read_text())
    cfg["circuit"]["dt_ms"] = 4.0
    cfg["environment"]["crossed_motor"] = False
    cfg["environment"]["arena"] = {"plume": "exponential", "plume_d0_mm": 4.0, "peak_concentration": 8.0,
                                   "start_distance_mm": [6.0, 8.0], "success_radius_mm": 2.0, "motor_table": TABLE,
                                   "antenna_forward_mm": 0.6, "antenna_lateral_mm": 0.3}
    (d / "c.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(cli, ["train", "--config", str(d / "c.yaml"), "--episodes", "0", "--eval-episodes", "0",
                                   "--out", str(d / "run")])
    assert res.exit_code == 0, res.output
    cal = d / "cal.json"
    cal.write_text(json.dumps(calibration_dict()))
    return d / "run" / "checkpoints" / "last", cal


def test_body_loop_reproduces_the_arena_loop(body_ck):
    ck, cal = body_ck
    circuit, meta = load_circuit(ck)
    cfg = TrainingConfig.from_dict(meta["meta"]["config"]).replace(device="cpu")
    _, _, arena, agent, _ = build_components(cfg, circuit=circuit, device=torch.device("cpu"))
    g = episode_generator(5, 0, 3)
    env = arena.reset(1, generator=g)
    state = g.get_state()
    with torch.no_grad():
        ro = agent.rollout(1, 60, g, env_state=env, closed_loop="stepped")
    body = BodyArena(arena, load_calibration(cal), sensors="palps", body_factory=StandInBody)
    g.set_state(state)
    benv = body.start(env)
    agent.arena = body
    with torch.no_grad():
        bro = agent.rollout(1, 60, g, env_state=benv, closed_loop="stepped")
    # the palps of the stand-in sit where the arena's model antennae are: same odor at the start
    assert torch.allclose(bro.concentration[0], ro.concentration[0], rtol=1e-4)
    assert (ro.positions[-1] - ro.positions[0]).norm() > 0.3  # the fly walked
    # same drives, integrated on 0.1 ms instead of 4 ms steps: the paths agree closely
    assert (bro.positions[:, 0, :2] - ro.positions[:, 0, :2]).norm(dim=-1).max() < 0.1


def test_rollout_until_ends_early(body_ck):
    ck, _ = body_ck
    circuit, meta = load_circuit(ck)
    cfg = TrainingConfig.from_dict(meta["meta"]["config"]).replace(device="cpu")
    _, _, arena, agent, _ = build_components(cfg, circuit=circuit, device=torch.device("cpu"))
    with torch.no_grad():
        ro = agent.rollout(1, 50, torch.Generator().manual_seed(1), until=lambda e: int(e.step) >= 7)
    assert ro.positions.shape[0] == 8 and ro.activations["DN"].shape[0] == 7


def test_sensor_sets():
    v = [1.0, 2.0, 3.0, 5.0]
    assert combine_sensors(v, "palps").tolist() == [1.0, 2.0]
    assert combine_sensors(v, "antennae").tolist() == [3.0, 5.0]
    assert combine_sensors(v, "both").tolist() == [2.0, 3.5]


# --------------------------------------------------------- refusals (CLI)
def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def test_embody_refuses_a_checkpoint_without_a_body_calibration(body_ck, tmp_path):
    _, cal = body_ck
    res = invoke("embody", REPO / "examples" / "pretrained" / "flywire_mb_navigator", "--calibration", cal,
                 "--episodes", 1, "--out", tmp_path / "o")
    assert_one_line_error(res, contains="without a body calibration", absent=[tmp_path / "o"])


@pytest.mark.parametrize("content, what", [
    ("{not json", "not readable JSON"),
    (json.dumps({"format": "something else"}), "not a body calibration"),
    (json.dumps({**calibration_dict(), "motor_table": {"drives": [1, 0]}}), "motor_table"),
    (json.dumps({**calibration_dict(), "arena": {"palps": {"antenna_forward_mm": 0.6}}}), "antenna_lateral_mm"),
    (json.dumps({**calibration_dict(), "arena": {"palps": {"antenna_forward_mm": "nan", "antenna_lateral_mm": 0.3}}}),
     "non-finite"),
])
def test_embody_refuses_bad_calibration_files(body_ck, tmp_path, content, what):
    ck, _ = body_ck
    bad = tmp_path / "cal.json"
    bad.write_text(content)
    res = invoke("embody", ck, "--calibration", bad, "--episodes", 1, "--out", tmp_path / "o")
    assert_one_line_error(res, contains=what, absent=[tmp_path / "o"])


def test_the_body_smells_where_the_model_antennae_were_trained(body_ck, tmp_path):
    """--sensors auto (the default) picks the calibration's sensor set at whose position the
    checkpoint's model antennae sat in training; a checkpoint matching none is refused."""
    from dmn_neuro.embodiment.body import trained_sensors

    cal = calibration_dict()
    assert trained_sensors(cal, ArenaConfig(antenna_forward_mm=0.6, antenna_lateral_mm=0.3)) == "palps"
    assert trained_sensors(cal, ArenaConfig(antenna_forward_mm=1.0, antenna_lateral_mm=0.09)) == "antennae"
    assert trained_sensors(cal, ArenaConfig()) is None  # the model-scale antennae of the main arena
    assert trained_sensors({k: v for k, v in cal.items() if k != "arena"}, ArenaConfig()) is None
    ck, _ = body_ck
    other = tmp_path / "cal.json"
    other.write_text(json.dumps({**cal, "arena": {"antennae": cal["arena"]["antennae"]}}))
    res = invoke("embody", ck, "--calibration", other, "--episodes", 1, "--out", tmp_path / "o")
    assert_one_line_error(res, contains="pass --sensors", absent=[tmp_path / "o"])


def test_without_flygym_the_body_commands_say_so(body_ck, tmp_path):
    try:
        import flygym_gymnasium  # noqa: F401
        pytest.skip("flygym is installed here: the refusal is for environments without it")
    except ImportError:
        pass
    ck, cal = body_ck
    res = invoke("embody", ck, "--calibration", cal, "--episodes", 1, "--out", tmp_path / "o")
    assert_one_line_error(res, contains="make embody-env", absent=[tmp_path / "o"])
    res = invoke("embody", "calibrate", "--out", tmp_path / "cal.json")
    assert_one_line_error(res, contains="make embody-env", absent=[tmp_path / "cal.json"])


def test_body_arena_refuses_what_the_body_cannot_run(body_ck):
    ck, cal = body_ck
    circuit, meta = load_circuit(ck)
    cfg = TrainingConfig.from_dict(meta["meta"]["config"]).replace(device="cpu")
    _, _, arena, _, _ = build_components(cfg, circuit=circuit, device=torch.device("cpu"))
    with pytest.raises(DMNError, match="sensors"):
        BodyArena(arena, load_calibration(cal), sensors="eyes")
    windy = OdorArena(ArenaConfig(motor_table=TABLE, wind=(5.0, 0.0)), dt_ms=4.0)
    with pytest.raises(DMNError, match="wind"):
        BodyArena(windy, load_calibration(cal))


def test_arena_path_reproduces_the_shipped_comparison():
    """The calibration figure's arena paths (made with a hand-written copy of the arena's
    integration) are what OdorArena.move gives on the same drives (the body started facing +x;
    its start heading is not stored: with 0 the paths agree to 5e-5 mm)."""
    from dmn_neuro.embodiment.calibration import arena_path

    cal = json.loads((REPO / "examples" / "embodied" / "body_calibration.json").read_text())
    for name, c in cal["comparison"].items():
        start = c["body"][0]
        path = np.array(arena_path(cal["motor_table"], c["drives"], start[1], start[2], 0.0))
        assert path.shape == np.array(c["arena"]).shape
        assert np.abs(path - np.array(c["arena"])).max() < 1e-3, name


def test_bearing_offsets_and_their_breakdown():
    from dmn_neuro.embodiment.run import _summary, bearing_offset_deg

    # source due north of the start: heading north = 0, east = -90, west = +90, south = 180
    assert bearing_offset_deg([0, 0], [0, 5], math.pi / 2) == pytest.approx(0.0)
    assert bearing_offset_deg([0, 0], [0, 5], 0.0) == pytest.approx(-90.0)
    assert bearing_offset_deg([0, 0], [0, 5], math.pi) == pytest.approx(90.0)
    assert bearing_offset_deg([0, 0], [0, 5], -math.pi / 2) == pytest.approx(180.0)
    assert bearing_offset_deg([1, 1], [0, 0], math.radians(225.0) + 2 * math.pi) == pytest.approx(0.0, abs=1e-9)

    def ep(off, ok):
        res = {"success": ok, "time_to_goal_ms": 500.0 if ok else None, "final_distance_mm": 1.0 if ok else 9.0}
        return {"start_bearing_offset_deg": off, "arena": res}

    eps = [ep(10, True), ep(-59, False), ep(60, True), ep(-119.5, True), ep(120, False), ep(180, False)]
    s = _summary(eps, "arena")
    assert s["n_success"] == 3 and s["success_rate"] == pytest.approx(0.5)
    assert s["by_start_bearing"] == [
        {"abs_offset_deg": [0.0, 60.0], "n": 2, "n_success": 1},
        {"abs_offset_deg": [60.0, 120.0], "n": 2, "n_success": 2},
        {"abs_offset_deg": [120.0, 180.0], "n": 2, "n_success": 0},
    ]
