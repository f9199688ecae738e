"""Running an experiment grid: every cell an ordinary training run, then its evaluations.

Stores (under the experiment directory ``out``):
    .lock                        held by the driver (one driver per directory)
    experiment.json              the experiment as run (conditions, seeds, evaluation)
    runs/COND/seedS/             each cell's run directory (see :mod:`dmn_neuro.experiments.run`)
    results/COND__seedS.json     each finished cell's result, written atomically by the driver

Scheduling is the executor's: a local :class:`~concurrent.futures.ProcessPoolExecutor`
(spawn context, one torch thread per worker) or Ray tasks (``ray_address``; one CPU
each). A cell is finished when its result file exists; a rerun of the same
experiment reuses finished cells and runs the others, resuming a run directory
from its last checkpoint when it has one (and starting it over when it has
none). A finished cell whose stored config differs from the experiment's is an
error (another experiment wrote this directory).

With Ray the run directories are written by the worker at the same path, so they
land in ``out`` when the workers share its file system (a local Ray instance, a
cluster with a shared disk); the results are always written by the driver.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from connectome.atomic import write_text
from dmn_neuro.errors import ConfigError, DMNError
from dmn_neuro.experiments.spec import Cell, ExperimentSpec

Progress = Callable[[str, Optional[Dict[str, Any]]], None]


def _init_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def run_cell(payload: Dict[str, Any]) -> Dict[str, Any]:
    """Train one cell in its run directory and evaluate it; returns the result record.

    Runs in a worker (process pool or Ray): everything it needs is in ``payload``.
    """
    _init_worker()
    from dmn_neuro.experiments.evaluation import evaluate_cell, learning_curve
    from dmn_neuro.experiments.run import train_run
    from dmn_neuro.training.config import TrainingConfig

    t0 = time.time()
    cfg = TrainingConfig.from_dict(payload["config"])
    run_dir = Path(payload["run_dir"])
    last = run_dir / "checkpoints" / "last"
    resume = last.exists() or any(run_dir.glob("checkpoints/.last.*"))
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # killed before its first checkpoint: start it over
    train_run(cfg, run_dir, resume=resume, figure_episodes=payload["figure_episodes"])
    ev = payload["evaluate"]
    result = {
        "condition": payload["condition"], "seed": payload["seed"], "config": payload["config"],
        "run_dir": payload["run_rel"], "learning_curve": learning_curve(run_dir / "metrics.jsonl"),
    }
    result.update(evaluate_cell(run_dir / "checkpoints" / ev["checkpoint"], cfg, episodes=ev["episodes"],
                                seed=ev["seed"], odor_removed=ev["odor_removed"]))
    result["wall_s"] = time.time() - t0
    result["pid"] = os.getpid()
    return result


def _payload(cell: Cell, spec: ExperimentSpec, out: Path) -> Dict[str, Any]:
    return {"condition": cell.condition, "seed": cell.seed, "config": cell.config,
            "run_dir": str((out / cell.run_dir).resolve()), "run_rel": cell.run_dir,
            "evaluate": dict(spec.evaluate), "figure_episodes": int(spec.train["figure_episodes"])}


def finished_cells(spec: ExperimentSpec, out: Path) -> Dict[str, Dict[str, Any]]:
    """Results already in ``out`` by cell key; a result of another config is an error."""
    from dmn_neuro.experiments.run import config_differences

    done = {}
    for cell in spec.cells():
        p = out / cell.result_path
        if not p.exists():
            continue
        try:
            res = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # unreadable: run the cell again
        diffs = config_differences(res.get("config") or {}, cell.config)
        if diffs:
            raise ConfigError(f"{p} was run with another config ({', '.join(diffs[:3])} differ); "
                              "use another --out for a changed experiment")
        done[cell.key] = res
    return done


def _write_result(out: Path, cell: Cell, res: Dict[str, Any]) -> None:
    write_text(out / cell.result_path, json.dumps(res, indent=1, default=float))


def run_experiment(spec: ExperimentSpec, out, workers: int = 1, ray_address: Optional[str] = None,
                   progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Run the unfinished cells of ``spec`` in ``out``; returns {cells, reused, ran, failed}.

    ``progress(event, info)``: ``("start", {total, done})`` once, then ``("cell", {key, ok})`` per cell.
    Cells that fail are reported together at the end (one-line DMNError); the
    others are kept, and a rerun retries only the failed and missing ones.
    """
    from dmn_neuro.experiments.run import run_lock

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        write_text(out / "experiment.json", json.dumps(spec.to_dict(), indent=1))
        cells = spec.cells()
        done = finished_cells(spec, out)
        todo = [c for c in cells if c.key not in done]
        if progress:
            progress("start", {"total": len(cells), "done": len(done), "todo": [c.key for c in todo]})
        failures: List[str] = []

        def finish(cell: Cell, res: Optional[Dict[str, Any]], err: Optional[BaseException]) -> None:
            if err is None:
                _write_result(out, cell, res)
            else:
                failures.append(f"{cell.condition} seed {cell.seed}: {' '.join(str(err).split()) or type(err).__name__}")
            if progress:
                progress("cell", {"key": cell.key, "ok": err is None})

        if todo:
            payloads = [(c, _payload(c, spec, out)) for c in todo]
            if ray_address:
                _run_ray(payloads, ray_address, finish)
            else:
                _run_pool(payloads, workers, finish)
        if failures:
            raise DMNError(f"{len(failures)} of {len(cells)} cells failed ({failures[0]}"
                           f"{'; ...' if len(failures) > 1 else ''}); rerun the same command to retry them")
        return {"cells": len(cells), "reused": len(done), "ran": len(todo), "out": str(out)}


def _run_pool(payloads, workers: int, finish) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("spawn")
    ex = ProcessPoolExecutor(max_workers=min(workers, len(payloads)), mp_context=ctx, initializer=_init_worker)
    try:
        futures = {ex.submit(run_cell, p): c for c, p in payloads}
        for f in as_completed(futures):
            err = f.exception()
            finish(futures[f], None if err else f.result(), err)
    except BaseException:  # Ctrl-C, a failing write: drop the queue, do not wait for running cells
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True)


def _run_ray(payloads, address: str, finish) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray-address needs Ray: pip install 'dmn-neuro[cluster]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - ConnectionError and Ray's own errors
            raise ConfigError(f"cannot connect to Ray at {address}: {' '.join(str(exc).split())[:200]}") from None
    task = ray.remote(num_cpus=1)(run_cell)
    refs = {task.remote(p): c for c, p in payloads}
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1)
        cell = refs.pop(ready[0])
        try:
            res, err = ray.get(ready[0]), None
        except Exception as exc:  # noqa: BLE001 - a task's failure, reported with the others
            res, err = None, getattr(exc, "cause", None) or exc
        finish(cell, res, err)


__all__ = ["run_experiment", "run_cell", "finished_cells"]
