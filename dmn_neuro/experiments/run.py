"""A training run in its directory: what ``dmn-neuro train`` does, as a library call.

Stores (under ``out``):
    .lock                        held (flock) while a process writes the run; names the holder
    config.yaml                  the run's config (sectioned)
    metrics.jsonl                one record per training episode, episode numbers unique and consecutive
    checkpoints/untrained        the circuit before training
    checkpoints/last, best       see :meth:`DMNTrainer.train_episode`
    checkpoints/loihi            with ``deployment.loihi``: best after QAT, on the Loihi 2 grid
    before.json                  held-out behaviour of the untrained circuit
    summary.json                 episodes, config, before and after
    loss_curves.png, trajectories_before_after.png

Promises:

* one writer: a second process gets a one-line error naming the holder (the
  lock is an OS file lock, so a killed holder releases it);
* ``resume`` continues from ``checkpoints/last`` exactly as the uninterrupted
  run would (the episode randomness is a function of (seed, episode)); it
  refuses a config that differs from the run's in anything but
  ``num_episodes`` and ``device`` unless ``allow_config_change``;
* after a resume, ``metrics.jsonl`` holds each episode once (records written
  after the last checkpoint are dropped and recomputed) and the summary and
  figure keep their "before" part;
* a fresh run that fails before training starts (bad input, no memory for
  the first evaluation) leaves no directory.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import yaml

from connectome.atomic import OutputError, ensure_parent, write_text
from dmn_neuro.errors import ConfigError

#: Config keys a resumed run may change (extend training, move to another device).
RESUMABLE_CHANGES = frozenset({"num_episodes", "device"})
LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` exclusively; a second holder gets a one-line ConfigError naming the first."""
    path = out / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutputError(f"cannot lock run directory {out}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            raise ConfigError(f"run directory {out} is in use by {holder}") from None
        info = f"pid {os.getpid()} on {socket.gethostname()} since {datetime.datetime.now().isoformat(timespec='seconds')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def config_differences(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def _describe(diffs: List[str], old: Dict[str, Any], new: Dict[str, Any]) -> str:
    def get(d, key):
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    shown = ", ".join(f"{k} {get(old, k)!r} -> {get(new, k)!r}" for k in diffs[:3])
    return shown + (f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else "")


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """Records of ``metrics.jsonl``; a torn last line (a killed writer) is skipped."""
    if not path.exists():
        return []
    recs = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("episode"), int):
            recs.append(rec)
    return recs


def truncate_metrics(path: Path, episodes: int) -> int:
    """Keep the first record of each episode below ``episodes`` (atomically); returns how many were dropped."""
    recs = read_metrics(path)
    seen, keep = set(), []
    for r in recs:
        if r["episode"] < episodes and r["episode"] not in seen:
            seen.add(r["episode"])
            keep.append(r)
    if len(keep) != len(recs) or (path.exists() and not recs):
        write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return len(recs) - len(keep)


def deploy_loihi(cfg, best: Path, target: Path, notice: Callable[[str], None] = lambda msg: None) -> Dict[str, Any]:
    """The run's Loihi stage: QAT fine-tuning of ``best``, snapped to the grid and
    saved as ``target``; held-out success of the float model and of the
    fixed-point emulator of the snapped one (same episodes), and their difference."""
    from dmn_neuro.analysis.recording import closed_loop_success
    from dmn_neuro.simulation.fixed_point import FixedPointStepper, quantize
    from dmn_neuro.training.checkpoint import load_circuit
    from dmn_neuro.training.qat import quantize_checkpoint

    dep = cfg.deployment
    notice(f"Loihi stage: {dep.qat_episodes} quantisation-aware episodes on {best}")
    rep = quantize_checkpoint(best, target, dep.qat_episodes, dep.weight_bits,
                              clip_weight_thresholds=dep.clip_weight_thresholds)
    out: Dict[str, Any] = {"checkpoint": rep["checkpoint"], "qat_episodes": dep.qat_episodes,
                           "clip_weight_thresholds": dep.clip_weight_thresholds, "clipped": rep["clipped"],
                           "weight_bits": dep.weight_bits, "check_episodes": dep.check_episodes}
    if dep.check_episodes:
        float_circuit, _ = load_circuit(best, device="cpu")
        snapped, _ = load_circuit(target, device="cpu")
        stepper = FixedPointStepper(quantize(snapped.to_spec(), weight_bits=dep.weight_bits))
        out["float_success_rate"] = closed_loop_success(float_circuit, cfg, None, dep.check_episodes)
        out["fixed_point_success_rate"] = closed_loop_success(snapped, cfg, stepper, dep.check_episodes)
        out["difference"] = out["fixed_point_success_rate"] - out["float_success_rate"]
    return out


def _check_out(out: Path) -> None:
    for p in [out, *out.parents]:
        if p.exists():
            if not p.is_dir():
                raise OutputError(f"cannot use run directory {out}: {p} is a file, not a directory")
            break


def train_run(
    cfg, out: os.PathLike, resume: bool = False, init_from: Optional[os.PathLike] = None,
    allow_config_change: bool = False, figure_episodes: int = 20,
    progress: Optional[Callable[[int, Optional[Dict[str, float]]], None]] = None,
    notice: Callable[[str], None] = lambda msg: None,
) -> Dict[str, Any]:
    """Train ``cfg`` in run directory ``out`` (see the module docstring); returns the summary.

    ``progress(total_remaining, record)`` is called once with ``record=None``
    before training and once per episode; ``notice`` receives one-line status messages.
    """
    from dmn_neuro.analysis import plots
    from dmn_neuro.training.checkpoint import load_circuit, read_checkpoint, recover_checkpoint
    from dmn_neuro.training.config import TrainingConfig
    from dmn_neuro.training.optimizer import DMNTrainer, build_components, evaluate_agent

    out = Path(out)
    _check_out(out)
    if init_from is not None and resume:
        raise ConfigError("--resume and --init-from exclude each other")
    torch.manual_seed(cfg.seed)
    circuit, encoder, arena, agent, loss_fn = build_components(cfg)  # validates before anything is written
    trainer = DMNTrainer(circuit, loss_fn, cfg, environment=arena, encoder=encoder)
    fresh = not out.exists()
    ensure_parent(out / LOCK_NAME)
    started = False  # set once the run holds a checkpoint worth keeping
    try:
        with run_lock(out):
            last = out / "checkpoints" / "last"
            recover_checkpoint(last)
            metrics = out / "metrics.jsonl"
            if resume and last.exists():
                old = TrainingConfig.from_dict(read_checkpoint(last)["meta"]["config"]).to_dict()
                diffs = [d for d in config_differences(old, cfg.to_dict()) if d not in RESUMABLE_CHANGES]
                if diffs and not allow_config_change:
                    raise ConfigError(f"--resume: the config differs from the run's in {_describe(diffs, old, cfg.to_dict())}; "
                                      "pass --allow-config-change to continue anyway, or use another --out")
                trainer.load_checkpoint(last)
                dropped = truncate_metrics(metrics, trainer.episode)
                notice(f"resumed from {last} at episode {trainer.episode}"
                       + (f" ({dropped} metrics records after it dropped)" if dropped else ""))
            elif metrics.exists() or last.exists():
                raise ConfigError(f"run directory {out} already holds a run; use --resume or another --out")
            elif init_from is not None:
                trainer.load_checkpoint(init_from)
                trainer.best_score, trainer.best_loss = None, float("inf")
                notice(f"initialised from {init_from} at episode {trainer.episode}")
            write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            seed = cfg.seed + 777
            before, before_rollouts = None, None
            if figure_episodes:
                untrained = out / "checkpoints" / "untrained"
                if trainer.episode == 0:
                    res = evaluate_agent(agent, cfg, figure_episodes, seed=seed, device=trainer.device,
                                         return_rollouts=True)
                elif untrained.exists():  # a resumed run: the same held-out episodes of the untrained circuit
                    c0, _ = load_circuit(untrained, device=trainer.device)
                    _, _, _, agent0, _ = build_components(cfg, circuit=c0, device=trainer.device)
                    res = evaluate_agent(agent0, cfg, figure_episodes, seed=seed, device=trainer.device,
                                         return_rollouts=True)
                else:
                    res = None
                if res is not None:
                    before_rollouts = res.pop("rollouts")
                    before = res
                    plots.write_json(out / "before.json", before)
            if trainer.episode == 0:
                trainer.save_checkpoint(out / "checkpoints" / "untrained")
            started = True
            remaining = max(cfg.num_episodes - trainer.episode, 0)
            if progress is not None:
                progress(remaining, None)
            if remaining:
                trainer.train_episode(remaining, out_dir=out,
                                      progress=None if progress is None else (lambda rec: progress(remaining, rec)))
            trainer.save_checkpoint(last)
            if not (out / "checkpoints" / "best").exists():
                trainer.save_checkpoint(out / "checkpoints" / "best")
            summary: Dict[str, Any] = {"episodes": trainer.episode, "config": cfg.to_dict()}
            if cfg.deployment.loihi:
                summary["loihi"] = deploy_loihi(cfg, out / "checkpoints" / "best", out / "checkpoints" / "loihi",
                                                notice)
            if figure_episodes:
                after = evaluate_agent(agent, cfg, figure_episodes, seed=seed, device=trainer.device,
                                       return_rollouts=True)
                after_rollouts = after.pop("rollouts")
                if before is not None:
                    plots.trajectories_before_after(before_rollouts, after_rollouts, arena,
                                                    out / "trajectories_before_after.png")
                    summary["before"] = before
                summary["after"] = after
            if metrics.exists():
                plots.loss_curves(metrics, out / "loss_curves.png")
            plots.write_json(out / "summary.json", summary)
            return summary
    except BaseException:
        if fresh and not started and out.exists():
            shutil.rmtree(out, ignore_errors=True)  # failed before training: leave no half-made run behind
        raise


__all__ = ["train_run", "deploy_loihi", "run_lock", "read_metrics", "truncate_metrics", "config_differences", "RESUMABLE_CHANGES"]
