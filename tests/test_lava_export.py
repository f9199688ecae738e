"""Lava export (float): graph files, the worker, exactness against dmn_neuro.simulation.spec.simulate, errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dmn_neuro.errors import DMNError, ExportError
from dmn_neuro.simulation.semantics import LAVA_INPUT_DELAY_STEPS
from dmn_neuro.simulation.spec import CircuitSpec, PopulationSpec, ProjectionSpec, simulate
from exporters.lava_export import ARRAYS_NAME, MANIFEST_NAME, export_lava, read_lava_graph
from exporters.lava_runner import LAVA_PYTHON_ENV, find_lava_python, run_lava

SIZES = {"ORN": 8, "PN": 6, "KC": 40, "APL": 1, "MBON": 5, "DN": 3}
BETAS = {"ORN": 0.8, "PN": 0.9, "KC": 0.85, "APL": 0.7, "MBON": 0.95, "DN": 0.9}


def small_spec(seed: int = 0) -> CircuitSpec:
    """Random circuit with a KC->APL->KC loop, mixed signs, per-neuron thresholds, some biases."""
    rng = np.random.default_rng(seed)
    pops = []
    for name, n in SIZES.items():
        bias = np.where(rng.random(n) < 0.3, rng.normal(0, 0.05, n), 0.0)
        pops.append(PopulationSpec(name, n, BETAS[name], rng.uniform(0.5, 1.5, n), bias))

    def w(post, pre, scale, offset=0.0, sign=None):
        m = rng.normal(0, scale, (SIZES[post], SIZES[pre]))
        return sign * np.abs(m) if sign is not None else m + offset

    projs = [ProjectionSpec("ORN", "PN", w("PN", "ORN", 0.6, 0.2)),
             ProjectionSpec("PN", "KC", w("KC", "PN", 0.5, 0.15)),
             ProjectionSpec("KC", "APL", w("APL", "KC", 0.1, sign=1.0)),
             ProjectionSpec("APL", "KC", w("KC", "APL", 0.6, sign=-1.0)),
             ProjectionSpec("KC", "MBON", w("MBON", "KC", 0.3, 0.05)),
             ProjectionSpec("MBON", "DN", w("DN", "MBON", 0.8, 0.2))]
    return CircuitSpec(pops, projs)


def small_input(T: int = 300, B: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.2, 0.9, (T, B, SIZES["ORN"]))


@pytest.fixture(scope="module")
def float_graph(tmp_path_factory):
    spec = small_spec()
    d = tmp_path_factory.mktemp("lava_float")
    res = export_lava(spec, d)
    return spec, d, res


def test_graph_files_fold_thresholds_and_record_lag(float_graph):
    spec, d, res = float_graph
    manifest, arrays = read_lava_graph(d)
    assert manifest == json.loads((d / MANIFEST_NAME).read_text())
    assert manifest["mode"] == "float" and manifest["lava_input_delay_steps"] == LAVA_INPUT_DELAY_STEPS
    assert manifest["dt_ms"] == spec.semantics.dt_ms and manifest["semantics"]["reset"] == "zero"
    lifs = {p["name"]: p for p in manifest["processes"] if p["kind"] == "LIF"}
    assert list(lifs) == spec.population_names
    kc = spec.population("KC")
    assert lifs["KC"]["du"] == 1.0 and lifs["KC"]["vth"] == 1.0
    assert lifs["KC"]["dv"] == pytest.approx(1 - kc.beta)
    conns = {c["name"]: c for c in manifest["connections"]}
    assert conns["input->ORN"]["num_message_bits"] == 24 and conns["PN->KC"]["num_message_bits"] == 0
    w = arrays[conns["PN->KC"]["weights"]]
    np.testing.assert_allclose(w * kc.threshold[:, None], spec.projections[1].weight, rtol=1e-15)
    np.testing.assert_allclose(arrays[lifs["KC"]["bias_mant"]], kc.bias / kc.threshold)
    # loadable without pickle
    with np.load(d / ARRAYS_NAME, allow_pickle=False) as data:
        assert "conn/0/weights" in data.files


@pytest.mark.lava
def test_lava_float_matches_reference_exactly(float_graph):
    spec, d, _ = float_graph
    x = small_input()
    ref = simulate(spec, x)
    out = run_lava(d, x, return_info=True)
    assert out["lag"] == LAVA_INPUT_DELAY_STEPS
    for name in spec.population_names:
        assert out[name].shape == ref[name].shape == (300, 2, SIZES[name])
        assert out[name].dtype == bool
        assert int((out[name] != ref[name]).sum()) == 0, name
    # the circuit is not silent, so the comparison means something
    assert all(ref[n].any() for n in spec.population_names)


@pytest.mark.lava
def test_lava_float_batch_chunks_and_steps(float_graph):
    spec, d, _ = float_graph
    x = small_input(T=40, B=3, seed=5)
    ref = simulate(spec, np.concatenate([x, np.zeros((10, 3, SIZES["ORN"]))]))
    out = run_lava(d, x, steps=50, batch_chunk=2, return_info=True)
    assert [t["stacked"] for t in out["timing"]] == [2, 1]
    for name in spec.population_names:
        assert out[name].shape == (50, 3, SIZES[name])
        np.testing.assert_array_equal(out[name], ref[name])


def test_missing_lava_env_is_one_line(monkeypatch, tmp_path, float_graph):
    monkeypatch.setenv(LAVA_PYTHON_ENV, str(tmp_path / "nope" / "python"))
    with pytest.raises(ExportError) as exc:
        find_lava_python()
    msg = str(exc.value)
    assert "\n" not in msg and "make lava-env" in msg and str(tmp_path / "nope") in msg
    with pytest.raises(ExportError, match="make lava-env"):
        run_lava(float_graph[1], small_input(T=5))


def test_corrupt_graph_is_one_line_error(tmp_path, float_graph):
    d = tmp_path / "g"
    export_lava(float_graph[0], d)
    (d / ARRAYS_NAME).write_bytes(b"PK\x03\x04 this is not a zip file")
    with pytest.raises(ExportError) as exc:
        run_lava(d, small_input(T=5))
    assert "\n" not in str(exc.value) and "unreadable" in str(exc.value)
    with pytest.raises(ExportError, match="not found"):
        read_lava_graph(tmp_path / "missing")


@pytest.mark.lava
def test_worker_corrupt_graph_reports_one_line(tmp_path, float_graph):
    """The worker itself (not only the runner's pre-check) fails with one line."""
    d = tmp_path / "g"
    export_lava(float_graph[0], d)
    (d / ARRAYS_NAME).write_bytes(b"garbage")
    np.save(tmp_path / "x.npy", small_input(T=5))
    from exporters.lava_runner import WORKER

    proc = subprocess.run([str(find_lava_python()), str(WORKER), "--graph", str(d), "--input", str(tmp_path / "x.npy"),
                           "--out", str(tmp_path / "o.npz")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("lava worker: cannot read graph arrays")
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.lava
def test_worker_failure_becomes_export_error(tmp_path, float_graph, monkeypatch):
    """A graph whose manifest names a kind the worker does not know: ExportError with the worker's last line."""
    d = tmp_path / "g"
    export_lava(float_graph[0], d)
    m = json.loads((d / MANIFEST_NAME).read_text())
    m["connections"][1]["kind"] = "Conv"
    (d / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ExportError, match=r"^Lava run failed: lava worker: unknown connection kind 'Conv'$"):
        run_lava(d, small_input(T=5))


def test_export_rejects_bad_input(tmp_path):
    with pytest.raises(ExportError):
        export_lava("not a spec", tmp_path)
    with pytest.raises(ExportError, match="without fixed_point"):
        export_lava(small_spec(), tmp_path, weight_bits=8)
    assert issubclass(ExportError, DMNError)


def test_main_env_never_imports_lava():
    code = "import exporters.lava_export, exporters.lava_runner, dmn_neuro.simulation.fixed_point, exporters.netx, sys; " \
           "print(any(m == 'lava' or m.startswith('lava.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.stdout.strip() == "False"
