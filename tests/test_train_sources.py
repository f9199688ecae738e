"""`dmn-neuro train --source X` with each source's own options (in-process, CliRunner).

The training default options (8 ORNs per glomerulus, 16 DNs) are model-layer
options of the bundled and synthetic sources only; codex and cave read the real
ORNs and DNs and take none. The cave run uses the fake client of
test_connectome_sources in place of caveclient (no network)."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from dmn_neuro.cli import cli
from test_connectome_sources import _fake_client, write_codex


def _train(out, *args):
    return CliRunner().invoke(cli, ["--threads", "1", "train", *[str(a) for a in args], "--episodes", "1",
                                    "--steps", "20", "--batch-size", "2", "--out", str(out)])


@pytest.mark.parametrize("source", ["flywire_v783_mb", "hemibrain_v1.2.1_mb", "synthetic", "codex", "cave"])
def test_train_with_each_source(tmp_path, monkeypatch, source):
    import connectome.sources.cave as cave

    if source == "codex":
        source = f"codex:{write_codex(tmp_path / 'codex')}"
    if source == "cave":
        client = _fake_client()
        monkeypatch.setattr(cave, "_default_client", lambda datastack: client)
    out = tmp_path / "run"
    res = _train(out, "--source", source)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert json.loads(res.stdout.strip().splitlines()[-1])["episodes"] == 1
    written = yaml.safe_load((out / "config.yaml").read_text())["connectome"]
    assert written == {"source": source, "source_options": None, "variant": None}
    meta = json.loads((out / "checkpoints" / "last" / "checkpoint.json").read_text())
    sizes = meta["structure"]["layer_sizes"]
    if source.startswith(("codex", "cave")):
        assert sizes["ORN"] == 3 and sizes["DN"] == 1  # the real ones of the fixture
    else:
        assert sizes["DN"] == 16 and sizes["ORN"] % 8 == 0  # the training defaults
    if source == "cave":
        assert client.materialize.calls, "the fake client was used"


def test_an_option_the_source_does_not_take_is_a_one_line_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("connectome: {source_options: {orn_per_glomerulus: 8, n_dn: 16}}\n")
    out = tmp_path / "run"
    res = _train(out, "--config", cfg, "--source", "cave")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code != 0 and len(lines) == 1, res.output
    assert lines[0].startswith("Error: config: connectome: source cave: unknown option 'n_dn'; accepted: all_alpn")
    assert not out.exists()
