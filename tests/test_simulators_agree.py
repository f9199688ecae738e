"""Every simulator of the dynamics gives the same spikes, in every population, on one small circuit.

Float: the torch circuit per step (snnTorch ``LIFCell``), the fused engine,
:func:`dmn_neuro.simulation.spec.simulate` (the NumPy reference), the NIR file run
by :func:`exporters.nir_import.run_nir` and the Lava float graph. Fixed point:
:func:`simulate_fixed`, :class:`FixedPointStepper` and Lava ``fixed_pt`` bit for
bit, and the float model on the grid (snapped circuit, dequantised spec) against
them. Each comparison is shown not to be vacuous: every population spikes, and a
one-weight perturbation is caught.
"""
import copy
import inspect

import numpy as np
import pytest
import torch

from connectome.adjacency_matrix import ConstrainedWeight
from dmn_neuro.simulation.fixed_point import FixedPointStepper, quantize, simulate_fixed
from dmn_neuro.simulation.spec import simulate
from dmn_neuro.training.qat import dequantize, snap_circuit_to_grid
from exporters.lava_export import export_lava
from exporters.lava_runner import run_lava
from exporters.nir_export import export_nir
from exporters.nir_import import run_nir

from test_lava_export import SIZES, small_input  # noqa: E402  (tests dir is on sys.path)
from test_qat import tiny_circuit  # noqa: E402

SEED = 2
T, B = 200, 2


def _circuit():
    """``tiny_circuit`` (all six populations, KC->APL->KC loop, DN bias) in float64, with a
    KC->APL projection strong enough that APL fires (tiny_circuit's single APL row is
    all 1e-4 weights)."""
    c = tiny_circuit(SEED)
    g = torch.Generator().manual_seed(SEED)
    n_kc = SIZES["KC"]
    c.weights[c._wkey("KC", "APL")] = ConstrainedWeight(torch.rand(1, n_kc, generator=g) * 0.3 + 0.05,
                                                        torch.ones(n_kc), torch.ones(1, n_kc, dtype=torch.bool))
    return c.double()


def _numpy(spikes):
    return {n: (s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s)).astype(bool)
            for n, s in spikes.items() if not n.endswith("_mem")}


def assert_same_spikes(reference, candidate, names, what):
    ref, cand = _numpy({n: reference[n] for n in names}), _numpy({n: candidate[n] for n in names})
    bad = {n: int((ref[n] != cand[n]).sum()) for n in names if ref[n].shape != cand[n].shape or np.any(ref[n] != cand[n])}
    assert not bad, f"{what}: mismatched spikes per population {bad}"


def assert_every_population_spikes(spikes, names):
    counts = {n: int(_numpy({n: spikes[n]})[n].sum()) for n in names}
    assert all(v > 0 for v in counts.values()), f"a silent population makes the comparison vacuous: {counts}"


def _strongest_synapse_of_busiest_pn(w, spikes):
    j = int(np.argmax(spikes["PN"].sum(axis=(0, 1))))
    return int(np.argmax(np.abs(w[:, j]))), j


@pytest.fixture(scope="module")
def setup():
    c = _circuit()
    x = small_input(T=T, B=B, seed=SEED + 10)
    spec = c.to_spec()
    ref = simulate(spec, x)
    names = spec.population_names
    assert names == list(SIZES)
    assert_every_population_spikes(ref, names)
    return c, spec, x, ref, names


@pytest.fixture(scope="module")
def fixed(setup):
    """The circuit snapped onto the Loihi grid, its fixed-point spec and the emulator's spikes."""
    c, _, x, _, names = setup
    cf = copy.deepcopy(c)
    snap_circuit_to_grid(cf)
    spec_fx = cf.to_spec()
    fps = quantize(spec_fx)
    em = simulate_fixed(fps, x, record_membrane=True)
    assert_every_population_spikes(em, names)
    return cf, spec_fx, fps, em


# -- float ------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["snntorch", "fused"])
def test_torch_circuit_equals_numpy_reference(setup, engine):
    c, _, x, ref, names = setup
    with torch.no_grad():
        _, act = c(torch.as_tensor(x), engine=engine)
    assert_same_spikes(ref, act["spikes"], names, f"torch circuit ({engine}) vs spec.simulate")


def test_nir_file_equals_numpy_reference(setup, tmp_path):
    _, spec, x, ref, names = setup
    path = export_nir(spec, tmp_path / "model.nir")
    assert_same_spikes(ref, run_nir(path, x), names, "NIR (run_nir) vs spec.simulate")


def test_run_nir_reads_only_the_nir_file():
    """run_nir is the independent check of the export: it may not consult our spec or simulator."""
    src = inspect.getsource(run_nir)
    for name in ("CircuitSpec", "simulate", "checkpoint", "spec."):
        assert name not in src, name
    assert list(inspect.signature(run_nir).parameters) == ["graph_or_path", "x", "dt", "record_membrane"]


@pytest.mark.lava
def test_lava_float_equals_numpy_reference(setup, tmp_path):
    _, spec, x, ref, names = setup
    res = export_lava(spec, tmp_path / "float")
    assert_same_spikes(ref, run_lava(res["graph_dir"], x), names, "Lava float vs spec.simulate")


def test_float_comparison_catches_one_changed_weight(setup):
    c, spec, x, ref, names = setup
    moved = copy.deepcopy(spec)
    q = next(p for p in moved.projections if p.name == "PN->KC")
    i, j = _strongest_synapse_of_busiest_pn(q.weight, ref)
    q.weight[i, j] = 0.0
    with pytest.raises(AssertionError, match="mismatched spikes"):
        assert_same_spikes(ref, simulate(moved, x), names, "perturbed")
    # and the torch path sees the perturbation too (the circuit is not consulted through the spec)
    cw = c.weight("PN", "KC")
    saved = cw.raw.detach().clone()
    try:
        with torch.no_grad():
            cw.raw[i, j] -= 40.0  # softplus(raw) -> ~0
            _, act = c(torch.as_tensor(x), engine="fused")
        with pytest.raises(AssertionError, match="mismatched spikes"):
            assert_same_spikes(ref, act["spikes"], names, "perturbed circuit")
    finally:
        with torch.no_grad():
            cw.raw.copy_(saved)


# -- fixed point ------------------------------------------------------------------------
def test_torch_stepper_is_bit_identical_to_numpy_emulator(setup, fixed):
    _, _, x, _, names = setup
    _, _, fps, em = fixed
    st = FixedPointStepper(fps).run(torch.as_tensor(x))
    assert_same_spikes(em, st, names, "FixedPointStepper vs simulate_fixed")


@pytest.mark.lava
def test_lava_fixed_is_bit_identical_to_emulator(setup, fixed, tmp_path):
    _, _, x, _, names = setup
    _, spec_fx, fps, em = fixed
    res = export_lava(spec_fx, tmp_path / "fixed", fixed_point=True, write_netx_file=False)
    assert_same_spikes(em, run_lava(res["graph_dir"], x, fixed_point=True), names, "Lava fixed_pt vs simulate_fixed")


def test_float_model_on_the_grid_equals_fixed_point(setup, fixed):
    """The snapped circuit (torch), its spec (NumPy) and the dequantised fixed-point spec agree with
    the integer emulator on this input. In general they differ by Loihi's decay truncation and the
    ORN input rounding (tests/test_qat.py bounds that over longer runs: ~0.1-0.3 % of spikes)."""
    _, _, x, _, names = setup
    cf, spec_fx, fps, em = fixed
    with torch.no_grad():
        _, act = cf(torch.as_tensor(x), engine="fused")
    assert_same_spikes(em, act["spikes"], names, "snapped circuit (fused) vs simulate_fixed")
    assert_same_spikes(em, simulate(spec_fx, x), names, "snapped spec (simulate) vs simulate_fixed")
    assert_same_spikes(em, simulate(dequantize(fps, like=spec_fx), x), names, "dequantised spec vs simulate_fixed")


def test_fixed_comparison_catches_one_changed_weight(setup, fixed):
    _, _, x, _, names = setup
    _, _, fps, em = fixed
    moved = copy.deepcopy(fps)
    q = next(p for p in moved.projections if p.name == "PN->KC")
    i, j = _strongest_synapse_of_busiest_pn(q.weight, em)
    q.weight[i, j] = 0
    with pytest.raises(AssertionError, match="mismatched spikes"):
        assert_same_spikes(em, simulate_fixed(moved, x), names, "perturbed")
    with pytest.raises(AssertionError, match="mismatched spikes"):
        assert_same_spikes(em, FixedPointStepper(moved).run(torch.as_tensor(x)), names, "perturbed stepper")
