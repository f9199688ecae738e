"""Odor arena: seeded resets, plume, sign conventions, walls, gradients, solvability."""
import math

import pytest
import torch

from connectome.errors import ConfigError
from dmn_neuro.environment.arena import ArenaConfig, EnvState, OdorArena, plot_trajectories
from dmn_neuro.environment.odors import OdorEncoder

N_DN = 4
#: The arena these physics tests were written for: ArenaConfig's defaults before they
#: became the shipped model's arena (Gaussian plume, 1 mm antennae, 50 ms motor filter).
GAUSSIAN_ARENA = dict(plume="gaussian", plume_d0_mm=10.0, motor_tau_ms=50.0, antenna_lateral_mm=1.0)


def _state(arena, pos, heading, source=(50.0, 50.0, 0.0)):
    B = len(pos)
    pos = torch.tensor(pos, dtype=torch.float32)
    return EnvState(
        pos=pos, heading=torch.tensor(heading, dtype=torch.float32), motor=torch.zeros(B, 2),
        source=torch.tensor([source] * B, dtype=torch.float32), odor=torch.zeros(B, dtype=torch.long),
        start_pos=pos.clone(), step=0,
    )


def test_config_validation():
    with pytest.raises(ConfigError, match="plume"):
        ArenaConfig(plume="smoke")
    with pytest.raises(ConfigError, match="start_distance_mm"):
        ArenaConfig(start_distance_mm=(30.0, 10.0))
    with pytest.raises(ConfigError, match="inside the arena"):
        ArenaConfig(goal_mm=(95.0, 50.0, 0.0))
    with pytest.raises(ConfigError, match="v_max_mm_s"):
        ArenaConfig(v_max_mm_s=-1.0)
    cfg = ArenaConfig(arena_size_mm=[80, 80], goal_mm=[40, 40, 0], odors="ethyl acetate")
    assert cfg.arena_size_mm == (80.0, 80.0) and cfg.odors == ("ethyl acetate",)
    assert ArenaConfig().success_radius == pytest.approx(0.1 * 22.5)
    assert ArenaConfig(success_radius_mm=3.0).success_radius == 3.0
    with pytest.raises(Exception, match="unknown odor"):
        OdorArena(ArenaConfig(odors=("unobtainium",)))


def test_reset_seeded_and_varied():
    arena = OdorArena(ArenaConfig(odors=("ethyl acetate", "1-hexanol")))
    a = arena.reset(64, torch.Generator().manual_seed(5))
    b = arena.reset(64, torch.Generator().manual_seed(5))
    c = arena.reset(64, torch.Generator().manual_seed(6))
    for name in ("pos", "heading", "motor", "source", "odor", "start_pos"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.conditions is None  # the fixed arena draws no per-episode conditions
    assert not torch.equal(a.source, c.source)
    # sources and starts vary per episode, within the configured ranges
    assert a.source[:, :2].std(0).min() > 3.0
    assert torch.all((a.source[:, :2] - 50.0).abs() <= 15.0)
    d = (a.pos - a.source).norm(dim=-1)
    assert torch.all(d >= 15.0 - 1e-4) and torch.all(d <= 30.0 + 1e-4)
    assert torch.equal(a.start_pos, a.pos) and torch.all(a.pos[:, 2] == 0) and torch.all(a.motor == 0)
    # the source lies both left and right of the initial heading
    bearing = torch.atan2(a.source[:, 1] - a.pos[:, 1], a.source[:, 0] - a.pos[:, 0])
    rel = torch.atan2(torch.sin(bearing - a.heading), torch.cos(bearing - a.heading))
    assert (rel > 0.3).sum() > 10 and (rel < -0.3).sum() > 10
    assert rel.abs().max() <= math.radians(120.0) + 1e-4
    assert set(a.odor.tolist()) == {arena.odor_indices[0], arena.odor_indices[1]}
    assert a.step == 0 and a.pos.dtype == torch.float32
    d64 = arena.reset(3, torch.Generator().manual_seed(5), dtype=torch.float64)
    assert d64.pos.dtype == torch.float64


def test_odor_indices_follow_encoder():
    enc = OdorEncoder(["DM2", "DL5"], odors=["1-hexanol", "isopentyl acetate"])
    arena = OdorArena(ArenaConfig(odors=("isoamyl acetate",)), encoder=enc)
    assert arena.odor_indices == [1]
    state = arena.reset(4, torch.Generator().manual_seed(0))
    rates = arena.odor_rates(state, enc)
    assert tuple(rates.shape) == (4, 2, 2)
    hemi = arena.hemisphere_rates(state, enc, contralateral_fraction=0.25)
    torch.testing.assert_close(hemi[:4], 0.75 * rates[:, 0] + 0.25 * rates[:, 1])
    torch.testing.assert_close(hemi[4:], 0.75 * rates[:, 1] + 0.25 * rates[:, 0])


@pytest.mark.parametrize("plume", ["gaussian", "inverse_square"])
def test_concentration_peaks_at_source_and_sides(plume):
    arena = OdorArena(ArenaConfig(**{**GAUSSIAN_ARENA, "plume": plume}))
    src = torch.tensor([[50.0, 50.0, 0.0]])
    xs = torch.linspace(20, 80, 61)
    pts = torch.stack([xs, torch.full_like(xs, 50.0), torch.zeros_like(xs)], -1)[None]
    c = arena.field(pts, src)[0]
    assert c.argmax().item() == 30 and c.max().item() == pytest.approx(1.0)
    assert torch.all(c[1:31] > c[:30]) and torch.all(c[31:] < c[30:-1])
    # fly at (40, 50) heading +y: the source (+x) is on its right; heading -y: on its left
    st = _state(arena, [[40.0, 50.0, 0.0], [40.0, 50.0, 0.0]], [math.pi / 2, -math.pi / 2])
    ant = arena.antenna_positions(st)
    torch.testing.assert_close(ant[0, 0], torch.tensor([39.0, 51.0, 0.0]))  # left antenna, 1 mm fwd + 1 mm left
    conc = arena.concentration(st)
    assert conc[0, 1] > conc[0, 0]  # source on the right -> right antenna reads higher
    assert conc[1, 0] > conc[1, 1]  # source on the left -> left antenna reads higher
    removed = OdorArena(ArenaConfig(**{**GAUSSIAN_ARENA, "plume": plume}, odor_removed=True)).concentration(st)
    assert torch.all(removed == 0)


def test_wind_stretches_plume_downwind():
    arena = OdorArena(ArenaConfig(wind=(10.0, 0.0), **GAUSSIAN_ARENA))
    src = torch.tensor([[50.0, 50.0, 0.0]])
    pts = torch.tensor([[[70.0, 50.0, 0.0], [30.0, 50.0, 0.0], [50.0, 50.0, 0.0]]])
    c = arena.field(pts, src)[0]
    assert c[0] > c[1]  # downwind reads more than upwind at the same distance
    assert c[2].item() == pytest.approx(1.0)  # peak stays at the source
    calm = OdorArena(ArenaConfig(**GAUSSIAN_ARENA)).field(pts, src)[0]
    assert c[1].item() == pytest.approx(calm[1].item())


def test_turning_sign_and_standing_still():
    arena = OdorArena(ArenaConfig())
    st = _state(arena, [[30.0, 30.0, 0.0]] * 3, [0.0, 0.0, 0.0])
    T = 200
    left = torch.zeros(T, 3, N_DN)
    right = torch.zeros(T, 3, N_DN)
    left[:, 0], right[:, 0] = 0.2, 0.05   # more left-DN activity
    left[:, 1], right[:, 1] = 0.05, 0.2   # more right-DN activity
    pos, vel = arena.rollout_kinematics(left, right, st)
    assert tuple(pos.shape) == (T + 1, 3, 3) and tuple(vel.shape) == (T, 3, 3)
    # episode 0 turns counter-clockwise (left): it ends up at y > start; episode 1 clockwise
    assert pos[-1, 0, 1] > 30.5 and pos[-1, 1, 1] < 29.5
    assert pos[-1, 0, 0] > 30.5 and pos[-1, 1, 0] > 30.5
    # no DN activity: the fly does not move at all
    assert torch.equal(pos[:, 2], pos[:1, 2].expand(T + 1, 3))
    assert torch.all(vel[:, 2] == 0)
    assert torch.all(pos[..., 2] == 0)
    # heading follows the sign: state after one step
    s1, _ = arena.step(st, left[0], right[0])
    assert s1.heading[0] > 0 > s1.heading[1] and s1.heading[2] == 0 and s1.step == 1


def test_walls_hold():
    arena = OdorArena(ArenaConfig())
    st = _state(arena, [[95.0, 50.0, 0.0], [5.0, 3.0, 0.0]], [0.0, -math.pi / 2])
    T = 1000
    drive = torch.full((T, 2, N_DN), 0.3)
    pos, _ = arena.rollout_kinematics(drive, drive, st)
    assert torch.all(pos[..., :2] >= 0) and torch.all(pos[..., 0] <= 100) and torch.all(pos[..., 1] <= 100)
    assert pos[-1, 0, 0].item() == pytest.approx(100.0) and pos[-1, 1, 1].item() == pytest.approx(0.0)


def test_stop_at_source_holds_a_fly_that_reached_the_radius():
    """Walking straight through the source: without stop_at_source the fly passes it; with it,
    the fly stops at the first step within the success radius and stays there."""
    T = 1000  # 1 s at ~20 mm/s from 10 mm away
    drive = torch.full((T, 1, N_DN), 0.3)
    ends = {}
    for stop in (False, True):
        arena = OdorArena(ArenaConfig(success_radius_mm=2.0, stop_at_source=stop))
        pos, vel = arena.rollout_kinematics(drive, drive, _state(arena, [[40.0, 50.0, 0.0]], [0.0]))
        d = torch.linalg.vector_norm(pos[:, 0, :2] - torch.tensor([50.0, 50.0]), dim=-1)
        first = int(torch.nonzero(d <= 2.0)[0])
        ends[stop] = (d, first, vel)
    d, first, _ = ends[False]
    assert d[-1] > 9.0  # walked on past the source
    d, first_stop, vel = ends[True]
    assert first_stop == ends[False][1]  # same path until the radius is reached
    assert torch.all(d[first:] == d[first]) and d[-1] <= 2.0
    assert torch.all(vel[first:] == 0)
    assert ArenaConfig(stop_at_source=True).conditions()["stop_at_source"] is True
    with pytest.raises(ConfigError, match="stop_at_source must be a bool"):
        ArenaConfig(stop_at_source="yes")


def test_gradient_from_final_position_to_dn_spikes():
    arena = OdorArena(ArenaConfig())
    st = arena.reset(4, torch.Generator().manual_seed(1))
    T = 100
    left = torch.full((T, 4, N_DN), 0.1, requires_grad=True)
    right = torch.full((T, 4, N_DN), 0.05, requires_grad=True)
    pos, vel = arena.rollout_kinematics(left, right, st)
    loss = (pos[-1] - st.source).norm(dim=-1).sum()
    loss.backward()
    assert left.grad.abs().sum() > 0 and right.grad.abs().sum() > 0
    assert torch.isfinite(left.grad).all()
    # spikes early in the episode matter (through heading and motor filter)
    assert left.grad[0].abs().sum() > 0


def _closed_loop(arena, controller, B=32, T=5000, seed=0):
    st = arena.reset(B, torch.Generator().manual_seed(seed))
    min_d = torch.full((B,), float("inf"))
    with torch.no_grad():
        for _ in range(T):
            c = arena.concentration(st)
            dn_l, dn_r = controller(c)
            st, _ = arena.step(st, dn_l, dn_r)
            min_d = torch.minimum(min_d, (st.pos - st.source).norm(dim=-1))
    final_d = (st.pos - st.source).norm(dim=-1)
    return final_d, min_d


def _approach(c, k=0.2):
    """Braitenberg 'aggression' with ipsilateral turning: dn_left ∝ c_left, dn_right ∝ c_right
    (expected spikes per step)."""
    return (k * c[:, :1]).expand(-1, N_DN), (k * c[:, 1:]).expand(-1, N_DN)


def _seek_and_stop(c, k=0.2):
    """Braitenberg 'love': each side's DNs fire tonically and are suppressed by the
    *contralateral* antenna (dn_left ∝ 1 - c_right): turns towards the odor and stops at the peak."""
    return (k * (1 - c[:, 1:])).expand(-1, N_DN), (k * (1 - c[:, :1])).expand(-1, N_DN)


def test_braitenberg_controllers_solve_the_task_only_with_odor():
    cfg = ArenaConfig(**GAUSSIAN_ARENA)
    R = cfg.success_radius
    arena = OdorArena(cfg)
    blind = OdorArena(ArenaConfig(odor_removed=True, **GAUSSIAN_ARENA))

    final_d, min_d = _closed_loop(arena, _approach)
    assert (min_d < R).float().mean() >= 0.8  # reaches the source in most episodes
    _, min_blind = _closed_loop(blind, _approach)
    assert (min_blind < R).float().mean() == 0.0  # no odor -> no drive -> stays put

    final_d, _ = _closed_loop(arena, _seek_and_stop)
    assert (final_d < R).float().mean() >= 0.8  # success at episode end
    final_blind, _ = _closed_loop(blind, _seek_and_stop)
    assert (final_blind < R).float().mean() <= 0.2


def test_plot_trajectories_writes_png(tmp_path):
    arena = OdorArena(ArenaConfig())
    st = arena.reset(3, torch.Generator().manual_seed(2))
    drive = torch.full((50, 3, N_DN), 0.1)
    pos, _ = arena.rollout_kinematics(drive, drive * 0.5, st)
    out = plot_trajectories(pos, st.source, tmp_path / "fig" / "traj.png", title="t",
                            success_radius=arena.success_radius, arena_size_mm=arena.config.arena_size_mm)
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["traj.png"]
    plot_trajectories(pos[:, 0].numpy(), st.source[0].numpy(), tmp_path / "single.png")
    assert (tmp_path / "single.png").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    arena = OdorArena(ArenaConfig())
    a = arena.reset(8, torch.Generator().manual_seed(3))
    b = arena.reset(8, torch.Generator().manual_seed(3), device="cuda")
    torch.testing.assert_close(a.source, b.source.cpu())
    drive = torch.full((20, 8, N_DN), 0.1)
    pa, _ = arena.rollout_kinematics(drive, drive * 0.5, a)
    pb, _ = arena.rollout_kinematics(drive.cuda(), drive.cuda() * 0.5, b)
    torch.testing.assert_close(pa, pb.cpu(), atol=1e-4, rtol=1e-5)


# -- training distribution ------------------------------------------------------------
RANDOM_ARENA = dict(concentration_range=(0.25, 4.0), plumes=("exponential", "gaussian", "inverse_square"),
                    plume_length_range_mm=(10.0, 20.0), wind_speed_range=(0.0, 5.0))


def test_distribution_draws_each_condition_within_its_range():
    from dmn_neuro.environment.arena import PLUMES

    arena = OdorArena(ArenaConfig(**RANDOM_ARENA))
    s = arena.reset(512, torch.Generator().manual_seed(3))
    c = s.conditions
    assert c is not None and c.peak.shape == (512,) and c.wind.shape == (512, 2)
    assert torch.all((c.peak >= 0.25 - 1e-6) & (c.peak <= 4.0 + 1e-6))
    assert abs(float(torch.log(c.peak).mean())) < 0.15  # log-uniform around 1 = geometric mean of 0.25 and 4
    assert set(c.plume.tolist()) == set(range(len(PLUMES)))
    assert torch.all((c.length >= 10.0) & (c.length <= 20.0))
    speed = c.wind.norm(dim=-1)
    assert torch.all(speed <= 5.0 + 1e-5) and speed.std() > 0.5
    assert (c.wind[:, 0] < 0).any() and (c.wind[:, 1] < 0).any()  # directions all round
    # conditions survive steps
    s2, _ = arena.step(s, torch.zeros(512, N_DN), torch.zeros(512, N_DN))
    assert s2.conditions is c


def test_distribution_leaves_the_fixed_episodes_unchanged():
    """Per-episode conditions are drawn after the fixed arena's numbers: same sources, starts and odors."""
    fixed = OdorArena(ArenaConfig()).reset(32, torch.Generator().manual_seed(9))
    rand = OdorArena(ArenaConfig(**RANDOM_ARENA)).reset(32, torch.Generator().manual_seed(9))
    for name in ("pos", "heading", "source", "odor"):
        assert torch.equal(getattr(fixed, name), getattr(rand, name))


@pytest.mark.parametrize("plume", ["exponential", "gaussian", "inverse_square"])
def test_per_episode_field_matches_the_configured_plume(plume):
    """A randomised arena's episode gives the same concentrations as a fixed arena set to its conditions."""
    arena = OdorArena(ArenaConfig(**{**RANDOM_ARENA, "plumes": (plume,)}))
    s = arena.reset(8, torch.Generator().manual_seed(1))
    c = s.conditions
    got = arena.concentration(s)
    for b in range(8):
        fixed = OdorArena(ArenaConfig(plume=plume, plume_sigma_mm=float(c.length[b]), plume_d0_mm=float(c.length[b]),
                                      peak_concentration=float(c.peak[b]), wind=tuple(c.wind[b].tolist())))
        one = s._replace(pos=s.pos[b:b + 1], heading=s.heading[b:b + 1], source=s.source[b:b + 1], conditions=None)
        assert torch.allclose(got[b], fixed.concentration(one)[0], rtol=1e-4, atol=1e-7)


def test_held_out_odors_are_declared_apart_from_training():
    cfg = ArenaConfig(odors=("isopentyl acetate", "ethyl acetate"), held_out_odors=("1-hexanol", "butyl acetate"))
    assert cfg.held_out_odors == ("1-hexanol", "butyl acetate")
    with pytest.raises(ConfigError, match="both a training odor"):
        ArenaConfig(odors=("isopentyl acetate",), held_out_odors=("1-hexanol", "isoamyl acetate"))  # an alias
    with pytest.raises(ConfigError, match="unknown odor"):
        ArenaConfig(held_out_odors=("unobtainium",))
    arena = OdorArena(cfg)
    s = arena.reset(256, torch.Generator().manual_seed(0))
    assert set(s.odor.tolist()) == set(arena.odor_indices)  # only training odors are ever drawn


@pytest.mark.parametrize("field, value, match", [
    ("concentration_range", (0.0, 1.0), "concentration_range"),
    ("concentration_range", (2.0, 1.0), "concentration_range"),
    ("plume_length_range_mm", (5.0,), "plume_length_range_mm"),
    ("wind_speed_range", (-1.0, 2.0), "wind_speed_range"),
    ("plumes", ("smoke",), "plumes"),
    ("peak_concentration", -1.0, "peak_concentration"),
])
def test_distribution_validation(field, value, match):
    with pytest.raises(ConfigError, match=match):
        ArenaConfig(**{field: value})


def test_zero_peak_concentration_is_odor_removed():
    s = OdorArena(ArenaConfig(peak_concentration=0.0)).reset(4, torch.Generator().manual_seed(0))
    assert torch.all(OdorArena(ArenaConfig(peak_concentration=0.0)).concentration(s) == 0)
