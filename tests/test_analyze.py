"""``dmn-neuro analyze``: learned vs connectome, KC coding, readout, lesions, manifolds.

Behaviour on a tiny untrained checkpoint (``train --episodes 0``): the rebuilt
initial weights are the checkpoint's, weights equal to log-counts correlate
perfectly with the counts, a lesion of APL removes APL's effect on the KCs,
and the JSON has every item of issue 13's deliverable 4.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dmn_neuro.cli import cli

REPO = Path(__file__).resolve().parent.parent
TINY_YAML = REPO / "examples" / "configs" / "tiny.yaml"
ODORS = ["ethyl acetate", "1-hexanol", "benzaldehyde", "isopentyl acetate"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("analyze")
    res = CliRunner().invoke(cli, ["train", "--config", str(TINY_YAML), "--episodes", "0", "--eval-episodes", "0",
                                   "--out", str(d / "run")])
    assert res.exit_code == 0, res.output
    return d / "run" / "checkpoints" / "last"


@pytest.fixture(scope="module")
def loaded(tiny):
    from dmn_neuro.analysis.connectome_vs_learned import rebuild_reference
    from dmn_neuro.training.checkpoint import load_circuit
    from dmn_neuro.training.config import TrainingConfig

    circuit, ck = load_circuit(tiny)
    cfg = TrainingConfig.from_dict(ck["meta"]["config"]).replace(device="cpu")
    return circuit, cfg, rebuild_reference(circuit, cfg)


def _set_magnitudes(w, mag: np.ndarray) -> None:
    from connectome.adjacency_matrix import inverse_softplus

    with torch.no_grad():
        m = torch.as_tensor(mag, dtype=w.raw.dtype).clamp_min(1e-6)
        w.raw.copy_(torch.where(w.mask, inverse_softplus(m), w.raw))


def test_untrained_checkpoint_is_its_own_initial_circuit(loaded):
    from dmn_neuro.analysis.connectome_vs_learned import learned_vs_connectome

    circuit, _, ref = loaded
    cmp_ = learned_vs_connectome(circuit, ref)
    assert set(cmp_) == {f"{a}->{b}" for a, b in circuit.projection_pairs}
    for key, c in cmp_.items():
        assert c["fraction_unchanged"] == 1.0, key
        assert c["relative_change"]["quantiles"]["q50"] == pytest.approx(0.0, abs=1e-6)
    # PN->KC is initialised from log(1 + count) without normalisation: a monotone map of the counts
    assert cmp_["PN->KC"]["spearman_initial_vs_count"] == pytest.approx(1.0, abs=1e-9)


def test_weights_equal_to_log_counts_have_spearman_one_and_scaling_is_a_relative_change(loaded):
    import copy

    from dmn_neuro.analysis.connectome_vs_learned import learned_vs_connectome

    circuit, _, ref = loaded
    c = copy.deepcopy(circuit)
    for key in ("PN->KC", "KC->MBON"):
        a, b = key.split("->")
        _set_magnitudes(c.weight(a, b), np.log1p(ref.counts[key]))
    with torch.no_grad():
        w = c.weight("KC", "APL")
        w.raw.copy_(w.raw + float(np.log(np.expm1(1.0))))  # any change; relative change is then nonzero
    cmp_ = learned_vs_connectome(c, ref)
    for key in ("PN->KC", "KC->MBON"):
        assert cmp_[key]["spearman_learned_vs_count"] == pytest.approx(1.0, abs=1e-9)
        within = cmp_[key]["within_post_learned_vs_count"]
        assert within["n_rows"] > 0 and within["mean"] == pytest.approx(1.0, abs=1e-9)
    assert cmp_["KC->APL"]["fraction_unchanged"] == 0.0
    assert cmp_["ORN->PN"]["fraction_unchanged"] == 1.0  # untouched projection


def test_spearman_is_none_when_undefined():
    from dmn_neuro.analysis.connectome_vs_learned import spearman

    assert spearman(np.ones(5), np.arange(5)) is None
    assert spearman(np.arange(2), np.arange(2)) is None
    assert spearman(np.arange(10), -np.arange(10) ** 3) == pytest.approx(-1.0)


def _kc_spikes(circuit, x):
    from dmn_neuro.analysis.recording import run_open_loop

    return run_open_loop(circuit, x, dtype=torch.float64, engine="snntorch")["KC"]


def test_apl_lesion_removes_apl_effect_on_kcs(loaded):
    import copy

    from dmn_neuro.analysis.kc_coding import panel_encoder
    from dmn_neuro.analysis.lesions import lesioned
    from dmn_neuro.environment.odors import static_odor_input

    circuit, cfg, _ = loaded
    enc = panel_encoder(circuit, cfg)
    x = np.asarray(static_odor_input(enc, ODORS[:2], 40, generator=torch.Generator().manual_seed(0)), dtype=np.float64)
    # make APL fire every step (a large tonic drive): then it inhibits the KCs, unless lesioned
    loud = copy.deepcopy(circuit).double()
    with torch.no_grad():
        loud.cells["APL"].raw_threshold.fill_(-20.0)
    les_loud, les_quiet = lesioned(loud, "APL"), lesioned(circuit.double(), "APL")
    assert not bool(les_loud.weight("APL", "KC").mask.any())
    assert bool(loud.weight("APL", "KC").mask.any()), "the lesion must not touch the original"
    kc_loud = _kc_spikes(loud, x)
    kc_les_loud, kc_les_quiet = _kc_spikes(les_loud, x), _kc_spikes(les_quiet, x)
    np.testing.assert_array_equal(kc_les_loud, kc_les_quiet)  # APL activity no longer matters
    assert kc_les_loud.sum() > kc_loud.sum()  # and it did inhibit the KCs before


def test_mbon_class_lesion_zeroes_exactly_its_columns(loaded):
    from dmn_neuro.analysis.lesions import lesion_plan, lesioned

    circuit, _, ref = loaded
    plan = lesion_plan(circuit, ref.mbon_transmitters)
    names = [p[0] for p in plan]
    assert names[0] == "APL" and "MBON:gaba" in names and any(n.startswith("MBON type ") for n in names)
    _, pop, idx = next(p for p in plan if p[0] == "MBON:gaba")
    w0 = circuit.weight("MBON", "DN")().detach()
    w = lesioned(circuit, pop, idx).weight("MBON", "DN")().detach()
    assert torch.all(w[:, idx] == 0)
    rest = [i for i in range(w.shape[1]) if i not in idx]
    assert torch.equal(w[:, rest], w0[:, rest])
    assert set(idx) == {i for i, t in enumerate(ref.mbon_transmitters) if t == "gaba"}


def test_pca_finds_rank_one_structure():
    from dmn_neuro.analysis.manifold import pca

    rng = np.random.default_rng(0)
    x = np.outer(rng.normal(size=200), rng.normal(size=30)) + 1e-6 * rng.normal(size=(200, 30))
    p = pca(x, k=5)
    assert p["explained_variance_ratio"][0] > 0.999 and p["participation_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert p["scores"].shape == (200, 5)


def test_jaccard_overlap():
    from dmn_neuro.analysis.kc_coding import jaccard_matrix

    r = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=bool)
    j = jaccard_matrix(r)
    assert j[0, 1] == pytest.approx(1 / 3) and j[0, 0] == 1.0 and np.isnan(j[2, 2]) and j[0, 2] == 0.0


def _no_nan(text: str):
    def bad(c):
        raise AssertionError(f"{c} in JSON")

    return json.loads(text, parse_constant=bad)


def test_analysis_json_has_every_item(tiny, tmp_path):
    from dmn_neuro.analysis.analyze import analyze_checkpoint

    calls = []
    res = analyze_checkpoint(tiny, tmp_path / "a", episodes=2, steps=20, odor_steps=20, odors=ODORS,
                             progress=lambda label, total: calls.append((label, total)))
    on_disk = _no_nan((tmp_path / "a" / "analysis.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert calls and calls[-1][0] == "written" and all(t == calls[0][1] for _, t in calls)
    for key, c in res["learned_vs_connectome"].items():
        for item in ("spearman_learned_vs_count", "within_post_learned_vs_count", "relative_change",
                     "fraction_unchanged", "provenance"):
            assert item in c, (key, item)
    kc = res["kc_coding"]
    assert set(kc["fraction_responding"]) == set(ODORS)
    for item in ("pairwise_overlap_jaccard", "pattern_correlation", "fraction_responding_blank"):
        assert item in kc
    assert {"pn", "kc", "similarity_pn_vs_kc"} <= set(kc["pattern_correlation"])
    ro = res["mbon_readout"]
    assert {"acetylcholine", "gaba", "glutamate"} <= set(ro["by_transmitter"]) and ro["by_cell_type"]
    les = res["lesions"]
    assert "intact" in les and "method" in les
    assert {"APL", "MBON:acetylcholine", "MBON:gaba", "MBON:glutamate"} <= set(les["lesions"])
    assert any(k.startswith("MBON type ") for k in les["lesions"])
    for v in les["lesions"].values():
        assert 0.0 <= v["success_rate"] <= 1.0 and v["final_distance_mm"] >= 0
    man = res["manifold"]
    assert {"PN", "KC", "MBON"} <= set(man["per_odor"]["populations"])
    assert {"KC", "MBON"} <= set(man["trajectories"]["populations"])
    assert "headline" in res
    for name in ["kc_coding.npz"] + res["figures"]:
        assert (tmp_path / "a" / name).stat().st_size > 0
    with np.load(tmp_path / "a" / "kc_coding.npz") as z:
        assert z["jaccard"].shape == (len(ODORS), len(ODORS))


def test_analyze_cli_in_a_real_process(tiny, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dmn_neuro.cli", "--threads", "1", "analyze", str(tiny), "--episodes", "1",
         "--steps", "10", "--odor-steps", "10", "--odors", ",".join(ODORS[:3]), "--no-figures", "--no-lesions",
         "--json", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    res = _no_nan(proc.stdout)
    assert res["lesions"]["lesions"] == {} and "intact" in res["lesions"]
    assert sorted(res["kc_coding"]["fraction_responding"]) == sorted(ODORS[:3])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["analysis.json", "kc_coding.npz"]


def test_pca_ignores_constant_features_and_handles_no_variance():
    from dmn_neuro.analysis.manifold import pca

    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6))
    wide = np.concatenate([x, np.zeros((50, 40)), np.full((50, 3), 2.0)], axis=1)
    a, b = pca(x, k=4), pca(wide, k=4)
    np.testing.assert_allclose(np.abs(a["scores"]), np.abs(b["scores"]), atol=1e-9)
    np.testing.assert_allclose(a["explained_variance_ratio"], b["explained_variance_ratio"])
    assert b["components"].shape == (4, 49) and np.all(b["components"][:, 6:] == 0)
    z = pca(np.ones((10, 5)), k=3)
    assert z["participation_ratio"] == 0.0 and z["scores"].shape == (10, 3)
