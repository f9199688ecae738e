"""The recurrent group (KC <-> APL) stepped in C (dmn_neuro.simulation.engine.group_kernel)
against the torch loop of _GroupScan: spikes, membranes and every gradient bit for bit
(float32 CPU), on a small random circuit, on the shipped model with real odor input and
in the blocked closed loop. Behaviour only, no timing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dmn_neuro.simulation.engine import group_kernel, kernels, run_layered, run_layered_with_state, scans
from dmn_neuro.simulation.engine.contract import PopulationState

from _helpers import make_trainer, tiny_config
from test_engine import SIZES, Circuit, _grads, _input, _loss

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"C kernels unavailable: {kernels.load_error()}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns (signed zeros and NaN payloads count)."""
    return t.detach().contiguous().view(torch.int32)


def _assert_bits(a, b, what):
    for k in a:
        assert torch.equal(_bits(a[k]), _bits(b[k])), f"{what}: {k}"


@pytest.fixture
def spy(monkeypatch):
    """Records, per group scan with recurrent edges, whether the C steps ran."""
    used = []
    orig = group_kernel.plan

    def plan(edges, *a, **k):
        res = orig(edges, *a, **k)
        if edges:
            used.append(res is not None)
        return res

    monkeypatch.setattr(group_kernel, "plan", plan)
    return used


def _both(monkeypatch, fn):
    """``fn()`` with the C steps, then with the torch loop."""
    out_c = fn()
    with monkeypatch.context() as mp:
        mp.setattr(group_kernel, "ENABLED", False)
        out_t = fn()
    return out_c, out_t


@pytest.mark.parametrize("B,T,chunk", [(4, 37, None), (8, 23, 700), (12, 41, 1)])
def test_random_circuit_bit_identical(monkeypatch, spy, B, T, chunk):
    """Spikes, membrane traces and all gradients equal the torch loop bit for bit,
    for batches > 1, T not a multiple of the time chunk (``chunk``: elements per
    chunk, forcing several chunks in both passes)."""
    if chunk is not None:
        monkeypatch.setattr(scans, "_CHUNK_ELEMENTS", chunk)
    circ = Circuit(torch.float32, seed=31)
    x = _input(T=T, B=B, dtype=torch.float32, seed=32)
    leaves = circ.leaves()

    def run():
        out = run_layered(x, circ.populations(), circ.projections(), record_membrane=True)
        return out, dict(zip(map(str, range(len(leaves))), _grads(_loss(out), leaves)))

    (out_c, g_c), (out_t, g_t) = _both(monkeypatch, run)
    assert spy[0] is True and spy[-1] is False  # the C steps ran, then the torch loop
    assert out_c["KC"].sum() > 0 and out_c["APL"].sum() > 0
    _assert_bits(out_c, out_t, "outputs")
    _assert_bits(g_c, g_t, "gradients")


def test_continued_state_and_checkpointing_bit_identical(monkeypatch, spy):
    """From a non-zero initial state (gradients reach it), in checkpointed segments."""
    circ = Circuit(torch.float32, seed=33)
    x = _input(T=29, B=8, dtype=torch.float32, seed=34)
    leaves = circ.leaves()

    def run():
        out1, st = run_layered_with_state(x[:13], circ.populations(), circ.projections())
        st = {n: PopulationState(s.mem.detach().requires_grad_(), s.spikes) for n, s in st.items()}
        out2, _ = run_layered_with_state(x[13:], circ.populations(), circ.projections(), initial_state=st,
                                         checkpoint_every=5, record_membrane=True)
        mem0 = [st[n].mem for n in SIZES]
        gs = torch.autograd.grad(_loss(out1) + _loss(out2), leaves + mem0, allow_unused=True)
        gs = [torch.zeros(1) if g is None else g for g in gs]
        return {**{f"a{k}": v for k, v in out1.items()}, **{f"b{k}": v for k, v in out2.items()}}, \
            dict(zip(map(str, range(len(gs))), gs))

    (out_c, g_c), (out_t, g_t) = _both(monkeypatch, run)
    assert True in spy and False in spy
    _assert_bits(out_c, out_t, "outputs")
    _assert_bits(g_c, g_t, "gradients")


def test_shipped_model_on_odors_bit_identical(monkeypatch, spy):
    """The trained FlyWire model (KC 2597 <-> APL 1) on Poisson-encoded real odors."""
    from dmn_neuro.environment.odors import OdorEncoder, static_odor_input
    from dmn_neuro.training.checkpoint import load_circuit
    from dmn_neuro.training.optimizer import default_current_per_hz

    circ = load_circuit(REPO / "examples" / "pretrained" / "flywire_mb_navigator")[0]
    enc = OdorEncoder(circ.orn_glomeruli, dt_ms=circ.semantics.dt_ms, encoding="poisson",
                      current_per_hz=default_current_per_hz(circ))
    B, T = 8, 61
    x = torch.as_tensor(static_odor_input(enc, enc.odors[:B], T, concentration=1.0,
                                          generator=torch.Generator().manual_seed(0)), dtype=torch.float32)

    def run():
        circ.zero_grad(set_to_none=True)
        out = run_layered(x, circ.population_params(), circ.projection_weights(), surrogate=circ.surrogate,
                          slope=circ.surrogate_slope, record_membrane=True)
        _loss(out).backward()
        return out, {n: p.grad.clone() for n, p in circ.named_parameters() if p.grad is not None}

    (out_c, g_c), (out_t, g_t) = _both(monkeypatch, run)
    assert spy[0] is True and spy[-1] is False
    assert out_c["KC"].sum() > 0 and out_c["APL"].sum() > 0
    assert g_c.keys() == g_t.keys() and "weights.KC_to_APL.raw" in g_c
    _assert_bits(out_c, out_t, "outputs")
    _assert_bits(g_c, g_t, "gradients")


@pytest.mark.parametrize("B", [2, 6])  # 4 and 12 rows (both hemispheres)
def test_blocked_closed_loop_bit_identical(monkeypatch, spy, B):
    """The blocked closed-loop runner (groups advanced a few steps per call)."""
    tr = make_trainer(tiny_config())

    def run():
        tr.circuit.zero_grad(set_to_none=True)
        from dmn_neuro.training.optimizer import episode_generator

        ro = tr.agent.rollout(B, 33, episode_generator(5, 1), closed_loop="blocked")
        tr.compute_loss(ro)["total"].backward()
        return ({**ro.activations, "positions": ro.positions},
                {n: p.grad.clone() for n, p in tr.circuit.named_parameters() if p.grad is not None})

    (out_c, g_c), (out_t, g_t) = _both(monkeypatch, run)
    assert spy[0] is True and spy[-1] is False
    assert out_c["KC"].sum() > 0
    _assert_bits(out_c, out_t, "rollout")
    assert g_c.keys() == g_t.keys() and g_c
    _assert_bits(g_c, g_t, "gradients")


def test_falls_back_where_the_order_is_not_reproduced():
    """float64, sparse or full-matrix recurrent edges: the torch loop (plan is None)."""
    w_kc_apl, w_apl_kc = torch.rand(1, 40), -torch.rand(40, 1)
    edges = ((1, 0, None), (0, 1, None))
    assert group_kernel.plan(edges, (w_kc_apl, w_apl_kc), 8, torch.zeros(1), ()) is not None
    assert group_kernel.plan(edges, (w_kc_apl.double(), w_apl_kc.double()), 8, torch.zeros(1).double(), ()) is None
    assert group_kernel.plan(((1, 0, None),), (torch.rand(3, 40),), 8, torch.zeros(1), ()) is None
    assert group_kernel.plan(edges, (w_kc_apl, w_apl_kc), 8, torch.zeros(1), (torch.zeros(2).double(),)) is None
