"""NIR export -> file -> nir.read -> exact execution / CircuitSpec round trip."""
from __future__ import annotations

import json

import nir
import numpy as np
import pytest

from dmn_neuro.errors import ExportError
from dmn_neuro.simulation.semantics import DISCRETISATION, RESET_MODE, SPIKE_CONDITION
from dmn_neuro.simulation.spec import CircuitSpec, PopulationSpec, ProjectionSpec, simulate
from exporters.nir_export import export_nir, spec_to_nir
from exporters.nir_import import UnsupportedNodeError, nir_to_spec, run_nir

SIZES = {"ORN": 8, "PN": 6, "KC": 40, "APL": 1, "MBON": 5, "DN": 3}
BETAS = {"ORN": 0.8, "PN": 0.9, "KC": 0.85, "APL": 0.7, "MBON": 0.95, "DN": 0.3}


def make_spec(seed: int = 0) -> CircuitSpec:
    rng = np.random.default_rng(seed)
    pops = [
        PopulationSpec(
            name, n, BETAS[name], threshold=rng.uniform(0.5, 1.5, n),
            bias=rng.normal(0.0, 0.05, n) if name in ("KC", "MBON", "DN") else None,
            cell_types=[f"{name}_{i % 3}" for i in range(n)],
            root_ids=np.arange(n, dtype=np.int64) + 720575940600000000,
            provenance="flywire" if name != "APL" else "model",
        )
        for name, n in SIZES.items()
    ]

    def proj(pre, post, scale, sign=None, density=0.5):
        mask = rng.random((SIZES[post], SIZES[pre])) < density
        w = rng.uniform(0.2, 1.0, mask.shape) * scale * mask
        w *= rng.choice([-1.0, 1.0], w.shape) if sign is None else sign
        return ProjectionSpec(pre, post, w)

    projs = [
        proj("ORN", "PN", 1.0),            # mixed signs
        proj("PN", "KC", 0.8, +1),
        proj("KC", "APL", 0.2, +1, 1.0),   # recurrent KC -> APL -> KC
        proj("APL", "KC", 1.0, -1, 1.0),
        proj("KC", "MBON", 0.4),
        proj("MBON", "DN", 1.5, +1, 0.8),
        proj("PN", "PN", 0.3, -1, 0.3),    # lateral inhibition, a self-loop
    ]
    return CircuitSpec(pops, projs, metadata={"dataset": "synthetic-flywire", "version": "783-test", "seed": seed})


@pytest.fixture(scope="module")
def spec():
    return make_spec()


@pytest.fixture(scope="module")
def nir_file(spec, tmp_path_factory):
    return export_nir(spec, tmp_path_factory.mktemp("nir") / "model.nir")


@pytest.fixture(scope="module")
def drive():
    return np.random.default_rng(1).uniform(0.0, 0.6, (1000, 2, SIZES["ORN"]))


def test_run_nir_matches_reference_exactly(spec, nir_file, drive):
    ref = simulate(spec, drive, record_membrane=True)
    out = run_nir(nir.read(nir_file), drive, record_membrane=True)
    assert set(spec.population_names) <= set(out)
    for name in spec.population_names:
        assert out[name].shape == (1000, 2, SIZES[name])
        assert ref[name].any(), f"{name} never spikes: the test would be vacuous"
        assert int(np.count_nonzero(out[name] != ref[name])) == 0, name
        np.testing.assert_allclose(out[name + "_mem"], ref[name + "_mem"], rtol=0, atol=1e-12)


def test_run_nir_detects_a_changed_weight(spec, nir_file, drive):
    graph = nir.read(nir_file)
    graph.nodes["w_KC_MBON"].weight = graph.nodes["w_KC_MBON"].weight * 1.5
    ref = simulate(spec, drive)
    out = run_nir(graph, drive)
    assert np.count_nonzero(out["MBON"] != ref["MBON"]) > 0
    assert np.count_nonzero(out["KC"] != ref["KC"]) == 0  # upstream unaffected


def test_delay_is_one_step_per_hop(spec, nir_file):
    # A single ORN pulse reaches PN one step later, KC two steps later.
    x = np.zeros((6, 1, SIZES["ORN"]))
    x[0] = 50.0
    out = run_nir(nir_file, x)
    ref = simulate(spec, x)
    for name in ("ORN", "PN", "KC"):
        np.testing.assert_array_equal(out[name], ref[name])
    assert out["ORN"][0].all() and not out["PN"][0].any()
    assert out["PN"][1].any()


def test_nir_to_spec_round_trip(spec, nir_file):
    back = nir_to_spec(nir_file)
    assert back.population_names == spec.population_names
    assert (back.input_population, back.output_population) == ("ORN", "DN")
    assert back.semantics.dt_ms == spec.semantics.dt_ms
    assert back.metadata == spec.metadata
    for a, b in zip(spec.populations, back.populations):
        assert a.n == b.n
        np.testing.assert_allclose(b.beta, a.beta, rtol=0, atol=1e-14)
        np.testing.assert_allclose(b.threshold, a.threshold, rtol=0, atol=0)
        np.testing.assert_allclose(b.bias, a.bias, rtol=1e-13, atol=1e-16)
        assert list(b.cell_types) == list(a.cell_types)
        np.testing.assert_array_equal(b.root_ids, a.root_ids)
        assert b.provenance == a.provenance
    assert [q.name for q in back.projections] == [q.name for q in spec.projections]
    for a, b in zip(spec.projections, back.projections):
        np.testing.assert_array_equal(b.weight, a.weight)


def test_spec_round_trip_simulates_identically(spec, nir_file, drive):
    back = nir_to_spec(nir_file)
    ref, out = simulate(spec, drive[:300]), simulate(back, drive[:300])
    for name in spec.population_names:
        np.testing.assert_array_equal(out[name], ref[name])


def test_file_passes_nir_read_and_type_check(spec, nir_file):
    graph = nir.read(nir_file, type_check=True)
    graph.validate_structure()
    graph.infer_types()
    assert graph.check_types()
    kinds = {name: type(node).__name__ for name, node in graph.nodes.items()}
    assert kinds["input"] == "Input"
    for name in spec.population_names:
        assert kinds[name] == "LIF"
        assert kinds[f"out_{name}"] == "Output"
    assert kinds["w_APL_KC"] == "Linear" and kinds["d_APL_KC"] == "Delay"
    assert ("KC", "d_KC_APL") in graph.edges and ("w_APL_KC", "KC") in graph.edges
    np.testing.assert_allclose(graph.nodes["d_PN_KC"].delay, spec.semantics.dt_s)
    kc = graph.nodes["KC"]
    np.testing.assert_allclose(kc.tau, spec.semantics.dt_s / (1 - 0.85))
    np.testing.assert_allclose(kc.r, kc.tau / spec.semantics.dt_s)
    np.testing.assert_array_equal(kc.v_threshold, spec.population("KC").threshold)
    np.testing.assert_array_equal(kc.v_reset, 0.0)
    # bias encoded in v_leak: (dt/tau) * v_leak == bias
    np.testing.assert_allclose(spec.semantics.dt_s / kc.tau * kc.v_leak, spec.population("KC").bias, rtol=1e-13)
    np.testing.assert_array_equal(graph.nodes["w_APL_KC"].weight, spec.projections[3].weight)


def test_metadata_survives(spec, nir_file):
    meta = nir.read(nir_file).metadata
    assert float(meta["dt"]) == pytest.approx(1e-3)
    assert meta["discretisation"] == DISCRETISATION == "forward-euler"
    assert meta["reset"] == RESET_MODE and meta["spike_condition"] == SPIKE_CONDITION
    assert meta["reset_timing"] == "same-step"
    assert int(meta["delay_steps_per_hop"]) == 1
    assert meta["dataset"] == "synthetic-flywire" and meta["version"] == "783-test"
    assert json.loads(meta["spec_metadata_json"]) == spec.metadata
    kc = meta["populations"]["KC"]
    assert json.loads(kc["cell_types_json"]) == list(spec.population("KC").cell_types)
    np.testing.assert_array_equal(kc["root_ids"], spec.population("KC").root_ids)
    assert meta["output_node"] == "out_DN"


def test_export_is_atomic_and_refuses_bad_input(spec, tmp_path):
    target = tmp_path / "m.nir"
    with pytest.raises(ExportError):
        export_nir("not a spec", target)
    assert not target.exists() and not list(tmp_path.iterdir())
    export_nir(spec, target)
    assert [p.name for p in tmp_path.iterdir()] == ["m.nir"]


def test_importer_refuses_unknown_nodes_and_semantics(spec, tmp_path):
    graph = spec_to_nir(spec)
    graph.nodes["KC"] = nir.CubaLIF(
        tau_syn=np.ones(40), tau_mem=np.ones(40), r=np.ones(40), v_leak=np.zeros(40), v_threshold=np.ones(40)
    )
    with pytest.raises(UnsupportedNodeError, match="'KC'.*CubaLIF"):
        run_nir(graph, np.zeros((3, 1, 8)))
    with pytest.raises(NotImplementedError):
        nir_to_spec(graph)

    graph = spec_to_nir(spec)
    graph.metadata["reset"] = "subtract"
    with pytest.raises(ExportError, match="reset"):
        nir_to_spec(graph)

    graph = spec_to_nir(spec)
    graph.nodes["MBON"].v_reset = np.full(5, -0.5)
    with pytest.raises(ExportError, match="v_reset"):
        nir_to_spec(graph)

    graph = spec_to_nir(spec)
    graph.nodes["d_PN_KC"].delay = np.full(6, 2e-3)
    with pytest.raises(ExportError, match="2 steps"):
        nir_to_spec(graph)

    bad = tmp_path / "corrupt.nir"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(ExportError, match="unreadable"):
        run_nir(bad, np.zeros((3, 1, 8)))
    with pytest.raises(ExportError, match="not found"):
        nir_to_spec(tmp_path / "missing.nir")


def test_cycle_without_delay_is_refused(spec):
    graph = spec_to_nir(spec)
    graph.nodes["d_APL_KC"].delay = np.zeros(1)
    graph.nodes["d_KC_APL"].delay = np.zeros(40)
    with pytest.raises(ExportError, match="cycle"):
        run_nir(graph, np.zeros((3, 1, 8)))
