"""Bundled sources: counts, ordering, signs, provenance, model layers."""
import numpy as np
import pytest

from connectome.errors import DataError
from connectome.fetch_data import FlyWireConnectome
from connectome.tables import NeuronMetadata, SynapseConnection


def _proj(data, pre, post):
    return next(p for p in data.projections if (p.pre, p.post) == (pre, post))


def test_flywire_counts(flywire_circuit):
    d = flywire_circuit
    assert d.source == "flywire_v783_mb" and d.version == "v783"
    assert d.layer_sizes == {"ORN": 55, "PN": 124, "KC": 2597, "APL": 1, "MBON": 48, "DN": 4}
    pk = _proj(d, "PN", "KC")
    assert (pk.n_edges, pk.n_synapses, pk.provenance) == (9841, 135797, "flywire_v783")
    km = _proj(d, "KC", "MBON")
    assert (km.n_edges, km.n_synapses) == (7485, 55237)
    assert _proj(d, "ORN", "PN").provenance == "model"
    assert _proj(d, "MBON", "DN").provenance == "model"
    assert d.provenance("APL", "KC") == "flywire_v783"
    assert d.count_matrix("PN", "KC").sum() == 135797
    assert d.count_matrix("PN", "KC").shape == (2597, 124)
    assert np.count_nonzero(d.count_matrix("KC", "MBON")) == 7485


def test_dan_only_on_request(tmp_path):
    f = FlyWireConnectome(cache_dir=tmp_path)
    d = f.fetch_olfactory_circuit(include_layers=["KC", "MBON", "DAN"])
    assert d.layer_sizes["DAN"] == 165
    with pytest.raises(DataError, match="modulatory"):
        d.presynaptic_sign("DAN")
    d2 = f.fetch_olfactory_circuit()
    assert "DAN" not in d2.layer_sizes and "APL" not in d2.layer_sizes


def test_layer_order_and_metadata(flywire_circuit):
    d = flywire_circuit
    for layer in d.layers:
        ids = d.layer_ids(layer)
        assert ids.dtype == np.int64 and len(set(ids.tolist())) == ids.size
        neurons = d.layer_neurons(layer)
        assert [n.id for n in neurons] == ids.tolist()
        assert all(n.layer == layer for n in neurons)
    np.testing.assert_array_equal(d.layer_ids("KC"), d.layer_ids("KC"))
    orns = d.layer_neurons("ORN")
    assert all(n.glomerulus and n.id < 0 and n.cell_type == f"ORN_{n.glomerulus}" for n in orns)
    assert {n.glomerulus for n in orns} == {n.glomerulus for n in d.layer_neurons("PN")}
    assert next(n for n in orns if n.glomerulus == "DA1").receptor == "Or67d"
    # ORN_g -> exactly the PNs of glomerulus g
    c = d.count_matrix("ORN", "PN")
    pn_g = d.layer_column("PN", "glomerulus")
    orn_g = d.layer_column("ORN", "glomerulus")
    np.testing.assert_array_equal(c > 0, pn_g[:, None] == orn_g[None, :])
    assert isinstance(d.neurons[int(d.layer_ids("PN")[0])], NeuronMetadata)
    s = d.synapses
    assert len(s) == len(d.edge_table) and isinstance(s[0], SynapseConnection)
    assert sum(x.count for x in s) == d.total_synapses


def test_signs_dale(flywire_circuit):
    d = flywire_circuit
    assert set(d.presynaptic_sign("PN").tolist()) == {1.0}
    assert set(d.presynaptic_sign("APL").tolist()) == {-1.0}
    mb = d.layer_neurons("MBON")
    s = d.presynaptic_sign("MBON")
    for n, x in zip(mb, s):
        assert x == (1.0 if n.transmitter == "acetylcholine" else -1.0)
    p = next(p for p in d.projections if (p.pre, p.post) == ("APL", "KC"))
    assert p.n_inhibitory_edges == p.n_edges and p.n_excitatory_edges == 0


def test_model_layer_options(tmp_path):
    d = FlyWireConnectome(cache_dir=tmp_path).fetch_olfactory_circuit(
        include_layers=["ORN", "PN", "MBON", "DN"], orn_per_glomerulus=3, n_dn=2)
    assert d.layer_sizes["ORN"] == 55 * 3 and d.layer_sizes["DN"] == 2
    assert d.count_matrix("MBON", "DN").min() > 0
    with pytest.raises(DataError, match="n_dn"):
        FlyWireConnectome(use_cache=False).fetch_olfactory_circuit(include_layers=["MBON", "DN"], n_dn=0)
    with pytest.raises(DataError, match="unknown option 'bogus'"):
        FlyWireConnectome(use_cache=False).fetch_olfactory_circuit(bogus=1)


def test_unknown_layer_and_source():
    f = FlyWireConnectome(use_cache=False)
    with pytest.raises(DataError, match=r"unknown layer 'LN'.*ORN, PN, KC, APL, MBON, DN, DAN"):
        f.fetch_olfactory_circuit(include_layers=["PN", "LN"])
    with pytest.raises(DataError, match="unknown source 'nope'"):
        f.fetch_olfactory_circuit(source="nope")
    d = f.fetch_olfactory_circuit(include_layers=["PN", "KC"])
    with pytest.raises(DataError, match="not in this circuit"):
        d.count_matrix("KC", "MBON")


def test_hemibrain(tmp_path):
    d = FlyWireConnectome(cache_dir=tmp_path).fetch_olfactory_circuit(
        include_layers=["ORN", "PN", "KC", "APL", "MBON", "DN"], source="hemibrain_v1.2.1_mb")
    assert d.version == "v1.2.1"
    sz = d.layer_sizes
    assert (sz["PN"], sz["KC"], sz["MBON"], sz["APL"]) == (119, 1919, 57, 1)  # data README says 121 PNs; the table has 119
    assert d.provenance("PN", "KC") == "hemibrain_v1.2.1" and d.provenance("ORN", "PN") == "model"
    assert set(d.presynaptic_sign("APL").tolist()) == {-1.0}
    mb = {n.cell_type: s for n, s in zip(d.layer_neurons("MBON"), d.presynaptic_sign("MBON"))}
    assert mb["MBON01"] == -1 and mb["MBON11"] == -1 and mb["MBON14"] == 1
    # per-ROI counts are summed per pair
    assert d.count_matrix("PN", "KC").sum() == sum(
        p.n_synapses for p in d.projections if (p.pre, p.post) == ("PN", "KC"))
    assert all(n.glomerulus for n in d.layer_neurons("PN"))


def test_to_tables_roundtrip(flywire_circuit, tmp_path):
    import csv
    n_path, e_path = flywire_circuit.to_tables(tmp_path / "out")
    rows = list(csv.DictReader(open(e_path)))
    assert len(rows) == len(flywire_circuit.edge_table)
    assert sum(int(r["count"]) for r in rows if r["pre_layer"] == "PN" and r["post_layer"] == "KC") == 135797
    assert {r["provenance"] for r in rows if r["post_layer"] == "DN"} == {"model"}
    assert len(list(csv.DictReader(open(n_path)))) == sum(flywire_circuit.layer_sizes.values())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["edges.csv", "neurons.csv"]


def test_to_tables_no_partial_files(flywire_circuit, tmp_path, monkeypatch):
    import connectome.tables as tables
    real = tables._write_csv_tmp

    def failing(out, name, header, columns):
        if name == "edges.csv":
            raise OSError(28, "No space left on device")
        return real(out, name, header, columns)

    monkeypatch.setattr(tables, "_write_csv_tmp", failing)
    with pytest.raises(DataError, match="cannot write tables into .*No space left"):
        flywire_circuit.to_tables(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
