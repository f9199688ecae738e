"""One definition of the torch dynamics: every path steps through, or is held to, ``neurons.lif_step``."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dmn_neuro.errors import ConfigError
from dmn_neuro.simulation import neurons
from dmn_neuro.simulation.engine import (
    PopulationParams, ProjectionParams, lif_scan, lif_scan_with_state, run_layered, run_layered_with_state,
    run_reference,
)
from dmn_neuro.simulation.neurons import (
    DEFAULT_SURROGATE, DEFAULT_SURROGATE_SLOPE, LIFCell, Surrogate, lif_step, make_surrogate,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "examples" / "pretrained" / "flywire_mb_navigator"
SURR = [("fast_sigmoid", 25.0), ("atan", 2.0)]


@pytest.fixture
def step_calls(monkeypatch):
    """How often the one LIF step runs (every caller goes through its autograd Function)."""
    calls = [0]
    orig = neurons._LIFStep.apply

    def counted(*args):
        calls[0] += 1
        return orig(*args)

    monkeypatch.setattr(neurons._LIFStep, "apply", counted)
    return calls


def _step_loop(current, beta, thr, surrogate, slope, mem0=None):
    mem = torch.zeros_like(current[0]) if mem0 is None else mem0
    spk, mems = [], []
    for c in current.unbind(0):
        s, mem = lif_step(c, mem, beta, thr, surrogate, slope)
        spk.append(s)
        mems.append(mem)
    return torch.stack(spk), torch.stack(mems)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("surrogate,slope", SURR)
def test_lif_scan_is_the_one_step_over_time(dtype, surrogate, slope):
    """The fused single-population scan gives lif_step's spikes and membranes bit for bit."""
    g = torch.Generator().manual_seed(0)
    T, B, N = 90, 5, 9
    current = torch.rand(T, B, N, generator=g, dtype=dtype) * 0.9
    mem0 = torch.rand(B, N, generator=g, dtype=dtype) * 0.5
    beta = torch.tensor(0.83, dtype=dtype)
    thr = torch.rand(N, generator=g, dtype=dtype) + 0.5
    s_ref, m_ref = _step_loop(current, beta, thr, surrogate, slope, mem0)
    assert 0.05 < s_ref.mean().item() < 0.6
    s, m = lif_scan_with_state(current, beta, thr, mem0, surrogate, slope, trace=True)
    assert torch.equal(s, s_ref) and torch.equal(m, m_ref)
    assert torch.equal(lif_scan(current, beta, thr, surrogate, slope), _step_loop(current, beta, thr, surrogate, slope)[0])


def _small_circuit(dtype, seed=0):
    sizes = {"ORN": 8, "PN": 6, "KC": 40, "APL": 1, "MBON": 5, "DN": 3}
    edges = [("ORN", "PN"), ("PN", "KC"), ("KC", "APL"), ("APL", "KC"), ("KC", "MBON"), ("MBON", "DN")]
    g = torch.Generator().manual_seed(seed)
    pops = [PopulationParams(n, torch.tensor(0.7 + 0.2 * float(torch.rand(1, generator=g)), dtype=dtype),
                             torch.rand(k, generator=g, dtype=dtype) * 0.6 + 0.4)
            for n, k in sizes.items()]
    projs = []
    for pre, post in edges:
        shape = (sizes[post], sizes[pre])
        mask = (torch.rand(shape, generator=g) < 0.4).to(dtype)
        scale = 0.05 if pre == "KC" and post == "APL" else 0.9
        w = mask * torch.rand(shape, generator=g, dtype=dtype) * scale
        projs.append(ProjectionParams(pre, post, -w if pre == "APL" else w))
    x = torch.rand(50, 3, sizes["ORN"], generator=g, dtype=dtype) * 1.2
    return pops, projs, x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_group_scans_agree_with_the_one_step(dtype, step_calls):
    """run_reference steps every population through lif_step (T x populations
    calls); the fused group scans (KC <-> APL loop) give identical spikes and membranes."""
    pops, projs, x = _small_circuit(dtype)
    ref = run_reference(x, pops, projs, record_membrane=True)
    assert step_calls[0] == x.shape[0] * len(pops)
    n_ref = step_calls[0]
    out = run_layered(x, pops, projs, record_membrane=True)
    assert step_calls[0] == n_ref  # the fused engine does not step
    assert set(out) == set(ref)
    for k in ref:
        assert torch.equal(out[k], ref[k]), k
    assert all(ref[p.name].sum() > 0 for p in pops)


def test_circuit_step_path_is_the_one_step(step_calls):
    """The shipped circuit's per-step path (LIFCell -> lif_step), an explicit
    loop over lif_step and the fused engine give the same spikes."""
    from dmn_neuro.environment.odors import OdorEncoder, static_odor_input
    from dmn_neuro.training.checkpoint import load_circuit
    from dmn_neuro.training.optimizer import default_current_per_hz

    circ = load_circuit(SHIPPED)[0]
    enc = OdorEncoder(circ.orn_glomeruli, dt_ms=circ.semantics.dt_ms, encoding="poisson",
                      current_per_hz=default_current_per_hz(circ))
    x = torch.as_tensor(static_odor_input(enc, enc.odors[:4], 60, generator=torch.Generator().manual_seed(0)))
    engine_before = circ.engine
    with torch.no_grad():
        _, stepped = circ(x, engine="snntorch")
        assert step_calls[0] == x.shape[0] * len(circ.population_names)
        assert circ.engine == engine_before
        _, fused = circ(x, engine="fused")
        # the same dynamics written out with nothing but lif_step and the projections
        pops = {p.name: p for p in circ.population_params()}
        B = x.shape[1]
        mem = {n: x.new_zeros(B, p.threshold.shape[0]) for n, p in pops.items()}
        prev = {n: m.clone() for n, m in mem.items()}
        manual = {n: [] for n in pops}
        for x_t in x.unbind(0):
            cur = {n: None for n in pops}
            cur[circ.input_population] = x_t
            for q in circ.projection_weights():
                c = prev[q.pre] @ q.weight.t()
                cur[q.post] = c if cur[q.post] is None else cur[q.post] + c
            for n, p in pops.items():
                c = cur[n] if cur[n] is not None else torch.zeros_like(mem[n])
                if p.bias is not None:
                    c = c + p.bias
                prev[n], mem[n] = lif_step(c, mem[n], p.beta, p.threshold, circ.surrogate, circ.surrogate_slope)
                manual[n].append(prev[n])
    for n in circ.population_names:
        want = torch.stack(manual[n])
        assert torch.equal(stepped["spikes"][n], want), n
        assert torch.equal(fused["spikes"][n], want), n
    assert stepped["spikes"]["KC"].sum() > 0 and stepped["spikes"]["DN"].sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("surrogate,slope", SURR)
def test_lif_step_matches_snntorch_leaky(dtype, surrogate, slope):
    """snnTorch's Leaky (zero reset applied detached, as the semantics say) is
    the independent oracle: same spikes and membranes, gradients to float32 rounding."""
    import snntorch as snn

    g = torch.Generator().manual_seed(3)
    T, B, N = 40, 3, 6
    current = (torch.rand(T, B, N, generator=g, dtype=dtype) * 0.9).requires_grad_()
    beta = torch.tensor(0.8, dtype=dtype, requires_grad=True)
    raw_thr = (torch.rand(N, generator=g, dtype=dtype) + 0.5).requires_grad_()
    coef = torch.randn(T, B, N, generator=g, dtype=dtype)
    leaky = snn.Leaky(beta=1.0, threshold=1.0, spike_grad=make_surrogate(surrogate, slope), init_hidden=False,
                      reset_mechanism="none")
    leaky.beta, leaky.threshold = beta, F.softplus(raw_thr)
    mem = torch.zeros(B, N, dtype=dtype)
    s_ref, m_ref = [], []
    for c in current.unbind(0):
        spk, v = leaky(c, mem)
        spk = spk.to(dtype)
        mem = v * (1.0 - spk.detach())
        s_ref.append(spk)
        m_ref.append(mem)
    s_ref, m_ref = torch.stack(s_ref), torch.stack(m_ref)
    s, m = _step_loop(current, beta, F.softplus(raw_thr), surrogate, slope)
    assert torch.equal(s, s_ref) and torch.equal(m, m_ref)
    leaves = [current, beta, raw_thr]
    g_ref = torch.autograd.grad((s_ref * coef).sum() + (m_ref * coef).sum(), leaves)
    g_new = torch.autograd.grad((s * coef).sum() + (m * coef).sum(), leaves)
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float64 else (1e-3, 1e-4)
    for a, b in zip(g_new, g_ref):
        assert torch.linalg.norm(b) > 0
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * float(b.abs().max()))


@pytest.mark.parametrize("surrogate,slope", SURR)
def test_surrogate_forms_agree(surrogate, slope):
    x = torch.linspace(-2, 2, 101, dtype=torch.float64)
    sur = Surrogate(surrogate, slope)
    d = sur.derivative(x)
    torch.testing.assert_close(d, sur.numerator / sur.denominator_(x.clone()), rtol=1e-15, atol=0)
    if surrogate == "fast_sigmoid":
        want = 1.0 / (slope * x.abs() + 1.0) ** 2
    else:
        want = slope / 2 / (1 + (torch.pi / 2 * slope * x) ** 2)
    torch.testing.assert_close(d, want, rtol=1e-14, atol=0)


def test_one_default_surrogate_everywhere():
    fns = [lif_step, lif_scan, lif_scan_with_state, run_layered, run_layered_with_state, run_reference]
    for fn in fns:
        params = inspect.signature(fn).parameters
        assert params["surrogate"].default == DEFAULT_SURROGATE, fn.__name__
        assert params["slope"].default == DEFAULT_SURROGATE_SLOPE, fn.__name__
    params = inspect.signature(LIFCell).parameters
    assert params["surrogate"].default == DEFAULT_SURROGATE and params["slope"].default == DEFAULT_SURROGATE_SLOPE


# ---------------------------------------------------------------------------
# LIFCell API
# ---------------------------------------------------------------------------
def test_lifcell_from_rest_golden_values():
    """tau = 2 ms at dt = 1 ms -> beta = 0.5; threshold 10 mV above rest -> theta = 1.
    I = [0.6, 1.2, 0.0] from rest: v = [0.6, 1.2, 0] (neuron 1 spikes and resets),
    then [0.9, 1.2, 0], then [1.05 -> spike, 1.2 -> spike, 0]."""
    lif = LIFCell(3, tau_ms=2.0, threshold_mv=-50.0, rest_mv=-60.0, dt_ms=1.0)  # float32 parameters
    I_syn = torch.tensor([0.6, 1.2, 0.0], dtype=torch.float64)
    spikes, V = lif(I_syn)
    assert spikes.shape == (3,) and V.shape == (3,) and V.dtype == torch.float64  # the current's dtype
    assert spikes.tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(V, torch.tensor([0.6, 0.0, 0.0], dtype=torch.float64))
    spikes, V = lif(I_syn, V)
    assert spikes.tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(V, torch.tensor([0.9, 0.0, 0.0], dtype=torch.float64))
    spikes, V = lif(I_syn, V)
    assert spikes.tolist() == [1.0, 1.0, 0.0]
    torch.testing.assert_close(V, torch.zeros(3, dtype=torch.float64))
    # from rest == from an explicit zero membrane, batched too
    batch = I_syn.expand(4, 3)
    s0, v0 = lif(batch)
    s1, v1 = lif(batch, torch.zeros(4, 3, dtype=torch.float64))
    assert torch.equal(s0, s1) and torch.equal(v0, v1) and s0.shape == (4, 3)


def test_lifcell_wrong_current_shape_is_a_config_error():
    with pytest.raises(ConfigError, match=r"expected \[\.\.\., 3\]"):
        LIFCell(3, name="PN")(torch.zeros(4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_lifcell_cuda_without_cuda_warns_and_uses_the_cpu():
    with pytest.warns(RuntimeWarning, match="CUDA is not available; using the CPU"):
        cell = LIFCell(4, device="cuda", name="KC")
    assert cell.raw_threshold.device.type == "cpu"
    with pytest.raises(ConfigError, match="invalid device"):
        LIFCell(4, device="tpu:x", name="KC")


def test_lifcell_unknown_surrogate_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown surrogate"):
        LIFCell(4, surrogate="relu")
