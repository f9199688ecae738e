"""Checkpoints as safetensors + JSON (no pickle anywhere).

Stores:
    model.safetensors      circuit parameters and buffers (masks, signs)
    optimizer.safetensors  optimiser state tensors (absent for untrained models)
    rng.safetensors        torch RNG states
    checkpoint.json        format, training config, circuit structure and
                           constructor arguments, episode, loss history,
                           optimiser param groups, metrics

A checkpoint is a directory of these files, or, for a path ending in ``.pt``,
a single file: an uncompressed zip archive of the same files (nothing else;
reading it never unpickles anything, and a ``torch.save`` file is refused as
"not a dmn-neuro checkpoint").

Writes are atomic: everything goes to a temporary sibling (directory or file)
that is renamed into place, so a crash (even ``kill -9``) leaves either the
previous checkpoint or the new one, never a half-written one.

Format versions: 1 stored the training config flat; 2 stores it in sections
(:class:`~dmn_neuro.training.config.TrainingConfig`). Both are read
(``TrainingConfig.from_dict`` migrates the flat form).

Validation: every load checks checkpoint.json field by field
(:func:`check_meta`) and the model tensors against the circuit and the
connectome (:func:`validate_checkpoint`): shapes, dtypes, finite values,
decays in (0, 1), thresholds > 0, Dale's-law signs of the presynaptic neurons'
transmitters and masks equal to the connectome's synapses. ``structure`` in
checkpoint.json holds the source options and sha256 hashes of every mask and
sign vector (``structure.hashes``, written on save); where the source can be
rebuilt offline the wiring is also compared with the connectome rebuilt with
those options (checkpoints without hashes, like the shipped ones: this alone).
Anything wrong is a one-line :class:`CheckpointError` naming the tensor or field,
so ``evaluate``, ``export``, ``verify``, ``quantize`` and ``train --init-from``
refuse a circuit that is not the fly's.
"""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from connectome.atomic import atomic_dir, atomic_file, ensure_parent, recover_dir, temp_sibling
from dmn_neuro.errors import CheckpointError, DMNError
from dmn_neuro.training.checkpoint_checks import (  # noqa: F401  (re-exported: the checks live there)
    check_against_connectome, check_aux_tensors, check_meta, check_stored_hashes, mask_digest, reference_connectome,
    sign_digest, structure_difference, structure_hashes, wkey)

FORMAT = "dmn-neuro-checkpoint"
FORMAT_VERSION = 2
#: Member names of a checkpoint (directory entries or single-file archive members).
MEMBERS = ("checkpoint.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors")
SINGLE_FILE_SUFFIX = ".pt"


def is_single_file(path) -> bool:
    """Whether ``path`` names a single-file checkpoint (suffix ``.pt``)."""
    return Path(path).suffix == SINGLE_FILE_SUFFIX


def _write_single_file(path: Path, writer) -> Path:
    """Write the checkpoint files into a temporary directory and pack them into
    an uncompressed zip written atomically at ``path``."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"cannot write a single-file checkpoint over the directory {path}")
    ensure_parent(path)
    tmp_dir = temp_sibling(path, "tmp")
    tmp_dir.mkdir()
    try:
        writer(tmp_dir)
        with atomic_file(path, "wb") as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
            for name in MEMBERS:
                if (tmp_dir / name).exists():
                    zf.write(tmp_dir / name, arcname=name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def _optimizer_tensors(opt: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    sd = opt.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path, circuit, config, episode: int, optimizer: Optional[torch.optim.Optimizer] = None,
    loss_history=None, metrics: Optional[Dict[str, Any]] = None, rng: Optional[Dict[str, torch.Tensor]] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    model_sd = {k: v.detach().cpu().contiguous() for k, v in circuit.state_dict().items()}
    for k, v in model_sd.items():
        if v.is_floating_point() and not torch.all(torch.isfinite(v)):
            raise CheckpointError(f"refusing to save a checkpoint with NaN/Inf in {k}")
    structure = circuit.structure.to_json()
    structure["hashes"] = structure_hashes(model_sd, circuit.structure.projections)
    meta: Dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "episode": int(episode),
        "config": config.to_dict(), "circuit": circuit.config_dict(), "structure": structure,
        "semantics": circuit.semantics.to_dict(), "loss_history": list(loss_history or []),
        "metrics": metrics or {}, "extra": extra or {},
    }
    opt_t: Dict[str, torch.Tensor] = {}
    if optimizer is not None:
        opt_t, meta["optimizer"] = _optimizer_tensors(optimizer)

    def writer(d: Path) -> None:
        save_file(model_sd, str(d / "model.safetensors"))
        if optimizer is not None:
            save_file(opt_t if opt_t else {"_empty": torch.zeros(0)}, str(d / "optimizer.safetensors"))
        if rng:
            save_file({k: v.cpu().contiguous() for k, v in rng.items()}, str(d / "rng.safetensors"))
        (d / "checkpoint.json").write_text(json.dumps(meta, indent=1))

    if is_single_file(path):
        return _write_single_file(Path(path), writer)
    with atomic_dir(path) as tmp:
        writer(tmp)
    return Path(path)


def recover_checkpoint(path) -> bool:
    """Finish an interrupted atomic save (see :func:`connectome.atomic.recover_dir`)."""
    return recover_dir(path)


def _read_members(path: Path) -> Dict[str, bytes]:
    """The member files of a checkpoint directory or single-file archive (raw bytes; absent = missing)."""
    if path.is_dir():
        return {name: (path / name).read_bytes() for name in MEMBERS if (path / name).is_file()}
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint must be a directory or a {SINGLE_FILE_SUFFIX} file written by "
                              f"dmn-neuro (safetensors + checkpoint.json): {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "checkpoint.json" not in names:
                raise CheckpointError(f"checkpoint {path}: not a dmn-neuro checkpoint (no checkpoint.json in the archive)")
            return {name: zf.read(name) for name in MEMBERS if name in names}
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path}: archive is corrupt ({exc})") from None


def read_checkpoint(path) -> Dict[str, Any]:
    """Read and validate a checkpoint (directory or ``.pt`` file: tensors + metadata), building nothing.

    Every field of checkpoint.json is checked (:func:`check_meta`) and the
    optimiser / RNG tensors are checked against it; a problem is a one-line
    :class:`CheckpointError` naming the field. The model tensors are checked
    against the circuit by :func:`validate_checkpoint` (from :func:`load_circuit`).
    """
    path = Path(path)
    recover_checkpoint(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    files = _read_members(path)
    try:
        meta = json.loads(files["checkpoint.json"].decode("utf-8"))
    except KeyError:
        raise CheckpointError(f"checkpoint {path} has no checkpoint.json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: checkpoint.json is corrupt ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a dmn-neuro checkpoint")
    version = meta.get("format_version", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format_version {version!r} is newer than this reader ({FORMAT_VERSION})")
    missing = [k for k in ("config", "structure", "circuit") if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path}: checkpoint.json lacks {', '.join(missing)}")
    check_meta(meta, f"checkpoint {path}", FORMAT_VERSION)
    out: Dict[str, Any] = {"meta": meta, "path": path}
    for name in ("model", "optimizer", "rng"):
        fname = f"{name}.safetensors"
        if fname not in files:
            if name == "model":
                raise CheckpointError(f"checkpoint {path} has no model.safetensors")
            out[name] = None
            continue
        try:
            out[name] = load_bytes(files[fname])
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {path}: {fname} is corrupt ({str(exc).splitlines()[0]})") from None
    if out.get("optimizer") is not None:
        out["optimizer"].pop("_empty", None)
    check_aux_tensors(out, f"checkpoint {path}")
    return out


def validate_checkpoint(ck: Dict[str, Any], circuit) -> None:
    """Check a checkpoint's model tensors before they are loaded into ``circuit``
    (built from the checkpoint's structure, not yet loaded).

    * the tensors are those of the circuit, of its shapes; parameters are
      floating point and finite, masks bool, signs in {-1, +1} and the same for
      every projection of a presynaptic population;
    * decays ``sigmoid(raw_beta)`` lie strictly in (0, 1) and thresholds
      ``softplus(raw_threshold)`` are > 0, in the circuit's dtype;
    * where the connectome source can be rebuilt here (the bundled sources,
      ``synthetic``, a ``codex:DIR`` that exists), the masks, signs (Dale's law
      of the presynaptic neurons' transmitters) and neuron ids equal the
      connectome's, rebuilt with the checkpoint's own source options;
    * the masks and signs match the content hashes stored at save time
      (checkpoints written before hashes were stored: the rebuild alone).

    Raises a one-line :class:`CheckpointError` naming the tensor and the rule.
    """
    where = f"checkpoint {ck['path']}"
    sd = ck["model"]
    expected = circuit.state_dict()
    structure = circuit.structure
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        what = "; ".join(x for x in (f"missing {', '.join(missing[:3])}" if missing else "",
                                     f"unexpected {', '.join(unexpected[:3])}" if unexpected else "") if x)
        raise CheckpointError(f"{where}: model tensors do not match the circuit ({what})")

    def fail(key: str, rule: str) -> CheckpointError:
        return CheckpointError(f"{where}: {key}: {rule}")

    for key, ref in expected.items():
        t = sd[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise fail(key, f"shape {tuple(t.shape)} but the circuit structure needs {tuple(ref.shape)}")
        if key.endswith(".mask"):
            if t.dtype != torch.bool:
                raise fail(key, f"dtype {str(t.dtype).replace('torch.', '')}; synapse masks must be bool")
            continue
        if not t.is_floating_point():
            raise fail(key, f"dtype {str(t.dtype).replace('torch.', '')}; expected a floating-point tensor")
        if not bool(torch.isfinite(t).all()):
            raise fail(key, "contains NaN/Inf")
        tv = t.to(ref.dtype)
        if key.endswith(".raw_beta"):
            beta = torch.sigmoid(tv)
            bad = ~((beta > 0) & (beta < 1))
            if bool(bad.any()):
                i = int(bad.reshape(-1).nonzero()[0])
                raw, b = float(tv.reshape(-1)[i]), float(beta.reshape(-1)[i])
                raise fail(key, f"decay beta = sigmoid({raw:g}) is {b:g} in {str(ref.dtype).replace('torch.', '')}; "
                                "it must lie strictly between 0 and 1")
        elif key.endswith(".raw_threshold"):
            thr = F.softplus(tv)
            bad = ~(thr > 0)
            if bool(bad.any()):
                i = int(bad.reshape(-1).nonzero()[0])
                raise fail(key, f"threshold softplus({float(tv.reshape(-1)[i]):g}) of neuron {i} is 0 in "
                                f"{str(ref.dtype).replace('torch.', '')}; thresholds must be > 0")
        elif key.endswith(".sign"):
            bad = ~((tv == 1) | (tv == -1))
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                pre = key.split(".")[1].split("_to_")[0]
                raise fail(key, f"sign of {pre} neuron {i} is {float(tv[i]):g}, not -1 or +1 (Dale's law)")
    first_sign: Dict[str, str] = {}
    for pre, post in structure.projections:
        k = f"{wkey(pre, post)}.sign"
        if pre in first_sign and not torch.equal(sd[k], sd[first_sign[pre]]):
            raise fail(k, f"differs from {first_sign[pre]}: one presynaptic population has one sign per neuron (Dale's law)")
        first_sign.setdefault(pre, k)
    for layer, ids in structure.root_ids.items():
        if layer in structure.layer_sizes and len(ids) != structure.layer_sizes[layer]:
            raise fail(f"structure.root_ids.{layer}", f"{len(ids)} ids for {structure.layer_sizes[layer]} neurons")

    check_against_connectome(ck, structure, sd, fail)
    check_stored_hashes(structure, sd, fail)


def load_circuit(path, device=None, engine: Optional[str] = None):
    """Rebuild the trained circuit from a checkpoint: ``(circuit, meta)``.

    The checkpoint is validated first (:func:`read_checkpoint`,
    :func:`validate_checkpoint`): a circuit that is not the connectome's (a
    changed sign or mask, an impossible decay or threshold) is refused.
    """
    from dmn_neuro.simulation.mechanism import CircuitStructure, DifferentiableOlfactoryCircuit

    ck = read_checkpoint(path)
    meta = ck["meta"]
    try:
        structure = CircuitStructure.from_json(meta["structure"])
        kw = dict(meta["circuit"])
        kw["neuron_params"] = {k: tuple(v) for k, v in kw.get("neuron_params", {}).items()}
        if engine is not None:
            kw["engine"] = engine
        circuit = DifferentiableOlfactoryCircuit(structure=structure, **kw)
    except (KeyError, TypeError, ValueError, AttributeError, DMNError) as exc:
        raise CheckpointError(f"checkpoint {path}: cannot rebuild the circuit ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    validate_checkpoint(ck, circuit)
    try:
        circuit.load_state_dict(ck["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: model tensors do not match the circuit ({str(exc).splitlines()[0]})") from None
    if device is not None:
        circuit = circuit.to(device)
    return circuit, ck


def restore_optimizer(optimizer: torch.optim.Optimizer, ck: Dict[str, Any]) -> None:
    if ck.get("optimizer") is None or "optimizer" not in ck["meta"]:
        return
    try:
        optimizer.load_state_dict(_optimizer_state(ck["optimizer"], ck["meta"]["optimizer"]))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {ck['path']}: optimizer state does not fit ({exc})") from None
