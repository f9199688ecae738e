"""BPTT training: gradients, Dale/mask invariants, determinism, NaN handling,
TrainingConfig validation, and kill -9 + resume (real subprocesses).

Behaviour only: nothing here depends on learning succeeding.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dmn_neuro.training.config import TrainingConfig, resolve_device
from dmn_neuro.errors import ConfigError, TrainingError
from dmn_neuro.training.optimizer import TRAIN_STREAM, DMNTrainer, build_components

from _helpers import TINY_YAML, make_trainer, tiny_config








def test_tiny_config_is_valid_and_small():
    cfg = TrainingConfig.from_yaml(TINY_YAML)
    assert cfg.episode_length_steps == 60 and cfg.batch_size == 2 and cfg.dt_ms == 2.0
    assert cfg.hill_k is None and cfg.encoding == "poisson"


# -- gradients -----------------------------------------------------------------------
#: A regime in which every parameter influences the loss within 60 steps. With the
#: tiny config as it is, cells.ORN.raw_beta gets an exactly zero gradient: each
#: Poisson input event is 3 ORN thresholds (default current_per_hz), so an ORN fires
#: and resets in the same step and never carries charge into the next one -- its
#: decay has no effect (rate encoding instead synchronises the identical ORNs of a
#: glomerulus and zeroes cells.PN.raw_beta the same way). Here one event is
#: 0.9 threshold, and the KC->APL/MBON drive is strong enough for APL and MBONs to spike.
GRADIENT_REGIME = dict(projection_gains={"ORN->PN": 5.0, "KC->MBON": 50.0, "KC->APL": 80.0})
ORN_EVENT_THRESHOLDS = 0.9


@pytest.mark.parametrize("engine", ["fused", "snntorch"])
def test_gradients_reach_every_learnable_parameter(engine):
    from dmn_neuro.training.optimizer import default_current_per_hz

    cfg = tiny_config(engine=engine, **GRADIENT_REGIME)
    torch.manual_seed(cfg.seed)
    circuit = build_components(cfg)[0]
    orn_threshold = default_current_per_hz(circuit) / 3.0
    cfg = cfg.replace(current_per_hz=ORN_EVENT_THRESHOLDS * orn_threshold)
    _, encoder, arena, _, loss_fn = build_components(cfg, circuit=circuit)
    tr = DMNTrainer(circuit, loss_fn, cfg, environment=arena, encoder=encoder)
    c = tr.circuit
    ro = tr.rollout_episode(batch_size=tr.config.batch_size, episode=0, stream=TRAIN_STREAM, grad=True)
    tr.compute_loss(ro)["total"].backward()
    names = dict(c.named_parameters())
    expected = {f"cells.{p}.raw_beta" for p in c.population_names}
    expected |= {f"cells.{p}.raw_threshold" for p in c.population_names}
    expected |= {f"biases.{p}" for p in c.biases}
    expected |= {f"weights.{c._wkey(a, b)}.raw" for a, b in c.projection_pairs}
    assert set(names) == expected  # nothing learnable is missed, nothing unexpected is learnable
    assert {"ORN", "PN", "KC", "APL", "MBON", "DN"} <= set(c.population_names)
    for name, p in names.items():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.all(torch.isfinite(p.grad)), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: gradient is zero"
    for a, b in c.projection_pairs:
        w = c.weight(a, b)
        # a structural zero stays a zero in the gradient too
        assert torch.all(w.raw.grad[~w.mask] == 0), f"{a}->{b}: gradient on masked-out entries"
        assert w.raw.grad[w.mask].abs().sum() > 0, f"{a}->{b}: no gradient on existing synapses"


def test_masked_weights_stay_zero_and_signs_never_flip():
    tr = make_trainer(tiny_config(learning_rate=0.5, grad_clip=None))
    c = tr.circuit
    before = {(a, b): (c.weight(a, b).mask.clone(), c.weight(a, b).sign.clone(), c.weight(a, b)().detach().clone())
              for a, b in c.projection_pairs}
    tr.train_episode(3)
    changed = 0
    for (a, b), (mask, sign, w0) in before.items():
        cw = c.weight(a, b)
        w = cw().detach()
        assert torch.equal(cw.mask, mask) and torch.equal(cw.sign, sign), f"{a}->{b}: mask/sign buffers changed"
        assert torch.all(w[~mask] == 0), f"{a}->{b}: a masked-out weight became non-zero"
        assert torch.all(w * sign[None, :] >= 0), f"{a}->{b}: a weight flipped its sign"
        changed += int(not torch.equal(w, w0))
    assert changed >= 4, "the large learning rate should have moved most projections"


# -- determinism ---------------------------------------------------------------------
def _history(seed: int):
    tr = make_trainer(tiny_config(seed=seed))
    recs = tr.train_episode(2)
    terms = [{k: r[k] for k in ("total", "navigation", "energy", "sparsity", "activity")} for r in recs]
    return terms, tr.loss_history, {k: v.detach().clone() for k, v in tr.circuit.state_dict().items()}


def test_same_seed_identical_loss_history_different_seed_differs():
    h1, lh1, sd1 = _history(3)
    h2, lh2, sd2 = _history(3)
    assert h1 == h2 and lh1 == lh2  # bit-identical on CPU
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    h3, _, sd3 = _history(4)
    assert [r["total"] for r in h3] != [r["total"] for r in h1]
    assert any(not torch.equal(sd1[k], sd3[k]) for k in sd1)
    assert all(math.isfinite(r["total"]) for r in h1 + h3)


# -- NaN / Inf -----------------------------------------------------------------------
def _snapshot(d: Path):
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


def _train_then_poison(tmp_path, monkeypatch, poison):
    tr = make_trainer(tiny_config(checkpoint_every=1))
    tr.train_episode(2, out_dir=tmp_path)
    last = tmp_path / "checkpoints" / "last"
    snap = _snapshot(last)
    params = {k: v.detach().clone() for k, v in tr.circuit.state_dict().items()}
    orig = tr.compute_loss
    monkeypatch.setattr(tr, "compute_loss", lambda ro: poison(orig(ro), tr))
    with pytest.raises(TrainingError) as exc:
        tr.train_episode(2, out_dir=tmp_path)
    return tr, exc.value, last, snap, params


class _NaNGrad(torch.autograd.Function):
    """Zero in the forward pass, NaN in the backward pass."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, g):
        return torch.full(ctx.shape, float("nan"), dtype=g.dtype)


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_nan_stops_training_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, what):
    from dmn_neuro.training.checkpoint import load_circuit

    def poison(terms, tr):
        if what == "loss":
            terms["total"] = terms["total"] * float("nan")
        else:
            raw = tr.circuit.weight("KC", "MBON").raw
            terms["total"] = terms["total"] + _NaNGrad.apply(raw)
        return terms

    tr, err, last, snap, params = _train_then_poison(tmp_path, monkeypatch, poison)
    msg = str(err)
    assert "\n" not in msg and what in msg and "NaN" in msg and "episode 2" in msg
    assert str(last) in msg  # names the last good checkpoint
    assert _snapshot(last) == snap  # left byte-for-byte intact
    circuit, ck = load_circuit(last)
    assert ck["meta"]["episode"] == 2
    sd = circuit.state_dict()
    assert all(torch.equal(sd[k], params[k]) for k in params)
    # the failing episode did not update the parameters or the counter
    assert tr.episode == 2
    assert all(torch.equal(tr.circuit.state_dict()[k], params[k]) for k in params)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


# -- TrainingConfig validation -------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    ({"learnin_rate": 0.1}, "learnin_rate"),
    ({"learning_rate": -1e-3}, "learning_rate"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"learning_rate": "abc"}, "learning_rate"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"device": "tpu"}, "device"),
    ({"engine": "jax"}, "engine"),
    ({"encoding": "spikes"}, "encoding"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"num_episodes": -1}, "num_episodes"),
    ({"episode_length_steps": True}, "episode_length_steps"),
    ({"seed": 1.5}, "seed"),
    ({"grad_clip": 0.0}, "grad_clip"),
    ({"tbptt_window": 0}, "tbptt_window"),
    ({"dt_ms": 0.0}, "dt_ms"),
    ({"contralateral_fraction": 0.9}, "contralateral_fraction"),
    ({"contralateral_fraction": "abc"}, "contralateral_fraction"),
    ({"arena": 5}, "arena"),
    ({"energy_weight": -0.1}, "energy_weight"),
])
def test_training_config_rejects_bad_values(bad, match):
    with pytest.raises(ConfigError, match=match) as exc:
        TrainingConfig.from_dict(bad)
    assert "\n" not in str(exc.value)


def test_training_config_unknown_keys_are_all_named():
    with pytest.raises(ConfigError) as exc:
        TrainingConfig.from_dict({"learning_rate": 0.1, "zzz": 1, "aaa": 2})
    assert "aaa" in str(exc.value) and "zzz" in str(exc.value) and "learning_rate" not in str(exc.value)


def test_training_config_round_trip_and_overrides(tmp_path):
    cfg = tiny_config(odors=["isopentyl acetate"])
    again = TrainingConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg.to_dict()))
    assert TrainingConfig.from_yaml(p) == cfg
    r = cfg.replace(learning_rate=0.5, seed=None)  # None = not overridden
    assert r.learning_rate == 0.5 and r.seed == cfg.seed
    with pytest.raises(ConfigError, match="optimizer"):
        cfg.replace(optimizer="lbfgs")
    assert TrainingConfig.from_yaml(_write(tmp_path / "empty.yaml", "")) == TrainingConfig()


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, match", [
    ("dt_ms: [2.0\nfoo: {\n", "not valid YAML"),
    ("learning_rate: 0.1\n  bad indent: [\n", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
    ("just a string\n", "mapping"),
    ("\t- tab\n", "YAML"),
])
def test_from_yaml_malformed(tmp_path, text, match):
    p = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError, match=match) as exc:
        TrainingConfig.from_yaml(p)
    assert "\n" not in str(exc.value)


def test_from_yaml_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        TrainingConfig.from_yaml(tmp_path / "nope.yaml")


def test_unknown_nested_arena_key_is_a_config_error():
    """``arena:`` keys are ArenaConfig fields; a typo must be a one-line ConfigError naming it."""
    with pytest.raises(ConfigError, match="speed_gainn") as exc:  # at load time or at build time
        build_components(tiny_config(arena={"speed_gainn": 0.1}))
    assert "\n" not in str(exc.value)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
        assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu")


# -- kill -9 and resume (real subprocesses) ------------------------------------------
def _cli_env(cache: Path) -> dict:
    env = dict(os.environ)
    env.update(DMN_NEURO_CACHE=str(cache), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _train_cmd(cfg: Path, out: Path, *extra: str):
    return [sys.executable, "-m", "dmn_neuro.cli", "train", "--config", str(cfg), "--episodes", "6",
            "--eval-episodes", "0", "--out", str(out), *extra]


def _last_episode(run: Path):
    try:
        return json.loads((run / "checkpoints" / "last" / "checkpoint.json").read_text())["episode"]
    except (OSError, ValueError, KeyError):
        return None


def test_kill_minus_9_and_resume_gives_the_uninterrupted_weights(tmp_path):
    from safetensors.torch import load_file

    cfg = tmp_path / "tiny_ckpt1.yaml"
    d = yaml.safe_load(TINY_YAML.read_text())
    # checkpoint every episode; longer episodes so that the kill lands mid-run
    d.update(checkpoint_every=1, episode_length_steps=100)
    cfg.write_text(yaml.safe_dump(d))
    env = _cli_env(tmp_path / "cache")
    a, b = tmp_path / "A", tmp_path / "B"
    done = subprocess.run(_train_cmd(cfg, a), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    proc = subprocess.Popen(_train_cmd(cfg, b), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while (_last_episode(b) or 0) < 2:
            assert proc.poll() is None, "training finished before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint at episode >= 2 in time"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _last_episode(b)
    assert killed_at is not None and 2 <= killed_at < 6, f"checkpoint after kill: episode {killed_at}"

    resumed = subprocess.run(_train_cmd(cfg, b, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {b / 'checkpoints' / 'last'} at episode {killed_at}" in resumed.stderr
    assert _last_episode(a) == _last_episode(b) == 6
    ta = load_file(str(a / "checkpoints" / "last" / "model.safetensors"))
    tb = load_file(str(b / "checkpoints" / "last" / "model.safetensors"))
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"resumed run differs from the uninterrupted one in {differ}"
    oa = load_file(str(a / "checkpoints" / "last" / "optimizer.safetensors"))
    ob = load_file(str(b / "checkpoints" / "last" / "optimizer.safetensors"))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    # the loss history in the checkpoint matches too
    ha = json.loads((a / "checkpoints" / "last" / "checkpoint.json").read_text())["loss_history"]
    hb = json.loads((b / "checkpoints" / "last" / "checkpoint.json").read_text())["loss_history"]
    assert ha == hb and len(ha) == 6


# -- the design document's Stage 4 spellings -----------------------------------------
def test_design_document_trainer_usage(tmp_path):
    """DMNTrainer(circuit, loss_fn, config) builds its own arena; train_episode(num_episodes=N)
    returns the losses; rollouts read by key; save_checkpoint('best_model.pt') writes one file."""
    from dmn_neuro.training.checkpoint import load_circuit

    cfg = tiny_config().replace(learning_rate=0.001, optimizer="adam", num_episodes=2, nav_weight=1.0,
                                energy_weight=0.1)
    torch.manual_seed(cfg.seed)
    circuit, _, _, _, loss_fn = build_components(cfg)
    trainer = DMNTrainer(circuit, loss_fn, cfg)
    assert trainer.environment.config == cfg.environment.arena_config()
    losses = trainer.train_episode(num_episodes=2)
    assert [r["episode"] for r in losses] == [0, 1] and all(math.isfinite(r["total"]) for r in losses)
    circuit.eval()
    with torch.no_grad():
        ro = trainer.rollout_episode(episode_length=7, batch_size=cfg.batch_size)
        one = trainer.rollout_episode(episode_length=7)
    assert tuple(one["positions"].shape) == (8, 3) and tuple(one["velocities"].shape) == (7, 3)
    assert tuple(one["activations"]["KC"].shape) == (7, 2, ro.activations["KC"].shape[-1])
    assert ro["positions"] is ro.positions and ro["velocities"] is ro.velocities
    assert tuple(ro["positions"].shape) == (8, cfg.batch_size, 3) and tuple(ro["velocities"].shape) == (7, cfg.batch_size, 3)
    assert list(dict(ro)) == list(ro._fields) and ro[0] is ro.positions
    with pytest.raises(KeyError):
        ro["trajectory"]
    path = trainer.save_checkpoint(tmp_path / "best_model.pt")
    assert path.is_file()
    loaded, ck = load_circuit(path)
    assert ck["meta"]["episode"] == 2
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trainer.circuit.state_dict().items())


def test_python_m_optimizer_runs_a_first_training_loop(tmp_path):
    env = _cli_env(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-m", "dmn_neuro.training.optimizer", "--episodes", "2", "--steps", "20"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "dmn_first_run"  # default: a folder of the current directory
    last = run / "checkpoints" / "last"
    assert f"wrote checkpoint {last.relative_to(tmp_path)}" in res.stdout
    assert "training" in res.stderr and "2/2" in res.stderr  # the progress bar
    assert json.loads((last / "checkpoint.json").read_text())["episode"] == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    out = tmp_path / "elsewhere"
    res = subprocess.run([sys.executable, "-m", "dmn_neuro.training.optimizer", "--episodes", "1", "--steps", "10",
                          "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "checkpoints" / "last" / "checkpoint.json").is_file() and str(out) in res.stdout


def test_loihi_stage_runs_as_part_of_training(tmp_path):
    """deployment.loihi: the run ends with QAT + snapping; the saved model is on the grid
    (quantising it again changes no integer) and its fixed-point success is reported."""
    from dmn_neuro.experiments.run import train_run
    from dmn_neuro.simulation.fixed_point import quantize
    from dmn_neuro.training.checkpoint import load_circuit
    from dmn_neuro.training.qat import snap_circuit_to_grid

    cfg = tiny_config(num_episodes=1, deployment={"loihi": True, "qat_episodes": 1, "check_episodes": 2})
    summary = train_run(cfg, tmp_path / "run", figure_episodes=0)
    loihi = summary["loihi"]
    assert loihi["checkpoint"] == str(tmp_path / "run" / "checkpoints" / "loihi")
    assert {"float_success_rate", "fixed_point_success_rate", "difference"} <= set(loihi)
    snapped, ck = load_circuit(loihi["checkpoint"])
    assert ck["meta"]["extra"]["fixed_point_snap"]["finetune_episodes"] == 1
    before = quantize(snapped.to_spec(), weight_bits=8)
    snap_circuit_to_grid(snapped, weight_bits=8)  # on the grid already: snapping again moves no integer
    after = quantize(snapped.to_spec(), weight_bits=8)
    assert [p.vth for p in before.populations] == [p.vth for p in after.populations]
    for p, q in zip(before.projections, after.projections):
        assert (p.weight == q.weight).all()
    best, _ = load_circuit(tmp_path / "run" / "checkpoints" / "best")
    assert any(not torch.equal(a, b) for a, b in zip(best.state_dict().values(), load_circuit(loihi["checkpoint"])[0].state_dict().values()))
