"""Event-driven CPU kernels (dmn_neuro.simulation.engine.kernels): bit-exact forward against the
GEMM, gradients against dense algebra, the engine on them against the snnTorch
reference (a mid-size random circuit and the shipped model), build cache and
fallback without a compiler."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dmn_neuro.simulation.engine import kernels, runner, scans
from dmn_neuro.simulation.engine import run_layered, run_reference

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "examples" / "pretrained" / "flywire_mb_navigator"


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """A private kernel cache; the module state is restored afterwards."""
    monkeypatch.setenv("DMN_NEURO_KERNEL_CACHE", str(tmp_path / "kernels"))
    kernels._reset_for_tests()
    yield tmp_path / "kernels"
    monkeypatch.undo()
    kernels._reset_for_tests()


def _binary(M, K, density, seed):
    g = torch.Generator().manual_seed(seed)
    S = (torch.rand(M, K, generator=g) < density).float()
    S[0] = 0.0  # a silent row
    S[1] = 1.0  # every input active
    return S


def _sparse_weight(N, K, density, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * (torch.rand(N, K, generator=g) < density)
    W[:, 0] = 0.0  # an input without synapses
    return W


# ---------------------------------------------------------------------------
# the kernels themselves
# ---------------------------------------------------------------------------
def test_library_is_built_once_and_cached(fresh_kernels):
    lib = kernels.library()
    assert lib is not None, kernels.load_error()
    built = list(fresh_kernels.glob("spike_ops-*.so"))
    assert len(built) == 1 and not list(fresh_kernels.glob("*.tmp"))
    stamp = built[0].stat().st_mtime_ns
    kernels._reset_for_tests()
    assert kernels.library() is not None
    assert [p.stat().st_mtime_ns for p in fresh_kernels.glob("spike_ops-*.so")] == [stamp]  # loaded, not rebuilt


@pytest.mark.parametrize("n_pre,n_post", [(124, 700), (440, 124), (2597, 48), (300, 64), (201, 30)])
@pytest.mark.parametrize("density", [0.02, 0.5])
def test_spike_matmul_is_bit_identical_to_the_gemm(n_pre, n_post, density):
    block = kernels.gemm_block_size(n_pre, n_post)
    assert block is not None, "no summation order reproduces torch.mm here"
    S = _binary(200, n_pre, density, seed=n_pre)
    W = _sparse_weight(n_post, n_pre, 0.06, seed=n_post)
    out = kernels.spike_matmul(S, kernels.csr_by_pre(W), block)
    assert torch.equal(out, torch.mm(S, W.t()))
    assert out[1].abs().sum() > 0  # not vacuous
    if n_pre > block:  # a wrong order shows up as rounding differences
        wrong = kernels.spike_matmul(S, kernels.csr_by_pre(W), n_pre)
        assert not torch.equal(wrong, torch.mm(S, W.t()))


def test_gradient_kernels_equal_dense_algebra():
    S = _binary(150, 300, 0.1, seed=1)
    W = _sparse_weight(64, 300, 0.08, seed=2)
    G = torch.randn(150, 64, generator=torch.Generator().manual_seed(3))
    csr = kernels.csr_by_pre(W)
    torch.testing.assert_close(kernels.spike_matmul_input_grad(G, csr), G @ W, rtol=1e-5, atol=1e-5)
    mask = W != 0
    edges = kernels.csr_by_pre(mask, values=False)
    acc = kernels.spike_weight_grad(G, S.bool(), edges)
    full = G.t() @ S
    torch.testing.assert_close(acc, full[edges.idx, edges.pre], rtol=1e-5, atol=1e-5)
    assert acc.numel() == int(mask.sum())


def test_kernels_refuse_wrong_inputs():
    W = _sparse_weight(10, 20, 0.3, seed=4)
    csr = kernels.csr_by_pre(W)
    with pytest.raises(ValueError, match="columns"):
        kernels.spike_matmul(torch.zeros(3, 21), csr, 20)
    with pytest.raises(ValueError, match="float32"):
        kernels.spike_matmul(torch.zeros(3, 20, dtype=torch.float64), csr, 20)
    with pytest.raises(ValueError, match="bool"):
        kernels.spike_weight_grad(torch.zeros(3, 10), torch.zeros(3, 20, dtype=torch.float64),
                                  kernels.csr_by_pre(W != 0, values=False))


def test_weight_grad_from_reset_mask_equals_from_spikes():
    S = _binary(120, 300, 0.05, seed=7)
    G = torch.randn(120, 40, generator=torch.Generator().manual_seed(8))
    edges = kernels.csr_by_pre(_sparse_weight(40, 300, 0.1, seed=9) != 0, values=False)
    torch.testing.assert_close(kernels.spike_weight_grad(G, 1.0 - S, edges), kernels.spike_weight_grad(G, S.bool(), edges),
                               rtol=0, atol=0)


# ---------------------------------------------------------------------------
# the engine on the kernels
# ---------------------------------------------------------------------------
MID = {"ORN": 40, "PN": 30, "KC": 400, "APL": 1, "MBON": 12, "DN": 4}
MID_EDGES = [("ORN", "PN"), ("PN", "KC"), ("KC", "APL"), ("APL", "KC"), ("KC", "MBON"), ("MBON", "DN")]
MID_DENSITY = {("ORN", "PN"): 0.15, ("PN", "KC"): 0.15, ("KC", "MBON"): 0.1}
MID_SCALE = {("ORN", "PN"): 1.2, ("PN", "KC"): 0.5, ("KC", "APL"): 0.02, ("APL", "KC"): 0.3, ("KC", "MBON"): 1.5,
             ("MBON", "DN"): 0.8}


class MidCircuit:
    """Random float32 circuit big and sparse enough for the kernel path (weights
    with >= 4096 entries and <= 25 % nonzero), as leaf parameters."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.raw_beta = {n: torch.tensor(1.5, requires_grad=True) for n in MID}
        self.raw_thr = {n: (torch.rand(s, generator=g) * 0.4 + 0.3).requires_grad_() for n, s in MID.items()}
        self.mask, self.sign, self.raw = {}, {}, {}
        for pre, post in MID_EDGES:
            shape = (MID[post], MID[pre])
            mask = torch.rand(shape, generator=g) < MID_DENSITY.get((pre, post), 1.0)
            sign = -1.0 if pre == "APL" else 1.0
            self.mask[pre, post] = mask
            self.sign[pre, post] = sign
            init = torch.log(torch.expm1(torch.full(shape, MID_SCALE[pre, post])))
            self.raw[pre, post] = (init + 0.3 * torch.randn(shape, generator=g)).requires_grad_()

    def leaves(self):
        return [*self.raw_beta.values(), *self.raw_thr.values(), *self.raw.values()]

    def populations(self):
        return [{"name": n, "beta": torch.sigmoid(self.raw_beta[n]), "threshold": F.softplus(self.raw_thr[n])}
                for n in MID]

    def projections(self, grad_mask=True):
        out = []
        for pre, post in MID_EDGES:
            w = torch.where(self.mask[pre, post], self.sign[pre, post] * F.softplus(self.raw[pre, post]), 0.0)
            q = {"pre": pre, "post": post, "weight": w}
            if grad_mask:
                q["grad_mask"] = self.mask[pre, post]
            out.append(q)
        return out


def _mid_input(T=80, B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, B, MID["ORN"], generator=g) < 0.2).float() * 1.5


def _loss(out):
    total = 0.0
    for k in sorted(out):
        w = torch.linspace(0.5, 1.5, out[k].shape[0])[:, None, None]
        total = total + (out[k] * w).sum() * (1.0 + len(k) / 10)
    return total


def _grads(out, leaves):
    gs = torch.autograd.grad(_loss(out), leaves, allow_unused=True)
    return [torch.zeros_like(l) if g is None else g for g, l in zip(gs, leaves)]


def _assert_grads_close(got, want, rtol=1e-3):
    for a, b in zip(got, want):
        scale = max(float(b.abs().max()), 1e-30)
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = {"fwd": 0, "dgrad": 0, "wgrad": 0}
    for name, key in (("spike_matmul", "fwd"), ("spike_matmul_input_grad", "dgrad"), ("spike_weight_grad", "wgrad")):
        orig = getattr(kernels, name)

        def counted(*a, _orig=orig, _key=key, **kw):
            calls[_key] += 1
            return _orig(*a, **kw)

        monkeypatch.setattr(kernels, name, counted)
    return calls


@pytest.fixture
def group_plans(monkeypatch):
    """The plans the engine hands to its group scans (to see what was fused)."""
    plans = []
    orig = scans._GroupScan.apply

    def spy(plan, *tensors):
        plans.append(plan)
        return orig(plan, *tensors)

    monkeypatch.setattr(scans._GroupScan, "apply", spy)
    return plans


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("checkpoint_every", [None, 30])
def test_engine_on_kernels_matches_reference(kernel_calls, group_plans, checkpoint_every, fuse, monkeypatch):
    monkeypatch.setattr(runner, "_FUSE_PROJECTIONS", fuse)
    circ = MidCircuit()
    x = _mid_input()
    leaves = circ.leaves()
    ref = run_reference(x, circ.populations(), circ.projections())
    for n in MID:
        assert ref[n].sum() > 0, f"{n} never spikes; the test would be vacuous"
    g_ref = _grads(ref, leaves)
    out = run_layered(x, circ.populations(), circ.projections(), checkpoint_every=checkpoint_every)
    for n in MID:
        assert torch.equal(out[n], ref[n]), n
    g = _grads(out, leaves)
    kc_group = [p for p in group_plans if p.sizes == (MID["KC"], MID["APL"])]
    assert kc_group and all(bool(p.fused_in) == fuse and bool(p.fused_out) == fuse for p in kc_group)
    _assert_grads_close(g, g_ref)
    assert kernel_calls["fwd"] > 0 and kernel_calls["dgrad"] > 0 and kernel_calls["wgrad"] > 0
    # structural zeros get no gradient, existing synapses do
    for i, (pre, post) in enumerate(MID_EDGES):
        gw = g[len(MID) * 2 + i]
        assert torch.all(gw[~circ.mask[pre, post]] == 0)
    # the plain torch path gives the same
    monkeypatch.setenv("DMN_NEURO_KERNELS", "0")
    before = dict(kernel_calls)
    out0 = run_layered(x, circ.populations(), circ.projections(), checkpoint_every=checkpoint_every)
    for n in MID:
        assert torch.equal(out0[n], ref[n]), n
    _assert_grads_close(_grads(out0, leaves), g_ref)
    assert kernel_calls == before  # DMN_NEURO_KERNELS=0 really switched them off


@pytest.mark.parametrize("with_apl", [True, False])
def test_fused_projections_with_membranes_and_all_outputs(kernel_calls, group_plans, with_apl):
    """KC spikes also used directly (their gradient adds to the fused one),
    membrane traces recorded, and a KC group without the APL loop (the scan's
    edge-free branch)."""
    circ = MidCircuit(seed=11)
    x = _mid_input(seed=12)

    def args():
        pops, projs = circ.populations(), circ.projections()
        if not with_apl:
            pops = [p for p in pops if p["name"] != "APL"]
            projs = [q for q in projs if "APL" not in (q["pre"], q["post"])]
        return pops, projs

    leaves = [l for l in circ.leaves() if with_apl or l is not circ.raw_beta["APL"] and l is not circ.raw_thr["APL"]
              and l is not circ.raw["KC", "APL"] and l is not circ.raw["APL", "KC"]]
    ref = run_reference(x, *args(), record_membrane=True)
    out = run_layered(x, *args(), record_membrane=True)
    assert set(out) == set(ref)
    for k in ref:
        assert torch.equal(out[k], ref[k]), k
    assert any(p.fused_in and p.fused_out for p in group_plans)
    _assert_grads_close(_grads(out, leaves), _grads(ref, leaves))


def test_fused_projections_propagate_nan_like_the_gemm(kernel_calls, group_plans):
    """A NaN in the loss gradient spreads through the fused projections to the
    same parameter entries as through the reference's GEMMs (NaN * 0 = NaN)."""
    circ = MidCircuit(seed=13)
    x = _mid_input(seed=14)
    leaves = circ.leaves()

    def nan_loss(o):
        w = torch.ones_like(o["MBON"])
        w[40, 1, 3] = float("nan")
        return (o["MBON"] * w).sum() + o["DN"].sum()

    res = []
    for run in (run_reference, run_layered):
        o = run(x, circ.populations(), circ.projections(), outputs=["MBON", "DN"])
        gs = torch.autograd.grad(nan_loss(o), leaves, allow_unused=True)
        res.append([torch.zeros_like(l) if g is None else g for g, l in zip(gs, leaves)])
    assert any(p.fused_out for p in group_plans)
    n_nan = 0
    for a, b in zip(*res):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        n_nan += int(torch.isnan(a).sum())
        fa = torch.isfinite(a)
        if fa.any():
            torch.testing.assert_close(a[fa], b[fa], rtol=1e-3, atol=1e-3 * float(b[fa].abs().max()))
    assert n_nan > 0


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_small_batches_stay_bit_identical(batch, kernel_calls):
    """MKL sums GEMMs with fewer than 4 rows in another order; the engine then
    runs the reference's per-step GEMMs (and no kernels), so membranes match to the bit."""
    circ = MidCircuit(seed=17)
    x = _mid_input(B=batch, seed=18)
    ref = run_reference(x, circ.populations(), circ.projections(), record_membrane=True)
    out = run_layered(x, circ.populations(), circ.projections(), record_membrane=True)
    for k in ref:
        assert torch.equal(out[k], ref[k]), k
    assert kernel_calls["fwd"] == 0


def test_engine_without_grad_mask_computes_full_weight_gradient(kernel_calls):
    """Without a grad_mask the weight gradient is the full dense one (the
    gradient w.r.t. a structurally zero entry is not zero in general)."""
    circ = MidCircuit(seed=3)
    x = _mid_input(seed=4)
    projs = circ.projections(grad_mask=False)
    w = projs[1]["weight"].detach().requires_grad_()
    projs[1]["weight"] = w
    ref = run_reference(x, circ.populations(), projs)
    g_ref = torch.autograd.grad(_loss(ref), w)[0]
    out = run_layered(x, circ.populations(), projs)
    g = torch.autograd.grad(_loss(out), w)[0]
    assert kernel_calls["fwd"] > 0 and kernel_calls["wgrad"] == 0
    assert g[~circ.mask["PN", "KC"]].abs().sum() > 0
    _assert_grads_close([g], [g_ref])


def test_engine_without_compiler_falls_back(fresh_kernels, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level("WARNING", logger="dmn_neuro.simulation.engine.kernels"):
        assert not kernels.available()
    assert "no C compiler" in kernels.load_error() and "using torch instead" in caplog.text
    circ = MidCircuit(seed=5)
    x = _mid_input(seed=6)
    ref = run_reference(x, circ.populations(), circ.projections())
    out = run_layered(x, circ.populations(), circ.projections())
    for n in MID:
        assert torch.equal(out[n], ref[n]), n
    _assert_grads_close(_grads(out, circ.leaves()), _grads(ref, circ.leaves()))


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("DMN_NEURO_KERNELS", "0")
    assert kernels.library() is None and not kernels.available()
    assert "DMN_NEURO_KERNELS" in kernels.load_error()


def test_bad_grad_mask_is_a_config_error():
    from dmn_neuro.errors import ConfigError

    circ = MidCircuit()
    projs = circ.projections()
    projs[1]["grad_mask"] = projs[1]["grad_mask"].float()
    with pytest.raises(ConfigError, match="grad_mask must be a bool tensor"):
        run_layered(_mid_input(), circ.populations(), projs)


def test_shipped_circuit_engine_matches_snntorch_reference(kernel_calls):
    """The issue's acceptance on the shipped model: same spikes in every
    population, every parameter's gradient equal to float tolerance."""
    from dmn_neuro.training.checkpoint import load_circuit
    from dmn_neuro.environment.odors import OdorEncoder, static_odor_input
    from dmn_neuro.training.optimizer import default_current_per_hz

    circ = load_circuit(SHIPPED)[0]
    enc = OdorEncoder(circ.orn_glomeruli, dt_ms=circ.semantics.dt_ms, encoding="poisson",
                      current_per_hz=default_current_per_hz(circ))
    x = torch.as_tensor(static_odor_input(enc, enc.odors[:4], 120, generator=torch.Generator().manual_seed(0)))
    params = [p for p in circ.parameters() if p.requires_grad]
    args = (circ.population_params(), circ.projection_weights(), circ.surrogate, circ.surrogate_slope)
    ref = run_reference(x, *args)
    assert all(ref[n].sum() > 0 for n in circ.population_names)
    out = run_layered(x, circ.population_params(), circ.projection_weights(), circ.surrogate, circ.surrogate_slope)
    for n in circ.population_names:
        assert torch.equal(out[n], ref[n]), n

    def grads(o):
        loss = sum((o[n].mean(0) * torch.linspace(0.5, 1.5, o[n].shape[-1])).sum() for n in ("KC", "MBON", "DN"))
        return [torch.zeros_like(p) if g is None else g
                for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)]

    g_ref = grads(ref)
    assert sum(int(g.abs().sum() > 0) for g in g_ref) >= len(params) - 2
    _assert_grads_close(grads(out), g_ref)
    assert kernel_calls["fwd"] >= 2 and kernel_calls["dgrad"] >= 2 and kernel_calls["wgrad"] >= 2


# ---------------------------------------------------------------------------
# the build cache is guarded: private directory, sha256 record, rebuild on mismatch
# ---------------------------------------------------------------------------
PLANTED_C = """
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("constructor ran", f); fclose(f); }
}
"""


def _planted_library(tmp_path, marker):
    import subprocess

    src = tmp_path / "planted.c"
    src.write_text(PLANTED_C)
    lib = tmp_path / "planted.so"
    subprocess.run([kernels._compiler(), "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(lib), str(src)],
                   check=True, capture_output=True, timeout=120)
    return lib


def _sha256(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_planted_library_is_rebuilt_never_loaded(fresh_kernels, tmp_path):
    import ctypes
    import shutil

    assert kernels.library() is not None, kernels.load_error()
    (target,) = fresh_kernels.glob("spike_ops-*.so")
    record = target.with_name(target.name + ".sha256")
    assert record.read_text().strip() == _sha256(target)
    marker = tmp_path / "constructor_ran"
    planted = _planted_library(tmp_path, marker)
    for case in ("record of the real library", "no record", "symbolic link"):
        kernels._reset_for_tests()
        target.unlink()
        if case == "symbolic link":
            target.symlink_to(planted)
        else:
            shutil.copyfile(planted, target)
        if case == "no record":
            record.unlink()
        assert kernels.library() is not None, kernels.load_error()
        assert not marker.exists(), f"{case}: the planted library was loaded"
        assert not target.is_symlink() and _sha256(target) != _sha256(planted), case
        assert record.read_text().strip() == _sha256(target), case
        W = _sparse_weight(30, 200, 0.1, seed=1)
        S = _binary(8, 200, 0.2, seed=2)
        torch.testing.assert_close(kernels.spike_matmul(S, kernels.csr_by_pre(W), 200), S @ W.t())
    assert list(fresh_kernels.glob("spike_ops-*.so")) == [target] and not list(fresh_kernels.glob("*.tmp"))
    ctypes.CDLL(str(planted))  # not vacuous: loading the planted library does run its constructor
    assert marker.read_text() == "constructor ran"


def test_the_cache_directory_is_private(fresh_kernels):
    import stat

    assert kernels.library() is not None, kernels.load_error()
    assert stat.S_IMODE(fresh_kernels.stat().st_mode) == 0o700
    (target,) = fresh_kernels.glob("spike_ops-*.so")
    stamp = target.stat().st_mtime_ns
    kernels._reset_for_tests()
    fresh_kernels.chmod(0o777)
    assert kernels.library() is not None, kernels.load_error()
    assert stat.S_IMODE(fresh_kernels.stat().st_mode) == 0o700  # tightened
    assert target.stat().st_mtime_ns == stamp  # and the verified library loaded, not rebuilt


def test_a_cache_directory_of_another_user_is_refused(fresh_kernels, monkeypatch, caplog):
    import os

    fresh_kernels.mkdir(mode=0o755)
    monkeypatch.setattr(kernels, "_euid", lambda: os.geteuid() + 1)  # as if someone else owned it
    with caplog.at_level("WARNING", logger="dmn_neuro.simulation.engine.kernels"):
        assert kernels.library() is None and not kernels.available()
        assert kernels.library() is None
    assert "belongs to another user" in kernels.load_error()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "using torch instead" in warnings[0].getMessage()
    assert not list(fresh_kernels.iterdir())  # nothing built or loaded there
    assert (fresh_kernels.stat().st_mode & 0o777) == 0o755  # and not touched


def test_a_cache_path_that_is_a_file_is_refused(fresh_kernels):
    fresh_kernels.parent.mkdir(parents=True, exist_ok=True)
    fresh_kernels.write_text("not a directory")
    assert kernels.library() is None and kernels.load_error()
