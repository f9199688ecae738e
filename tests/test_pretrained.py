"""The shipped trained model: it loads, and it steers towards sources on both sides."""
import math
from pathlib import Path

import torch

from dmn_neuro.training.checkpoint import load_circuit
from dmn_neuro.training.config import TrainingConfig
from dmn_neuro.training.optimizer import EVAL_STREAM, build_components, episode_generator

PRETRAINED = Path(__file__).resolve().parent.parent / "examples" / "pretrained" / "flywire_mb_navigator"


def test_trained_fly_turns_towards_sources_on_both_sides():
    circuit, ck = load_circuit(PRETRAINED)
    cfg = TrainingConfig.from_dict(ck["meta"]["config"]).replace(device="cpu")
    _, _, arena, agent, _ = build_components(cfg, circuit=circuit, device=torch.device("cpu"))
    steps = 100  # first 0.4 s
    with torch.no_grad():
        ro = agent.rollout(80, steps, episode_generator(7, 0, EVAL_STREAM), device=torch.device("cpu"))
    start, src = ro.positions[0], ro.source
    # heading from the velocity direction (speed = v_max tanh(...) > 0 once the DNs fire)
    v0 = ro.velocities[2:6].mean(0)[:, :2]  # step 0 has zero speed (motor filter starts at rest)
    heading0 = torch.atan2(v0[:, 1], v0[:, 0])
    bearing = torch.atan2(src[:, 1] - start[:, 1], src[:, 0] - start[:, 0])
    offset = torch.remainder(bearing - heading0 + math.pi, 2 * math.pi) - math.pi  # > 0: source to the left
    v1 = ro.velocities[-5:].mean(0)[:, :2]
    heading1 = torch.atan2(v1[:, 1], v1[:, 0])
    turn = torch.remainder(heading1 - heading0 + math.pi, 2 * math.pi) - math.pi  # > 0: turned left
    left, right = offset > 0.5, offset < -0.5  # sources at least ~30 degrees to a side
    assert int(left.sum()) >= 5 and int(right.sum()) >= 5, "the episodes must put sources on both sides"
    agree_left = (turn[left] > 0).float().mean().item()
    agree_right = (turn[right] < 0).float().mean().item()
    print(f"turned towards the source: left {agree_left:.2f} ({int(left.sum())}), right {agree_right:.2f} ({int(right.sum())})")
    # chance is 0.5 (measured here: 0.90 on each side)
    assert agree_left >= 0.7 and agree_right >= 0.7, (agree_left, agree_right)
