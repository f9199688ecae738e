"""Helpers shared by the training, checkpoint and CLI tests."""
from pathlib import Path

import torch

from dmn_neuro.training.config import TrainingConfig
from dmn_neuro.training.optimizer import DMNTrainer, build_components

REPO = Path(__file__).resolve().parent.parent
TINY_YAML = REPO / "examples" / "configs" / "tiny.yaml"


def tiny_config(**overrides) -> TrainingConfig:
    """examples/configs/tiny.yaml on the CPU, with ``overrides`` (flat or section spellings; None kept)."""
    return TrainingConfig.from_yaml(TINY_YAML).with_values(device="cpu", **overrides)


def make_trainer(cfg: TrainingConfig) -> DMNTrainer:
    torch.manual_seed(cfg.seed)  # as `dmn-neuro train` does
    circuit, encoder, arena, _agent, loss_fn = build_components(cfg)
    return DMNTrainer(circuit, loss_fn, cfg, environment=arena, encoder=encoder)
