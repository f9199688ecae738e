"""Cache round trip and corruption; cell_types.yaml validation."""
import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from connectome.cache import CacheWarning, default_cache_dir
from connectome.config import load_cell_types
from connectome.errors import ConfigError
from connectome.fetch_data import FlyWireConnectome

LAYERS = ["ORN", "PN", "KC", "APL", "MBON", "DN"]


def _same(a, b):
    assert a.layer_sizes == b.layer_sizes and a.source == b.source and a.version == b.version
    for k, v in a.neuron_table.columns().items():
        np.testing.assert_array_equal(v, b.neuron_table.columns()[k])
    for k, v in a.edge_table.columns().items():
        np.testing.assert_array_equal(v, b.edge_table.columns()[k])
    assert a.projections == b.projections


def test_cache_roundtrip(tmp_path, monkeypatch):
    f = FlyWireConnectome(cache_dir=tmp_path)
    a = f.fetch_olfactory_circuit(LAYERS)
    files = sorted(p.suffix for p in (tmp_path / "connectome").iterdir())
    assert files == [".json", ".npz"]
    import connectome.sources.bundled as bundled
    monkeypatch.setattr(bundled, "load_flywire_v783_mb", lambda *a, **k: pytest.fail("cache not used"))
    b = f.fetch_olfactory_circuit(LAYERS)
    _same(a, b)
    # different selection -> different key
    monkeypatch.undo()
    f.fetch_olfactory_circuit(LAYERS, n_dn=2)
    assert len(list((tmp_path / "connectome").glob("*.npz"))) == 2
    # use_cache=False writes nothing
    FlyWireConnectome(use_cache=False, cache_dir=tmp_path / "other").fetch_olfactory_circuit(LAYERS)
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("how", ["flip_byte", "truncate", "bad_json"])
def test_cache_corruption_rebuilt(tmp_path, how):
    f = FlyWireConnectome(cache_dir=tmp_path)
    a = f.fetch_olfactory_circuit(LAYERS)
    npz = next((tmp_path / "connectome").glob("*.npz"))
    js = npz.with_suffix(".json")
    if how == "flip_byte":
        raw = bytearray(npz.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        npz.write_bytes(bytes(raw))
    elif how == "truncate":
        npz.write_bytes(npz.read_bytes()[:100])
    else:
        js.write_text("{not json")
    with pytest.warns(CacheWarning, match="corrupt connectome cache entry"):
        b = f.fetch_olfactory_circuit(LAYERS)
    _same(a, b)
    c = f.fetch_olfactory_circuit(LAYERS)  # rebuilt entry is valid again
    _same(a, c)


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DMN_NEURO_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"


def test_cell_types_yaml():
    cfg = load_cell_types()
    assert set(cfg.layers) == set(LAYERS) | {"DAN"}
    kc = cfg.neuron_params("KC")
    assert 5 <= kc.tau_m_ms <= 10 and kc.threshold_mv > kc.rest_mv and kc.reset_mv == kc.rest_mv
    assert cfg.neuron_params("APL").tau_m_ms >= 40
    assert cfg.neuron_params("KC", "KCab") == kc
    assert cfg.transmitter_sign("GLUT") == -1 and cfg.transmitter_sign("ACH") == 1
    assert {(t.pre, t.post, t.bundled) for t in cfg.topology} >= {("ORN", "PN", "model"), ("PN", "KC", "data"),
                                                                 ("MBON", "DN", "model")}
    lo, hi = cfg.validation["kc_sparsity"]["min"], cfg.validation["kc_sparsity"]["max"]
    assert (lo, hi) == (0.05, 0.10)
    assert cfg.validation["neuron_counts"]["flywire_v783_mb"] == {"PN": 124, "KC": 2597, "APL": 1, "MBON": 48, "DAN": 165}
    with pytest.raises(ConfigError, match="unknown layer"):
        cfg.neuron_params("LN")


def test_baseline_rates_match_hallem():
    root = Path(__file__).resolve().parent.parent / "connectome" / "data" / "hallem_carlson_2006"
    rows = list(csv.reader(open(root / "responses.csv")))
    expected = {r: float(v) for r, v in zip(rows[0][3:], rows[1][3:])}
    got = {r: v for r, (_, v) in load_cell_types().orn_spontaneous_hz.items()}
    assert got == expected


def test_mbon_table_matches_flywire(flywire_circuit):
    table = load_cell_types().mbon_transmitters
    for n in flywire_circuit.layer_neurons("MBON"):
        key = n.cell_type.split(",")[0].replace("-like", "")
        assert table[key] == n.transmitter, n.cell_type


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["neuron_parameters"]["KC"].__setitem__("tau_m_ms", -1),
     "cell_types.yaml: neuron_parameters.KC.tau_m_ms must be a positive number"),
    (lambda d: d["neuron_parameters"]["PN"].pop("rest_mv"), "neuron_parameters.PN.rest_mv is missing"),
    (lambda d: d["neuron_parameters"]["PN"].__setitem__("threshold_mv", "high"),
     "neuron_parameters.PN.threshold_mv must be a finite number"),
    (lambda d: d["synapses"]["glutamate"].__setitem__("sign", 1), "synapses.glutamate.sign contradicts"),
    (lambda d: d["topology"][0].__setitem__("pre", "LN"), r"topology\[0\].pre is not a known layer"),
    (lambda d: d.__setitem__("extra", 1), "extra is not a known key"),
    (lambda d: d["neuron_parameters"]["KC"].__setitem__("cite", ["nobody2020"]), "unknown citation 'nobody2020'"),
])
def test_cell_types_schema_errors(tmp_path, edit, match):
    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "connectome" / "cell_types.yaml").read_text())
    edit(raw)
    p = tmp_path / "cell_types.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=match):
        load_cell_types(p)


def test_cell_type_override(tmp_path):
    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "connectome" / "cell_types.yaml").read_text())
    raw["cell_type_parameters"]["KC"] = {"KCab": {"tau_m_ms": 6.0}}
    p = tmp_path / "ct.yaml"
    p.write_text(yaml.safe_dump(raw))
    cfg = load_cell_types(p)
    assert cfg.neuron_params("KC", "KCab").tau_m_ms == 6.0
    assert cfg.neuron_params("KC", "KCab").threshold_mv == cfg.neuron_params("KC").threshold_mv
    assert cfg.neuron_params("KC", "KCg-m") == cfg.neuron_params("KC")
    p.write_text("a: [1, 2")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_cell_types(p)
    with pytest.raises(ConfigError, match="not found"):
        load_cell_types(tmp_path / "missing.yaml")
