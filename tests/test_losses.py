"""CombinedLoss golden values and gradients; TrajectoryAnalyzer metrics."""
import math

import numpy as np
import pytest
import torch

from connectome.errors import ConfigError
from dmn_neuro.training.loss_functions import CombinedLoss, TrajectoryAnalyzer, kc_population_sparsity


def _tiny():
    # episode 0 approaches the goal (0, 0, 0) along x, episode 1 walks away along y
    positions = torch.tensor(
        [[[10.0, 0, 0], [0, 10.0, 0]],
         [[6.0, 0, 0], [0, 12.0, 0]],
         [[3.0, 0, 0], [0, 15.0, 0]]]
    )
    velocities = torch.tensor([[[-4.0, 0, 0], [0, 2.0, 0]], [[-3.0, 0, 0], [0, 3.0, 0]]])
    kc = torch.zeros(4, 1, 10)
    kc[0, 0, 0] = kc[1, 0, 0] = kc[1, 0, 1] = 1.0  # window 1: KCs 0, 1 active
    kc[3, 0, 2] = 1.0                              # window 2: KC 2 active
    return positions, velocities, kc


def _loss(**kw):
    args = dict(goal_position=(0.0, 0.0, 0.0), kc_sparsity_target=0.1, sparsity_window_ms=2.0, dt_ms=1.0)
    args.update(kw)
    return CombinedLoss(**args)


def test_golden_values():
    positions, velocities, kc = _tiny()
    out = _loss()(positions, velocities, {"KC": kc})
    assert set(out) == {"navigation", "energy", "sparsity", "activity", "total"}
    # navigation: n = [1, .6, .3] and [1, 1.2, 1.5] (d0 = 10 mm); weights [1, 2, 3] / 6
    # + final n_T + no_progress_weight (1) * (relu(n_T - 1) + mean_t g_t (1 - p_t)).
    # Per-step progress p_t = (d_{t-1} - d_t) / (20 mm/s * 1 ms) = (d_{t-1} - d_t) / 0.02 mm,
    # with d_{-1} = the start distance (row 0 is the start): gate g_t = [d_{t-1} > 0.1 * 10 mm] = 1 throughout.
    # episode 0: d = 10, 6, 3   -> p = 0, 200, 150  -> mean(1 - p) = (1 - 199 - 149) / 3
    # episode 1: d = 10, 12, 15 -> p = 0, -100, -150 -> mean(1 - p) = (1 + 101 + 151) / 3
    stalled0 = (1 - 199 - 149) / 3
    stalled1 = (1 + 101 + 151) / 3
    nav0 = (1 + 2 * 0.6 + 3 * 0.3) / 6 + 0.3 + (0.0 + stalled0)
    nav1 = (1 + 2 * 1.2 + 3 * 1.5) / 6 + 1.5 + (0.5 + stalled1)  # relu(1.5 - 1) = 0.5
    assert (nav0 + nav1) / 2 == pytest.approx(-13.6)  # hand arithmetic: (11/6 + 2.3 - 94/3) / 2
    assert out["navigation"].item() == pytest.approx((nav0 + nav1) / 2, rel=1e-6)
    # energy: mean |v|^2 = (16 + 9 + 4 + 9) / 4 over the 20 mm/s reference speed squared
    assert out["energy"].item() == pytest.approx(9.5 / 400, rel=1e-6)
    # sparsity: windows of 2 steps -> fractions 0.2, 0.1 -> 0.15 vs target 0.1
    assert out["sparsity"].item() == pytest.approx(((0.15 - 0.1) / 0.1) ** 2, rel=1e-5)
    # activity: L1 = mean spike prob / (200 Hz * 1 ms) = 0.1 / 0.2; hinge: KC0 at 500 Hz,
    # KC1 and KC2 at 250 Hz over the 200 Hz bound
    act = 0.5 + (((500 - 200) / 200) ** 2 + 2 * ((250 - 200) / 200) ** 2) / 10
    assert out["activity"].item() == pytest.approx(act, rel=1e-6)
    total = out["navigation"] + 0.01 * out["energy"] + 0.1 * out["sparsity"] + 0.01 * out["activity"]
    assert out["total"].item() == pytest.approx(total.item(), rel=1e-7)
    assert out["total"].item() == pytest.approx((nav0 + nav1) / 2 + 0.01 * 9.5 / 400 + 0.1 * 0.25 + 0.01 * act, rel=1e-6)


def test_navigation_no_progress_gate_and_weight():
    """The per-step no-progress penalty switches off once within arrival_fraction * d0 of the goal."""
    # one episode, goal at 0, d0 = 10 mm; reference step = 4000 mm/s * 1 ms = 4 mm
    pos = torch.tensor([[[10.0, 0, 0]], [[6.0, 0, 0]], [[0.5, 0, 0]], [[0.5, 0, 0]], [[2.5, 0, 0]]])
    vel = torch.zeros(4, 1, 3)
    kw = dict(velocity_scale_mm_s=4000.0, sparsity_weight=0.0, activity_weight=0.0, energy_weight=0.0)
    # d = 10, 6, .5, .5, 2.5 ; d_prev = 10, 10, 6, .5, .5 ; p = 0, 1, 1.375, 0, -0.5
    # gate (d_prev > 1 mm) = 1, 1, 1, 0, 0 -> stalled = (1 + 0 - 0.375 + 0 + 0) / 5
    n = torch.tensor([1.0, 0.6, 0.05, 0.05, 0.25])
    weighted = float((torch.arange(1, 6) * n).sum() / 15)
    stalled = (1 + 0 - 0.375) / 5
    out = _loss(**kw)(pos, vel)
    assert out["navigation"].item() == pytest.approx(weighted + 0.25 + stalled, rel=1e-6)
    assert out["total"].item() == pytest.approx(out["navigation"].item(), rel=1e-7)
    # no_progress_weight scales only the no-progress part
    out0 = _loss(no_progress_weight=0.0, **kw)(pos, vel)
    assert out0["navigation"].item() == pytest.approx(weighted + 0.25, rel=1e-6)
    # with arrival_fraction 0 the gate never closes: the last two steps count too
    outg = _loss(arrival_fraction=0.0, **kw)(pos, vel)
    assert outg["navigation"].item() == pytest.approx(weighted + 0.25 + (1 + 0 - 0.375 + 1 + 1.5) / 5, rel=1e-6)


def test_goal_and_start_overrides():
    positions, velocities, kc = _tiny()
    loss = _loss(goal_position=(99.0, 99.0, 0.0))
    a = loss(positions, velocities, {"KC": kc}, goal=torch.zeros(2, 3))
    b = _loss()(positions, velocities, {"KC": kc})
    torch.testing.assert_close(a["navigation"], b["navigation"])
    # a start further away normalises by a larger d0
    c = _loss()(positions, velocities, {"KC": kc}, start_positions=torch.tensor([[20.0, 0, 0], [0, 20.0, 0]]))
    assert c["navigation"] < b["navigation"]


def test_gradients_reach_positions_and_spikes():
    positions, velocities, kc = _tiny()
    positions = positions.clone().requires_grad_(True)
    velocities = velocities.clone().requires_grad_(True)
    kc = (kc * 0.5 + 0.01).requires_grad_(True)  # surrogate-style soft spikes
    dn = torch.full((4, 2, 3), 0.3, requires_grad=True)
    out = _loss(rate_bounds_hz=(5.0, 200.0))(positions, velocities, {"KC": kc, "DN": dn})
    out["total"].backward()
    for t in (positions, velocities, kc, dn):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert all(torch.isfinite(v) for v in out.values())


def test_terms_finite_for_silent_network_and_zero_motion():
    T, B = 30, 3
    pos = torch.full((T, B, 3), 50.0)
    pos[..., 2] = 0
    out = CombinedLoss()(pos, torch.zeros(T - 1, B, 3), {"KC": torch.zeros(T, 2 * B, 20), "DN": torch.zeros(T, 2 * B, 4)},
                         goal=torch.tensor([50.0, 50.0, 0.0]))
    assert all(torch.isfinite(v) for v in out.values())
    assert out["sparsity"].item() == pytest.approx(1.0)  # no KC activity: (0 - t)^2 / t^2
    assert out["energy"].item() == 0.0


def test_missing_kc_population_and_bad_config():
    positions, velocities, _ = _tiny()
    with pytest.raises(ConfigError, match="KC"):
        CombinedLoss()(positions, velocities, {"PN": torch.zeros(3, 2, 4)})
    out = CombinedLoss(sparsity_weight=0.0)(positions, velocities, {"PN": torch.zeros(3, 2, 4)})
    assert out["sparsity"].item() == 0.0
    with pytest.raises(ConfigError):
        CombinedLoss(energy_weight=-1.0)
    with pytest.raises(ConfigError):
        CombinedLoss(kc_sparsity_target=0.0)
    with pytest.raises(ConfigError):
        CombinedLoss(rate_bounds_hz=(100.0, 10.0))
    with pytest.raises(ConfigError):
        CombinedLoss(goal_position=(1.0, 2.0))


def test_kc_population_sparsity_definition():
    T, B, n = 100, 2, 50
    s = torch.zeros(T, B, n)
    s[10, 0, :5] = 1.0    # window 0 (steps 0-49): 5/50 KCs in episode 0
    s[60:70, 0, 0] = 1.0  # window 1: 1 KC bursting counts once
    per = kc_population_sparsity(s, window_ms=50.0, dt_ms=1.0, reduce=False)
    torch.testing.assert_close(per, torch.tensor([(0.1 + 0.02) / 2, 0.0]))
    assert kc_population_sparsity(s).item() == pytest.approx(0.03)
    # dt_ms = 2 -> 25-step windows: four windows
    assert kc_population_sparsity(s, dt_ms=2.0, reduce=False)[0].item() == pytest.approx((0.1 + 0.02) / 4)
    # skipping the first 50 steps leaves only the burst
    assert kc_population_sparsity(s, skip_steps=50, reduce=False)[0].item() == pytest.approx(0.02)
    # short run: one window
    assert kc_population_sparsity(s[:20]).item() == pytest.approx(0.05)
    # the loss reports the same metric it optimises
    loss = CombinedLoss(sparsity_window_ms=25.0, dt_ms=0.5, sparsity_skip_ms=25.0)
    torch.testing.assert_close(loss.kc_population_sparsity(s), kc_population_sparsity(s, 25.0, 0.5, skip_steps=50))


def test_trajectory_metrics_straight_line():
    T = 101
    x = torch.linspace(0.0, 10.0, T)
    pos = torch.stack([x, torch.zeros(T), torch.zeros(T)], -1)
    vel = torch.tensor([[50.0, 0.0, 0.0]]).expand(T - 1, 3)  # 0.1 mm per 2 ms step
    m = TrajectoryAnalyzer().compute_trajectory_metrics(pos, vel, goal=(10.0, 0.0, 0.0), success_radius_mm=0.5, dt_ms=2.0)
    assert m["path_length"] == pytest.approx(10.0, rel=1e-5)
    assert m["final_distance_to_goal"] == pytest.approx(0.0, abs=1e-5)
    assert m["mean_distance_to_goal"] == pytest.approx(5.0, rel=1e-5)
    assert m["time_to_goal"] == pytest.approx(95 * 2.0)
    assert m["success"] is True
    assert m["exploration_area"] == 11.0  # 1 mm cells x = 0..10 on the line y = 0
    assert m["mean_speed"] == pytest.approx(50.0)


def test_trajectory_metrics_batched_numpy():
    T = 101
    x = np.linspace(0.0, 10.0, T)
    reach = np.stack([x, np.zeros(T), np.zeros(T)], -1)
    stay = np.tile(np.array([[0.0, 0.0, 0.0]]), (T, 1))
    pos = np.stack([reach, stay], axis=1)
    goal = np.array([[10.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    m = TrajectoryAnalyzer().compute_trajectory_metrics(pos, None, goal, success_radius_mm=0.5, dt_ms=1.0)
    np.testing.assert_allclose(m["path_length"], [10.0, 0.0], atol=1e-9)
    assert m["time_to_goal"][0] == 95.0 and math.isnan(m["time_to_goal"][1])
    assert m["time_to_goal_mean"] == 95.0
    np.testing.assert_array_equal(m["success"], [True, False])
    assert m["success_rate"] == 0.5
    np.testing.assert_allclose(m["final_distance_to_goal"], [0.0, 10.0], atol=1e-9)
    assert m["final_distance_to_goal_mean"] == pytest.approx(5.0)
    np.testing.assert_array_equal(m["exploration_area"], [11.0, 1.0])
    # default radius: 10 % of the mean start distance (10 mm) -> 1 mm
    d = TrajectoryAnalyzer().compute_trajectory_metrics(pos, None, goal)
    assert d["success_radius_mm"] == pytest.approx(1.0) and d["time_to_goal"][0] == 90.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binary_sparsity_fast_path_equals_prod_bit_for_bit(dtype):
    """Binary spikes take a counting backward; values and gradients equal autograd through torch.prod."""
    from dmn_neuro.training.loss_functions import kc_population_sparsity

    g = torch.Generator().manual_seed(3)
    s = (torch.rand(503, 6, 300, generator=g) < 0.01).to(dtype)
    s[10:12, 0, :5] = 1.0  # windows with two spikes
    s = s.requires_grad_()
    w = torch.randn(6, generator=g, dtype=dtype)
    (kc_population_sparsity(s, 50.0, 1.0, reduce=False) * w).sum().backward()
    fast = s.grad.clone()
    s.grad = None
    x = s[:500].reshape(10, 50, 6, 300).clamp(0, 1)
    ((1 - torch.prod(1 - x, dim=1)).mean(-1).mean(0) * w).sum().backward()
    assert torch.equal(fast, s.grad) and float(fast.abs().sum()) > 0
    rates = torch.full((100, 2, 4), 0.3, dtype=dtype, requires_grad=True)  # non-binary: the smooth path
    kc_population_sparsity(rates, 50.0, 1.0).backward()
    assert torch.all(rates.grad > 0)


def test_log_distance_part_of_navigation():
    """log_distance_weight adds the time-weighted mean of log((d_t + 1) / (d0 + 1)) and puts
    its gradient on the last millimetres; 0 (the default) leaves the loss bit for bit."""
    pos = torch.tensor([[[10.0, 0, 0]], [[6.0, 0, 0]], [[0.5, 0, 0]], [[0.5, 0, 0]], [[2.5, 0, 0]]])
    vel = torch.zeros(4, 1, 3)
    kw = dict(velocity_scale_mm_s=4000.0, sparsity_weight=0.0, activity_weight=0.0, energy_weight=0.0)
    base = _loss(**kw)(pos, vel)["navigation"]
    assert torch.equal(_loss(log_distance_weight=0.0, **kw)(pos, vel)["navigation"], base)
    d = torch.tensor([10.0, 6.0, 0.5, 0.5, 2.5])
    log_part = float((torch.arange(1, 6) * torch.log((d + 1) / 11)).sum() / 15)
    out = _loss(log_distance_weight=0.5, **kw)(pos, vel)["navigation"]
    assert out.item() == pytest.approx(base.item() + 0.5 * log_part, rel=1e-6)

    def grad_at(x_mm):  # d loss / d x of the last position, from a start 20 mm away
        p = torch.tensor([[[20.0, 0, 0]], [[x_mm, 0, 0]]], requires_grad=True)
        _loss(log_distance_weight=1.0, no_progress_weight=0.0, **kw)(p, torch.zeros(1, 1, 3))["navigation"].backward()
        lin = torch.tensor([[[20.0, 0, 0]], [[x_mm, 0, 0]]], requires_grad=True)
        _loss(no_progress_weight=0.0, **kw)(lin, torch.zeros(1, 1, 3))["navigation"].backward()
        return p.grad[1, 0, 0].item() - lin.grad[1, 0, 0].item()

    # the log part's pull is 1/(d + 1): 4.5x stronger at 3.5 mm than at 20 mm
    assert grad_at(3.5) / grad_at(20.0) == pytest.approx(21 / 4.5, rel=1e-5)
    with pytest.raises(ConfigError, match="log_distance_weight"):
        _loss(log_distance_weight=-1.0)
