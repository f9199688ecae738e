"""Checkpoint validation on load: a checkpoint whose circuit is not the connectome's
(a flipped Dale sign, an invented synapse, an impossible decay or threshold) or
whose checkpoint.json is malformed is refused with one line naming the tensor or
field and the rule -- by load_circuit and therefore by every command that loads
one (evaluate, export, verify, quantize, train --init-from / --resume)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from dmn_neuro.cli import cli
from dmn_neuro.errors import CheckpointError
from dmn_neuro.simulation.mechanism import CircuitStructure, DifferentiableOlfactoryCircuit
from dmn_neuro.training import checkpoint as ckpt
from dmn_neuro.training.checkpoint import load_circuit, save_checkpoint

from _helpers import REPO, TINY_YAML, make_trainer, tiny_config
from _helpers import assert_one_line_error as one_line_error

PRETRAINED = REPO / "examples" / "pretrained"
SHIPPED = ("flywire_mb_navigator", "flywire_mb_navigator_loihi")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny circuit after one training episode and its checkpoint (directory form)."""
    tr = make_trainer(tiny_config())
    tr.train_episode(1)
    return tr, tr.save_checkpoint(tmp_path_factory.mktemp("ckval") / "ck")


@pytest.fixture
def ck(trained, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(trained[1], dst)
    return dst


def _edit_tensors(d: Path, fn) -> None:
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"))


def _edit_meta(d: Path, fn) -> None:
    meta = json.loads((d / "checkpoint.json").read_text())
    fn(meta)
    (d / "checkpoint.json").write_text(json.dumps(meta))


def _error(d: Path) -> str:
    with pytest.raises(CheckpointError) as exc:
        load_circuit(d)
    msg = str(exc.value)
    assert msg and "\n" not in msg, repr(msg)
    assert msg.startswith(f"checkpoint {d}: "), msg
    return msg[len(f"checkpoint {d}: "):]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def assert_one_line_error(res, expected: str, where: str = "end") -> str:
    """The shared check, with ``expected`` ending the line (``where="end"``) or inside it (``"in"``)."""
    return one_line_error(res, **({"endswith": expected} if where == "end" else {"contains": expected}))


# -- the three tampering cases of the issue, and their exact messages ---------------
def _apl_excitatory(t):
    t["weights.APL_to_KC.sign"] = torch.ones_like(t["weights.APL_to_KC.sign"])


def _mbon_dn_seven(t):
    t["weights.MBON_to_DN.sign"] = torch.full_like(t["weights.MBON_to_DN.sign"], 7.0)


def _orn_pn_all_true(t):
    t["weights.ORN_to_PN.mask"] = torch.ones_like(t["weights.ORN_to_PN.mask"])


def _n_invented(trained) -> int:
    m = trained[0].circuit.weight("ORN", "PN").mask
    return int((~m).sum())


TAMPER = {
    "apl_excitatory": (_apl_excitatory, lambda tr: "weights.APL_to_KC.sign: sign of APL neuron 0 is +1 but its "
                                                   "transmitter (gaba) is inhibitory (Dale's law)"),
    "mbon_dn_sign_7": (_mbon_dn_seven, lambda tr: "weights.MBON_to_DN.sign: sign of MBON neuron 0 is 7, "
                                                  "not -1 or +1 (Dale's law)"),
    "orn_pn_all_true": (_orn_pn_all_true, lambda tr: f"weights.ORN_to_PN.mask: {_n_invented(tr):,} synapses not "
                                                     "in the connectome (flywire_v783_mb v783)"),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tampered_checkpoint_is_refused_on_load(trained, ck, case):
    tamper, expected = TAMPER[case]
    _edit_tensors(ck, tamper)
    assert _error(ck) == expected(trained)


def test_invented_synapses_are_counted(trained, ck):
    assert _n_invented(trained) > 1000  # all-true invents most of the 440 x 124 matrix (only ~1k synapses exist)


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_verify_refuses_to_certify_a_tampered_checkpoint(trained, ck, case, tmp_path):
    tamper, expected = TAMPER[case]
    _edit_tensors(ck, tamper)
    res = invoke("verify", ck, "--target", "nir", "--steps", 1000, "--json")
    assert_one_line_error(res, expected(trained))
    assert res.stdout == ""  # nothing certified


def test_export_and_evaluate_refuse_a_tampered_checkpoint(trained, ck, tmp_path):
    tamper, expected = TAMPER["apl_excitatory"]
    _edit_tensors(ck, tamper)
    out = tmp_path / "model.nir"
    assert_one_line_error(invoke("export", ck, "--format", "nir", "-o", out), expected(trained))
    assert not out.exists()
    assert_one_line_error(invoke("evaluate", ck, "--episodes", 2, "--steps", 20, "--device", "cpu",
                                 "--out", tmp_path / "ev"), expected(trained))
    assert_one_line_error(invoke("quantize", ck, "-o", tmp_path / "q"), expected(trained))
    assert not (tmp_path / "q").exists()


def test_verify_in_a_real_process_refuses_an_invented_mask(trained, ck):
    _edit_tensors(ck, _orn_pn_all_true)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "dmn_neuro.cli", "verify", str(ck), "--target", "nir"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert_one_line_error(res, f"checkpoint {ck}: " + TAMPER["orn_pn_all_true"][1](trained))


# -- the other tensor rules ----------------------------------------------------------
def _set(key, fn):
    def edit(t):
        t[key] = fn(t[key].clone())
    return edit


def _put(idx, value):
    def fn(x):
        x[idx] = value
        return x
    return fn


TENSOR_RULES = {
    "beta_rounds_to_1": (_set("cells.KC.raw_beta", lambda x: torch.full_like(x, 20.0)),
                         "cells.KC.raw_beta: decay beta = sigmoid(20) is 1 in float32; it must lie strictly between 0 and 1"),
    "beta_rounds_to_0": (_set("cells.PN.raw_beta", lambda x: torch.full_like(x, -120.0)),
                         "cells.PN.raw_beta: decay beta = sigmoid(-120) is 0 in float32; it must lie strictly between 0 and 1"),
    "threshold_zero": (_set("cells.KC.raw_threshold", _put(3, -200.0)),
                       "cells.KC.raw_threshold: threshold softplus(-200) of neuron 3 is 0 in float32; thresholds must be > 0"),
    "nan_weight": (_set("weights.KC_to_MBON.raw", _put((0, 0), float("nan"))),
                   "weights.KC_to_MBON.raw: contains NaN/Inf"),
    "inf_bias": (_set("biases.DN", _put(0, float("inf"))), "biases.DN: contains NaN/Inf"),
    "float_mask": (_set("weights.KC_to_MBON.mask", lambda x: x.float()),
                   "weights.KC_to_MBON.mask: dtype float32; synapse masks must be bool"),
    "int_parameter": (_set("cells.KC.raw_threshold", lambda x: x.to(torch.int32)),
                      "cells.KC.raw_threshold: dtype int32; expected a floating-point tensor"),
    "wrong_shape": (_set("cells.KC.raw_threshold", lambda x: x[:-1]),
                    "cells.KC.raw_threshold: shape (%d,) but the circuit structure needs (%d,)"),
    "sign_zero": (_set("weights.PN_to_KC.sign", _put(2, 0.0)),
                  "weights.PN_to_KC.sign: sign of PN neuron 2 is 0, not -1 or +1 (Dale's law)"),
    "inconsistent_kc_signs": (_set("weights.KC_to_MBON.sign", _put(0, -1.0)),
                              "weights.KC_to_MBON.sign: differs from weights.KC_to_APL.sign: one presynaptic "
                              "population has one sign per neuron (Dale's law)"),
    "synapse_dropped": (_set("weights.KC_to_MBON.mask", lambda x: x & False),
                        "weights.KC_to_MBON.mask: %s synapses of the connectome (flywire_v783_mb v783) are missing"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_RULES))
def test_tensor_rules(trained, ck, case):
    edit, expected = TENSOR_RULES[case]
    if case == "wrong_shape":
        n = trained[0].circuit.structure.layer_sizes["KC"]
        expected = expected % (n - 1, n)
    if case == "synapse_dropped":
        expected = expected % f"{int(trained[0].circuit.weight('KC', 'MBON').mask.sum()):,}"
    _edit_tensors(ck, edit)
    assert _error(ck) == expected


def test_tampered_neuron_ids_are_refused(ck):
    _edit_meta(ck, lambda m: m["structure"]["root_ids"]["APL"].__setitem__(0, 42))
    assert _error(ck).startswith("structure.root_ids.APL: neuron 0 is id 42 but the connectome "
                                 "(flywire_v783_mb v783) has ")


def test_changed_source_options_are_refused(ck):
    """Options that do not rebuild the stored wiring (here: 1 ORN per glomerulus instead of 8)."""
    _edit_meta(ck, lambda m: m["structure"]["source_options"].__setitem__("orn_per_glomerulus", 1))
    assert _error(ck).startswith("structure.layer_sizes.ORN: 440 neurons but the connectome (flywire_v783_mb v783, "
                                 "structure.source_options")


# -- the stored hashes ---------------------------------------------------------------
def test_checkpoint_stores_hashes_and_source_options(trained):
    meta = json.loads((trained[1] / "checkpoint.json").read_text())
    s = meta["structure"]
    assert s["source"] == "flywire_v783_mb" and s["source_options"] == {"orn_per_glomerulus": 8}
    c = trained[0].circuit
    assert set(s["hashes"]["masks"]) == {f"{a}->{b}" for a, b in c.structure.projections}
    assert set(s["hashes"]["signs"]) == {a for a, _ in c.structure.projections}
    m = s["hashes"]["masks"]["ORN->PN"]
    assert m["shape"] == list(c.weight("ORN", "PN").mask.shape)
    assert m["sha256"] == ckpt.mask_digest(c.weight("ORN", "PN").mask) and len(m["sha256"]) == 64
    assert s["hashes"]["signs"]["APL"] == {"n": 1, "sha256": ckpt.sign_digest(torch.tensor([-1.0]))}
    # a mask differing in one bit, or only in shape, hashes differently
    mask = c.weight("PN", "KC").mask.clone()
    flipped = mask.clone()
    flipped[0, 0] = ~flipped[0, 0]
    assert ckpt.mask_digest(flipped) != ckpt.mask_digest(mask)
    assert ckpt.mask_digest(torch.zeros(2, 6, dtype=torch.bool)) != ckpt.mask_digest(torch.zeros(3, 4, dtype=torch.bool))


def test_source_that_cannot_be_rebuilt_checks_the_stored_hashes(ck, caplog):
    """cave needs the network: the stored hashes alone are checked, with a warning saying so."""
    _edit_meta(ck, lambda m: m["structure"].__setitem__("source", "cave"))
    with caplog.at_level(logging.WARNING, logger="dmn_neuro.training.checkpoint_checks"):
        load_circuit(ck)
    assert "cannot be rebuilt here" in caplog.text and "only the hashes stored in the checkpoint were checked" in caplog.text
    _edit_tensors(ck, _orn_pn_all_true)
    assert _error(ck).startswith("weights.ORN_to_PN.mask: content differs from the sha256 stored at save time")


def test_sign_hash_without_rebuild(trained, ck):
    _edit_meta(ck, lambda m: m["structure"].__setitem__("source", "cave"))
    _edit_tensors(ck, _apl_excitatory)
    assert _error(ck) == ("weights.APL_to_KC.sign: content differs from the sha256 of the APL signs stored at save "
                          "time (the signs were changed after saving)")


def test_edited_hash_is_refused(ck):
    _edit_meta(ck, lambda m: m["structure"]["hashes"]["masks"]["PN->KC"].__setitem__("sha256", "0" * 64))
    assert _error(ck).startswith("weights.PN_to_KC.mask: content differs from the sha256 stored at save time")


def test_checkpoint_without_hashes_is_checked_against_the_connectome(ck):
    """Checkpoints written before hashes were stored (like the shipped ones) load; the rebuild still applies."""
    _edit_meta(ck, lambda m: m["structure"].pop("hashes"))
    load_circuit(ck)
    _edit_meta(ck, lambda m: m["structure"].pop("source_options"))  # options then come from the config
    load_circuit(ck)
    _edit_tensors(ck, _orn_pn_all_true)
    assert _error(ck).endswith("synapses not in the connectome (flywire_v783_mb v783)")


def test_reference_connectome_is_built_once_per_process(ck):
    ckpt.reference_connectome.cache_clear()
    load_circuit(ck)
    load_circuit(ck)
    info = ckpt.reference_connectome.cache_info()
    assert info.misses == 1 and info.hits == 1


def test_ablated_masks_may_drop_but_not_invent_synapses(tmp_path):
    """A mask the caller supplied (masks=...) is recorded; it may drop connectome synapses, never add any."""
    cfg = tiny_config()
    full = DifferentiableOlfactoryCircuit.from_connectome(source_options={"orn_per_glomerulus": 8}, dt_ms=2.0)
    cut = full.weight("PN", "KC").mask.clone()
    cut[:, :10] = False
    c = DifferentiableOlfactoryCircuit.from_connectome(source_options={"orn_per_glomerulus": 8}, dt_ms=2.0,
                                                       masks={"PN->KC": cut})
    assert c.structure.user_masks == ["PN->KC"]
    p = save_checkpoint(tmp_path / "ablated", c, cfg, episode=0)
    c2, _ = load_circuit(p)
    assert torch.equal(c2.weight("PN", "KC").mask, cut) and c2.structure.user_masks == ["PN->KC"]
    _edit_tensors(p, lambda t: t.__setitem__("weights.PN_to_KC.mask", torch.ones_like(t["weights.PN_to_KC.mask"])))
    assert _error(p).endswith("synapses not in the connectome (flywire_v783_mb v783)")


# -- checkpoint.json -----------------------------------------------------------------
JSON_FIELDS = {
    "episode_string": (lambda m: m.__setitem__("episode", "many"),
                       "checkpoint.json field episode must be a non-negative integer, got str 'many'"),
    "episode_negative": (lambda m: m.__setitem__("episode", -3),
                         "checkpoint.json field episode must be a non-negative integer, got int -3"),
    "episode_bool": (lambda m: m.__setitem__("episode", True),
                     "checkpoint.json field episode must be a non-negative integer, got bool True"),
    "loss_history_int": (lambda m: m.__setitem__("loss_history", 5),
                         "checkpoint.json field loss_history must be a list of {name: number} records, got int 5"),
    "loss_history_entry": (lambda m: m.__setitem__("loss_history", [{"episode": 0, "total": 1.0}, 7]),
                           "checkpoint.json field loss_history[1] must be a mapping of names to numbers, got int 7"),
    "loss_history_value": (lambda m: m["loss_history"][0].__setitem__("total", "low"),
                           "checkpoint.json field loss_history[0].total must be a number, got str 'low'"),
    "format_version_zero": (lambda m: m.__setitem__("format_version", 0),
                            "checkpoint.json field format_version must be one of [1, 2], got int 0"),
    "format_version_string": (lambda m: m.__setitem__("format_version", "2"),
                              "checkpoint.json field format_version must be one of [1, 2], got str '2'"),
    "config_list": (lambda m: m.__setitem__("config", [1]),
                    "checkpoint.json field config must be a mapping, got list [1]"),
    "config_unknown_key": (lambda m: m["config"].__setitem__("bogus", 1),
                           "checkpoint.json field config is not a valid training config ("),
    "circuit_string": (lambda m: m.__setitem__("circuit", "x"),
                       "checkpoint.json field circuit must be a mapping, got str 'x'"),
    "metrics_list": (lambda m: m.__setitem__("metrics", []),
                     "checkpoint.json field metrics must be a mapping, got list []"),
    "best_score": (lambda m: m["extra"].__setitem__("best_score", "good"),
                   "checkpoint.json field extra.best_score must be null or a list of numbers, got str 'good'"),
    "held_out": (lambda m: m["extra"].__setitem__("held_out", ["stream 1"]),
                 "checkpoint.json field extra.held_out must be a mapping, got list ['stream 1']"),
    "best_loss": (lambda m: m["extra"].__setitem__("best_loss", None),
                  "checkpoint.json field extra.best_loss must be a number, got NoneType None"),
    "param_groups": (lambda m: m["optimizer"].__setitem__("param_groups", {"lr": 1}),
                     "checkpoint.json field optimizer.param_groups must be a list, got dict {'lr': 1}"),
    "param_group_params": (lambda m: m["optimizer"]["param_groups"][0].__setitem__("params", "all"),
                           "checkpoint.json field optimizer.param_groups[0].params must be a list of parameter "
                           "indices, got str 'all'"),
    "param_group_lr": (lambda m: m["optimizer"]["param_groups"][0].__setitem__("lr", "fast"),
                       "checkpoint.json field optimizer.param_groups[0].lr must be a non-negative number, got str 'fast'"),
    "optimizer_scalars": (lambda m: m["optimizer"].__setitem__("scalars", {"999.step": 1}),
                          "checkpoint.json field optimizer.scalars.999.step names no parameter of param_groups "
                          "(expected 'INDEX.NAME')"),
    "hashes": (lambda m: m["structure"].__setitem__("hashes", 5),
               "checkpoint.json field structure.hashes must be a mapping, got int 5"),
    "hash_entry": (lambda m: m["structure"]["hashes"]["masks"].__setitem__("PN->KC", {"sha256": "ab"}),
                   "checkpoint.json field structure.hashes.masks.PN->KC must be {sha256: 64 hex digits, ...}"),
    "source_options": (lambda m: m["structure"].__setitem__("source_options", [8]),
                       "checkpoint.json field structure.source_options must be a mapping, got list [8]"),
}


@pytest.mark.parametrize("case", sorted(JSON_FIELDS))
def test_malformed_checkpoint_json_field(ck, case):
    edit, expected = JSON_FIELDS[case]
    _edit_meta(ck, edit)
    assert _error(ck).startswith(expected)


def test_optimizer_tensor_for_no_parameter_is_refused(ck):
    t = load_file(str(ck / "optimizer.safetensors"))
    t["state.999.exp_avg"] = torch.zeros(3)
    save_file(t, str(ck / "optimizer.safetensors"))
    assert _error(ck) == ("optimizer.safetensors tensor state.999.exp_avg names no parameter of checkpoint.json's "
                          "optimizer.param_groups")


def test_rng_state_of_the_wrong_type_is_refused(ck):
    save_file({"torch_cpu": torch.zeros(4)}, str(ck / "rng.safetensors"))
    assert _error(ck) == "rng.safetensors tensor torch_cpu must be a 1-D uint8 tensor, got torch.float32 of shape (4,)"


@pytest.mark.parametrize("edit,expected", [
    (lambda m: m.__setitem__("episode", "many"), "checkpoint.json field episode must be a non-negative integer"),
    (lambda m: m.__setitem__("loss_history", 5), "checkpoint.json field loss_history must be a list"),
], ids=["episode", "loss_history"])
def test_train_init_from_and_quantize_of_malformed_json_are_one_line(ck, tmp_path, edit, expected):
    _edit_meta(ck, edit)
    res = invoke("train", "--config", TINY_YAML, "--episodes", 1, "--eval-episodes", 0, "--init-from", ck,
                 "--out", tmp_path / "run")
    assert_one_line_error(res, f"checkpoint {ck}: {expected}", where="in")
    assert_one_line_error(invoke("quantize", ck, "-o", tmp_path / "q"), f"checkpoint {ck}: {expected}", where="in")


# -- train --init-from / --resume of another circuit --------------------------------
def test_init_from_a_different_circuit_names_what_differs(ck, tmp_path):
    res = invoke("train", "--config", TINY_YAML, "--source", "synthetic", "--episodes", 1, "--eval-episodes", 0,
                 "--init-from", ck, "--out", tmp_path / "run")
    assert_one_line_error(res, f"checkpoint {ck} is not the configured circuit: layer ORN has 440 neurons in the "
                               "checkpoint but 408 in the configured circuit")


def test_resume_with_other_source_options_names_what_differs(ck, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ck, run / "checkpoints" / "last")
    cfg = tmp_path / "dn8.yaml"
    import yaml

    data = yaml.safe_load(TINY_YAML.read_text())
    data["connectome"]["source_options"]["n_dn"] = 8
    cfg.write_text(yaml.safe_dump(data))
    res = invoke("train", "--config", cfg, "--episodes", 1, "--eval-episodes", 0, "--resume", "--out", run)
    assert_one_line_error(res, "connectome.source_options.n_dn None -> 8", where="in")
    res = invoke("train", "--config", cfg, "--episodes", 1, "--eval-episodes", 0, "--resume", "--allow-config-change",
                 "--out", run)
    assert_one_line_error(res, f"is not the configured circuit: layer DN has 4 neurons in the checkpoint but 8 in "
                               "the configured circuit")


def test_structure_difference_names_neuron_ids_and_projections(trained):
    s = trained[0].circuit.structure
    other = CircuitStructure.from_json(s.to_json())
    assert ckpt.structure_difference(other, s) is None
    other.root_ids["KC"][5] = 7
    assert ckpt.structure_difference(other, s) == (
        f"KC neuron 5 is id 7 in the checkpoint but id {s.root_ids['KC'][5]} in the configured circuit")
    other = CircuitStructure.from_json(s.to_json())
    other.projections = other.projections[:-1]
    assert ckpt.structure_difference(other, s).startswith("projections ORN->PN")


# -- the shipped checkpoints ---------------------------------------------------------
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoints_pass_validation(name, caplog):
    with caplog.at_level(logging.WARNING):
        circuit, ck = load_circuit(PRETRAINED / name)
    assert "cannot be rebuilt" not in caplog.text  # checked against the rebuilt connectome, not skipped
    assert "hashes" not in ck["meta"]["structure"]  # written before hashes were stored
    assert circuit.weight("APL", "KC").sign.tolist() == [-1.0]


def test_circuit_built_from_data_directly_loads_and_keeps_its_hashes(tmp_path, caplog):
    """The design document's API: a circuit from fetch_olfactory_circuit data (no APL, default
    options) saved with a default config. Its source options are not recorded and the config's
    do not rebuild it: it loads with a warning, and its stored hashes still catch tampering."""
    from connectome.fetch_data import FlyWireConnectome
    from dmn_neuro.training.config import TrainingConfig

    data = FlyWireConnectome().fetch_olfactory_circuit(include_layers=["ORN", "PN", "KC", "MBON", "DN"])
    c = DifferentiableOlfactoryCircuit(connectivity_data=data)
    assert c.structure.source_options is None
    p = save_checkpoint(tmp_path / "doc.pt", c, TrainingConfig(), episode=0)
    with caplog.at_level(logging.WARNING, logger="dmn_neuro.training.checkpoint_checks"):
        load_circuit(p)
    assert "source options are not recorded" in caplog.text and "only the hashes" in caplog.text
    d = tmp_path / "doc_dir"
    save_checkpoint(d, c, TrainingConfig(), episode=0)
    _edit_tensors(d, _orn_pn_all_true)
    assert _error(d).startswith("weights.ORN_to_PN.mask: content differs from the sha256 stored at save time")
