"""Bad input across every command: one line, a non-zero exit, nothing left behind.

Each case runs the CLI in-process (click's runner, through the same error
boundary as the ``dmn-neuro`` program) and asserts: exit code != 0, at most two
non-empty stderr lines of which exactly one starts with ``Error:``, no
traceback, and no new file (nor temporary file) in the case's output area.
A few cases run as real subprocesses too. After them, unusual but valid inputs
that must still succeed.
"""
from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from dmn_neuro.cli import cli

from test_connectome_sources import CONNECTIONS, write_codex

REPO = Path(__file__).resolve().parent.parent
TINY_YAML = REPO / "examples" / "configs" / "tiny.yaml"


def invoke(*args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True, **kw)


def files_under(root: Path) -> set:
    return {p.relative_to(root) for p in root.rglob("*")} if root.exists() else set()


def check_failure(res, contains=None):
    """One 'Error:' line (at most one more line of context), a non-zero exit, no traceback."""
    assert isinstance(res.exception, SystemExit), f"uncaught {res.exception!r}"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert res.exit_code != 0 and len(lines) <= 2 and len(errors) == 1, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert contains is None or contains in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Read-only inputs shared by the cases."""
    d = tmp_path_factory.mktemp("fixtures")
    run = d / "run"
    res = invoke("train", "--config", TINY_YAML, "--episodes", 0, "--eval-episodes", 0, "--out", run)
    assert res.exit_code == 0, res.output
    ck = run / "checkpoints" / "last"
    n_orn = json.loads((ck / "checkpoint.json").read_text())["structure"]["layer_sizes"]["ORN"]
    np.save(d / "x.npy", np.random.default_rng(0).random((20, 2, n_orn)))
    np.save(d / "t0.npy", np.zeros((0, 2, n_orn)))
    np.save(d / "wrong_n.npy", np.zeros((20, 2, n_orn + 3)))
    (d / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    with open(d / "huge.npy", "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f8", "fortran_order": False,
                                                 "shape": (10**9, 2, n_orn)})
        fh.write(np.zeros(8).tobytes())
    with open(d / "truncated.npy", "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f8", "fortran_order": False, "shape": (50, 2, n_orn)})
        fh.write(np.zeros(8).tobytes())
    (d / "regular_file").write_text("not a directory")
    base = yaml.safe_load(TINY_YAML.read_text())

    def cfg(name, **changes):
        c = json.loads(json.dumps(base))
        for dotted, v in changes.items():
            node = c
            *path, last = dotted.split(".")
            for k in path:
                node = node.setdefault(k, {})
            node[last] = v
        (d / f"{name}.yaml").write_text(yaml.safe_dump(c))

    cfg("dt", **{"circuit.dt_ms": 1000})
    cfg("seed", seed=2**70)
    cfg("gain", **{"circuit.projection_gains": {"ORN->PN": "x"}})
    cfg("batch", batch_size=1e8)
    cfg("lr", **{"optimisation.learning_rate": -1})
    cfg("opt", **{"optimisation.optimizer": "rmsprop"})
    cfg("arena", **{"environment.arena.wind": 3})
    cfg("section", **{"physics.gravity": 9.8})
    cfg("surrogate", **{"circuit.surrogate": "relu"})
    cfg("episodes", num_episodes="many")
    cfg("steps", episode_length_steps=10**9)
    cfg("source", **{"connectome.source": "nosuch"})
    cfg("deploy", **{"deployment.weight_bits": 0})
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "broken.yaml").write_text("a: [1, 2\n")
    write_codex(d / "codex_big", connections=[(a, b, n, "1e30" if i == 0 else c)
                                              for i, (a, b, n, c) in enumerate(CONNECTIONS)])
    write_codex(d / "codex_neg", connections=[(a, b, n, -c if a == 401 else c) for a, b, n, c in CONNECTIONS])
    return {"d": d, "ck": ck, "run": run}


CASES = [
    # id, argv (with {ck} {run} {d} {o} placeholders), message part
    ("root-unknown-command", ["nosuch"], "No such command"),
    ("root-threads-0", ["--threads", "0", "evaluate", "{ck}"], "--threads"),
    ("conn-unknown-source", ["connectome", "info", "--source", "nosuch"], "unknown source"),
    ("conn-codex-missing", ["connectome", "info", "--source", "codex:{d}/nodir"], "not found"),
    ("conn-codex-1e30", ["connectome", "info", "--source", "codex:{d}/codex_big", "--no-cache"], "out of range"),
    ("conn-codex-negative", ["connectome", "info", "--source", "codex:{d}/codex_neg", "--no-cache"], "must be >= 0"),
    ("conn-synthetic-scale", ["connectome", "info", "--source", "synthetic", "--option", "scale=1e9"], "scale"),
    ("conn-unknown-layer", ["connectome", "info", "--layers", "PN,XX"], "unknown layer"),
    ("conn-bad-option", ["connectome", "info", "--option", "novalue"], None),
    ("conn-unknown-option", ["connectome", "info", "--option", "flavour=3"], "unknown option"),
    ("conn-table-file-in-way", ["connectome", "export-table", "-o", "{d}/regular_file/t"], None),
    ("train-config-missing", ["train", "--config", "{d}/nope.yaml", "--out", "{o}/r"], "not found"),
    ("train-config-broken", ["train", "--config", "{d}/broken.yaml", "--out", "{o}/r"], "not valid YAML"),
    ("train-config-list", ["train", "--config", "{d}/list.yaml", "--out", "{o}/r"], "mapping"),
    ("train-config-dir", ["train", "--config", "{d}", "--out", "{o}/r"], None),
    ("train-dt-1000", ["train", "--config", "{d}/dt.yaml", "--out", "{o}/r"], "dt_ms"),
    ("train-seed-2**70", ["train", "--config", "{d}/seed.yaml", "--out", "{o}/r"], "seed"),
    ("train-gain-string", ["train", "--config", "{d}/gain.yaml", "--out", "{o}/r"], "projection_gains"),
    ("train-batch-1e8", ["train", "--config", "{d}/batch.yaml", "--out", "{o}/r"], "batch_size"),
    ("train-lr-negative", ["train", "--config", "{d}/lr.yaml", "--out", "{o}/r"], "learning_rate"),
    ("train-optimizer", ["train", "--config", "{d}/opt.yaml", "--out", "{o}/r"], "optimizer"),
    ("train-arena-key", ["train", "--config", "{d}/arena.yaml", "--out", "{o}/r"], "wind"),
    ("train-unknown-section", ["train", "--config", "{d}/section.yaml", "--out", "{o}/r"], "physics"),
    ("train-surrogate", ["train", "--config", "{d}/surrogate.yaml", "--out", "{o}/r"], "surrogate"),
    ("train-episodes-string", ["train", "--config", "{d}/episodes.yaml", "--out", "{o}/r"], "num_episodes"),
    ("train-steps-1e9", ["train", "--config", "{d}/steps.yaml", "--out", "{o}/r"], "episode_length_steps"),
    ("train-source-config", ["train", "--config", "{d}/source.yaml", "--out", "{o}/r"], "unknown source"),
    ("train-deploy-bits", ["train", "--config", "{d}/deploy.yaml", "--out", "{o}/r"], "deployment.weight_bits"),
    ("train-episodes-flag", ["train", "--config", str(TINY_YAML), "--episodes", "-1", "--out", "{o}/r"], "--episodes"),
    ("train-steps-0", ["train", "--config", str(TINY_YAML), "--steps", "0", "--out", "{o}/r"], "--steps"),
    ("train-batch-0", ["train", "--config", str(TINY_YAML), "--batch-size", "0", "--out", "{o}/r"], "--batch-size"),
    ("train-seed-negative", ["train", "--config", str(TINY_YAML), "--seed", "-3", "--out", "{o}/r"], "--seed"),
    ("train-device", ["train", "--config", str(TINY_YAML), "--device", "tpu", "--out", "{o}/r"], "--device"),
    ("train-source-flag", ["train", "--config", str(TINY_YAML), "--source", "nosuch", "--out", "{o}/r"], "unknown source"),
    ("train-out-is-file", ["train", "--config", str(TINY_YAML), "--episodes", "0", "--out", "{d}/regular_file"], None),
    ("train-out-under-file", ["train", "--config", str(TINY_YAML), "--episodes", "0", "--out", "{d}/regular_file/r"],
     "not a directory"),
    ("train-init-missing", ["train", "--config", str(TINY_YAML), "--init-from", "{d}/nock", "--out", "{o}/r"], "not found"),
    ("train-init-and-resume", ["train", "--config", str(TINY_YAML), "--init-from", "{ck}", "--resume", "--out", "{o}/r"],
     "exclude"),
    ("train-existing-run", ["train", "--config", str(TINY_YAML), "--episodes", "0", "--out", "{run}"], "already holds"),
    ("train-resume-changed-seed", ["train", "--config", str(TINY_YAML), "--episodes", "0", "--seed", "5", "--resume",
                                   "--out", "{run}"], "seed"),
    ("train-resume-changed-steps", ["train", "--config", str(TINY_YAML), "--episodes", "0", "--steps", "30", "--resume",
                                    "--out", "{run}"], "episode_length_steps"),
    ("eval-missing", ["evaluate", "{d}/nock"], "not found"),
    ("eval-steps-negative", ["evaluate", "{ck}", "--steps", "-5", "--out", "{o}/e"], "--steps"),
    ("eval-steps-0", ["evaluate", "{ck}", "--steps", "0", "--out", "{o}/e"], "--steps"),
    ("eval-episodes-0", ["evaluate", "{ck}", "--episodes", "0", "--out", "{o}/e"], "--episodes"),
    ("eval-seed-negative", ["evaluate", "{ck}", "--seed", "-1", "--out", "{o}/e"], "--seed"),
    ("eval-device", ["evaluate", "{ck}", "--device", "tpu", "--out", "{o}/e"], "--device"),
    ("eval-not-a-checkpoint", ["evaluate", "{d}", "--out", "{o}/e"], None),
    ("eval-out-is-file", ["evaluate", "{ck}", "--steps", "5", "--episodes", "1", "--out", "{d}/regular_file"], None),
    ("eval-odor-unknown", ["evaluate", "{ck}", "--odor", "dragon breath", "--out", "{o}/e"], "unknown odor"),
    ("eval-odor-typo", ["evaluate", "{ck}", "--odor", "1-hexanl", "--out", "{o}/e"], "close matches: 1-hexanol"),
    ("eval-odor-twice", ["evaluate", "{ck}", "--odor", "1-hexanol", "--odor", "1-Hexanol", "--out", "{o}/e"],
     "named twice"),
    ("eval-odor-too-many", ["evaluate", "{ck}", *sum([["--odor", o] for o in ("methanol", "ethanol", "1-propanol",
                            "1-butanol", "1-pentanol", "1-hexanol", "1-octanol", "2-pentanol", "glycerol")], []),
                            "--out", "{o}/e"], "1 to 8 odors"),
    ("eval-concentration-negative", ["evaluate", "{ck}", "--concentration", "-1", "--out", "{o}/e"], "0<=x<=100"),
    ("eval-concentration-huge", ["evaluate", "{ck}", "--concentration", "1e6", "--out", "{o}/e"], "0<=x<=100"),
    ("eval-concentration-nan", ["evaluate", "{ck}", "--concentration", "nan", "--out", "{o}/e"], "not a number in the range 0"),
    ("eval-concentration-text", ["evaluate", "{ck}", "--concentration", "lots", "--out", "{o}/e"], "--concentration"),
    ("eval-plume", ["evaluate", "{ck}", "--plume", "smoke", "--out", "{o}/e"], "exponential"),
    ("eval-plume-length-0", ["evaluate", "{ck}", "--plume-length", "0", "--out", "{o}/e"], "0<x<=500"),
    ("eval-plume-length-inf", ["evaluate", "{ck}", "--plume-length", "inf", "--out", "{o}/e"], "0<x<=500"),
    ("eval-wind-negative", ["evaluate", "{ck}", "--wind", "-2", "--out", "{o}/e"], "0<=x<=500"),
    ("eval-wind-nan", ["evaluate", "{ck}", "--wind", "nan", "--out", "{o}/e"], "not a number"),
    ("eval-start-distance-order", ["evaluate", "{ck}", "--start-distance", "20", "10", "--out", "{o}/e"],
     "MIN must be <= MAX"),
    ("eval-start-distance-0", ["evaluate", "{ck}", "--start-distance", "0", "10", "--out", "{o}/e"], "0<x<=500"),
    ("eval-start-distance-one", ["evaluate", "{ck}", "--start-distance", "10"], "--start-distance"),
    ("run-t0", ["run", "{ck}", "--input", "{d}/t0.npy", "--out", "{o}/s.npz"], "no time steps"),
    ("run-huge-header", ["run", "{ck}", "--input", "{d}/huge.npy", "--out", "{o}/s.npz"], "at most"),
    ("run-truncated", ["run", "{ck}", "--input", "{d}/truncated.npy", "--out", "{o}/s.npz"], "truncated"),
    ("run-garbage", ["run", "{ck}", "--input", "{d}/garbage.npy", "--out", "{o}/s.npz"], "not a readable"),
    ("run-wrong-n", ["run", "{ck}", "--input", "{d}/wrong_n.npy", "--out", "{o}/s.npz"], "must have shape"),
    ("run-missing-input", ["run", "{ck}", "--input", "{d}/nope.npy", "--out", "{o}/s.npz"], "not found"),
    ("run-out-under-file", ["run", "{ck}", "--input", "{d}/x.npy", "--out", "{d}/regular_file/s.npz"], "is a file"),
    ("run-dtype", ["run", "{ck}", "--input", "{d}/x.npy", "--out", "{o}/s.npz", "--dtype", "float16"], "--dtype"),
    ("export-format", ["export", "{ck}", "--format", "onnx", "-o", "{o}/m"], "--format"),
    ("export-nir-under-file", ["export", "{ck}", "--format", "nir", "-o", "{d}/regular_file/m.nir"], "is a file"),
    ("export-lava-onto-file", ["export", "{ck}", "--format", "lava", "-o", "{d}/regular_file"], "file is in the way"),
    ("export-weight-bits-0", ["export", "{ck}", "--format", "lava", "--fixed-point", "--weight-bits", "0", "-o", "{o}/l"],
     "--weight-bits"),
    ("export-weight-bits-9", ["export", "{ck}", "--format", "lava", "--fixed-point", "--weight-bits", "9", "-o", "{o}/l"],
     "--weight-bits"),
    ("export-fixed-nir", ["export", "{ck}", "--format", "nir", "--fixed-point", "-o", "{o}/m.nir"], "--fixed-point"),
    ("export-missing-ck", ["export", "{d}/nock", "--format", "nir", "-o", "{o}/m.nir"], "not found"),
    ("verify-odors-empty", ["verify", "{ck}", "--target", "nir", "--odors", ",,,"], "names no odor"),
    ("verify-odor-unknown", ["verify", "{ck}", "--target", "nir", "--odors", "dragon breath"], "dragon"),
    ("verify-steps-huge", ["verify", "{ck}", "--target", "nir", "--steps", "10000000"], "--steps"),
    ("verify-target", ["verify", "{ck}", "--target", "loihi3"], "--target"),
    ("verify-closed-loop-negative", ["verify", "{ck}", "--target", "lava-fixed", "--closed-loop-episodes", "-1"],
     "--closed-loop-episodes"),
    ("quantize-bits", ["quantize", "{ck}", "-o", "{o}/q", "--weight-bits", "0"], "--weight-bits"),
    ("quantize-nan", ["quantize", "{ck}", "-o", "{o}/q", "--leak-lsb", "nan"], "not a number"),
    ("quantize-episodes", ["quantize", "{ck}", "-o", "{o}/q", "--finetune-episodes", "-1"], "--finetune-episodes"),
    ("quantize-under-file", ["quantize", "{ck}", "-o", "{d}/regular_file/q"], None),
    ("analyze-missing", ["analyze", "{d}/nock", "--out", "{o}/a"], "not found"),
    ("analyze-not-a-checkpoint", ["analyze", "{d}", "--out", "{o}/a"], None),
    ("analyze-episodes-negative", ["analyze", "{ck}", "--episodes", "-1", "--out", "{o}/a"], "--episodes"),
    ("analyze-steps-0", ["analyze", "{ck}", "--steps", "0", "--out", "{o}/a"], "--steps"),
    ("analyze-odor-steps-0", ["analyze", "{ck}", "--odor-steps", "0", "--out", "{o}/a"], "--odor-steps"),
    ("analyze-seed-negative", ["analyze", "{ck}", "--seed", "-1", "--out", "{o}/a"], "--seed"),
    ("analyze-odors-empty", ["analyze", "{ck}", "--odors", ",,,", "--out", "{o}/a"], "names no odor"),
    ("analyze-odor-unknown", ["analyze", "{ck}", "--odors", "dragon breath", "--out", "{o}/a"], "dragon"),
    ("analyze-out-under-file", ["analyze", "{ck}", "--episodes", "0", "--odor-steps", "5", "--odors", "ethyl acetate",
                                "--no-figures", "--out", "{d}/regular_file/a"], None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(fx, tmp_path, case):
    _, argv, contains = case
    o = tmp_path / "out"
    o.mkdir()
    fill = {"ck": fx["ck"], "run": fx["run"], "d": fx["d"], "o": o}
    args = [a.format(**fill) for a in argv]
    shared_before = files_under(fx["d"])
    res = invoke(*args)
    check_failure(res, contains)
    assert files_under(o) == set(), f"left behind: {files_under(o)}"
    assert files_under(fx["d"]) == shared_before, f"changed: {files_under(fx['d']) ^ shared_before}"


def test_there_are_at_least_sixty_kinds():
    assert len(CASES) >= 60 and len({c[0].split("-")[0] for c in CASES}) >= 7  # every command


@pytest.mark.parametrize("argv", [
    ["evaluate", "{ck}", "--steps", "-5"],
    ["run", "{ck}", "--input", "{d}/huge.npy", "--out", "{o}/s.npz"],
    ["export", "{ck}", "--format", "nir", "-o", "{d}/regular_file/m.nir"],
    ["analyze", "{d}/nock", "--out", "{o}/a"],
])
def test_bad_input_in_a_real_process(fx, tmp_path, argv):
    fill = {"ck": fx["ck"], "d": fx["d"], "o": tmp_path}
    proc = subprocess.run([sys.executable, "-m", "dmn_neuro.cli", *[a.format(**fill) for a in argv]],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("Error:"), proc.stderr
    assert files_under(tmp_path) == set()


# ------------------------------------------------- failures while writing
def _raise(exc):
    def f(*a, **k):
        raise exc
    return f


def test_disk_full_during_fixed_point_export(fx, tmp_path, monkeypatch):
    out = tmp_path / "lava"
    monkeypatch.setattr(np, "savez", _raise(OSError(errno.ENOSPC, "No space left on device")))
    check_failure(invoke("export", fx["ck"], "--format", "lava", "--fixed-point", "-o", out), "disk full")
    assert files_under(tmp_path) == set()


def test_disk_full_during_checkpoint(fx, tmp_path, monkeypatch):
    import dmn_neuro.training.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "save_file", _raise(OSError(errno.ENOSPC, "No space left on device")))
    check_failure(invoke("quantize", fx["ck"], "-o", tmp_path / "q"), "disk full")
    assert files_under(tmp_path) == set()


def test_ctrl_c_during_lava_export_keeps_the_old_export(fx, tmp_path, monkeypatch):
    out = tmp_path / "lava"
    assert invoke("export", fx["ck"], "--format", "lava", "-o", out).exit_code == 0
    before = {p: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(np, "savez", _raise(KeyboardInterrupt()))
    res = invoke("export", fx["ck"], "--format", "lava", "--fixed-point", "-o", out)
    assert check_failure(res, "interrupted") and res.exit_code == 130
    assert {p: p.read_bytes() for p in out.iterdir()} == before
    assert files_under(tmp_path) == {Path("lava")} | {Path("lava") / p.name for p in before}


def test_unexpected_error_is_one_line_and_traceback_only_with_vv(fx, tmp_path, monkeypatch):
    import dmn_neuro.analysis.recording as recording

    monkeypatch.setattr(recording, "run_open_loop", _raise(RuntimeError("boom\nsecond line")))
    args = ["run", fx["ck"], "--input", fx["d"] / "x.npy", "--out", tmp_path / "s.npz"]
    line = check_failure(invoke(*args), "internal error: RuntimeError: boom second line")
    assert line.endswith("(run with -vv for details)")
    res = invoke("-vv", *args)
    assert res.exit_code == 1 and "Traceback" in res.stderr and "RuntimeError: boom" in res.stderr
    assert files_under(tmp_path) == set()


def test_second_writer_of_a_run_directory_is_refused(fx, tmp_path):
    from dmn_neuro.experiments.run import run_lock

    out = tmp_path / "r"
    out.mkdir()
    with run_lock(out):
        line = check_failure(invoke("train", "--config", TINY_YAML, "--episodes", 0, "--eval-episodes", 0, "--out", out),
                             "is in use by pid")
    assert "on" in line and "since" in line
    assert files_under(out) == {Path(".lock")}


# ------------------------------------------------------ unusual but valid
def test_unicode_and_space_paths(fx, tmp_path):
    out = tmp_path / "rün dir" / "ö ä"
    res = invoke("train", "--config", TINY_YAML, "--episodes", 1, "--eval-episodes", 0, "--out", out)
    assert res.exit_code == 0, res.stderr
    ck = out / "checkpoints" / "last"
    assert invoke("export", ck, "--format", "nir", "-o", tmp_path / "mödel é.nir").exit_code == 0
    assert invoke("run", ck, "--input", fx["d"] / "x.npy", "--out", tmp_path / "spïkes.npz").exit_code == 0


@pytest.mark.parametrize("dtype", ["float16", "int16", "float32"])
def test_other_numeric_input_dtypes(fx, tmp_path, dtype):
    x = np.load(fx["d"] / "x.npy").astype(dtype)
    np.save(tmp_path / "x.npy", x)
    res = invoke("run", fx["ck"], "--input", tmp_path / "x.npy", "--out", tmp_path / "s.npz")
    assert res.exit_code == 0, res.stderr
    assert set(np.load(tmp_path / "s.npz")) >= {"ORN", "DN"}


def test_single_episode_input_without_batch_axis(fx, tmp_path):
    np.save(tmp_path / "x.npy", np.load(fx["d"] / "x.npy")[:, 0])
    res = invoke("run", fx["ck"], "--input", tmp_path / "x.npy", "--out", tmp_path / "s.npz")
    assert res.exit_code == 0 and np.load(tmp_path / "s.npz")["DN"].shape[1] == 1


def test_smallest_evaluation(fx, tmp_path):
    res = invoke("evaluate", fx["ck"], "--episodes", 1, "--steps", 1, "--json", "--out", tmp_path / "e")
    assert res.exit_code == 0 and json.loads(res.stdout)["n_episodes"] == 1


def test_resumed_run_has_each_episode_once_and_keeps_before(tmp_path):
    out = tmp_path / "r"
    assert invoke("train", "--config", TINY_YAML, "--episodes", 1, "--eval-episodes", 2, "--out", out).exit_code == 0
    with open(out / "metrics.jsonl", "a") as fh:  # a record written after the last checkpoint, then killed
        fh.write(json.dumps({"episode": 1, "total": 9.9}) + "\n" + '{"episode": 2, "tot')
    res = invoke("train", "--config", TINY_YAML, "--episodes", 2, "--eval-episodes", 2, "--resume", "--out", out)
    assert res.exit_code == 0, res.stderr
    episodes = [json.loads(ln)["episode"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert episodes == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["episodes"] == 2 and "before" in summary and "after" in summary
    assert (out / "trajectories_before_after.png").is_file()


def test_resume_with_allowed_config_change(tmp_path):
    out = tmp_path / "r"
    assert invoke("train", "--config", TINY_YAML, "--episodes", 1, "--eval-episodes", 0, "--out", out).exit_code == 0
    res = invoke("train", "--config", TINY_YAML, "--episodes", 1, "--eval-episodes", 0, "--seed", 4, "--resume",
                 "--allow-config-change", "--out", out)
    assert res.exit_code == 0, res.stderr


def test_train_into_an_existing_empty_directory(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert invoke("train", "--config", TINY_YAML, "--episodes", 0, "--eval-episodes", 0, "--out", out).exit_code == 0


def test_verify_odors_with_spaces(fx):
    res = invoke("verify", fx["ck"], "--target", "nir", "--steps", 1000, "--odors", " ethyl acetate , 1-hexanol ",
                 "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["odors"] == ["ethyl acetate", "1-hexanol"]


def test_float_lava_export_replaces_a_fixed_point_one_whole(fx, tmp_path):
    out = tmp_path / "lava"
    assert invoke("export", fx["ck"], "--format", "lava", "--fixed-point", "-o", out).exit_code == 0
    assert (out / "netx.h5").is_file()
    assert invoke("export", fx["ck"], "--format", "lava", "-o", out).exit_code == 0
    assert not (out / "netx.h5").exists() and json.loads((out / "lava_graph.json").read_text())["mode"] == "float"
    assert [p.name for p in tmp_path.iterdir()] == ["lava"]


def test_single_file_checkpoint_everywhere(fx, tmp_path):
    pt = tmp_path / "model.pt"
    assert invoke("quantize", fx["ck"], "-o", pt).exit_code == 0 and pt.is_file()
    assert invoke("evaluate", pt, "--episodes", 1, "--steps", 5, "--out", tmp_path / "e").exit_code == 0
    assert invoke("export", pt, "--format", "nir", "-o", tmp_path / "m.nir").exit_code == 0


# ------------------------------------------------- experiment run / report
@pytest.fixture(scope="module")
def exp_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("experiments")
    good = {"base": str(TINY_YAML), "seeds": 1, "set": {"num_episodes": 0}, "conditions": {"real": {}}}
    files = {
        "kind": {**good, "conditions": {"flipped": {"connectome.variant": {"kind": "flipped"}}}},
        "key": {**good, "conditions": {"real": {"loss.nosuch_weight": 1}}},
        "name": {**good, "conditions": {"a b": {}}},
        "seeds": {**good, "seeds": -2},
        "top": {**good, "sweep": 3},
        "evaluate": {**good, "evaluate": {"episodes": -1}},
        "good": good,
    }
    for name, spec in files.items():
        (d / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    (d / "broken.yaml").write_text("conditions: [1, 2\n")
    (d / "list.yaml").write_text("- 1\n")
    return d


EXPERIMENT_CASES = [
    ("exp-unknown-variant-kind", ["experiment", "run", "{e}/kind.yaml", "--out", "{o}/x"], "kind must be one of"),
    ("exp-unknown-config-key", ["experiment", "run", "{e}/key.yaml", "--out", "{o}/x"], "nosuch_weight"),
    ("exp-bad-condition-name", ["experiment", "run", "{e}/name.yaml", "--out", "{o}/x"], "condition name"),
    ("exp-bad-seeds", ["experiment", "run", "{e}/seeds.yaml", "--out", "{o}/x"], "seeds"),
    ("exp-unknown-top-key", ["experiment", "run", "{e}/top.yaml", "--out", "{o}/x"], "sweep"),
    ("exp-bad-evaluate", ["experiment", "run", "{e}/evaluate.yaml", "--out", "{o}/x"], "evaluate.episodes"),
    ("exp-broken-yaml", ["experiment", "run", "{e}/broken.yaml", "--out", "{o}/x"], "not valid YAML"),
    ("exp-yaml-list", ["experiment", "run", "{e}/list.yaml", "--out", "{o}/x"], "mapping"),
    ("exp-file-missing", ["experiment", "run", "{e}/nope.yaml", "--out", "{o}/x"], "not found"),
    ("exp-negative-workers", ["experiment", "run", "{e}/good.yaml", "--out", "{o}/x", "--workers", "-1"], "--workers"),
    ("exp-zero-workers", ["experiment", "run", "{e}/good.yaml", "--out", "{o}/x", "--workers", "0"], "--workers"),
    ("exp-out-is-file", ["experiment", "run", "{e}/good.yaml", "--out", "{e}/good.yaml"], None),
    ("exp-report-missing-dir", ["experiment", "report", "{o}/nodir"], "not found"),
    ("exp-report-no-results", ["experiment", "report", "{e}"], "no finished cells"),
]


@pytest.mark.parametrize("case", EXPERIMENT_CASES, ids=[c[0] for c in EXPERIMENT_CASES])
def test_bad_experiment_input_is_one_line_and_leaves_nothing(exp_files, tmp_path, case):
    _, argv, contains = case
    o = tmp_path / "out"
    o.mkdir()
    before = files_under(exp_files)
    check_failure(invoke(*[a.format(e=exp_files, o=o) for a in argv]), contains)
    assert files_under(o) == set(), f"left behind: {files_under(o)}"
    assert files_under(exp_files) == before
