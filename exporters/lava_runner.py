"""Run an exported Lava graph from the main environment.

The main environment never imports lava: :func:`run_lava` writes the input to
a temporary ``.npy``, runs ``exporters/lava_worker/worker.py`` with the Lava
env's interpreter (:func:`find_lava_python`) in a subprocess and reads the
spikes back. A failing worker becomes one :class:`~dmn_neuro.errors.ExportError`
line (the last line of the worker's stderr).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from dmn_neuro.errors import ExportError

from exporters.lava_export import read_lava_graph

logger = logging.getLogger(__name__)

LAVA_PYTHON_ENV = "DMN_LAVA_PYTHON"
WORKER = Path(__file__).resolve().parent / "lava_worker" / "worker.py"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_TIMEOUT_S = 1800.0


def find_lava_python() -> Path:
    """The Lava env's interpreter: ``$DMN_LAVA_PYTHON``, else ``<repo>/.venv-lava/bin/python``."""
    env = os.environ.get(LAVA_PYTHON_ENV)
    path = Path(env) if env else REPO / ".venv-lava" / "bin" / "python"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ExportError(f"Lava environment not found at {path}: run `make lava-env` (or set {LAVA_PYTHON_ENV})")
    return path


def run_lava(graph_dir: os.PathLike, x: np.ndarray, steps: Optional[int] = None, fixed_point: bool = False,
             timeout: float = DEFAULT_TIMEOUT_S, batch_chunk: Optional[int] = None,
             return_info: bool = False) -> Dict[str, np.ndarray]:
    """Run the graph in ``graph_dir`` on ORN input ``x`` ``[T, B, n_in]`` with Lava.

    Returns ``{population: bool [steps, B, n]}`` in model time (the input lag
    already removed). With ``return_info`` also ``"lag"`` (int) and ``"timing"``
    (list of dicts per batch chunk: build/run seconds).
    """
    manifest, _ = read_lava_graph(graph_dir)
    if fixed_point != (manifest["mode"] == "fixed"):
        raise ExportError(f"graph {graph_dir} is a {manifest['mode']} graph but fixed_point={fixed_point}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x[:, None, :]
    n_in = next(p["n"] for p in manifest["processes"] if p["kind"] == "source")
    if x.ndim != 3 or x.shape[2] != n_in:
        raise ExportError(f"input must be [T, batch, {n_in}], got {list(x.shape)}")
    python = find_lava_python()
    with tempfile.TemporaryDirectory(prefix="dmn_lava_") as tmp:
        xin = Path(tmp) / "x.npy"
        out = Path(tmp) / "spikes.npz"
        np.save(xin, x)
        cmd = [str(python), str(WORKER), "--graph", str(Path(graph_dir).resolve()), "--input", str(xin), "--out", str(out)]
        if steps is not None:
            cmd += ["--steps", str(int(steps))]
        if fixed_point:
            cmd.append("--fixed-point")
        if batch_chunk:
            cmd += ["--batch-chunk", str(int(batch_chunk))]
        logger.info("running Lava worker: %s", " ".join(cmd))
        # The worker must not find the main env's packages (numpy 2) on its path.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
        except subprocess.TimeoutExpired:
            raise ExportError(f"Lava worker timed out after {timeout:.0f} s") from None
        except OSError as exc:
            raise ExportError(f"cannot start the Lava interpreter {python}: {exc}") from None
        if proc.returncode != 0 or not out.is_file():
            lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit status {proc.returncode}, no message"
            logger.debug("Lava worker stderr:\n%s", proc.stderr)
            raise ExportError(f"Lava run failed: {last}")
        with np.load(out, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    pops = [p["name"] for p in manifest["processes"] if p["kind"] == "LIF"]
    result = {name: arrays[name].astype(bool) for name in pops}
    if return_info:
        result["lag"] = int(arrays["lag"])
        result["timing"] = json.loads(bytes(arrays["timing_json"]).decode())
    return result
