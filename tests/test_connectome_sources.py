"""Codex CSV exports, fake CAVE client, synthetic generator."""
import csv
import gzip

import numpy as np
import pandas as pd
import pytest

from connectome.errors import DataError
from connectome.fetch_data import FlyWireConnectome

CLS_HEADER = ["root_id", "flow", "super_class", "class", "sub_class", "cell_type", "hemibrain_type",
              "hemilineage", "side", "nerve"]
# root_id, super_class, class, sub_class, cell_type, side, nt
NEURONS = [
    (101, "sensory", "olfactory", "", "ORN_DA1", "right", "ACH"),
    (102, "sensory", "olfactory", "", "ORN_DA1", "right", "ACH"),
    (103, "sensory", "olfactory", "", "ORN_VA1v", "right", "ACH"),
    (104, "sensory", "olfactory", "", "ORN_VA1v", "left", "ACH"),
    (201, "central", "ALPN", "uniglomerular", "DA1_lPN", "right", "ACH"),
    (202, "central", "ALPN", "uniglomerular", "VA1v_adPN", "right", "ACH"),
    (203, "central", "ALPN", "multiglomerular", "M_vPNml50", "right", "GABA"),
    (204, "central", "ALPN", "uniglomerular", "DA1_lPN", "left", "ACH"),
    (301, "central", "Kenyon_Cell", "KCab", "KCab", "right", "ACH"),
    (302, "central", "Kenyon_Cell", "KCg", "KCg-m", "right", "ACH"),
    (303, "central", "Kenyon_Cell", "KCab", "KCab", "right", "ACH"),
    (401, "central", "MBIN", "", "APL", "right", "GABA"),
    (501, "central", "MBON", "", "MBON01", "right", "GLUT"),
    (502, "central", "MBON", "", "MBON14", "right", "ACH"),
    (601, "descending", "", "", "DNp42", "right", "ACH"),
    (602, "descending", "", "", "DNa02", "right", "ACH"),
    (701, "central", "LHLN", "", "LHAV1a1", "right", "GABA"),
]
CONNECTIONS = [  # pre, post, neuropil, syn_count
    (101, 201, "AL_R", 20), (102, 201, "AL_R", 18), (103, 202, "AL_R", 25), (104, 202, "AL_R", 9),
    (201, 301, "MB_CA_R", 10), (201, 302, "MB_CA_R", 7), (202, 302, "MB_CA_R", 12), (202, 303, "MB_CA_R", 6),
    (203, 301, "MB_CA_R", 8),
    (301, 401, "MB_ML_R", 15), (302, 401, "MB_ML_R", 11), (303, 401, "MB_ML_R", 9),
    (401, 301, "MB_ML_R", 14), (401, 302, "MB_ML_R", 13), (401, 303, "MB_PED_R", 5),
    (301, 501, "MB_ML_R", 6), (301, 501, "MB_PED_R", 4), (302, 502, "MB_VL_R", 9),
    (501, 601, "SMP_R", 7), (502, 601, "SMP_R", 8), (501, 602, "SMP_R", 5), (201, 701, "LH_R", 30),
]


def _write_gz(path, header, rows):
    with gzip.open(path, "wt", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def write_codex(d, neurons=NEURONS, connections=CONNECTIONS):
    d.mkdir(parents=True, exist_ok=True)
    _write_gz(d / "neurons.csv.gz", ["root_id", "group", "nt_type", "nt_type_score", "ach_avg"],
              [(r[0], "g", r[6], 0.9, 0.5) for r in neurons])
    _write_gz(d / "classification.csv.gz", CLS_HEADER,
              [(r[0], "intrinsic", r[1], r[2], r[3], r[4], "", "", r[5], "AN" if r[1] == "sensory" else "")
               for r in neurons])
    _write_gz(d / "consolidated_cell_types.csv.gz", ["root_id", "primary_type", "additional_type(s)"],
              [(r[0], r[4], "") for r in neurons])
    _write_gz(d / "connections.csv.gz", ["pre_root_id", "post_root_id", "neuropil", "syn_count", "nt_type"],
              [(a, b, n, c, "ACH") for a, b, n, c in connections])
    return d


ALL = ["ORN", "PN", "KC", "APL", "MBON", "DN"]


def test_codex_selection(tmp_path):
    d = write_codex(tmp_path / "codex")
    data = FlyWireConnectome(cache_dir=tmp_path / "cache").fetch_olfactory_circuit(ALL, source=f"codex:{d}")
    assert data.layer_sizes == {"ORN": 3, "PN": 2, "KC": 3, "APL": 1, "MBON": 2, "DN": 1}
    assert data.layer_ids("DN").tolist() == [601]  # 602 gets only 5 < 10 synapses from MBONs
    assert all(p.provenance == "codex" for p in data.projections)
    c = data.count_matrix("ORN", "PN")
    assert c.sum() == 20 + 18 + 25 and np.count_nonzero(c) == 3
    assert data.count_matrix("KC", "MBON").max() == 10  # 6 + 4 summed over neuropils
    assert dict(zip(data.layer_column("ORN", "glomerulus"), data.layer_column("ORN", "cell_type")))["DA1"] == "ORN_DA1"
    assert data.presynaptic_sign("MBON").tolist() == [-1.0, 1.0]
    assert data.presynaptic_sign("APL").tolist() == [-1.0]
    both = FlyWireConnectome(use_cache=False).fetch_olfactory_circuit(ALL, source=f"codex:{d}", side="both")
    assert both.layer_sizes["ORN"] == 4 and both.layer_sizes["PN"] == 3


@pytest.mark.parametrize("case, match", [
    ("nodir", "codex directory not found"),
    ("missing_file", "missing connections.csv.gz"),
    ("missing_column", "missing column\\(s\\) syn_count"),
    ("non_numeric", "syn_count row 3 is not an integer: 'many'"),
    ("empty", "file is empty"),
    ("header_only", "header but no rows"),
    ("not_gzip", "cannot read"),
])
def test_codex_bad_input(tmp_path, case, match):
    d = write_codex(tmp_path / "codex")
    con = d / "connections.csv.gz"
    if case == "nodir":
        d = tmp_path / "nope"
    elif case == "missing_file":
        con.unlink()
    elif case == "missing_column":
        _write_gz(con, ["pre_root_id", "post_root_id", "neuropil"], [(1, 2, "x")])
    elif case == "non_numeric":
        _write_gz(con, ["pre_root_id", "post_root_id", "neuropil", "syn_count", "nt_type"],
                  [(101, 201, "AL", 5), (102, 201, "AL", "many")])
    elif case == "empty":
        with gzip.open(con, "wt"):
            pass
    elif case == "header_only":
        _write_gz(con, ["pre_root_id", "post_root_id", "neuropil", "syn_count", "nt_type"], [])
    elif case == "not_gzip":
        con.write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match=match) as exc:
        FlyWireConnectome(use_cache=False).fetch_olfactory_circuit(ALL, source=f"codex:{d}")
    assert "\n" not in str(exc.value)


def test_codex_missing_layer(tmp_path):
    d = write_codex(tmp_path / "codex", neurons=[r for r in NEURONS if r[4] != "APL"])
    with pytest.raises(DataError, match="no neurons of layer APL"):
        FlyWireConnectome(use_cache=False).fetch_olfactory_circuit(ALL, source=f"codex:{d}")


class FakeMaterialize:
    def __init__(self, annotations, synapses):
        self.annotations, self.synapses, self.calls = annotations, synapses, []

    def query_table(self, table, materialization_version=None, filter_in_dict=None, select_columns=None, limit=None):
        self.calls.append((table, materialization_version, None if filter_in_dict is None else
                           len(filter_in_dict["pre_pt_root_id"])))
        if table == "hierarchical_neuron_annotations":
            return self.annotations
        df = self.synapses[self.synapses.pre_pt_root_id.isin(filter_in_dict["pre_pt_root_id"])]
        return df.head(limit)[select_columns]


class FakeClient:
    def __init__(self, mat):
        self.materialize = mat


def _fake_client():
    ann = []
    for rid, sup, cls, sub, ct, side, _ in NEURONS:
        for system, v in (("super_class", sup), ("cell_class", cls), ("cell_sub_class", sub),
                          ("cell_type", ct), ("side", side)):
            if v:
                ann.append((rid, system, v))
    ann = pd.DataFrame(ann, columns=["pt_root_id", "classification_system", "cell_type"])
    nt = {r[0]: r[6] for r in NEURONS}
    rows = []
    for a, b, _, c in CONNECTIONS:
        for k in range(c):
            p = {"ach": 0.1, "gaba": 0.1, "glut": 0.1, "da": 0.0, "ser": 0.0, "oct": 0.0}
            p[{"ACH": "ach", "GABA": "gaba", "GLUT": "glut"}[nt[a]]] = 0.7
            rows.append({"pre_pt_root_id": a, "post_pt_root_id": b, "cleft_score": 40 if k == 0 and a == 101 else 120, **p})
    return FakeClient(FakeMaterialize(ann, pd.DataFrame(rows)))


def test_fake_cave_client(tmp_path):
    client = _fake_client()
    data = FlyWireConnectome(cache_dir=tmp_path).fetch_olfactory_circuit(
        ALL, source="cave", client_factory=lambda: client, batch_size=4, row_limit=60)
    assert data.version == "v783" and data.source == "cave"
    assert data.layer_sizes == {"ORN": 3, "PN": 2, "KC": 3, "APL": 1, "MBON": 2, "DN": 1}
    c = data.count_matrix("ORN", "PN")
    assert c.sum() == 19 + 18 + 25  # one ORN 101 synapse below cleft_score 50
    assert data.count_matrix("KC", "MBON").max() == 10
    assert data.presynaptic_sign("MBON").tolist() == [-1.0, 1.0]
    assert all(p.provenance == "cave" for p in data.projections)
    calls = client.materialize.calls
    assert all(v == 783 for _, v, _ in calls)
    assert max(n for t, _, n in calls if n is not None) <= 4
    assert sum(1 for _, _, n in calls if n == 2) >= 2  # a batch at the row limit was split and re-queried
    assert not list(tmp_path.rglob("*.npz"))  # an injected client is never cached


def test_cave_errors():
    def boom():
        raise ConnectionError("network down\nsecond line")
    with pytest.raises(DataError, match="cannot connect to CAVE datastack flywire_fafb_public: ConnectionError: network down$"):
        FlyWireConnectome(use_cache=False).fetch_olfactory_circuit(ALL, source="cave", client_factory=boom)
    with pytest.raises(DataError, match="unknown option 'token'"):
        FlyWireConnectome(use_cache=False).fetch_olfactory_circuit(ALL, source="cave", token="x")


def test_synthetic_determinism_and_stats():
    f = FlyWireConnectome(use_cache=False)
    a = f.fetch_olfactory_circuit(ALL, use_synthetic=True, seed=3)
    b = f.fetch_olfactory_circuit(ALL, source="synthetic", seed=3)
    c = f.fetch_olfactory_circuit(ALL, source="synthetic", seed=4)
    for k, v in a.edge_table.columns().items():
        np.testing.assert_array_equal(v, b.edge_table.columns()[k])
    for k, v in a.neuron_table.columns().items():
        np.testing.assert_array_equal(v, b.neuron_table.columns()[k])
    assert len(a.edge_table) != len(c.edge_table) or not np.array_equal(a.edge_table.pre_id, c.edge_table.pre_id)
    sz = a.layer_sizes
    assert sz["ORN"] == 51 and sz["KC"] == 2000 and sz["APL"] == 1 and 100 <= sz["PN"] <= 150
    pk = a.count_matrix("PN", "KC")
    assert 3.3 < np.count_nonzero(pk) / sz["KC"] < 4.2
    assert (pk[pk > 0] >= 5).all()
    assert all(p.provenance == "synthetic" for p in a.projections)
    np.testing.assert_array_equal(a.count_matrix("ORN", "PN") > 0,
                                  a.layer_column("PN", "glomerulus")[:, None] == a.layer_column("ORN", "glomerulus")[None, :])
    assert set(a.presynaptic_sign("APL").tolist()) == {-1.0}
    with pytest.raises(DataError, match="no DAN"):
        f.fetch_olfactory_circuit(["KC", "DAN"], source="synthetic")
    with pytest.raises(DataError, match="scale must be a positive number"):
        f.fetch_olfactory_circuit(ALL, source="synthetic", scale=-1)


def test_synthetic_moderate_scale():
    d = FlyWireConnectome(use_cache=False).fetch_olfactory_circuit(ALL, source="synthetic", scale=5, degree_scale=2)
    n = sum(d.layer_sizes.values())
    assert 9_000 < n < 14_000 and d.layer_sizes["APL"] == 5
    assert len(d.edge_table) > 100_000
    assert d.edge_table.pre_id.dtype == np.int64 and d.edge_table.count.dtype == np.int32


# -- options are per source --------------------------------------------------------------
def test_every_source_declares_its_options_and_training_defaults():
    from connectome.sources import SOURCES, training_options

    for name, spec in SOURCES.items():
        assert set(spec.training_defaults) <= set(spec.options), name
    for name in ("flywire_v783_mb", "hemibrain_v1.2.1_mb", "synthetic"):
        assert training_options(name) == {"orn_per_glomerulus": 8, "n_dn": 16}
    assert training_options("cave") == {} and training_options("codex:/any/dir") == {}
    # explicit options are used as given, never merged with the defaults
    assert training_options("flywire_v783_mb", {"n_dn": 3}) == {"n_dn": 3}
    assert training_options("cave", {}) == {}


@pytest.mark.parametrize("source, option", [
    ("cave", "n_dn"), ("codex:/any/dir", "orn_per_glomerulus"), ("flywire_v783_mb", "seed"),
    ("hemibrain_v1.2.1_mb", "side"), ("synthetic", "client_factory"),
])
def test_an_option_the_source_does_not_accept_is_one_line(tmp_path, source, option):
    from connectome.sources import SOURCES, check_source_options, resolve_source

    spec, _ = resolve_source(source)
    accepted = ", ".join(sorted(spec.options))
    msg = f"source {spec.name}: unknown option {option!r}; accepted: {accepted}"
    with pytest.raises(DataError) as exc:
        check_source_options(source, {option: 1})
    assert str(exc.value) == msg
    # the fetcher refuses it before reading anything (a codex directory that does not exist)
    with pytest.raises(DataError) as exc:
        FlyWireConnectome(cache_dir=tmp_path).fetch_olfactory_circuit(ALL, source=source, **{option: 1})
    assert str(exc.value) == msg
    assert SOURCES[spec.name] is spec


def test_training_defaults_build_a_circuit_from_codex_and_cave(tmp_path):
    """Codex and cave select the real ORNs and DNs, so the circuit needs no model-layer options."""
    from connectome.sources import training_options
    from dmn_neuro.simulation.mechanism import DifferentiableOlfactoryCircuit

    d = write_codex(tmp_path / "codex")
    client = _fake_client()
    for source, extra in ((f"codex:{d}", {}), ("cave", {"client_factory": lambda: client})):
        circuit = DifferentiableOlfactoryCircuit.from_connectome(
            source=source, cache_dir=tmp_path / "cache", source_options={**training_options(source), **extra})
        assert circuit.structure.layer_sizes == {"ORN": 3, "PN": 2, "KC": 3, "APL": 1, "MBON": 2, "DN": 1}
        assert sorted(set(circuit.orn_glomeruli)) == ["DA1", "VA1v"]
