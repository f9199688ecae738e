"""The peer contenders of benchmarks/bptt.py --peers compute the engine's dynamics (not timed).

The plain torch loop (what ``torch.compile`` compiles) runs in ``make test``;
Norse and SpikingJelly only in the peers env (``-m peers``, make peers-env).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import peers  # noqa: E402
from dmn_neuro.simulation.engine import run_layered, run_reference  # noqa: E402
from test_dynamics import SURR, _small_circuit  # noqa: E402


def _leaves(pops, projs):
    pops = [p._replace(beta=p.beta.clone().requires_grad_(), threshold=p.threshold.clone().requires_grad_())
            for p in pops]
    projs = [q._replace(weight=q.weight.clone().requires_grad_()) for q in projs]
    return pops, projs, [p.beta for p in pops] + [p.threshold for p in pops] + [q.weight for q in projs]


def _run(fn, x, pops, projs, params, **kw):
    out = fn(x, pops, projs, **kw)
    k = torch.arange(1.0, 1 + max(v.shape[-1] for v in out.values()), dtype=x.dtype)
    loss = sum(((v.mean(0) - 0.1) ** 2 * k[:v.shape[-1]]).sum() for v in out.values())
    return out, torch.autograd.grad(loss, params)


def _assert_same(out, grads, ref_out, ref_grads, rtol):
    assert set(out) == set(ref_out)
    for key in ref_out:
        assert torch.equal(out[key], ref_out[key]), key
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=rtol, atol=rtol * float(r.abs().max() + 1e-30))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("surrogate,slope", SURR)
def test_plain_loop_is_the_engine(dtype, surrogate, slope):
    """The plain per-step loop (straight-through surrogate, no custom autograd
    Function) gives run_reference's spikes bit for bit and its gradients to rounding,
    with and without torch.utils.checkpoint segments."""
    pops, projs, x = _small_circuit(dtype)
    pops, projs, params = _leaves(pops, projs)
    ref = _run(run_reference, x, pops, projs, params, surrogate=surrogate, slope=slope)
    assert all(v.sum() > 0 for v in ref[0].values())
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    _assert_same(*_run(peers.plain_loop, x, pops, projs, params, surrogate=surrogate, slope=slope), *ref, rtol)
    _assert_same(*_run(peers.plain_loop, x, pops, projs, params, surrogate=surrogate, slope=slope,
                       checkpoint_every=7), *ref, rtol)


@pytest.mark.slow
def test_compiled_plain_loop_is_the_engine():
    """torch.compile of the plain step (inductor, -ffp-contract=off) keeps the engine's spikes."""
    pops, projs, x = _small_circuit(torch.float32)
    pops, projs, params = _leaves(pops, projs)
    ref = _run(run_layered, x, pops, projs, params, outputs=["KC", "DN"])
    _assert_same(*_run(peers.plain_loop, x, pops, projs, params, surrogate="fast_sigmoid", slope=5.0,
                       outputs=["KC", "DN"], compiled=True, checkpoint_every=20), *ref, 1e-4)


@pytest.mark.peers
def test_norse_matches_the_engine_at_its_slope():
    """Norse's LIF box step with the matched parameters and a detached reset:
    the engine's spikes here and its gradients at surrogate slope 1."""
    pytest.importorskip("norse")
    pops, projs, x = _small_circuit(torch.float32)
    pops, projs, params = _leaves(pops, projs)
    ref = _run(run_layered, x, pops, projs, params, slope=peers.PEER_SLOPE)
    _assert_same(*_run(peers.norse_loop, x, pops, projs, params), *ref, 1e-3)


@pytest.mark.peers
def test_spikingjelly_forward_matches_the_engine():
    """SpikingJelly's LIFNode (scalar tau/threshold only, thresholds as input gains):
    the engine's spikes here; its gradients differ by design (see benchmarks/peers.py)."""
    pytest.importorskip("spikingjelly")
    pops, projs, x = _small_circuit(torch.float32)
    with torch.no_grad():
        ref = run_layered(x, pops, projs)
        out = peers.spikingjelly_loop(x, pops, projs)
    for key in ref:
        assert torch.equal(out[key], ref[key]), key
