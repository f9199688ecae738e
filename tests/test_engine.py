"""The fused engine against the per-step reference (LIFCell / lif_step) and the NumPy spec."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmn_neuro.simulation import engine
from dmn_neuro.simulation.engine import projections, scans, sparse
from dmn_neuro.simulation.engine import (
    SparseStructure, lif_scan, lif_scan_with_state, lif_step, run_layered, run_layered_with_state, run_reference,
    strongly_connected_groups,
)
from dmn_neuro.errors import ConfigError, DMNError
from dmn_neuro.simulation.neurons import LIFCell
from dmn_neuro.simulation.spec import CircuitSpec, PopulationSpec, ProjectionSpec, simulate

SIZES = {"ORN": 8, "PN": 6, "KC": 40, "APL": 1, "MBON": 5, "DN": 3}
EDGES = [("ORN", "PN"), ("PN", "KC"), ("KC", "APL"), ("APL", "KC"), ("KC", "MBON"), ("MBON", "DN")]
SURR = [("fast_sigmoid", 25.0), ("atan", 2.0)]


def _close(a, b, dtype, snntorch=False):
    """Gradient comparison. ``snntorch=True``: the per-step reference, whose
    tolerance dates from when it ran on snnTorch (float32 surrogate outputs,
    ~1e-6 in float64; tests/test_dynamics.py holds lif_step to snnTorch with
    it). Against the float64 autograd reference it is tight."""
    if dtype == torch.float64:
        rtol, atol = (1e-5, 1e-6) if snntorch else (1e-10, 1e-12)
    else:
        rtol, atol = 1e-3, 1e-4
    scale = max(float(b.abs().max()), 1e-30)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale)


class Circuit:
    """Raw (leaf) parameters of a small random circuit with the KC<->APL loop."""

    def __init__(self, dtype=torch.float64, seed=0, density=0.3, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.raw_beta = {n: torch.tensor(float(torch.empty(1).uniform_(0.5, 2.5, generator=g)), dtype=dtype,
                                         device=device, requires_grad=True) for n in SIZES}
        self.raw_thr = {n: (torch.rand(s, generator=g, dtype=dtype) * 0.6 + 0.4).to(device).requires_grad_()
                        for n, s in SIZES.items()}
        self.mask, self.sign, self.raw_w = {}, {}, {}
        for pre, post in EDGES:
            shape = (SIZES[post], SIZES[pre])
            mask = (torch.rand(shape, generator=g) < density).to(dtype)
            if pre == "KC" and post == "APL":
                mask = torch.ones(shape, dtype=dtype)
            sign = torch.where(torch.rand(shape, generator=g) < 0.3, -1.0, 1.0).to(dtype)
            if pre == "APL":
                sign = -torch.ones(shape, dtype=dtype)
            self.mask[pre, post] = mask.to(device)
            self.sign[pre, post] = sign.to(device)
            scale = 0.05 if pre == "KC" and post == "APL" else 0.6
            self.raw_w[pre, post] = (torch.randn(shape, generator=g, dtype=dtype) * 0.5 + scale).to(device).requires_grad_()

    def leaves(self):
        return ([*self.raw_beta.values()] + [*self.raw_thr.values()] + [*self.raw_w.values()])

    def populations(self):
        return [{"name": n, "beta": torch.sigmoid(self.raw_beta[n]), "threshold": F.softplus(self.raw_thr[n])}
                for n in SIZES]

    def weight(self, pre, post):
        return self.mask[pre, post] * self.sign[pre, post] * F.softplus(self.raw_w[pre, post])

    def projections(self, sparse=()):
        out = []
        for pre, post in EDGES:
            proj = {"pre": pre, "post": post, "weight": self.weight(pre, post)}
            if (pre, post) in sparse:
                proj["sparse"] = SparseStructure.from_mask(self.mask[pre, post])
            out.append(proj)
        return out

    def spec(self):
        pops = [PopulationSpec(n, s, torch.sigmoid(self.raw_beta[n]).item(), F.softplus(self.raw_thr[n]).detach().cpu().numpy())
                for n, s in SIZES.items()]
        projs = [ProjectionSpec(pre, post, self.weight(pre, post).detach().cpu().numpy()) for pre, post in EDGES]
        return CircuitSpec(pops, projs, input_population="ORN", output_population="DN")


def _input(T=60, B=3, dtype=torch.float64, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, B, SIZES["ORN"], generator=g, dtype=dtype) * 1.2).to(device)


def _loss(out, seed=2):
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for name in sorted(out):
        v = out[name]
        c = torch.randn(v.shape[-1], generator=g, dtype=v.dtype).to(v.device)
        # time-varying weights so that the gradient depends on spike timing
        w = torch.linspace(0.5, 1.5, v.shape[0], dtype=v.dtype, device=v.device)[:, None, None]
        total = total + (v * w * c).sum()
    return total


def _grads(loss, leaves):
    gs = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(l) if g is None else g for g, l in zip(gs, leaves)]


# ---------------------------------------------------------------------------
# lif_scan / lif_step vs LIFCell
# ---------------------------------------------------------------------------
def _cell_loop(cell, current, beta, thr, mem0=None):
    mem = torch.zeros_like(current[0]) if mem0 is None else mem0
    spk, mems = [], []
    for c in current.unbind(0):
        s, mem = cell(c, mem, beta=beta, threshold=thr)
        spk.append(s)
        mems.append(mem)
    return torch.stack(spk), torch.stack(mems)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("surrogate,slope", SURR)
def test_lif_scan_matches_lifcell(dtype, surrogate, slope):
    torch.manual_seed(0)
    T, B, N = 80, 4, 7
    current = (torch.rand(T, B, N, dtype=dtype) * 0.9).requires_grad_()
    raw_beta = torch.tensor(1.2, dtype=dtype, requires_grad=True)
    raw_thr = (torch.rand(N, dtype=dtype) + 0.5).requires_grad_()
    cell = LIFCell(N, surrogate=surrogate, slope=slope).to(dtype)
    coef = torch.randn(T, B, N, dtype=dtype)
    leaves = [current, raw_beta, raw_thr]

    spk_ref, _ = _cell_loop(cell, current, torch.sigmoid(raw_beta), F.softplus(raw_thr))
    g_ref = _grads((spk_ref * coef).sum(), leaves)
    spk = lif_scan(current, torch.sigmoid(raw_beta), F.softplus(raw_thr), surrogate, slope)
    g = _grads((spk * coef).sum(), leaves)

    assert spk.dtype == dtype and spk.shape == (T, B, N)
    assert 0.05 < spk.mean().item() < 0.6  # the test exercises spikes and resets
    assert torch.equal(spk, spk_ref)
    for a, b in zip(g, g_ref):
        assert torch.linalg.norm(b) > 0
        _close(a, b, dtype, snntorch=True)


def _autograd_lif(current, beta, thr, surrogate, slope, mem0=None):
    """Float64 autograd reference of the same math (straight-through surrogate:
    H(x) + f(x) - f(x).detach() with f' = the surrogate derivative)."""
    if surrogate == "fast_sigmoid":
        f = lambda u: u / (1 + slope * u.abs())  # noqa: E731
    else:
        f = lambda u: torch.atan(torch.pi / 2 * slope * u) / torch.pi  # noqa: E731
    mem = torch.zeros_like(current[0]) if mem0 is None else mem0
    spk, mems = [], []
    for c in current.unbind(0):
        v = beta * mem + c
        u = v - thr
        fu = f(u)
        s = (u > 0).to(v.dtype) + (fu - fu.detach())
        mem = v * (1 - s.detach())
        spk.append(s)
        mems.append(mem)
    return torch.stack(spk), torch.stack(mems)


@pytest.mark.parametrize("surrogate,slope", SURR)
def test_lif_scan_tight_float64(surrogate, slope):
    """Against a float64 autograd reference the gradients agree to ~1e-12."""
    torch.manual_seed(5)
    dtype = torch.float64
    T, B, N = 120, 3, 6
    current = (torch.rand(T, B, N, dtype=dtype) * 0.9).requires_grad_()
    mem0 = (torch.rand(B, N, dtype=dtype) * 0.5).requires_grad_()
    beta = torch.tensor(0.9, dtype=dtype, requires_grad=True)
    thr = (torch.rand(N, dtype=dtype) + 0.5).requires_grad_()
    c1, c2 = torch.randn(T, B, N, dtype=dtype), torch.randn(T, B, N, dtype=dtype)
    leaves = [current, mem0, beta, thr]
    s_ref, m_ref = _autograd_lif(current, beta, thr, surrogate, slope, mem0)
    s, m = lif_scan_with_state(current, beta, thr, mem0, surrogate, slope, trace=True)
    assert torch.equal(s, s_ref) and torch.equal(m, m_ref)
    g_ref = _grads((s_ref * c1).sum() + (m_ref * c2).sum(), leaves)
    g = _grads((s * c1).sum() + (m * c2).sum(), leaves)
    for a, b in zip(g, g_ref):
        assert torch.linalg.norm(b) > 0
        _close(a, b, dtype)


@pytest.mark.parametrize("surrogate,slope", SURR)
def test_lif_scan_state_and_membrane_grads(surrogate, slope):
    """Initial membrane, membrane trace output and its gradient (h_t terms)."""
    torch.manual_seed(1)
    dtype = torch.float64
    T, B, N = 40, 3, 5
    current = (torch.rand(T, B, N, dtype=dtype) * 0.8).requires_grad_()
    mem0 = (torch.rand(B, N, dtype=dtype) * 0.5).requires_grad_()
    beta = torch.tensor(0.85, dtype=dtype, requires_grad=True)
    thr = (torch.rand(N, dtype=dtype) + 0.5).requires_grad_()
    c1, c2 = torch.randn(T, B, N, dtype=dtype), torch.randn(T, B, N, dtype=dtype)
    leaves = [current, mem0, beta, thr]
    cell = LIFCell(N, surrogate=surrogate, slope=slope).to(dtype)
    s_ref, m_ref = _cell_loop(cell, current, beta, thr, mem0)
    g_ref = _grads((s_ref * c1).sum() + (m_ref * c2).sum(), leaves)
    s, m = lif_scan_with_state(current, beta, thr, mem0, surrogate, slope, trace=True)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(m, m_ref, rtol=0, atol=0)
    g = _grads((s * c1).sum() + (m * c2).sum(), leaves)
    for a, b in zip(g, g_ref):
        _close(a, b, dtype, snntorch=True)
    # last membrane only
    s2, m_last = lif_scan_with_state(current, beta, thr, mem0, surrogate, slope)
    torch.testing.assert_close(m_last, m_ref[-1], rtol=0, atol=0)
    g2 = _grads((s2 * c1).sum() + (m_last * c2[-1]).sum(), leaves)
    s_ref, m_ref = _cell_loop(cell, current, beta, thr, mem0)
    g2_ref = _grads((s_ref * c1).sum() + (m_ref[-1] * c2[-1]).sum(), leaves)
    for a, b in zip(g2, g2_ref):
        _close(a, b, dtype, snntorch=True)


@pytest.mark.parametrize("surrogate,slope", SURR)
def test_lif_step_matches_lifcell(surrogate, slope):
    torch.manual_seed(2)
    dtype = torch.float64
    T, B, N = 30, 2, 6
    current = (torch.rand(T, B, N, dtype=dtype) * 0.9).requires_grad_()
    beta = torch.tensor(0.8, dtype=dtype, requires_grad=True)
    thr = (torch.rand(N, dtype=dtype) + 0.5).requires_grad_()
    coef = torch.randn(T, B, N, dtype=dtype)
    cell = LIFCell(N, surrogate=surrogate, slope=slope).to(dtype)
    s_ref, m_ref = _cell_loop(cell, current, beta, thr)
    loss_ref = (s_ref * coef).sum() + (m_ref * coef).sum()
    mem = torch.zeros(B, N, dtype=dtype)
    s_l, m_l = [], []
    for c in current.unbind(0):
        s, mem = lif_step(c, mem, beta, thr, surrogate, slope)
        s_l.append(s)
        m_l.append(mem)
    s, m = torch.stack(s_l), torch.stack(m_l)
    assert torch.equal(s, s_ref) and torch.equal(m, m_ref)
    leaves = [current, beta, thr]
    for a, b in zip(_grads((s * coef).sum() + (m * coef).sum(), leaves), _grads(loss_ref, leaves)):
        _close(a, b, dtype, snntorch=True)


def test_lif_scan_golden_values():
    """Hand-computed trajectory: beta=0.5, theta=1, I=0.6 -> v = 0.6, 0.9, 1.05 (spike, reset), 0.6, ..."""
    current = torch.full((6, 1, 1), 0.6, dtype=torch.float64)
    s, m = lif_scan_with_state(current, 0.5, torch.tensor([1.0], dtype=torch.float64), trace=True)
    assert s.flatten().tolist() == [0, 0, 1, 0, 0, 1]
    torch.testing.assert_close(m.flatten(), torch.tensor([0.6, 0.9, 0.0, 0.6, 0.9, 0.0], dtype=torch.float64))


# ---------------------------------------------------------------------------
# circuits
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("surrogate,slope", SURR)
def test_run_layered_matches_reference_and_spec(dtype, surrogate, slope):
    circ = Circuit(dtype)
    x = _input(dtype=dtype)
    leaves = circ.leaves()
    ref = run_reference(x, circ.populations(), circ.projections(), surrogate, slope)
    out = run_layered(x, circ.populations(), circ.projections(), surrogate, slope)
    assert set(out) == set(SIZES)
    for n in SIZES:
        assert out[n].shape == (x.shape[0], x.shape[1], SIZES[n]) and out[n].dtype == dtype
        assert torch.equal(out[n], ref[n]), n
        assert out[n].sum() > 0, f"{n} never spikes; the test would be vacuous"
    g_ref = _grads(_loss(ref), leaves)
    g = _grads(_loss(out), leaves)
    for a, b in zip(g, g_ref):
        _close(a, b, dtype, snntorch=True)
    # every parameter receives gradient (including the APL loop)
    assert all(torch.linalg.norm(b) > 0 for b in g_ref)
    if dtype == torch.float64:
        sim = simulate(circ.spec(), x.numpy())
        for n in SIZES:
            np.testing.assert_array_equal(sim[n], out[n].detach().numpy().astype(bool), err_msg=n)


def test_record_membrane_matches_reference_and_spec():
    circ = Circuit(torch.float64, seed=3)
    x = _input(T=40, seed=4)
    leaves = circ.leaves()
    ref = run_reference(x, circ.populations(), circ.projections(), record_membrane=True)
    out = run_layered(x, circ.populations(), circ.projections(), record_membrane=True)
    sim = simulate(circ.spec(), x.numpy(), record_membrane=True)
    for n in SIZES:
        torch.testing.assert_close(out[n + "_mem"], ref[n + "_mem"], rtol=0, atol=0)
        np.testing.assert_allclose(out[n + "_mem"].detach().numpy(), sim[n + "_mem"], rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(_loss(out), leaves), _grads(_loss(ref), leaves)):
        _close(a, b, torch.float64, snntorch=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_path_equals_dense(dtype):
    circ = Circuit(dtype, seed=5)
    x = _input(dtype=dtype, seed=6)
    leaves = circ.leaves()
    dense = run_layered(x, circ.populations(), circ.projections())
    g_dense = _grads(_loss(dense), leaves)
    sparse_all = [("ORN", "PN"), ("PN", "KC"), ("KC", "MBON"), ("APL", "KC"), ("KC", "APL"), ("MBON", "DN")]
    for event in (False, True):
        out = run_layered(x, circ.populations(), circ.projections(sparse=sparse_all), event_driven=event)
        for n in SIZES:
            assert torch.equal(out[n], dense[n]), n
        for a, b in zip(_grads(_loss(out), leaves), g_dense):
            _close(a, b, dtype)


def test_sparse_values_parameter():
    """A per-edge ('values') parameter gives the gradient on the nonzeros only."""
    circ = Circuit(torch.float64, seed=7)
    x = _input(seed=8)
    st = SparseStructure.from_mask(circ.mask["PN", "KC"])
    raw_nnz = st.gather(circ.raw_w["PN", "KC"]).detach().clone().requires_grad_()
    projs = circ.projections()
    projs[1] = {"pre": "PN", "post": "KC", "sparse": st,
                "values": st.gather(circ.mask["PN", "KC"] * circ.sign["PN", "KC"]) * F.softplus(raw_nnz)}
    out = run_layered(x, circ.populations(), projs)
    ref = run_layered(x, circ.populations(), circ.projections())
    for n in SIZES:
        assert torch.equal(out[n], ref[n])
    (g_nnz,) = torch.autograd.grad(_loss(out), [raw_nnz])
    (g_dense,) = torch.autograd.grad(_loss(ref), [circ.raw_w["PN", "KC"]])
    torch.testing.assert_close(g_nnz, st.gather(g_dense))
    assert torch.count_nonzero(g_dense * (1 - circ.mask["PN", "KC"])) == 0


@pytest.mark.parametrize("every", [7, 20])
def test_checkpointed_equals_plain(every):
    circ = Circuit(torch.float64, seed=9)
    x = _input(T=50, seed=10)
    leaves = circ.leaves()
    plain = run_layered(x, circ.populations(), circ.projections())
    ck = run_layered(x, circ.populations(), circ.projections(), checkpoint_every=every)
    for n in SIZES:
        assert torch.equal(ck[n], plain[n])
    for a, b in zip(_grads(_loss(ck), leaves), _grads(_loss(plain), leaves)):
        _close(a, b, torch.float64)


def test_outputs_subset_and_state_continuation():
    """Only requested outputs are returned; two halves with carried state == one run."""
    circ = Circuit(torch.float64, seed=11)
    x = _input(T=40, seed=12)
    leaves = circ.leaves()
    full = run_layered(x, circ.populations(), circ.projections(), outputs=["DN", "MBON"])
    assert set(full) == {"DN", "MBON"}
    a, st = run_layered_with_state(x[:17], circ.populations(), circ.projections(), outputs=["DN", "MBON"])
    b, _ = run_layered_with_state(x[17:], circ.populations(), circ.projections(), outputs=["DN", "MBON"],
                                  initial_state=st)
    joined = {n: torch.cat([a[n], b[n]]) for n in ("DN", "MBON")}
    for n in ("DN", "MBON"):
        assert torch.equal(joined[n], full[n])
    for g1, g2 in zip(_grads(_loss(joined), leaves), _grads(_loss(full), leaves)):
        _close(g1, g2, torch.float64)


def test_self_recurrence_and_larger_component():
    """A KC->KC projection and a PN<->APL loop make a 3-population component."""
    circ = Circuit(torch.float64, seed=13)
    g = torch.Generator().manual_seed(0)
    extra = {("KC", "KC"): (40, 40), ("APL", "PN"): (6, 1), ("PN", "APL"): (1, 6)}
    raws = {k: (torch.randn(s, generator=g, dtype=torch.float64) * 0.3 - 1).requires_grad_() for k, s in extra.items()}
    masks = {k: (torch.rand(s, generator=g) < 0.2).double() for k, s in extra.items()}
    def projs():
        return circ.projections() + [{"pre": pre, "post": post, "weight": masks[pre, post] * -F.softplus(raws[pre, post])}
                                     for pre, post in extra]

    groups = strongly_connected_groups(list(SIZES), [(p["pre"], p["post"]) for p in projs()])
    assert groups == [["ORN"], ["PN", "KC", "APL"], ["MBON"], ["DN"]]
    x = _input(T=40, seed=14)
    leaves = circ.leaves() + list(raws.values())
    ref = run_reference(x, circ.populations(), projs())
    out = run_layered(x, circ.populations(), projs())
    for n in SIZES:
        assert torch.equal(out[n], ref[n]), n
    for a, b in zip(_grads(_loss(out), leaves), _grads(_loss(ref), leaves)):
        _close(a, b, torch.float64, snntorch=True)


def test_sparse_structure_kernels():
    torch.manual_seed(3)
    W = torch.randn(30, 20, dtype=torch.float64) * (torch.rand(30, 20) < 0.2)
    st = SparseStructure.from_mask(W)
    vals = st.gather(W)
    assert st.nnz == int((W != 0).sum())
    torch.testing.assert_close(st.to_dense(vals), W)
    X = (torch.rand(11, 20) < 0.3).double()
    G = torch.randn(11, 30, dtype=torch.float64)
    torch.testing.assert_close(st.spmm(vals, X), X @ W.t())
    torch.testing.assert_close(st.spmm_t(vals, G), G @ W)
    torch.testing.assert_close(st.sddmm(G, X), st.gather(G.t() @ X))
    torch.testing.assert_close(st.event_matmul(vals[st.t_perm], X.bool()), X @ W.t())
    st2 = SparseStructure.from_edges(st.row, st.col, 30, 20)
    torch.testing.assert_close(st2.to_dense(vals), W)


def test_bad_inputs_raise_one_line_errors():
    circ = Circuit(torch.float64)
    x = _input()
    with pytest.raises(ConfigError, match="surrogate"):
        run_layered(x, circ.populations(), circ.projections(), surrogate="relu")
    with pytest.raises(ConfigError, match="channels"):
        run_layered(x[..., :3], circ.populations(), circ.projections())
    projs = circ.projections()
    projs[0] = dict(projs[0], weight=projs[0]["weight"].t())
    with pytest.raises(ConfigError, match="ORN->PN"):
        run_layered(x, circ.populations(), projs)
    projs = circ.projections()
    projs[0] = dict(projs[0], post="LH")
    with pytest.raises(DMNError, match="unknown population 'LH'"):
        run_layered(x, circ.populations(), projs)
    with pytest.raises(ConfigError, match="checkpoint_every"):
        run_layered(x, circ.populations(), circ.projections(), checkpoint_every=0)
    with pytest.raises(ConfigError, match="duplicate"):
        SparseStructure(torch.tensor([0, 0]), torch.tensor([1, 1]), 2, 2)
    with pytest.raises(ConfigError, match="out of range"):
        SparseStructure(torch.tensor([0, 5]), torch.tensor([1, 1]), 2, 2)


def test_engine_import_is_light():
    assert engine.__all__ and "lif_scan" in engine.__all__


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    circ_cpu = Circuit(torch.float64, seed=15)
    circ_gpu = Circuit(torch.float64, seed=15, device="cuda")
    x = _input(seed=16)
    out_c = run_layered(x, circ_cpu.populations(), circ_cpu.projections(sparse=[("PN", "KC")]), checkpoint_every=25)
    out_g = run_layered(x.cuda(), circ_gpu.populations(), circ_gpu.projections(sparse=[("PN", "KC")]), checkpoint_every=25)
    for n in SIZES:
        assert out_g[n].device.type == "cuda"
        assert torch.equal(out_g[n].cpu(), out_c[n])
    g_c = _grads(_loss(out_c), circ_cpu.leaves())
    g_g = _grads(_loss({k: v for k, v in out_g.items()}), circ_gpu.leaves())
    for a, b in zip(g_g, g_c):
        _close(a.cpu(), b, torch.float64)


@pytest.mark.parametrize("chunk_elements", [1, 500])
def test_backward_time_chunking_is_exact(monkeypatch, chunk_elements):
    """The cache-blocked backward gives the same gradients for any chunk size."""
    circ = Circuit(torch.float64, seed=17)
    x = _input(T=30, seed=18)
    leaves = circ.leaves()
    g_full = _grads(_loss(run_layered(x, circ.populations(), circ.projections(), record_membrane=True)), leaves)
    monkeypatch.setattr(scans, "_CHUNK_ELEMENTS", chunk_elements)
    g_chunk = _grads(_loss(run_layered(x, circ.populations(), circ.projections(), record_membrane=True)), leaves)
    for a, b in zip(g_chunk, g_full):
        _close(a, b, torch.float64)


# ---------------------------------------------------------------------------
# binary-spike backward kernels (event-driven dW, sparse-weight dS)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("density", [0.0, 0.003, 0.05, 0.6])
def test_event_weight_grad_equals_gemm(dtype, density, monkeypatch):
    """dW = G^T S over the events of binary S equals the GEMM, sparse or dense S,
    also when the events are processed in several chunks."""
    g = torch.Generator().manual_seed(21)
    G = torch.randn(301, 37, generator=g, dtype=dtype)
    sb = torch.rand(301, 53, generator=g) < density
    ref = G.t() @ sb.to(dtype)
    _close(sparse._event_weight_grad(G, sb), ref, dtype)
    _close(sparse._weight_grad(G, sb), ref, dtype)  # whichever branch the density picks
    monkeypatch.setattr(sparse, "_EVENT_CHUNK_ELEMENTS", 37 * 5)  # 5 events per index_add
    out = sparse._event_weight_grad(G, sb)
    assert out.shape == (37, 53) and out.dtype == dtype
    _close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("density", [0.03, 0.9])
def test_sparse_input_grad_equals_gemm(dtype, density, monkeypatch):
    """dS = G W through the CSR of W^T on row blocks equals the dense GEMM (rows
    not a multiple of the block, weights with and without many zeros)."""
    g = torch.Generator().manual_seed(22)
    W = torch.randn(70, 90, generator=g, dtype=dtype) * (torch.rand(70, 90, generator=g) < density)
    G = torch.randn(333, 70, generator=g, dtype=dtype)
    monkeypatch.setattr(sparse, "_SPARSE_DGRAD_MIN_ELEMENTS", 0)
    monkeypatch.setattr(sparse, "_SPARSE_DGRAD_DENSITY", 1.0)
    csr = sparse._sparse_weight_t(W)
    assert csr is not None and csr.layout == torch.sparse_csr
    _close(sparse._input_grad(G, W, csr), G @ W, dtype)
    monkeypatch.setattr(sparse, "_SPARSE_DGRAD_DENSITY", 0.5)
    assert (sparse._sparse_weight_t(W) is None) == (density > 0.5)
    _close(sparse._input_grad(G, W, None), G @ W, dtype)


_FORCE_SPARSE = {"_EVENT_WGRAD_DENSITY": 1.0, "_EVENT_WGRAD_MIN_POST": 1, "_SPARSE_DGRAD_DENSITY": 1.0,
                 "_SPARSE_DGRAD_MIN_ELEMENTS": 0, "_DGRAD_ROWS": 7}
_FORCE_DENSE = {"_EVENT_WGRAD_DENSITY": -1.0, "_EVENT_WGRAD_MIN_POST": 10**9, "_SPARSE_DGRAD_DENSITY": -1.0}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("density", [0.3, 0.9])
def test_spike_kernels_match_reference(dtype, density, monkeypatch):
    """With the event/sparse backward kernels forced on (and forced off), the
    engine gives the reference's spikes exactly and its gradients to rounding,
    for sparse and dense connectivity (hence sparse and dense spike trains)."""
    circ = Circuit(dtype, seed=23, density=density)
    x = _input(dtype=dtype, seed=24, T=50)
    leaves = circ.leaves()
    ref = run_reference(x, circ.populations(), circ.projections())
    g_ref = _grads(_loss(ref), leaves)
    assert all(ref[n].sum() > 0 for n in SIZES)
    results = {}
    for name, force in (("sparse", _FORCE_SPARSE), ("dense", _FORCE_DENSE)):
        with monkeypatch.context() as mp:
            for key, val in force.items():
                mp.setattr(sparse, key, val)
            out = run_layered(x, circ.populations(), circ.projections())
            for n in SIZES:
                assert torch.equal(out[n], ref[n]), (name, n)
            results[name] = _grads(_loss(out), leaves)
            for a, b in zip(results[name], g_ref):
                _close(a, b, dtype, snntorch=True)
    for a, b in zip(results["sparse"], results["dense"]):
        _close(a, b, dtype)


def test_sparse_kernels_propagate_nonfinite_like_gemm(monkeypatch):
    """NaN in the incoming gradient reaches the same entries as through the dense
    GEMM (NaN * 0 = NaN), so overflowing BPTT fails identically on both paths."""
    for key, val in _FORCE_SPARSE.items():
        monkeypatch.setattr(sparse, key, val)
    g = torch.Generator().manual_seed(25)
    W = torch.randn(20, 30, generator=g) * (torch.rand(20, 30, generator=g) < 0.2)
    W[:, 0] = 0.0  # a presynaptic neuron without synapses
    G = torch.randn(50, 20, generator=g)
    G[3, 4] = float("nan")
    sb = torch.rand(50, 30, generator=g) < 0.05
    torch.testing.assert_close(sparse._weight_grad(G, sb), G.t() @ sb.float(), equal_nan=True)
    spikes = torch.rand(6, 9, 30, generator=g) < 0.05
    x = spikes.float().requires_grad_()
    w = W.clone().requires_grad_()
    out = projections._DelayedDense.apply(x, torch.zeros(9, 30), w, None)
    gx, gw = torch.autograd.grad(out, (x, w), torch.nan_to_num(torch.full_like(out, float("nan")), nan=1.0).index_put_(
        (torch.tensor([2]), torch.tensor([1]), torch.tensor([4])), torch.tensor(float("nan"))))
    ref_x = torch.zeros(6, 9, 30)
    gref = torch.ones(6, 9, 20)
    gref[2, 1, 4] = float("nan")
    ref_x[:-1] = gref[1:] @ W
    torch.testing.assert_close(gx, ref_x, equal_nan=True)
    assert bool(gx[1, 1, 0].isnan())  # through a zero weight, as the GEMM does
