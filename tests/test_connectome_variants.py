"""Counterfactual connectomes (connectome.variants): shuffled keeps every neuron's degrees,
random keeps each projection's density, ablate removes synapses; a variant is a config key,
and checkpoints of a variant circuit load and still refuse tampering."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from connectome.errors import DataError
from connectome.fetch_data import FlyWireConnectome
from connectome.variants import apply_variant, normalize_variant, variant_label
from dmn_neuro.errors import CheckpointError, ConfigError
from dmn_neuro.training.checkpoint import load_circuit

from _helpers import make_trainer, tiny_config

LAYERS = ["ORN", "PN", "KC", "APL", "MBON", "DN"]


@pytest.fixture(scope="module")
def data():
    return FlyWireConnectome().fetch_olfactory_circuit(include_layers=LAYERS, source="flywire_v783_mb",
                                                       orn_per_glomerulus=8, n_dn=16)


def _proj(d):
    return {f"{p.pre}->{p.post}": p for p in d.projections}


def test_shuffled_keeps_every_degree_and_count_but_not_the_wiring(data):
    v = apply_variant(data, {"kind": "shuffled", "seed": 3})
    assert v.layer_sizes == data.layer_sizes and v.version == "v783+shuffled(seed=3)"
    assert [list(v.layer_ids(l)) for l in LAYERS] == [list(data.layer_ids(l)) for l in LAYERS]
    for name, p in _proj(data).items():
        a, b = name.split("->")
        m0, m1 = data.count_matrix(a, b), v.count_matrix(a, b)
        assert ((m0 > 0).sum(0) == (m1 > 0).sum(0)).all(), name  # out-degree of every pre neuron
        assert ((m0 > 0).sum(1) == (m1 > 0).sum(1)).all(), name  # in-degree of every post neuron
        assert sorted(m0[m0 > 0]) == sorted(m1[m1 > 0]), name
        assert np.allclose(m0.sum(0), m1.sum(0)), name  # counts travel with the presynaptic end
        if a == b:
            assert not np.diag(m1).any()
    pk0, pk1 = data.count_matrix("PN", "KC") > 0, v.count_matrix("PN", "KC") > 0
    assert (pk0 & pk1).sum() < 0.5 * pk0.sum()  # rewired
    assert (data.count_matrix("MBON", "DN") == v.count_matrix("MBON", "DN")).all()  # model wiring kept
    assert (data.count_matrix("ORN", "PN") == v.count_matrix("ORN", "PN")).all()
    again = apply_variant(data, {"kind": "shuffled", "seed": 3})
    assert (again.count_matrix("PN", "KC") == v.count_matrix("PN", "KC")).all()
    other = apply_variant(data, {"kind": "shuffled", "seed": 4})
    assert not (other.count_matrix("PN", "KC") == v.count_matrix("PN", "KC")).all()


def test_random_keeps_density_and_count_distribution(data):
    v = apply_variant(data, {"kind": "random", "seed": 1, "projections": ["pn->kc", "KC->MBON"]})
    p0, p1 = _proj(data), _proj(v)
    for name in p0:
        assert p0[name].n_edges == p1[name].n_edges and p0[name].n_synapses == p1[name].n_synapses
    m0, m1 = data.count_matrix("PN", "KC"), v.count_matrix("PN", "KC")
    assert sorted(m0[m0 > 0]) == sorted(m1[m1 > 0])
    assert not ((m0 > 0).sum(1) == (m1 > 0).sum(1)).all()  # degrees not kept
    assert (data.count_matrix("APL", "KC") == v.count_matrix("APL", "KC")).all()  # not named: untouched


def test_ablate_removes_synapses_of_cell_types_transmitters_and_projections(data):
    v = apply_variant(data, {"kind": "ablate", "cell_types": ["APL"], "transmitters": ["MBON:gaba"],
                             "projections": ["PN->PN"]})
    assert v.layer_sizes == data.layer_sizes
    names = set(_proj(v))
    assert not any("APL" in n for n in names) and "PN->PN" not in names
    gaba = v.layer_column("MBON", "transmitter") == "gaba"
    assert gaba.sum() == 11
    assert not v.count_matrix("KC", "MBON")[gaba].any() and not v.count_matrix("MBON", "DN")[:, gaba].any()
    assert (v.count_matrix("KC", "MBON")[~gaba] == data.count_matrix("KC", "MBON")[~gaba]).all()


@pytest.mark.parametrize("spec, msg", [
    ({"kind": "flipped"}, "kind must be one of"),
    ({"kind": "shuffled", "seed": -1}, "seed"),
    ({"kind": "shuffled", "sed": 1}, "unknown key(s) sed"),
    ({"kind": "ablate"}, "names nothing"),
    ({"kind": "random", "projections": ["PNKC"]}, "PRE->POST"),
    ([1], "must be a mapping"),
])
def test_bad_variant_is_a_one_line_config_error(spec, msg):
    with pytest.raises(ConfigError) as exc:
        tiny_config(connectome={"variant": spec})
    assert msg in str(exc.value) and "\n" not in str(exc.value)


def test_variant_in_config_is_canonical_and_real_is_none():
    assert tiny_config(connectome={"variant": {"kind": "real"}}).connectome.variant is None
    cfg = tiny_config(connectome={"variant": {"kind": "ablate", "cell_types": "APL"}})
    assert cfg.connectome.variant == {"kind": "ablate", "projections": [], "cell_types": ["APL"], "transmitters": []}
    assert variant_label(cfg.connectome.variant) == "ablate(cell_types=APL)"
    assert normalize_variant({"kind": "shuffled"}) == {"kind": "shuffled", "seed": 0, "projections": None}


def test_unknown_cell_type_is_named(data):
    with pytest.raises(DataError, match="no neuron has cell type 'XYZ'"):
        apply_variant(data, {"kind": "ablate", "cell_types": ["XYZ"]})


# -- checkpoints of variant circuits ------------------------------------------------
def _save(tmp_path, variant):
    tr = make_trainer(tiny_config(connectome={"variant": variant}))
    return tr, tr.save_checkpoint(tmp_path / "ck")


def _edit_tensors(d, fn):
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"))


def _edit_meta(d, fn):
    meta = json.loads((d / "checkpoint.json").read_text())
    fn(meta)
    (d / "checkpoint.json").write_text(json.dumps(meta))


def _error(d):
    with pytest.raises(CheckpointError) as exc:
        load_circuit(d)
    return str(exc.value)


def test_shuffled_checkpoint_loads_and_refuses_tampering(tmp_path):
    tr, ck = _save(tmp_path, {"kind": "shuffled", "seed": 3})
    circuit, _ = load_circuit(ck)
    assert circuit.structure.version == "v783+shuffled(seed=3)"
    assert torch.equal(circuit.weight("PN", "KC").mask, tr.circuit.weight("PN", "KC").mask)
    real = make_trainer(tiny_config()).circuit.weight("PN", "KC").mask
    assert not torch.equal(real, tr.circuit.weight("PN", "KC").mask)
    # the real wiring put back (hashes dropped, so only the rebuild can tell): refused
    _edit_meta(ck, lambda m: m["structure"].pop("hashes"))
    _edit_tensors(ck, lambda t: t.__setitem__("weights.PN_to_KC.mask", real))
    assert "weights.PN_to_KC.mask:" in _error(ck) and "v783+shuffled(seed=3)" in _error(ck)


def test_checkpoint_config_naming_another_variant_is_refused(tmp_path):
    _, ck = _save(tmp_path, {"kind": "shuffled", "seed": 3})
    _edit_meta(ck, lambda m: m["config"]["connectome"].__setitem__("variant", {"kind": "shuffled", "seed": 4}))
    assert "structure.version: 'v783+shuffled(seed=3)' but the connectome" in _error(ck)


def test_ablated_checkpoint_loads_and_refuses_restored_synapses(tmp_path):
    tr, ck = _save(tmp_path, {"kind": "ablate", "cell_types": ["APL"]})
    circuit, _ = load_circuit(ck)
    assert not circuit.weight("APL", "KC").mask.any() and not circuit.weight("KC", "APL").mask.any()
    _edit_meta(ck, lambda m: m["structure"].pop("hashes"))
    _edit_tensors(ck, lambda t: t.__setitem__("weights.APL_to_KC.mask", torch.ones_like(t["weights.APL_to_KC.mask"])))
    assert "weights.APL_to_KC.mask:" in _error(ck) and "synapses not in the connectome" in _error(ck)
