"""`dmn-neuro train / evaluate / run / export / verify` through click's CliRunner
and real subprocesses: outputs, file round trips, and one-line errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nir
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from dmn_neuro.training.checkpoint import load_circuit
from _helpers import assert_one_line_error
from dmn_neuro.cli import cli
from dmn_neuro.analysis.recording import run_open_loop

REPO = Path(__file__).resolve().parent.parent
TINY_YAML = REPO / "examples" / "configs" / "tiny.yaml"
DMN = REPO / ".venv" / "bin" / "dmn-neuro"
POPULATIONS = ["ORN", "PN", "KC", "APL", "MBON", "DN"]




def invoke(*args: str, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=True)


def subprocess_cli(*args: str, env=None, timeout: float = 300):
    exe = [str(DMN)] if DMN.exists() else [sys.executable, "-m", "dmn_neuro.cli"]
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(exe + [str(a) for a in args], capture_output=True, text=True, env=e, timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """`train --episodes 0`: the untrained checkpoint the other tests use."""
    out = tmp_path_factory.mktemp("runs") / "untrained"
    res = invoke("train", "--config", TINY_YAML, "--episodes", 0, "--eval-episodes", 0, "--out", out)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out


@pytest.fixture(scope="module")
def ckpt(run_dir):
    return run_dir / "checkpoints" / "last"


@pytest.fixture(scope="module")
def x_npy(tmp_path_factory, ckpt):
    circuit, _ = load_circuit(ckpt)
    rng = np.random.default_rng(1)
    x = rng.uniform(0.0, 1.5, (50, 2, circuit.n_orn)) * (rng.random((50, 2, circuit.n_orn)) < 0.3)
    p = tmp_path_factory.mktemp("inputs") / "x.npy"
    np.save(p, x)
    return p


# -- train ---------------------------------------------------------------------------
def test_train_episodes_0_writes_untrained_checkpoint(run_dir):
    for name in ("untrained", "last", "best"):
        d = run_dir / "checkpoints" / name
        assert (d / "model.safetensors").is_file() and (d / "checkpoint.json").is_file()
        assert json.loads((d / "checkpoint.json").read_text())["episode"] == 0
    a = load_circuit(run_dir / "checkpoints" / "untrained")[0].state_dict()
    b = load_circuit(run_dir / "checkpoints" / "last")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["num_episodes"] == 0 and cfg["episode_length_steps"] == 60
    assert json.loads((run_dir / "summary.json").read_text())["episodes"] == 0
    assert not (run_dir / "metrics.jsonl").exists()


def test_train_two_episodes_writes_logs_and_figures(tmp_path):
    out = tmp_path / "run"
    res = invoke("train", "--config", TINY_YAML, "--episodes", 2, "--eval-episodes", 2, "--out", out)
    assert res.exit_code == 0, res.output + repr(res.exception)
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["episodes"] == 2 and {"before", "after"} <= set(summary)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in recs] == [0, 1]
    assert {"total", "navigation", "energy", "sparsity", "activity", "success_rate", "kc_sparsity"} <= set(recs[0])
    for f in ("loss_curves.png", "trajectories_before_after.png", "summary.json", "config.yaml"):
        assert (out / f).stat().st_size > 0, f
    assert json.loads((out / "checkpoints" / "last" / "checkpoint.json").read_text())["episode"] == 2
    # a second run into the same directory without --resume is refused
    again = invoke("train", "--config", TINY_YAML, "--episodes", 2, "--eval-episodes", 0, "--out", out)
    assert_one_line_error(again, contains="--resume")


def test_train_nan_loss_is_one_line_error(tmp_path, monkeypatch):
    from dmn_neuro.training.optimizer import DMNTrainer

    orig = DMNTrainer.compute_loss

    def nan_loss(self, ro):
        terms = orig(self, ro)
        terms["total"] = terms["total"] * float("nan")
        return terms

    monkeypatch.setattr(DMNTrainer, "compute_loss", nan_loss)
    out = tmp_path / "run"
    res = invoke("train", "--config", TINY_YAML, "--episodes", 2, "--eval-episodes", 0, "--out", out)
    # training had started: the progress bar's label may precede the error line
    assert isinstance(res.exception, SystemExit) and res.exit_code == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in res.output
    line = errors[0]
    assert "NaN" in line and "episode 0" in line and "untrained" in line  # names the last good checkpoint
    assert (out / "checkpoints" / "untrained" / "model.safetensors").is_file()


# -- evaluate ------------------------------------------------------------------------
def test_evaluate_json_prints_one_object_and_writes_figure(ckpt, tmp_path):
    out = tmp_path / "eval"
    res = invoke("evaluate", ckpt, "--episodes", 2, "--steps", 60, "--json", "--out", out)
    assert res.exit_code == 0, res.output + repr(res.exception)
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert {"success_rate", "final_distance_to_goal_mean", "kc_sparsity"} <= set(obj)
    assert 0.0 <= obj["success_rate"] <= 1.0 and obj["final_distance_to_goal_mean"] > 0
    assert obj["n_episodes"] == 2 and obj["episode_length_steps"] == 60
    assert (out / "evaluation_trajectories.png").stat().st_size > 0
    assert json.loads((out / "evaluation.json").read_text())["success_rate"] == obj["success_rate"]


def test_evaluate_subprocess_is_deterministic(ckpt, tmp_path):
    """A real process and an in-process run give the same held-out metrics."""
    args = ["evaluate", ckpt, "--episodes", 2, "--steps", 60, "--seed", 7, "--json", "--device", "cpu"]
    res = subprocess_cli(*args, "--out", tmp_path / "e0")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    here = invoke(*args, "--out", tmp_path / "e1")
    assert here.exit_code == 0, here.output
    a, b = json.loads(lines[0]), json.loads(here.stdout.strip())
    assert a == b and a["seed"] == 7
    assert (tmp_path / "e0" / "evaluation_trajectories.png").is_file()


def test_single_file_checkpoint_evaluates_like_its_directory(ckpt, tmp_path, monkeypatch):
    """A .pt checkpoint (trainer.save_checkpoint('x.pt')) works wherever a directory does."""
    from dmn_neuro.training.checkpoint import read_checkpoint, save_checkpoint
    from dmn_neuro.training.config import TrainingConfig

    circuit, ck = load_circuit(ckpt)
    pt = save_checkpoint(tmp_path / "model.pt", circuit, TrainingConfig.from_dict(ck["meta"]["config"]),
                         ck["meta"]["episode"])
    assert pt.is_file() and read_checkpoint(pt)["meta"]["config"] == ck["meta"]["config"]
    args = ["--episodes", 2, "--steps", 30, "--json", "--device", "cpu"]
    a = invoke("evaluate", ckpt, *args, "--out", tmp_path / "e_dir")
    monkeypatch.chdir(tmp_path)
    b = invoke("evaluate", pt, *args)
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output + repr(b.exception)
    ra, rb = json.loads(a.stdout), json.loads(b.stdout)
    assert {k: v for k, v in ra.items() if k != "checkpoint"} == {k: v for k, v in rb.items() if k != "checkpoint"}
    # default --out: ./evaluation/<checkpoint name>_<conditions>, never beside or inside the checkpoint
    assert (tmp_path / "evaluation" / "model_steps-30" / "evaluation.json").is_file()
    assert not (tmp_path / "model_eval").exists()


# -- run -----------------------------------------------------------------------------
def test_run_writes_every_population_and_matches_run_open_loop(ckpt, x_npy, tmp_path):
    out = tmp_path / "s.npz"
    res = invoke("run", ckpt, "--input", x_npy, "--out", out)
    assert res.exit_code == 0, res.output + repr(res.exception)
    counts = json.loads(res.stdout.strip())
    circuit, _ = load_circuit(ckpt)
    x = np.load(x_npy)
    ref = run_open_loop(circuit, x)
    with np.load(out, allow_pickle=False) as z:
        got = {k: z[k] for k in z.files}
    assert sorted(got) == sorted(POPULATIONS) == sorted(counts)
    for name in POPULATIONS:
        n = circuit.structure.layer_sizes[name]
        assert got[name].shape == (x.shape[0], x.shape[1], n) and got[name].dtype == bool, name
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
        assert counts[name] == int(ref[name].sum())
    assert got["ORN"].any() and got["PN"].any()


def test_run_subprocess_2d_input_same_as_batch_of_one(ckpt, x_npy, tmp_path):
    x = np.load(x_npy)[:, 0, :]
    p = tmp_path / "x2.npy"
    np.save(p, x)
    res = subprocess_cli("run", ckpt, "--input", p, "--out", tmp_path / "s.npz")
    assert res.returncode == 0, res.stderr
    ref = run_open_loop(load_circuit(ckpt)[0], x[:, None, :])
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
        for name in POPULATIONS:
            np.testing.assert_array_equal(z[name], ref[name], err_msg=name)


# -- one-line errors -----------------------------------------------------------------
def _bad_inputs(d: Path, n_orn: int):
    np.save(d / "shape.npy", np.zeros((10, 2, n_orn + 1)))
    nan = np.zeros((10, 2, n_orn))
    nan[3, 1, 5] = np.nan
    np.save(d / "nan.npy", nan)
    np.save(d / "object.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(d / "strings.npy", np.array(["a", "b"]))
    np.save(d / "rank4.npy", np.zeros((2, 2, 2, n_orn)))
    (d / "garbage.npy").write_bytes(b"not an npy file at all")
    return {
        "shape": "must have shape", "nan": "NaN", "object": "numeric", "strings": "numeric",
        "rank4": "must have shape", "garbage": "not a readable", "missing": "not found",
    }


@pytest.mark.parametrize("case", ["shape", "nan", "object", "strings", "rank4", "garbage", "missing"])
def test_run_bad_input_is_one_line_error(ckpt, tmp_path, case):
    expected = _bad_inputs(tmp_path, load_circuit(ckpt)[0].n_orn)
    out = tmp_path / "spikes.npz"
    res = invoke("run", ckpt, "--input", tmp_path / f"{case}.npy", "--out", out)
    assert_one_line_error(res, contains=expected[case], absent=[out, tmp_path / "spikes.npz.tmp"])


def _damaged(ckpt: Path, tmp_path: Path, how: str) -> Path:
    d = tmp_path / "ck"
    shutil.copytree(ckpt, d)
    if how == "model":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif how == "json":
        data = (d / "checkpoint.json").read_text()
        (d / "checkpoint.json").write_text(data[: len(data) // 2])
    elif how == "no_model":
        (d / "model.safetensors").unlink()
    elif how == "no_config":
        meta = json.loads((d / "checkpoint.json").read_text())
        del meta["config"]
        (d / "checkpoint.json").write_text(json.dumps(meta))
    return d


DAMAGE = [("model", "model.safetensors is corrupt"), ("json", "checkpoint.json is corrupt"),
          ("no_model", "no model.safetensors"), ("no_config", "config")]


@pytest.mark.parametrize("command, how, contains", [
    (c, h, m) for c in ("run", "evaluate", "export") for h, m in DAMAGE
    if not (c == "run" and h == "no_config")  # `run` needs no training config
])
def test_damaged_checkpoint_is_one_line_error(ckpt, x_npy, tmp_path, how, contains, command):
    d = _damaged(ckpt, tmp_path, how)
    out = tmp_path / "out.any"
    args = {"run": ["--input", x_npy, "--out", out], "evaluate": ["--episodes", 1, "--steps", 5, "--out", out],
            "export": ["--format", "nir", "-o", out]}[command]
    res = invoke(command, d, *args)
    assert_one_line_error(res, contains=contains, absent=[out])


def test_missing_and_corrupt_checkpoint_in_real_subprocesses(ckpt, x_npy, tmp_path):
    out = tmp_path / "s.npz"
    res = subprocess_cli("run", tmp_path / "nope", "--input", x_npy, "--out", out)
    assert_one_line_error(res, contains="checkpoint not found", absent=[out])
    d = _damaged(ckpt, tmp_path, "model")
    res = subprocess_cli("evaluate", d, "--episodes", 1, "--steps", 5)
    assert_one_line_error(res, contains="corrupt")
    res = subprocess_cli("run", ckpt, "--input", tmp_path / "missing.npy", "--out", out)
    assert_one_line_error(res, contains="not found", absent=[out])


BAD_CONFIGS = {
    "unknown_key": ("dt_ms: 2.0\nlearnin_rate: 0.1\n", "learnin_rate"),
    "malformed_yaml": ("dt_ms: [2.0\nfoo: {\n", "not valid YAML"),
    "not_a_mapping": ("- a\n- b\n", "mapping"),
    "negative_lr": ("learning_rate: -1\n", "learning_rate"),
    "bad_optimizer": ("optimizer: rmsprop\n", "optimizer"),
    "unknown_projection": ('projection_gains: {"X->Y": 1.0}\n', "X->Y"),
    "unknown_source_option": ("source_options: {bogus: 1}\n", "bogus"),
    "unknown_arena_key": ("arena: {speed_gainn: 0.1}\n", "speed_gainn"),
    "negative_hill_k": ("hill_k: -1.0\n", "hill_k"),
    "negative_current_per_hz": ("current_per_hz: -1.0\n", "current_per_hz"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_error(tmp_path, case):
    text, contains = BAD_CONFIGS[case]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    out = tmp_path / "run"
    res = invoke("train", "--config", cfg, "--episodes", 0, "--steps", 10, "--eval-episodes", 0, "--out", out)
    assert_one_line_error(res, contains=contains, absent=[out])


def test_bad_config_in_real_subprocess(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dt_ms: 2.0\nlearnin_rate: 0.1\n")
    res = subprocess_cli("train", "--config", cfg, "--episodes", 0, "--out", tmp_path / "run")
    assert_one_line_error(res, contains="learnin_rate", absent=[tmp_path / "run"])
    res = subprocess_cli("train", "--config", tmp_path / "nope.yaml", "--episodes", 0, "--out", tmp_path / "run")
    assert_one_line_error(res, contains="not found", absent=[tmp_path / "run"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_device_cuda_without_cuda(ckpt, tmp_path):
    out = tmp_path / "run"
    res = invoke("train", "--config", TINY_YAML, "--episodes", 0, "--device", "cuda", "--out", out)
    assert_one_line_error(res, contains="CUDA is not available", absent=[out])
    res = subprocess_cli("evaluate", ckpt, "--episodes", 1, "--steps", 5, "--device", "cuda",
                         "--out", tmp_path / "ev")
    assert_one_line_error(res, contains="CUDA is not available", absent=[tmp_path / "ev"])


# -- export / verify -----------------------------------------------------------------
def test_export_nir_loads_with_nir_read(ckpt, x_npy, tmp_path):
    from exporters.nir_import import run_nir

    out = tmp_path / "m.nir"
    res = invoke("export", ckpt, "--format", "nir", "-o", out)
    assert res.exit_code == 0, res.output + repr(res.exception)
    g = nir.read(str(out))
    circuit, _ = load_circuit(ckpt)
    lifs = {k: v for k, v in g.nodes.items() if isinstance(v, nir.LIF)}
    assert sorted(lifs) == sorted(POPULATIONS)
    for name, node in lifs.items():
        thr = circuit.cells[name].threshold.detach().double().numpy()
        np.testing.assert_array_equal(np.asarray(node.v_threshold), thr, err_msg=name)
    for a, b in circuit.projection_pairs:
        lin = [v for v in g.nodes.values() if isinstance(v, (nir.Linear, nir.Affine))
               and v.metadata.get("projection") == f"{a}->{b}"]
        assert len(lin) == 1, (a, b)
        np.testing.assert_array_equal(lin[0].weight, circuit.weight(a, b)().detach().double().numpy())
    x = np.load(x_npy)
    ref, got = run_open_loop(circuit, x), run_nir(out, x)
    for name in POPULATIONS:
        np.testing.assert_array_equal(np.asarray(got[name], dtype=bool), ref[name], err_msg=name)


def test_export_lava_writes_graph(ckpt, tmp_path):
    from exporters.lava_export import read_lava_graph

    out = tmp_path / "lava"
    res = invoke("export", ckpt, "--format", "lava", "-o", out, "--json")
    assert res.exit_code == 0, res.output + repr(res.exception)
    info = json.loads(res.stdout.strip())
    assert info["format"] == "lava"
    manifest, arrays = read_lava_graph(out)
    assert sorted(p["name"] for p in manifest["processes"] if p["kind"] == "LIF") == sorted(POPULATIONS)
    assert arrays


def test_verify_nir_passes(ckpt, tmp_path):
    # a real subprocess: one BLAS/torch thread from the start (in-process it is several times slower here)
    res = subprocess_cli("verify", ckpt, "--target", "nir", "--steps", 1000, "--json", "--report", tmp_path / "rep")
    assert res.returncode == 0, res.stderr[-3000:]
    obj = json.loads(res.stdout.strip())
    assert obj["passed"] is True and obj["steps"] == 1000
    assert sorted(obj["mismatch_fraction"]) == sorted(POPULATIONS)
    assert all(v == 0.0 for v in obj["mismatch_fraction"].values())
    assert (tmp_path / "rep" / "verification.json").is_file()


@pytest.mark.lava
def test_verify_lava_float_passes(ckpt):
    res = subprocess_cli("verify", ckpt, "--target", "lava", "--steps", 1000, "--json", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    obj = json.loads(res.stdout.strip().splitlines()[-1])
    assert obj["passed"] is True and all(v == 0.0 for v in obj["mismatch_fraction"].values())


@pytest.mark.parametrize("args", [
    ["export", "{ck}", "--format", "onnx", "-o", "{tmp}/m"],
    ["verify", "{ck}", "--target", "loihi3"],
    ["export", "{ck}", "-o", "{tmp}/m"],
])
def test_unknown_format_or_target_is_usage_error(ckpt, tmp_path, args):
    args = [a.format(ck=ckpt, tmp=tmp_path) for a in args]
    res = invoke(*args)
    assert res.exit_code == 2
    assert "--help')" in assert_one_line_error(res)
    assert not (tmp_path / "m").exists()
    proc = subprocess_cli(*args)
    assert proc.returncode == 2 and "--help')" in assert_one_line_error(proc)


def test_missing_lava_env_names_make_target(ckpt, tmp_path):
    res = invoke("verify", ckpt, "--target", "lava", "--steps", 50, env={"DMN_LAVA_PYTHON": "/nonexistent/python"})
    assert_one_line_error(res, contains="make lava-env")
    proc = subprocess_cli("verify", ckpt, "--target", "lava", "--steps", 50,
                          env={"DMN_LAVA_PYTHON": "/nonexistent/python"})
    assert_one_line_error(proc, contains="make lava-env")
