"""Snapping to the Loihi fixed-point grid and quantisation-aware fine-tuning (dmn_neuro.training.qat, cli_qat)."""
import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from connectome.adjacency_matrix import ConstrainedWeight
from dmn_neuro.training.checkpoint import load_circuit, save_checkpoint
from dmn_neuro.simulation.mechanism import CircuitStructure, DifferentiableOlfactoryCircuit
from dmn_neuro.training.config import TrainingConfig
from dmn_neuro.errors import ExportError
from dmn_neuro.simulation.spec import simulate
from dmn_neuro.cli.quantize import quantize_cmd
from dmn_neuro.simulation.fixed_point import DECAY_UNITY, quantize, simulate_fixed
from dmn_neuro.training.qat import (ZERO_MAGNITUDE, FakeQuantization, _write_spec, compensated_spec, dequantize,
                           fixed_point_differences, qat_finetune, snap_circuit_to_grid)

from test_lava_export import SIZES, small_input, small_spec  # noqa: E402  (tests dir is on sys.path)

GLOMERULI = ["DM1", "DL5", "VA2", "DM2", "DM4", "VM2", "DL1", "DC1"]  # one ORN each (SIZES["ORN"] == 8)
PROJECTIONS = [("ORN", "PN"), ("PN", "KC"), ("KC", "APL"), ("APL", "KC"), ("KC", "MBON"), ("MBON", "DN")]
NO_COMP = {"truncation_bias_lsb": 0.0, "threshold_margin_lsb": 0.0, "leak_lsb": 0.0}


def tiny_circuit(seed: int = 0) -> DifferentiableOlfactoryCircuit:
    """A circuit with SIZES, random masks/signs/magnitudes (some tiny: they round to 0), DN bias."""
    g = torch.Generator().manual_seed(seed)
    structure = CircuitStructure(
        layer_sizes=dict(SIZES), projections=list(PROJECTIONS), provenance={}, cell_types={}, root_ids={},
        glomeruli={"ORN": list(GLOMERULI)}, source="test", version="0")
    c = DifferentiableOlfactoryCircuit(structure=structure, dt_ms=1.0, engine="snntorch", bias={"DN": 0.2})
    signs = {"ORN": 1.0, "KC": 1.0, "APL": -1.0, "MBON": None, "PN": None}
    for pre, post in PROJECTIONS:
        n_post, n_pre = SIZES[post], SIZES[pre]
        mask = torch.rand(n_post, n_pre, generator=g) < 0.7
        mag = torch.rand(n_post, n_pre, generator=g) * 0.8 + 0.02
        mag[0, :] = torch.where(mask[0], torch.full((n_pre,), 1e-4), mag[0])  # rounds to 0 on the grid
        s = signs[pre]
        sign = torch.full((n_pre,), s) if s is not None else torch.where(torch.rand(n_pre, generator=g) < 0.3, -1.0, 1.0)
        c.weights[c._wkey(pre, post)] = ConstrainedWeight(mag, sign, mask)
    with torch.no_grad():
        for name in c.population_names:
            c.cells[name].raw_threshold.add_(torch.rand(SIZES[name], generator=g) * 0.5)
    return c


def test_dequantize_is_exact_and_round_trips():
    spec = small_spec()
    fps = quantize(spec)
    back = dequantize(fps, like=spec)
    assert fixed_point_differences(fps, quantize(back)) == []
    for p in fps.populations:
        bp = back.population(p.name)
        assert bp.beta == 1.0 - p.dv / DECAY_UNITY
        np.testing.assert_array_equal(bp.threshold, spec.population(p.name).threshold)
        np.testing.assert_allclose(bp.bias, p.bias_mant * bp.threshold / p.vth, rtol=1e-15)
    for q, bq in zip(fps.projections, back.projections):
        theta = back.population(q.post).threshold[:, None]
        np.testing.assert_allclose(bq.weight, q.weight * theta / fps.population(q.post).vth, rtol=1e-15, atol=0)
        assert np.array_equal(bq.weight == 0, q.weight == 0)
    assert back.metadata["dequantized_from"] == "loihi2-fixed-point"
    # compensation stays inside the rounding slack: same integers again
    assert fixed_point_differences(fps, quantize(compensated_spec(fps, like=spec))) == []
    assert fixed_point_differences(fps, quantize(compensated_spec(fps, like=spec, **NO_COMP))) == []


def test_snap_is_idempotent_and_keeps_masks_and_signs():
    c = tiny_circuit()
    masks = {k: w.mask.clone() for k, w in c.weights.items()}
    signs = {k: w.sign.clone() for k, w in c.weights.items()}
    thresholds = {n: c.cells[n].threshold.detach().clone() for n in c.population_names}
    rep = snap_circuit_to_grid(c)
    assert rep["idempotent"] and rep["rounds"] >= 1
    assert rep["epsilon_synapses"] > 0 and set(rep["biases_added"]) == {"PN", "KC", "APL", "MBON"}
    fps = quantize(c.to_spec())
    assert fixed_point_differences(fps, quantize(c.to_spec())) == []
    state = copy.deepcopy(c.state_dict())
    rep2 = snap_circuit_to_grid(c)  # snapping a snapped circuit changes nothing
    assert rep2["biases_added"] == []
    for k, v in c.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert fixed_point_differences(fps, quantize(c.to_spec())) == []
    n_zeroed = 0
    for (pre, post), q in zip(PROJECTIONS, fps.projections):
        k = c._wkey(pre, post)
        w = c.weights[k]
        assert torch.equal(w.mask, masks[k]) and torch.equal(w.sign, signs[k])
        eff = w().detach()
        assert torch.all(eff[~w.mask] == 0)
        assert torch.all((eff == 0) | (torch.sign(eff) == w.sign[None, :].expand_as(eff)))
        # synapses whose integer weight is 0 carry an epsilon magnitude, the others a real one
        tiny = (w.magnitude().detach() <= 10 * ZERO_MAGNITUDE).numpy()
        mask = w.mask.numpy()
        np.testing.assert_array_equal(tiny & mask, mask & (q.weight == 0))
        n_zeroed += int((mask & (q.weight == 0)).sum())
    assert n_zeroed == rep["epsilon_synapses"] > 0
    for n in c.population_names:
        assert torch.equal(c.cells[n].threshold.detach(), thresholds[n])


def test_snap_without_compensation_writes_the_dequantized_model():
    c = tiny_circuit(1)
    fps0 = quantize(c.to_spec())
    snap_circuit_to_grid(c, **NO_COMP)
    spec = c.to_spec()
    assert fixed_point_differences(fps0, quantize(spec)) == []
    want = dequantize(fps0, like=spec)
    for q, wq in zip(spec.projections, want.projections):
        nz = wq.weight != 0
        np.testing.assert_allclose(q.weight[nz], wq.weight[nz], rtol=2e-6)
        assert np.all(np.abs(q.weight[~nz]) <= ZERO_MAGNITUDE)
    for p in spec.populations:
        assert abs(p.beta - want.population(p.name).beta) < 1e-7
        np.testing.assert_allclose(p.bias, want.population(p.name).bias, rtol=2e-7, atol=1e-12)


def test_sign_flip_and_zero_policy_raise_one_line_errors():
    c = tiny_circuit(2)
    spec = c.to_spec()
    spec.projections[0].weight[1, :] *= -1.0  # would need a sign flip
    with pytest.raises(ExportError, match="sign flip"):
        _write_spec(c, spec, "epsilon")
    with pytest.raises(ExportError, match="round to 0") as err:
        snap_circuit_to_grid(tiny_circuit(2), zero_policy="raise")
    assert "\n" not in str(err.value)
    with pytest.raises(ExportError, match="zero_policy"):
        snap_circuit_to_grid(tiny_circuit(2), zero_policy="nope")
    with pytest.raises(ExportError, match="leak_lsb"):
        snap_circuit_to_grid(tiny_circuit(2), leak_lsb=-1.0)


def _mismatch(a, b):
    return {n: float(np.mean(a[n] != b[n])) for n in a if not n.endswith("_mem")}


def test_snapped_float_model_matches_the_fixed_point_emulator():
    """Rounding alone vs snapping: the float model on the grid differs from Loihi only by truncation."""
    spec = small_spec(3)
    x = small_input(T=1000, B=4, seed=5)
    fps = quantize(spec)
    fixed = simulate_fixed(fps, x)
    plain = _mismatch(simulate(spec, x), fixed)
    snapped = _mismatch(simulate(compensated_spec(fps, like=spec), x), fixed)
    exact_grid = _mismatch(simulate(dequantize(fps, like=spec), x), fixed)
    # measured (seed 3, 4 x 1000 steps): plain rounding KC 3.05%, MBON 7.58%, DN 6.80%;
    # exact grid KC 0.097%, MBON 0.26%, DN 0.23%; compensated KC 0.087%, MBON 0.215%, DN 0.175%
    # (the rest: Loihi's decay truncation and the rounding of the graded ORN input)
    for name, bound in (("KC", 0.003), ("MBON", 0.005), ("DN", 0.005)):
        assert snapped[name] <= bound, (name, snapped)
        assert exact_grid[name] <= 2 * bound, (name, exact_grid)
        assert plain[name] >= 0.02, (name, plain)
    assert sum(snapped.values()) < sum(exact_grid.values()) < sum(plain.values()) / 10


def test_fake_quantisation_forward_is_the_grid_and_backward_is_straight_through():
    c = tiny_circuit(4).double()
    keys = set(c.state_dict())
    with FakeQuantization(c) as fq:
        want = dequantize(fq.fps)
        for (pre, post), wq in zip(PROJECTIONS, want.projections):
            w = c.weight(pre, post)()
            np.testing.assert_allclose(w.detach().numpy(), wq.weight, rtol=1e-12, atol=1e-15)
        for p in want.populations:
            assert float(c.cells[p.name].beta.detach()) == pytest.approx(p.beta, abs=1e-12)
        np.testing.assert_allclose(c.bias("DN").detach().numpy(), want.population("DN").bias, rtol=1e-12)
        cw = c.weight("PN", "KC")
        cw.raw.grad = None
        cw().sum().backward()
        expect = torch.where(cw.mask, torch.sigmoid(cw.raw.detach()) * cw.sign[None, :], torch.zeros_like(cw.raw))
        torch.testing.assert_close(cw.raw.grad, expect)
        raw_beta = c.cells["KC"].parametrizations.raw_beta.original
        c.cells["KC"].beta.backward()
        assert raw_beta.grad is not None and float(raw_beta.grad) != 0.0
    assert set(c.state_dict()) == keys
    assert isinstance(c.cells["KC"].raw_beta, torch.nn.Parameter)


def _config():
    return TrainingConfig(episode_length_steps=30, batch_size=2, dt_ms=1.0, engine="snntorch", device="cpu",
                          bias={"DN": 0.2}, encoding="rate", hill_k=None, arena={"speed_gain": 0.015})


def test_qat_finetune_uses_the_trainer_and_ends_on_the_grid():
    from dmn_neuro.training.optimizer import DMNTrainer, build_components

    c = tiny_circuit(5)
    cfg = _config()
    c, _, _, _, loss_fn = build_components(cfg, circuit=c, device=torch.device("cpu"))
    trainer = DMNTrainer(c, loss_fn, cfg)
    before = {k: v.detach().clone() for k, v in c.state_dict().items()}
    res = qat_finetune(trainer, 2)
    assert [r["episode"] for r in res["records"]] == [0, 1] and trainer.episode == 2
    assert all(np.isfinite(r["total"]) for r in res["records"])
    assert any(not torch.equal(before[k], v) for k, v in c.state_dict().items() if k in before)
    fps = quantize(c.to_spec())
    assert fixed_point_differences(fps, quantize(c.to_spec())) == []
    assert not any("parametrizations" in k for k in c.state_dict())


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qat") / "ck"
    save_checkpoint(path, tiny_circuit(6), _config(), 3)
    return path


def test_cli_quantize_writes_a_snapped_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "snapped"
    res = CliRunner().invoke(quantize_cmd, [str(tiny_checkpoint), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["checkpoint"] == str(out) and rep["snap"]["idempotent"]
    assert set(rep["quantisation_before"]["populations"]) == set(SIZES)
    assert rep["quantisation_after"]["projections"]["PN->KC"]["rel_weight_error"] < \
        rep["quantisation_before"]["projections"]["PN->KC"]["rel_weight_error"]
    c, ck = load_circuit(out)
    assert ck["meta"]["episode"] == 3 and ck["meta"]["extra"]["fixed_point_snap"]["finetune_episodes"] == 0
    fps = quantize(c.to_spec())
    assert fixed_point_differences(fps, quantize(c.to_spec())) == []
    # a table without --json; a missing checkpoint is one line, non-zero exit, nothing written
    res = CliRunner().invoke(quantize_cmd, [str(tiny_checkpoint), "-o", str(tmp_path / "t")])
    assert res.exit_code == 0 and "KC->MBON" in res.output
    proc = subprocess.run(
        [sys.executable, "-c", "from dmn_neuro.cli import main; from dmn_neuro.cli.quantize import quantize_cmd; "
         "import dmn_neuro.cli as m; m.cli.add_command(quantize_cmd); main()",
         "quantize", str(tmp_path / "missing"), "-o", str(tmp_path / "never")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "not found" in proc.stderr
    assert not (tmp_path / "never").exists()


def test_clip_weights_makes_an_unrepresentable_model_deployable(tmp_path):
    """A weight above 254 thresholds cannot be held by Loihi (one-line error naming the fix);
    --clip-weights clips it (and only the weights above the cap) and the snap then succeeds."""
    c = tiny_circuit(7)
    cw = c.weight("APL", "KC")
    i, j = map(int, torch.nonzero(cw.mask)[0])
    with torch.no_grad():
        cw.raw[i, j] = 1000.0  # softplus(1000) = 1000 magnitude: ~1000 thresholds
    with pytest.raises(ExportError, match="clip-weights"):
        quantize(c.to_spec())
    before = c.to_spec()
    path = tmp_path / "big"
    save_checkpoint(path, c, _config(), 3)
    res = CliRunner().invoke(quantize_cmd, [str(path), "-o", str(tmp_path / "bad")])
    assert res.exit_code != 0 and "clip-weights" in str(res.exception) and not (tmp_path / "bad").exists()
    res = CliRunner().invoke(quantize_cmd, [str(path), "-o", str(tmp_path / "ok"), "--clip-weights", "4", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    over = {q.name: int((np.abs(q.weight) > 4 * q_th[:, None]).sum())
            for q, q_th in ((q, before.population(q.post).threshold) for q in before.projections)}
    assert rep["clipped"] == over and rep["clipped"]["APL->KC"] >= 1
    snapped, ck = load_circuit(tmp_path / "ok")
    assert ck["meta"]["extra"]["fixed_point_snap"]["clip_weight_thresholds"] == 4.0
    after = snapped.to_spec()
    for q in after.projections:
        th = after.population(q.post).threshold[:, None]
        assert np.all(np.abs(q.weight) <= 4 * th * (1 + 1e-3) + 1e-6), q.name
    res = CliRunner().invoke(quantize_cmd, [str(path), "-o", str(tmp_path / "z"), "--clip-weights", "0"])
    assert res.exit_code == 2 and not (tmp_path / "z").exists()
    with pytest.raises(Exception, match="clip_weight_thresholds"):
        TrainingConfig.from_dict({**_config().to_dict(), "deployment": {"clip_weight_thresholds": -1}})


def test_cli_quantize_with_finetuning(tiny_checkpoint, tmp_path):
    out = tmp_path / "qat"
    res = CliRunner().invoke(quantize_cmd, [str(tiny_checkpoint), "-o", str(out), "--finetune-episodes", "1", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert [r["episode"] for r in rep["finetune"]] == [3]
    c, ck = load_circuit(out)
    assert ck["meta"]["episode"] == 4 and len(ck["meta"]["loss_history"]) == 1


@pytest.mark.lava
def test_snapped_circuit_through_the_lava_worker(tmp_path):
    from exporters.lava_export import export_lava
    from exporters.lava_runner import run_lava

    c = tiny_circuit(7)
    snap_circuit_to_grid(c)
    spec = c.to_spec()
    x = small_input(T=200, B=2, seed=8)
    res = export_lava(spec, tmp_path / "fx", fixed_point=True)
    lava = run_lava(res["graph_dir"], x, fixed_point=True)
    emu = simulate_fixed(res["fixed_point_spec"], x)
    assert _mismatch(lava, emu) == {n: 0.0 for n in spec.population_names}
    ref = simulate(spec, x)
    mm = _mismatch(ref, lava)
    assert mm["KC"] <= 0.01 and mm["MBON"] <= 0.01 and mm["DN"] <= 0.02, mm
