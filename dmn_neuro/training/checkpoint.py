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

import functools
import hashlib
import json
import logging
import math
import numbers
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from connectome.atomic import atomic_dir, atomic_file, ensure_parent, recover_dir, temp_sibling
from dmn_neuro.errors import CheckpointError, DMNError

logger = logging.getLogger(__name__)

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
    check_meta(meta, f"checkpoint {path}")
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
    _check_aux_tensors(out, f"checkpoint {path}")
    return out


# -- checkpoint.json ------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _kind(v) -> str:
    return f"{type(v).__name__} {v!r}" if len(repr(v)) <= 40 else type(v).__name__


def check_meta(meta: Mapping[str, Any], where: str = "checkpoint") -> None:
    """Validate checkpoint.json; a malformed field is a one-line :class:`CheckpointError` naming it."""
    def bad(field: str, what: str) -> CheckpointError:
        return CheckpointError(f"{where}: checkpoint.json field {field} {what}")

    version = meta.get("format_version", 1)
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise bad("format_version", f"must be one of {list(range(1, FORMAT_VERSION + 1))}, got {_kind(version)}")
    episode = meta.get("episode", 0)
    if not _is_int(episode) or episode < 0:
        raise bad("episode", f"must be a non-negative integer, got {_kind(episode)}")
    history = meta.get("loss_history", [])
    if not isinstance(history, list):
        raise bad("loss_history", f"must be a list of {{name: number}} records, got {_kind(history)}")
    for i, rec in enumerate(history):
        if not isinstance(rec, dict):
            raise bad(f"loss_history[{i}]", f"must be a mapping of names to numbers, got {_kind(rec)}")
        for k, v in rec.items():
            if not _is_number(v):
                raise bad(f"loss_history[{i}].{k}", f"must be a number, got {_kind(v)}")
    for field in ("config", "circuit", "structure", "semantics", "metrics", "extra"):
        if field in meta and not isinstance(meta[field], dict):
            raise bad(field, f"must be a mapping, got {_kind(meta[field])}")
    from dmn_neuro.training.config import TrainingConfig

    try:
        TrainingConfig.from_dict(meta["config"])
    except (DMNError, TypeError, ValueError, AttributeError) as exc:
        raise bad("config", f"is not a valid training config ({_first_line(exc)})") from None
    extra = meta.get("extra", {})
    if "best_loss" in extra and not _is_number(extra["best_loss"]):
        raise bad("extra.best_loss", f"must be a number, got {_kind(extra['best_loss'])}")
    bs = extra.get("best_score")
    if bs is not None and not (isinstance(bs, list) and all(_is_number(x) for x in bs)):
        raise bad("extra.best_score", f"must be null or a list of numbers, got {_kind(bs)}")
    structure = meta.get("structure", {})
    if "hashes" in structure:
        _check_hashes_field(structure["hashes"], bad)
    if "source_options" in structure and structure["source_options"] is not None \
            and not isinstance(structure["source_options"], dict):
        raise bad("structure.source_options", f"must be a mapping, got {_kind(structure['source_options'])}")
    if "optimizer" in meta:
        _check_optimizer_meta(meta["optimizer"], bad)


def _first_line(exc) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _check_hashes_field(h, bad) -> None:
    if not isinstance(h, dict):
        raise bad("structure.hashes", f"must be a mapping, got {_kind(h)}")
    for group, size_key in (("masks", "shape"), ("signs", "n")):
        entries = h.get(group, {})
        if not isinstance(entries, dict):
            raise bad(f"structure.hashes.{group}", f"must be a mapping, got {_kind(entries)}")
        for name, e in entries.items():
            f = f"structure.hashes.{group}.{name}"
            if not isinstance(e, dict) or not isinstance(e.get("sha256"), str) or len(e["sha256"]) != 64:
                raise bad(f, "must be {sha256: 64 hex digits, ...}")
            size = e.get(size_key)
            ok = (isinstance(size, list) and len(size) == 2 and all(_is_int(x) and x >= 0 for x in size)) \
                if size_key == "shape" else (_is_int(size) and size >= 0)
            if not ok:
                raise bad(f"{f}.{size_key}", f"is malformed: {_kind(size)}")


def _check_optimizer_meta(opt, bad) -> None:
    if not isinstance(opt, dict):
        raise bad("optimizer", f"must be a mapping, got {_kind(opt)}")
    groups = opt.get("param_groups")
    if not isinstance(groups, list):
        raise bad("optimizer.param_groups", f"must be a list, got {_kind(groups)}")
    seen = set()
    for i, g in enumerate(groups):
        f = f"optimizer.param_groups[{i}]"
        if not isinstance(g, dict):
            raise bad(f, f"must be a mapping, got {_kind(g)}")
        params = g.get("params")
        if not isinstance(params, list) or not all(_is_int(p) and p >= 0 for p in params):
            raise bad(f"{f}.params", f"must be a list of parameter indices, got {_kind(params)}")
        if seen & set(params):
            raise bad(f"{f}.params", "repeats a parameter index of another group")
        seen |= set(params)
        if not _is_number(g.get("lr")) or not math.isfinite(g["lr"]) or g["lr"] < 0:
            raise bad(f"{f}.lr", f"must be a non-negative number, got {_kind(g.get('lr'))}")
    scalars = opt.get("scalars", {})
    if not isinstance(scalars, dict):
        raise bad("optimizer.scalars", f"must be a mapping, got {_kind(scalars)}")
    for key in scalars:
        idx = str(key).split(".", 1)
        if len(idx) != 2 or not idx[0].isdigit() or int(idx[0]) not in seen:
            raise bad(f"optimizer.scalars.{key}", "names no parameter of param_groups (expected 'INDEX.NAME')")


def _check_aux_tensors(ck: Dict[str, Any], where: str) -> None:
    """Optimiser tensors named ``state.INDEX.NAME`` for indices of param_groups; RNG state a byte vector."""
    opt = ck.get("optimizer")
    if opt is not None:
        groups = ck["meta"].get("optimizer", {}).get("param_groups", [])
        indices = {p for g in groups for p in g["params"]}
        for key, t in opt.items():
            parts = key.split(".", 2)
            if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) not in indices:
                raise CheckpointError(f"{where}: optimizer.safetensors tensor {key} names no parameter of "
                                      "checkpoint.json's optimizer.param_groups")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{where}: optimizer.safetensors tensor {key} contains NaN/Inf")
    rng = ck.get("rng")
    if rng is not None and "torch_cpu" in rng:
        t = rng["torch_cpu"]
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise CheckpointError(f"{where}: rng.safetensors tensor torch_cpu must be a 1-D uint8 tensor, "
                                  f"got {t.dtype} of shape {tuple(t.shape)}")


# -- model tensors --------------------------------------------------------------------
def _wkey(pre: str, post: str) -> str:
    return f"weights.{pre}_to_{post}"


def mask_digest(mask) -> str:
    """sha256 of a bool mask ``[n_post, n_pre]`` (its shape and its bits, row-major)."""
    m = np.asarray(mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else mask).astype(bool)
    h = hashlib.sha256(f"mask:{'x'.join(str(n) for n in m.shape)}:".encode())
    h.update(np.packbits(m, axis=None).tobytes())
    return h.hexdigest()


def sign_digest(sign) -> str:
    """sha256 of a presynaptic sign vector in {-1, +1} (its length and which entries are +1)."""
    s = np.asarray(sign.detach().cpu().numpy() if isinstance(sign, torch.Tensor) else sign)
    h = hashlib.sha256(f"sign:{s.size}:".encode())
    h.update(np.packbits(s.reshape(-1) > 0).tobytes())
    return h.hexdigest()


def structure_hashes(state_dict: Mapping[str, torch.Tensor], projections) -> Dict[str, Any]:
    """Content hashes of every projection's mask and every presynaptic population's signs
    (stored in checkpoint.json's ``structure.hashes``; checked on load)."""
    masks: Dict[str, Any] = {}
    signs: Dict[str, Any] = {}
    for pre, post in projections:
        k = _wkey(pre, post)
        m, s = state_dict[f"{k}.mask"], state_dict[f"{k}.sign"]
        masks[f"{pre}->{post}"] = {"shape": [int(n) for n in m.shape], "sha256": mask_digest(m)}
        signs.setdefault(pre, {"n": int(s.numel()), "sha256": sign_digest(s)})
    return {"masks": masks, "signs": signs}


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
        k = f"{_wkey(pre, post)}.sign"
        if pre in first_sign and not torch.equal(sd[k], sd[first_sign[pre]]):
            raise fail(k, f"differs from {first_sign[pre]}: one presynaptic population has one sign per neuron (Dale's law)")
        first_sign.setdefault(pre, k)
    for layer, ids in structure.root_ids.items():
        if layer in structure.layer_sizes and len(ids) != structure.layer_sizes[layer]:
            raise fail(f"structure.root_ids.{layer}", f"{len(ids)} ids for {structure.layer_sizes[layer]} neurons")

    _check_against_connectome(ck, structure, sd, fail)
    _check_stored_hashes(structure, sd, fail)


def _check_stored_hashes(structure, sd, fail) -> None:
    h = structure.hashes or {}
    masks, signs = h.get("masks", {}), h.get("signs", {})
    for pre, post in structure.projections:
        key = _wkey(pre, post)
        e = masks.get(f"{pre}->{post}")
        if h and e is None:
            raise fail(f"structure.hashes.masks.{pre}->{post}", "missing (the checkpoint stores hashes of every projection)")
        m = sd[f"{key}.mask"]
        if e is not None and (list(m.shape) != list(e["shape"]) or mask_digest(m) != e["sha256"]):
            raise fail(f"{key}.mask", f"content differs from the sha256 stored at save time "
                                      f"({int(m.sum()):,} synapses now; the mask was changed after saving)")
        e = signs.get(pre)
        if h and e is None:
            raise fail(f"structure.hashes.signs.{pre}", "missing (the checkpoint stores hashes of every presynaptic population)")
        s = sd[f"{key}.sign"]
        if e is not None and (s.numel() != e["n"] or sign_digest(s) != e["sha256"]):
            raise fail(f"{key}.sign", f"content differs from the sha256 of the {pre} signs stored at save time "
                                      "(the signs were changed after saving)")


#: Sources that can be rebuilt without the network.
OFFLINE_SOURCES = ("flywire_v783_mb", "hemibrain_v1.2.1_mb", "synthetic")


def _unrebuildable(source: str) -> Optional[str]:
    """Why ``source`` cannot be rebuilt here, or None."""
    if source in OFFLINE_SOURCES:
        return None
    if source.startswith("codex:"):
        d = Path(os.path.expanduser(source[len("codex:"):]))
        return None if d.is_dir() else f"its directory {d} does not exist here"
    if source == "cave":
        return "it is read over the network"
    return f"{source!r} is not a connectome source this version can load"


@functools.lru_cache(maxsize=8)
def reference_connectome(source: str, layers: Tuple[str, ...], options_json: str):
    """The connectome a checkpoint's circuit was built from: ``layers`` of ``source``
    rebuilt with its source options (JSON text, sorted keys); one load per process
    and (source, layers, options) -- the connectome layer caches on disk as well."""
    from connectome.fetch_data import FlyWireConnectome

    return FlyWireConnectome().fetch_olfactory_circuit(include_layers=list(layers), source=source,
                                                       **json.loads(options_json))


def _reference_options(ck: Dict[str, Any], structure) -> Tuple[Optional[Dict[str, Any]], str]:
    """(source options, where they came from), or (None, why unknown)."""
    if structure.source_options is not None:
        return dict(structure.source_options), "structure.source_options"
    from dmn_neuro.training.config import TrainingConfig

    cc = TrainingConfig.from_dict(ck["meta"]["config"]).connectome
    if cc.source == structure.source or cc.source.startswith("codex:") and structure.source.startswith("codex:"):
        return dict(cc.source_options), "config.connectome.source_options"
    return None, (f"its source options are not recorded (config source {cc.source!r}, "
                  f"structure source {structure.source!r})")


def _identity_difference(structure, ref, name: str, origin: str, options) -> Optional[Tuple[str, str]]:
    """(field, rule) where the stored neurons are not the rebuilt connectome's, or None."""
    if ref.version != structure.version:
        return "structure.version", f"{structure.version!r} but the connectome {ref.source} is {ref.version!r}"
    for layer in sorted(set(ref.layer_sizes) | set(structure.layer_sizes)):
        a, b = structure.layer_sizes.get(layer, 0), ref.layer_sizes.get(layer, 0)
        if a != b:
            return (f"structure.layer_sizes.{layer}",
                    f"{a:,} neurons but the connectome ({name}, {origin} {options}) has {b:,}")
    extra = [p for p in structure.projections if tuple(p) not in set(ref.projections)]
    if extra:
        return "structure.projections", f"{extra[0][0]}->{extra[0][1]} is not a projection of the connectome ({name})"
    for layer, ids in ref.root_ids.items():
        got = structure.root_ids.get(layer)
        if got is None:
            continue  # hand-built structures may omit ids (exporters write -1)
        if list(got) != list(ids):
            i = next(j for j, (x, y) in enumerate(zip(got, ids)) if x != y)
            return f"structure.root_ids.{layer}", f"neuron {i} is id {got[i]} but the connectome ({name}) has {ids[i]}"
    return None


def _check_against_connectome(ck, structure, sd, fail) -> None:
    """Compare neurons, signs and masks with the connectome rebuilt with the checkpoint's
    source options. Options recorded in ``structure`` (written by ``from_connectome``)
    are authoritative: a difference is an error. Without them (older checkpoints, circuits
    built from data directly) the config's connectome section is tried; if it does not
    rebuild the stored neurons, the options are unknown and only the stored hashes apply."""
    from dmn_neuro.simulation.mechanism import POPULATION_ORDER, DifferentiableOlfactoryCircuit

    where = f"checkpoint {ck['path']}"
    source = structure.source
    layers = tuple(l for l in POPULATION_ORDER if l in structure.layer_sizes)
    reason = _unrebuildable(source)
    options, origin, data = None, "", None
    if reason is None:
        options, origin = _reference_options(ck, structure)
        if options is None:
            reason = origin
    recorded = origin == "structure.source_options"
    if reason is None:
        try:
            data = reference_connectome(source, layers, json.dumps(options, sort_keys=True, default=str))
        except (DMNError, TypeError, ValueError, OSError) as exc:
            if recorded:
                raise fail(origin, f"cannot rebuild the connectome {source} with {options} "
                                   f"({_first_line(exc)})") from None
            reason = f"its source options are not recorded and the config's ({options}) do not load it"
    if data is not None:
        ref = DifferentiableOlfactoryCircuit._structure_from_data(data)
        name = f"{ref.source} {ref.version}"
        diff = _identity_difference(structure, ref, name, origin, options)
        if diff is not None and recorded:
            raise fail(*diff)
        if diff is not None:
            reason = (f"its source options are not recorded and the config's ({options}) rebuild another "
                      f"circuit ({diff[0]}: {diff[1]})")
    if reason is not None:
        checked = ("only the hashes stored in the checkpoint were checked" if structure.hashes
                   else "its masks and signs were not checked (the checkpoint stores no hashes)")
        logger.warning("%s: the connectome %s cannot be rebuilt here (%s); %s", where, source, reason, checked)
        return
    for pre, post in structure.projections:
        key = _wkey(pre, post)
        sign = sd[f"{key}.sign"].double().numpy()
        ref_sign = np.asarray(data.presynaptic_sign(pre), dtype=np.float64)
        wrong = np.flatnonzero(sign != ref_sign)
        if wrong.size:
            i = int(wrong[0])
            tx = str(data.layer_column(pre, "transmitter")[i] or "unknown")
            kind = "inhibitory" if ref_sign[i] < 0 else "excitatory"
            more = f" ({wrong.size:,} {pre} neurons differ)" if wrong.size > 1 else ""
            raise fail(f"{key}.sign", f"sign of {pre} neuron {i} is {int(sign[i]):+d} but its transmitter ({tx}) "
                                      f"is {kind} (Dale's law){more}")
        mask = sd[f"{key}.mask"].numpy()
        ref_mask = data.count_matrix(pre, post) > 0
        invented = int((mask & ~ref_mask).sum())
        if invented:
            raise fail(f"{key}.mask", f"{invented:,} synapses not in the connectome ({name})")
        dropped = int((ref_mask & ~mask).sum())
        if dropped and f"{pre}->{post}" not in structure.user_masks:
            raise fail(f"{key}.mask", f"{dropped:,} synapses of the connectome ({name}) are missing")


def structure_difference(stored, configured) -> Optional[str]:
    """What differs between two circuit structures (layer sizes, projections,
    neuron ids), as one phrase, or None when they describe the same circuit."""
    if stored.layer_sizes != configured.layer_sizes:
        for layer in [l for l in configured.layer_sizes if l in stored.layer_sizes] + \
                [l for l in stored.layer_sizes if l not in configured.layer_sizes] + \
                [l for l in configured.layer_sizes if l not in stored.layer_sizes]:
            a, b = stored.layer_sizes.get(layer, 0), configured.layer_sizes.get(layer, 0)
            if a != b:
                return f"layer {layer} has {a:,} neurons in the checkpoint but {b:,} in the configured circuit"
    if [tuple(p) for p in stored.projections] != [tuple(p) for p in configured.projections]:
        fmt = lambda ps: ", ".join(f"{a}->{b}" for a, b in ps)  # noqa: E731
        return f"projections {fmt(stored.projections)} in the checkpoint but {fmt(configured.projections)} configured"
    for layer, ids in configured.root_ids.items():
        got = stored.root_ids.get(layer)
        if got is not None and list(got) != list(ids):
            i = next(j for j, (x, y) in enumerate(zip(got, ids)) if x != y)
            return f"{layer} neuron {i} is id {got[i]} in the checkpoint but id {ids[i]} in the configured circuit"
    if (stored.source, stored.version) != (configured.source, configured.version):
        return (f"the checkpoint was built from {stored.source} {stored.version}, the configured circuit "
                f"from {configured.source} {configured.version}")
    return None


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
