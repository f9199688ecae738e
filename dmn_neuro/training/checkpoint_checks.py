"""Checks behind checkpoint validation (:func:`dmn_neuro.training.checkpoint.validate_checkpoint`).

* :func:`check_meta` -- checkpoint.json field by field, and the optimiser / RNG
  tensors against it (:func:`check_aux_tensors`);
* :func:`structure_hashes` -- sha256 of every projection's mask and every
  presynaptic population's signs, stored in ``structure.hashes`` on save and
  compared on load (:func:`check_stored_hashes`);
* :func:`check_against_connectome` -- neuron ids, Dale's-law signs and masks
  compared with the connectome rebuilt (offline sources only, once per process:
  :func:`reference_connectome`) with the checkpoint's own source options;
* :func:`structure_difference` -- what differs between a checkpoint's circuit and
  the configured one (``train --init-from`` / ``--resume``).

Every problem is a one-line :class:`~dmn_neuro.errors.CheckpointError` naming the
field or tensor and the rule.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import numbers
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from dmn_neuro.errors import CheckpointError, DMNError

logger = logging.getLogger(__name__)

# -- checkpoint.json ------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _kind(v) -> str:
    return f"{type(v).__name__} {v!r}" if len(repr(v)) <= 40 else type(v).__name__


def check_meta(meta: Mapping[str, Any], where: str = "checkpoint", max_version: int = 2) -> None:
    """Validate checkpoint.json; a malformed field is a one-line :class:`CheckpointError` naming it."""
    def bad(field: str, what: str) -> CheckpointError:
        return CheckpointError(f"{where}: checkpoint.json field {field} {what}")

    version = meta.get("format_version", 1)
    if not _is_int(version) or not 1 <= version <= max_version:
        raise bad("format_version", f"must be one of {list(range(1, max_version + 1))}, got {_kind(version)}")
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
        raise bad("config", f"is not a valid training config ({first_line(exc)})") from None
    extra = meta.get("extra", {})
    if "best_loss" in extra and not _is_number(extra["best_loss"]):
        raise bad("extra.best_loss", f"must be a number, got {_kind(extra['best_loss'])}")
    if "held_out" in extra and not isinstance(extra["held_out"], dict):
        raise bad("extra.held_out", f"must be a mapping, got {_kind(extra['held_out'])}")
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


def first_line(exc) -> str:
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


def check_aux_tensors(ck: Dict[str, Any], where: str) -> None:
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
def wkey(pre: str, post: str) -> str:
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
        k = wkey(pre, post)
        m, s = state_dict[f"{k}.mask"], state_dict[f"{k}.sign"]
        masks[f"{pre}->{post}"] = {"shape": [int(n) for n in m.shape], "sha256": mask_digest(m)}
        signs.setdefault(pre, {"n": int(s.numel()), "sha256": sign_digest(s)})
    return {"masks": masks, "signs": signs}


def check_stored_hashes(structure, sd, fail) -> None:
    h = structure.hashes or {}
    masks, signs = h.get("masks", {}), h.get("signs", {})
    for pre, post in structure.projections:
        key = wkey(pre, post)
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
def reference_connectome(source: str, layers: Tuple[str, ...], options_json: str, variant_json: str = "null"):
    """The connectome a checkpoint's circuit was built from: ``layers`` of ``source``
    rebuilt with its source options (JSON text, sorted keys) and with the config's
    connectome variant applied (:mod:`connectome.variants`; JSON text, ``null`` for
    the real wiring); one load per process and (source, layers, options, variant)
    -- the connectome layer caches on disk as well."""
    from connectome.fetch_data import FlyWireConnectome
    from connectome.variants import apply_variant

    data = FlyWireConnectome().fetch_olfactory_circuit(include_layers=list(layers), source=source,
                                                       **json.loads(options_json))
    return apply_variant(data, json.loads(variant_json))


def _reference_variant(ck: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The connectome variant the checkpoint's config names (None: the real wiring)."""
    from dmn_neuro.training.config import TrainingConfig

    return TrainingConfig.from_dict(ck["meta"]["config"]).connectome.variant


def _reference_options(ck: Dict[str, Any], structure) -> Tuple[Optional[Dict[str, Any]], str]:
    """(source options, where they came from), or (None, why unknown)."""
    if structure.source_options is not None:
        return dict(structure.source_options), "structure.source_options"
    from dmn_neuro.training.config import TrainingConfig

    cc = TrainingConfig.from_dict(ck["meta"]["config"]).connectome
    if cc.source == structure.source or cc.source.startswith("codex:") and structure.source.startswith("codex:"):
        return dict(cc.resolved_source_options()), "config.connectome.source_options"
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


def check_against_connectome(ck, structure, sd, fail) -> None:
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
            data = reference_connectome(source, layers, json.dumps(options, sort_keys=True, default=str),
                                        json.dumps(_reference_variant(ck), sort_keys=True))
        except (DMNError, TypeError, ValueError, OSError) as exc:
            if recorded:
                raise fail(origin, f"cannot rebuild the connectome {source} with {options} "
                                   f"({first_line(exc)})") from None
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
        key = wkey(pre, post)
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
