"""Open-loop runs of a trained circuit (``dmn-neuro run``, the verifier)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import torch

from dmn_neuro.training.checkpoint import load_circuit
from dmn_neuro.errors import DMNError


def load_input_array(path: os.PathLike, n_orn: int) -> np.ndarray:
    """Load an ORN input array ``[T, batch, n_orn]`` from .npy (no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise DMNError(f"input file not found: {path}")
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DMNError(f"input file {path} is not a readable .npy array ({str(exc).splitlines()[0]})") from None
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiub":
        raise DMNError(f"input file {path} must hold a numeric array, got dtype {getattr(x, 'dtype', None)}")
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3 or x.shape[2] != n_orn:
        raise DMNError(f"input {path} must have shape [T, batch, {n_orn}], got {list(x.shape)}")
    if not np.all(np.isfinite(x)):
        raise DMNError(f"input {path} contains NaN/Inf")
    return x.astype(np.float64)


def run_open_loop(circuit, x: np.ndarray, dtype: torch.dtype = torch.float64, engine: str = "snntorch") -> Dict[str, np.ndarray]:
    """Spikes of every population ``{name: bool [T, B, n]}`` for input currents ``x``.

    Runs in float64 by default so that comparisons with exported models
    (NumPy/Lava, float64) are not decided by float32 rounding at threshold.
    """
    circuit = circuit.to(dtype)
    xt = torch.as_tensor(np.asarray(x), dtype=dtype, device=next(circuit.parameters()).device)
    with torch.no_grad():
        _, act = circuit(xt, return_activations=True, engine=engine)
    return {k: v.detach().cpu().numpy().astype(bool) for k, v in act["spikes"].items()}


def run_checkpoint(path: os.PathLike, x: np.ndarray, dtype: torch.dtype = torch.float64, engine: str = "snntorch") -> Dict[str, np.ndarray]:
    circuit, _ = load_circuit(path)
    return run_open_loop(circuit, x, dtype=dtype, engine=engine)


def save_spikes(path: os.PathLike, spikes: Dict[str, np.ndarray]) -> Path:
    """Write ``{population: spikes}`` to .npz atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **{k: np.asarray(v, dtype=bool) for k, v in spikes.items()})
    os.replace(tmp, path)
    return path


def odor_input(circuit, odors: Sequence[str], steps: int, concentration: float = 1.0, encoding: str = "rate",
               current_per_hz=None, seed: int = 0) -> np.ndarray:
    """ORN input ``[T, len(odors), n_orn]`` for static odors (real Hallem & Carlson responses)."""
    from dmn_neuro.environment.odors import OdorEncoder, static_odor_input

    kw = {"dt_ms": circuit.semantics.dt_ms, "encoding": encoding, "seed": seed}
    if current_per_hz is not None:
        kw["current_per_hz"] = current_per_hz
    enc = OdorEncoder(circuit.orn_glomeruli, **kw)
    return np.asarray(static_odor_input(enc, list(odors), steps, concentration=concentration), dtype=np.float64)
