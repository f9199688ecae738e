"""Loihi 2 fixed point: quantisation, the NumPy/torch emulators, Lava fixed_pt, netx file."""
import json
import os
import subprocess
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dmn_neuro.errors import ExportError
from dmn_neuro.simulation.spec import simulate
from dmn_neuro.simulation.fixed_point import (DECAY_UNITY, FixedPointStepper, quantize, simulate_fixed)
from exporters.lava_export import export_lava, read_lava_graph
from exporters.lava_runner import run_lava
from exporters.netx import feedforward_chain, write_netx

from test_lava_export import SIZES, small_input, small_spec  # noqa: E402  (tests dir is on sys.path)


@pytest.fixture(scope="module")
def fixed_graph(tmp_path_factory):
    spec = small_spec()
    d = tmp_path_factory.mktemp("lava_fixed")
    res = export_lava(spec, d, fixed_point=True)
    return spec, d, res


def test_quantisation_uses_the_8bit_range_and_reports(fixed_graph):
    spec, d, res = fixed_graph
    fps, rep = res["fixed_point_spec"], res["quantisation"]
    for q in fps.projections:
        if q.sign_mode == "MIXED":
            assert q.weight.min() >= -256 and q.weight.max() <= 254 and not np.any(q.weight % 2)
        # the largest weight of the projection that sets vth fills the range to within one grid step
        assert rep["projections"][q.name]["rel_weight_error"] < 0.05
    for p in fps.populations:
        src = spec.population(p.name)
        assert p.du == DECAY_UNITY - 1
        assert abs((1 - p.dv / DECAY_UNITY) - src.beta) <= 0.5 / DECAY_UNITY
        assert rep["populations"][p.name]["vth"] == p.vth
    by_post = {}
    for q in fps.projections:
        by_post.setdefault(q.post, []).append(int(np.abs(q.weight).max()))
    for post, mx in by_post.items():
        assert max(mx) >= 250, (post, mx)  # the limiting projection uses the whole 8-bit range
    manifest, arrays = read_lava_graph(d)
    assert manifest["mode"] == "fixed" and manifest["select_tag"] == "fixed_pt"
    assert manifest["quantisation"]["projections"]["PN->KC"]["sign_mode"] == "MIXED"


def test_golden_fixed_point_step():
    """Hand-computed Loihi arithmetic for one ORN neuron: u = a << 6, v = trunc(v*(4096-dv)/4096) + u + bias."""
    spec = small_spec()
    fps = quantize(spec)
    orn = fps.population("ORN")
    x = np.zeros((3, 1, SIZES["ORN"]))
    x[:, 0, 0] = [0.3, 0.2, -0.1]
    out = simulate_fixed(fps, x, record_membrane=True)
    xq = fps.quantise_input(x)[:, 0, 0].astype(np.int64)
    b = int(orn.effective_bias[0])
    v, vs = 0, []
    for t in range(3):
        prod = v * (DECAY_UNITY - orn.dv)
        v = int(np.sign(prod)) * (abs(prod) >> 12) + (int(xq[t]) << 6) + b
        v = 0 if v > orn.vth << 6 else v
        vs.append(v)
    assert out["ORN_mem"][:, 0, 0].tolist() == vs


def test_torch_stepper_equals_numpy_emulator(fixed_graph):
    _, _, res = fixed_graph
    fps = res["fixed_point_spec"]
    x = small_input(T=120, B=3, seed=7)
    em = simulate_fixed(fps, x)
    stepper = FixedPointStepper(fps, device="cpu")
    state = stepper.init_state(3)
    for t in range(x.shape[0]):
        spk, state = stepper.step(state, torch.as_tensor(x[t], dtype=torch.float64))
        for name in fps.population_names:
            assert torch.equal(spk[name].cpu(), torch.as_tensor(em[name][t])), (name, t)


@pytest.mark.lava
def test_lava_fixed_equals_emulator_and_is_close_to_float(fixed_graph):
    spec, d, res = fixed_graph
    fps = res["fixed_point_spec"]
    x = small_input()
    em = simulate_fixed(fps, x)
    out = run_lava(d, x, fixed_point=True)
    ref = simulate(spec, x)
    for name in spec.population_names:
        assert int((out[name] != em[name]).sum()) == 0, name
    # quantisation error against the float model on this net (measured: ORN 0.02%, PN 0.75%,
    # KC 1.6%, APL 1.3%, MBON 4.4%, DN 3.1% of spikes; divergence compounds downstream)
    frac = {n: float((em[n] != ref[n]).mean()) for n in spec.population_names}
    assert frac["ORN"] < 0.005 and frac["PN"] < 0.02 and frac["KC"] < 0.04, frac
    assert max(frac.values()) < 0.08, frac


def test_fixed_point_errors():
    spec = small_spec()
    with pytest.raises(ExportError, match="weight_bits"):
        quantize(spec, weight_bits=9)
    big = small_spec()
    big.projections[0].weight = big.projections[0].weight * 1e4
    with pytest.raises(ExportError, match="not representable"):
        quantize(big)
    with pytest.raises(ExportError, match="input must be"):
        simulate_fixed(quantize(spec), np.zeros((3, 1, 5)))


def test_netx_file_layout(fixed_graph, tmp_path):
    spec, d, res = fixed_graph
    fps = res["fixed_point_spec"]
    assert feedforward_chain(fps) == ["ORN", "PN", "KC", "MBON", "DN"]
    path = write_netx(fps, tmp_path / "net.h5")
    assert not (tmp_path / "net.h5.tmp").exists()
    with h5py.File(path, "r") as f:
        assert sorted(f["layer"].keys()) == ["0", "1", "2", "3", "4"]
        l2 = f["layer/2"]
        assert l2["type"][()] == b"dense" and l2["neuron/type"][()] == b"CUBA"
        assert int(l2["inFeatures"][()]) == SIZES["PN"] and int(l2["outFeatures"][()]) == SIZES["KC"]
        kc = fps.population("KC")
        np.testing.assert_array_equal(l2["weight"][()], next(q.weight for q in fps.projections if q.name == "PN->KC"))
        assert int(l2["neuron/vThMant"][()]) == kc.vth and int(l2["neuron/iDecay"][()]) == 4096
        assert int(l2["neuron/vDecay"][()]) == kc.dv
        np.testing.assert_array_equal(f["layer/0/weight"][()], np.eye(SIZES["ORN"]))
        omitted = json.loads(f.attrs["dmn_neuro_omitted"])
        assert omitted == ["KC->APL", "APL->KC"]
        assert "feed-forward only" in f.attrs["dmn_neuro_note"]
        assert f["dmn_neuro/omitted/1"].attrs["pre"] == "APL"
    assert (d / "netx.h5").is_file()  # export_lava(fixed_point=True) writes it too


NETX_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from lava.lib.dl.netx import hdf5
    from lava.proc.io.source import RingBuffer
    from lava.magma.core.run_conditions import RunSteps
    from lava.magma.core.run_configs import Loihi2SimCfg
    sys.path.insert(0, sys.argv[4])
    from worker import SpikeSink
    net = hdf5.Network(net_config=sys.argv[1], input_message_bits=24)
    xq = np.load(sys.argv[2])  # [T, n_in] int32
    T = xq.shape[0]
    src = RingBuffer(data=xq.T.astype(np.int32))
    src.s_out.connect(net.inp)
    np.lib.format.open_memmap(sys.argv[3], mode="w+", dtype=np.uint8, shape=(T, net.out.shape[0])).flush()
    sink = SpikeSink(shapes=[net.out.shape], paths=[sys.argv[3]])
    net.out.connect(sink.in_0)
    net.run(condition=RunSteps(num_steps=T), run_cfg=Loihi2SimCfg(select_tag="fixed_pt"))
    net.stop()
""")


@pytest.mark.netx
def test_netx_loads_and_matches_emulator_without_apl(tmp_path):
    """Opt-in (make test-netx): lava-dl's netx loader runs the file; DN spikes equal the emulator
    of the same circuit without the omitted APL loop and without bias (netx cannot set v_init)."""
    py = os.environ.get("DMN_NETX_PYTHON")
    if not py:
        pytest.fail("DMN_NETX_PYTHON is not set (run `make test-netx`)")
    spec = small_spec()
    for p in spec.populations:
        p.bias = np.zeros(p.n)
    spec.projections = [q for q in spec.projections if "APL" not in (q.pre, q.post)]
    fps = quantize(spec)
    path = write_netx(fps, tmp_path / "net.h5")
    x = small_input(T=200, B=1)
    xq = fps.quantise_input(x)[:, 0, :]
    lag = len(feedforward_chain(fps))  # netx: one Dense hop per layer, the first one being the input hop
    np.save(tmp_path / "xq.npy", np.concatenate([xq, np.zeros((lag, xq.shape[1]), np.int32)]))
    (tmp_path / "run_netx.py").write_text(NETX_SCRIPT)
    worker_dir = Path(__file__).resolve().parent.parent / "exporters" / "lava_worker"
    subprocess.run([py, str(tmp_path / "run_netx.py"), str(path), str(tmp_path / "xq.npy"),
                    str(tmp_path / "dn.npy"), str(worker_dir)], check=True, timeout=600)
    dn = np.load(tmp_path / "dn.npy").astype(bool)
    em = simulate_fixed(fps, x)["DN"][:, 0, :]
    # model DN[t] appears at netx step t + 1 (input hop) -> row t + 1
    np.testing.assert_array_equal(dn[1:1 + em.shape[0]], em)


def test_decay_clamp_is_one_to_4095_everywhere():
    """dv = 0 (beta = 1) is a valid Lava register value but has no float counterpart, so the quantiser
    and QAT both clamp to [1, 4095]; a decay that rounds to 0 becomes 1 and stays dequantisable."""
    from dmn_neuro.simulation.fixed_point import DV_MAX, DV_MIN, decay_to_dv, dv_to_beta
    from dmn_neuro.training.qat import dequantize

    assert (DV_MIN, DV_MAX) == (1, DECAY_UNITY - 1)
    betas = [0.0, 0.3, 0.5, 1 - 0.4 / DECAY_UNITY, 1 - 1e-9]
    want = [DV_MAX, 2867, 2048, DV_MIN, DV_MIN]
    assert [int(decay_to_dv(b)) for b in betas] == want
    assert decay_to_dv(torch.tensor(betas, dtype=torch.float64)).tolist() == want
    spec = small_spec()
    spec.population("APL").beta = 1 - 1e-6  # tau = 1e6 steps
    fps = quantize(spec)
    assert fps.population("APL").dv == DV_MIN
    assert dequantize(fps).population("APL").beta == dv_to_beta(DV_MIN)


def test_integer_step_is_identical_in_numpy_and_torch():
    """lif_step_fixed is one definition for both libraries, including the int32 and 24-bit wraps."""
    from dmn_neuro.simulation.fixed_point import MAX_UV, lif_step_fixed

    rng = np.random.default_rng(3)
    v = rng.integers(-MAX_UV + 1, MAX_UV, (4, 500), dtype=np.int64)
    a = rng.integers(-(1 << 26), 1 << 26, (4, 500), dtype=np.int64)  # beyond 24 bits after << 6: wraps
    bias = rng.integers(-(1 << 18), 1 << 18, 500, dtype=np.int64)
    for dv, vth in ((1, 1), (300, 250), (4095, 131071)):
        vn, s = lif_step_fixed(v, a, dv, bias, vth)
        vt, st = lif_step_fixed(torch.as_tensor(v), torch.as_tensor(a), dv, torch.as_tensor(bias), vth)
        np.testing.assert_array_equal(vt.numpy(), vn)
        np.testing.assert_array_equal(st.numpy(), s)
        assert s.any() and not s.all() and vn.min() >= -MAX_UV + 1 and vn.max() <= MAX_UV - 1
