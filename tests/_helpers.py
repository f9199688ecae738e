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


def assert_one_line_error(res, contains=None, absent=(), endswith=None) -> str:
    """A CLI failure as the program promises it: non-zero exit, exactly one non-empty
    stderr line, starting with 'Error:' (containing ``contains`` / ending with
    ``endswith``), no traceback, and none of the ``absent`` paths left behind.
    ``res`` is a click ``Result`` or a ``subprocess.CompletedProcess``; returns the line."""
    if hasattr(res, "exit_code"):  # click's CliRunner
        code, err, out = res.exit_code, res.stderr, res.stdout
        assert isinstance(res.exception, SystemExit), f"uncaught {res.exception!r}"
    else:
        code, err, out = res.returncode, res.stderr, res.stdout
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("Error:"), err
    assert "Traceback" not in err + out
    if contains is not None:
        assert contains in lines[0], lines[0]
    if endswith is not None:
        assert lines[0].endswith(endswith), lines[0]
    for p in absent:
        assert not Path(p).exists(), f"partial output left behind: {p}"
    return lines[0]
