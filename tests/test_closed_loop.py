"""The blocked closed loop (circuit advanced in skewed blocks on the engine between
arena updates) against the per-step loop: spikes, trajectories and training loss
histories bit for bit, gradients to float rounding. Behaviour only, no timing."""
from __future__ import annotations

import pytest
import torch

from dmn_neuro.environment.agent import CLOSED_LOOPS, NavigationAgent
from dmn_neuro.training.optimizer import episode_generator, evaluate_agent

from _helpers import make_trainer, tiny_config


def _rollout(tr, mode, B, T, grad=False):
    tr.circuit.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        ro = tr.agent.rollout(B, T, episode_generator(5, 1), closed_loop=mode)
    return ro


@pytest.mark.parametrize("B", [1, 2, 3])  # 2B < 4 rows: per-step GEMMs; >= 4: one GEMM/kernel per block
def test_blocked_rollout_has_the_per_step_spikes_and_trajectories(B):
    tr = make_trainer(tiny_config())
    T = 37  # not a multiple of the block
    a, b = _rollout(tr, "stepped", B, T), _rollout(tr, "blocked", B, T)
    for k in a.activations:
        assert torch.equal(a.activations[k], b.activations[k]), k
    assert a.activations["KC"].sum() > 0 and a.activations["DN"].sum() > 0
    for f in ("positions", "velocities", "concentration", "source", "start", "odor"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_blocked_rollout_gradients_match_to_rounding():
    tr = make_trainer(tiny_config())
    grads = {}
    for mode in ("stepped", "blocked"):
        ro = _rollout(tr, mode, 3, 40, grad=True)
        tr.compute_loss(ro)["total"].backward()
        grads[mode] = {n: p.grad.clone() for n, p in tr.circuit.named_parameters() if p.grad is not None}
    assert grads["stepped"].keys() == grads["blocked"].keys() and grads["stepped"]
    for n, g in grads["stepped"].items():
        torch.testing.assert_close(grads["blocked"][n], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()) + 1e-12,
                                   msg=lambda m: f"{n}: {m}")


def test_training_loss_history_is_the_per_step_one():
    hist = {}
    for mode in ("stepped", "blocked"):
        tr = make_trainer(tiny_config(seed=2))
        tr.agent.closed_loop = mode
        tr.train_episode(3)
        hist[mode] = [r["total"] for r in tr.loss_history]
    assert hist["stepped"] == hist["blocked"]


def test_auto_picks_blocks_on_the_fused_engine_and_steps_otherwise(monkeypatch):
    tr = make_trainer(tiny_config())
    assert tr.agent.closed_loop == "auto" and "auto" in CLOSED_LOOPS
    calls = []
    orig = type(tr.circuit).closed_loop_runner

    def spy(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(type(tr.circuit), "closed_loop_runner", spy)
    _rollout(tr, None, 2, 12)
    assert calls == [1]
    _rollout(tr, "stepped", 2, 12)
    with torch.no_grad():  # truncated BPTT keeps the per-step loop
        tr.agent.rollout(2, 12, episode_generator(0, 0), tbptt_window=5)
    assert calls == [1]
    with pytest.raises(ValueError, match="closed_loop"):
        tr.agent.rollout(2, 12, episode_generator(0, 0), closed_loop="fast")
    with pytest.raises(ValueError, match="closed_loop"):
        NavigationAgent(tr.circuit, tr.encoder, tr.environment, closed_loop="nope")


def test_evaluation_is_the_same_on_both_loops():
    tr = make_trainer(tiny_config())
    out = {}
    for mode in ("stepped", "blocked"):
        tr.agent.closed_loop = mode
        out[mode] = evaluate_agent(tr.agent, tr.config, n_episodes=6, batch_size=4, episode_length=30)
    assert out["stepped"] == out["blocked"]


def test_adapting_encoder_gives_the_same_spikes_on_both_loops():
    tr = make_trainer(tiny_config(adaptation_tau_ms=200.0))
    assert tr.encoder.adapting
    a, b = _rollout(tr, "stepped", 2, 37), _rollout(tr, "blocked", 2, 37)
    for k in a.activations:
        assert torch.equal(a.activations[k], b.activations[k]), k
    assert torch.equal(a.positions, b.positions)
    plain = _rollout(make_trainer(tiny_config()), "blocked", 2, 37)
    assert not torch.equal(plain.activations["PN"] if "PN" in plain.activations else plain.activations["KC"],
                           b.activations["PN"] if "PN" in b.activations else b.activations["KC"])
