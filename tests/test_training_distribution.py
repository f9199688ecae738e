"""Training distribution: training and validation (model selection) episodes draw only
from the training odor set, and the held-out set is recorded in the checkpoint."""
from __future__ import annotations

from pathlib import Path

import yaml

from dmn_neuro.training.checkpoint import read_checkpoint
from dmn_neuro.training.config import TrainingConfig
from dmn_neuro.training.optimizer import DMNTrainer, build_components

REPO = Path(__file__).resolve().parent.parent
TRAIN = ["isopentyl acetate", "ethyl acetate", "2-heptanone"]
HELD_OUT = ["1-hexanol", "butyl acetate", "benzaldehyde"]


def test_training_and_validation_never_draw_a_held_out_odor(tmp_path):
    d = yaml.safe_load((REPO / "examples" / "configs" / "tiny.yaml").read_text())
    d["environment"]["arena"].update(odors=TRAIN, held_out_odors=HELD_OUT, concentration_range=[0.25, 4.0],
                                     plumes=["exponential", "gaussian", "inverse_square"],
                                     plume_length_range_mm=[10.0, 20.0], wind_speed_range=[0.0, 5.0])
    cfg = TrainingConfig.from_dict({**d, "episode_length_steps": 5, "batch_size": 8, "eval_episodes": 8,
                                    "checkpoint_every": 1, "device": "cpu"})
    circuit, encoder, arena, _, loss_fn = build_components(cfg)
    trainer = DMNTrainer(circuit, loss_fn, cfg, environment=arena, encoder=encoder)
    drawn = []
    reset = arena.reset

    def recording_reset(*a, **k):
        s = reset(*a, **k)
        drawn.extend(encoder.odors[i] for i in s.odor.tolist())
        assert s.conditions is not None  # the distribution is on
        return s

    arena.reset = recording_reset
    records = trainer.train_episode(2, out_dir=tmp_path)
    assert all("val_success_rate" in r for r in records)  # validation ran after each episode
    assert len(drawn) == 2 * 8 + 2 * 8 and set(drawn) <= set(TRAIN) and len(set(drawn)) > 1
    meta = read_checkpoint(tmp_path / "checkpoints" / "best")["meta"]
    saved = TrainingConfig.from_dict(meta["config"]).environment
    assert list(saved.train_odors) == TRAIN and list(saved.held_out_odors) == HELD_OUT
