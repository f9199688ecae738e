"""Recordings of a trained circuit: open-loop spike runs on ORN input
(``dmn-neuro run``, the verifier's reference), the verifier's odor input, and
closed-loop success with the circuit or a stand-in for it (the fixed-point emulator)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import torch

from connectome.atomic import atomic_file
from dmn_neuro.training.checkpoint import load_circuit
from dmn_neuro.errors import DMNError


#: Largest input accepted by ``dmn-neuro run`` (elements; 2**28 float64 = 2 GiB,
#: and the run keeps every population's spikes besides).
MAX_INPUT_ELEMENTS = 1 << 28


def _npy_header(path: Path):
    """(shape, dtype) from a .npy header, checked against the file size before any data is read."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            offset = fh.tell()
    except (ValueError, OSError, EOFError) as exc:
        raise DMNError(f"input file {path} is not a readable .npy array ({str(exc).splitlines()[0]})") from None
    if dtype.hasobject or dtype.kind not in "fiub":
        raise DMNError(f"input file {path} must hold a numeric array, got dtype {dtype}")
    n = int(np.prod(shape, dtype=object)) if shape else 1
    if n > MAX_INPUT_ELEMENTS:
        raise DMNError(f"input {path} has shape {list(shape)} ({n:,} values); at most {MAX_INPUT_ELEMENTS:,} are accepted")
    need = offset + n * dtype.itemsize
    have = path.stat().st_size
    if have < need:
        raise DMNError(f"input file {path} is truncated: its header promises {need:,} bytes, the file has {have:,}")
    return shape, dtype


def load_input_array(path: os.PathLike, n_orn: int) -> np.ndarray:
    """Load an ORN input array ``[T, batch, n_orn]`` (or ``[T, n_orn]``) from .npy:
    no pickle, the header checked (shape, dtype, size) before the data is read."""
    path = Path(path)
    if not path.is_file():
        raise DMNError(f"input file not found: {path}")
    shape, _ = _npy_header(path)
    if len(shape) not in (2, 3) or shape[-1] != n_orn:
        raise DMNError(f"input {path} must have shape [T, batch, {n_orn}] or [T, {n_orn}], got {list(shape)}")
    if shape[0] < 1 or (len(shape) == 3 and shape[1] < 1):
        raise DMNError(f"input {path} has no time steps or no batch entries: shape {list(shape)}")
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DMNError(f"input file {path} is not a readable .npy array ({str(exc).splitlines()[0]})") from None
    if x.ndim == 2:
        x = x[:, None, :]
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
    with atomic_file(path, "wb") as fh:
        np.savez_compressed(fh, **{k: np.asarray(v, dtype=bool) for k, v in spikes.items()})
    return Path(path)


def odor_input(circuit, odors: Sequence[str], steps: int, concentration: float = 1.0, encoding: str = "rate",
               current_per_hz=None, seed: int = 0) -> np.ndarray:
    """ORN input ``[T, len(odors), n_orn]`` for static odors (real Hallem & Carlson responses)."""
    from dmn_neuro.environment.odors import OdorEncoder, static_odor_input

    kw = {"dt_ms": circuit.semantics.dt_ms, "encoding": encoding, "seed": seed}
    if current_per_hz is not None:
        kw["current_per_hz"] = current_per_hz
    enc = OdorEncoder(circuit.orn_glomeruli, **kw)
    return np.asarray(static_odor_input(enc, list(odors), steps, concentration=concentration), dtype=np.float64)


#: Concentrations cycled over the verification odors (fraction of the Hallem 10^-2 dilution).
VERIFY_CONCENTRATIONS = (0.05, 0.3, 1.0)
#: Seed of the verification input (Poisson ORN spikes): the same input every run,
#: so that pass/fail is reproducible.
VERIFY_SEED = 0


def verification_input(circuit, cfg, odors: Sequence[str], steps: int, seed: int = VERIFY_SEED) -> np.ndarray:
    """ORN input ``[steps, len(odors) * len(VERIFY_CONCENTRATIONS), n_orn]``: each
    odor at several concentrations, with the checkpoint's own encoder (seeded)."""
    from dmn_neuro.environment.odors import static_odor_input
    from dmn_neuro.training.optimizer import build_components

    _, encoder, _, _, _ = build_components(cfg.replace(odors=[]), circuit=circuit, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(int(seed))
    xs = [np.asarray(static_odor_input(encoder, list(odors), steps, concentration=c, generator=gen), dtype=np.float64)
          for c in VERIFY_CONCENTRATIONS]
    return np.concatenate(xs, axis=1)


def default_odors(cfg) -> list:
    """The verification odors: the checkpoint's training odors plus up to three others (4 at most)."""
    trained = list(cfg.environment.arena_config().odors)
    extra = [o for o in ("ethyl acetate", "1-hexanol", "benzaldehyde") if o not in trained]
    return (trained + extra)[:4]


def closed_loop_success(circuit, cfg, stepper=None, episodes: int = 50, seed: int = 12345,
                        steps=None) -> float:
    """Held-out navigation success of the circuit, or of ``stepper`` (e.g. the
    Loihi fixed-point emulator) driving the same agent, on the evaluation stream."""
    from dmn_neuro.training.optimizer import build_components, evaluate_agent

    cpu = torch.device("cpu")
    _, _, _, agent, _ = build_components(cfg, circuit=circuit.float(), device=cpu)
    return float(evaluate_agent(agent, cfg, episodes, seed, episode_length=steps, device=cpu,
                                stepper=stepper)["success_rate"])
