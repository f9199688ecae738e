"""`connectome info` / `export-table` through CliRunner and a real subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dmn_neuro.cli.connectome import connectome

REPO = Path(__file__).resolve().parent.parent


def _run(args, tmp_path):
    return CliRunner().invoke(connectome, list(args) + ["--cache-dir", str(tmp_path / "cache")])


def _proj(summary, pre, post):
    return next(p for p in summary["projections"] if (p["pre"], p["post"]) == (pre, post))


def test_info_json_acceptance(tmp_path):
    r = _run(["info", "--json"], tmp_path)
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)  # exactly one JSON object
    assert s["source"] == "flywire_v783_mb" and s["version"] == "v783"
    assert {k: v["n"] for k, v in s["layers"].items()} == {"ORN": 55, "PN": 124, "KC": 2597, "APL": 1, "MBON": 48, "DN": 4}
    pk, km = _proj(s, "PN", "KC"), _proj(s, "KC", "MBON")
    assert (pk["n_edges"], pk["n_synapses"], pk["provenance"]) == (9841, 135797, "flywire_v783")
    assert (km["n_edges"], km["n_synapses"]) == (7485, 55237)
    assert _proj(s, "ORN", "PN")["provenance"] == "model" and _proj(s, "MBON", "DN")["provenance"] == "model"
    for p in s["projections"]:
        assert {"pre", "post", "n_edges", "n_synapses", "density", "provenance"} <= set(p)


def test_info_text_labels_models(tmp_path):
    r = _run(["info", "--layers", "ORN,PN,KC,MBON,DN"], tmp_path)
    assert r.exit_code == 0, r.output
    assert "ORN -> PN" in r.output and "[MODEL ASSUMPTION]" in r.output and "APL" not in r.output
    r = _run(["info", "--source", "hemibrain_v1.2.1_mb"], tmp_path)
    assert r.exit_code == 0 and "hemibrain_v1.2.1" in r.output


@pytest.mark.parametrize("args, message", [
    (["info", "--source", "codex:/nonexistent"], "Error: codex directory not found: /nonexistent"),
    (["info", "--source", "flywire"], "Error: unknown source 'flywire'"),
    (["info", "--layers", "PN,LN"], "Error: unknown layer 'LN'"),
    (["info", "--source", "hemibrain_v1.2.1_mb", "--layers", "KC,DAN"], "Error: source hemibrain_v1.2.1_mb has no DAN"),
    (["info", "--option", "n_dn=-2"], "Error: option n_dn must be a positive integer"),
])
def test_errors_one_line(tmp_path, args, message):
    r = _run(args, tmp_path)
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), r.output
    assert "Traceback" not in r.output


def test_export_table(tmp_path):
    out = tmp_path / "out"
    r = _run(["export-table", "--source", "synthetic", "--option", "seed=2", "-o", str(out)], tmp_path)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["edges.csv", "neurons.csv"]
    head = (out / "edges.csv").read_text().splitlines()[0]
    assert head == "pre_id,post_id,count,pre_layer,post_layer,provenance"
    bad = tmp_path / "bad_out"
    r = _run(["export-table", "--source", f"codex:{tmp_path / 'missing'}", "-o", str(bad)], tmp_path)
    assert r.exit_code == 1 and not bad.exists()


def test_corrupt_cache_via_cli(tmp_path):
    assert _run(["info", "--json"], tmp_path).exit_code == 0
    npz = next((tmp_path / "cache" / "connectome").glob("*.npz"))
    npz.write_bytes(b"garbage")
    with pytest.warns(Warning, match="corrupt connectome cache entry"):
        r = _run(["info", "--json"], tmp_path)
    assert r.exit_code == 0 and json.loads(r.output)["layers"]["PN"]["n"] == 124


def test_real_subprocess(tmp_path):
    env = {**os.environ, "DMN_NEURO_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "dmn_neuro.cli", "connectome"]
    ok = subprocess.run(cmd + ["info", "--json"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["projections"][0]["provenance"] == "model"
    assert (tmp_path / "cache" / "connectome").is_dir()
    bad = subprocess.run(cmd + ["info", "--source", "codex:/nonexistent"], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip() == "Error: codex directory not found: /nonexistent"
    out = tmp_path / "o"
    bad = subprocess.run(cmd + ["export-table", "--layers", "PN,XX", "-o", str(out)], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=120)
    assert bad.returncode == 1 and "unknown layer 'XX'" in bad.stderr and "Traceback" not in bad.stderr
    assert not out.exists()
