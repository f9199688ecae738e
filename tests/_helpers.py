"""Helpers shared by the training, checkpoint and CLI tests."""
from pathlib import Path

import torch
import yaml

from dmn_neuro.training.config import TrainingConfig
from dmn_neuro.training.optimizer import DMNTrainer, build_components

REPO = Path(__file__).resolve().parent.parent
TINY_YAML = REPO / "examples" / "configs" / "tiny.yaml"


def tiny_config(**overrides) -> TrainingConfig:
    d = yaml.safe_load(TINY_YAML.read_text())
    d.update(device="cpu")
    d.update(overrides)
    return TrainingConfig.from_dict(d)


def make_trainer(cfg: TrainingConfig) -> DMNTrainer:
    torch.manual_seed(cfg.seed)  # as `dmn-neuro train` does
    circuit, encoder, arena, _agent, loss_fn = build_components(cfg)
    return DMNTrainer(circuit, loss_fn, cfg, environment=arena, encoder=encoder)
