"""Odor input: Hallem & Carlson data, rate/Poisson encoding, gradients."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from connectome.errors import DataError
from dmn_neuro.environment.odors import (
    OdorEncoder,
    hallem_carlson_dir,
    load_hallem_carlson,
    static_odor_input,
)

# a few glomeruli with Hallem data (DM2 = Or22a, DL5 = Or7a, DM5 = Or85a + Or33b),
# one repeated (two ORNs of one glomerulus) and two without Hallem data.
GLOMERULI = ["DM2", "DM2", "DL5", "DM5", "DA1", "VP1l+"]


@pytest.fixture(scope="module")
def data():
    return load_hallem_carlson()


@pytest.fixture(scope="module")
def enc(data):
    return OdorEncoder(GLOMERULI, dt_ms=1.0, default_spontaneous_hz=7.0, data=data)


def test_hallem_table_shape_and_spontaneous_row(data):
    assert len(data.odors) == 110
    assert len(data.receptors) == 24
    assert data.responses.shape == (110, 24)
    assert "spontaneous firing rate" not in data.odors
    j = data.receptors.index("Or22a")
    assert data.spontaneous[j] == 4.0  # first data row of the published table
    assert data.receptor_glomerulus["Or22a"] == "DM2"
    assert data.receptor_glomerulus["Or33b"] == "DM5+DM3"
    i = data.odors.index("ammonium hydroxide")
    assert data.responses[i, data.receptors.index("Or7a")] == -21.0


def test_buffers_map_glomeruli(enc, data):
    assert tuple(enc.response.shape) == (110, len(GLOMERULI))
    assert tuple(enc.spontaneous.shape) == (len(GLOMERULI),)
    r22, r7 = data.receptors.index("Or22a"), data.receptors.index("Or7a")
    assert enc.spontaneous[0].item() == data.spontaneous[r22]
    assert torch.equal(enc.response[:, 0], enc.response[:, 1])
    np.testing.assert_allclose(enc.response[:, 2].numpy(), data.responses[:, r7], rtol=0, atol=1e-5)
    # DM5: Or85a and Or33b add their changes, average their spontaneous rates
    a, b = data.receptors.index("Or85a"), data.receptors.index("Or33b")
    np.testing.assert_allclose(enc.response[:, 3].numpy(), data.responses[:, a] + data.responses[:, b], atol=1e-4)
    assert enc.spontaneous[3].item() == pytest.approx(0.5 * (data.spontaneous[a] + data.spontaneous[b]))
    # glomeruli without data: default spontaneous rate, no response
    assert enc.spontaneous[4].item() == 7.0 and enc.spontaneous[5].item() == 7.0
    assert torch.all(enc.response[:, 4:] == 0)


def test_zero_concentration_gives_spontaneous_exactly(enc):
    idx = torch.arange(0, 110, 11)
    for c in (torch.zeros(len(idx)), torch.zeros(len(idx), 2)):
        r = enc.rates(idx, c)
        expect = enc.spontaneous.expand_as(r)
        assert torch.equal(r, expect)


def test_rate_monotone_in_concentration_for_excitatory_receptor(data):
    e = OdorEncoder(["DM2"], data=data)
    i = e.odor_index("ethyl butyrate")  # strongly excites Or22a
    assert e.response[i, 0] > 100
    c = torch.linspace(0, 2, 21)
    r = e.rates(torch.full((21,), i), c)[:, 0]
    assert torch.all(r[1:] > r[:-1])
    assert r[10].item() == pytest.approx(e.spontaneous[0].item() + e.response[i, 0].item())  # c = 1
    # Hill: saturating, normalised so that f(1) = 1, still monotone
    h = OdorEncoder(["DM2"], hill_k=0.5, data=data)
    rh = h.rates(torch.full((21,), i), c)[:, 0]
    assert torch.all(rh[1:] > rh[:-1])
    assert rh[10].item() == pytest.approx(r[10].item(), rel=1e-6)
    assert rh[20] - rh[10] < rh[10] - rh[0]


def test_rates_clamped_at_zero(enc, data):
    i = enc.odor_index("cadaverine")  # inhibits Or7a (DL5) by 41 Hz, spontaneous 17 Hz
    r = enc.rates(torch.tensor([i]), torch.tensor([1.0]))
    assert r[0, 2].item() == 0.0
    assert torch.all(r >= 0)


def test_unknown_odor_raises_with_close_matches(enc):
    with pytest.raises(DataError, match="ethyl acetate"):
        enc.odor_index("ethyl acetat")
    with pytest.raises(DataError):
        enc.odor_index("unobtainium")
    assert enc.odor_index("Isoamyl Acetate") == enc.odors.index("isopentyl acetate")
    with pytest.raises(DataError):
        OdorEncoder(["DM2"], odors=["ethyl acetate", "no such odor"])


def test_odor_subset_order(data):
    e = OdorEncoder(["DM2", "DL5"], odors=["1-hexanol", "ethyl acetate"], data=data)
    assert e.odors == ["1-hexanol", "ethyl acetate"]
    assert tuple(e.response.shape) == (2, 2)
    assert e.odor_index("ethyl acetate") == 1


def test_default_task_odors_by_data(data):
    glom = sorted({g for gs in data.receptor_glomerulus.values() for g in gs.split("+")})
    e = OdorEncoder(glom, data=data)
    odors = e.default_task_odors()
    assert odors[0] == "isopentyl acetate"
    assert len(odors) == 4 and len(set(odors)) == 4
    score = e.odor_score()
    # every chosen odor excites the receptors at least as much as the median odor
    assert all(score[e.odors.index(o)] >= np.median(score) for o in odors)
    assert score[e.odors.index(odors[-1])] >= np.quantile(score, 0.9)


def test_rate_currents_units(enc):
    r = torch.tensor([[100.0, 0.0, 250.0, 10.0, 7.0, 7.0]])
    e2 = OdorEncoder(GLOMERULI, dt_ms=0.5, current_per_hz=2.0)
    torch.testing.assert_close(e2.currents(r), r * 0.5e-3 * 2.0)
    torch.testing.assert_close(enc.currents(r), r * 1e-3)


def test_poisson_seeded_reproducible_and_unbiased(data):
    e = OdorEncoder(GLOMERULI, encoding="poisson", current_per_hz=0.5, data=data)
    r = torch.full((4000, len(GLOMERULI)), 200.0)
    a = e.currents(r, generator=torch.Generator().manual_seed(3))
    b = e.currents(r, generator=torch.Generator().manual_seed(3))
    c = e.currents(r, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(torch.unique(a).tolist()) <= {0.0, 0.5}
    assert (a.mean() / 0.5).item() == pytest.approx(0.2, abs=0.01)
    # the encoder's own seeded generator
    s1 = OdorEncoder(GLOMERULI, encoding="poisson", seed=11, data=data).currents(r)
    s2 = OdorEncoder(GLOMERULI, encoding="poisson", seed=11, data=data).currents(r)
    assert torch.equal(s1, s2)
    x1 = static_odor_input(e, ["ethyl acetate"], 50, generator=torch.Generator().manual_seed(1))
    x2 = static_odor_input(e, ["ethyl acetate"], 50, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(x1, x2)


def test_gradients_flow_from_rates_to_concentration(enc):
    i = torch.tensor([enc.odor_index("ethyl butyrate"), enc.odor_index("1-hexanol")])
    conc = torch.tensor([[0.3, 0.6], [0.2, 0.9]], requires_grad=True)
    rates = enc.rates(i, conc)
    assert tuple(rates.shape) == (2, 2, len(GLOMERULI))
    enc.currents(rates).sum().backward()
    assert conc.grad is not None and torch.all(conc.grad.abs() > 0)
    # Poisson input passes the gradient of its expectation (straight-through)
    pe = OdorEncoder(GLOMERULI, encoding="poisson", seed=0)
    conc2 = torch.tensor([0.5], requires_grad=True)
    pe.currents(pe.rates(torch.tensor([i[0].item()]), conc2)).sum().backward()
    assert conc2.grad.item() != 0.0


def test_static_odor_input_shape(enc):
    x = static_odor_input(enc, ["ethyl acetate", "1-hexanol"], T=7, concentration=0.5)
    assert x.shape == (7, 2, len(GLOMERULI)) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], x[-1])
    zero = static_odor_input(enc, ["ethyl acetate"], T=3, concentration=0.0)
    np.testing.assert_allclose(zero[0, 0], enc.spontaneous.numpy() * 1e-3, rtol=1e-6)


def _copy_table(tmp_path: Path) -> Path:
    d = tmp_path / "hc"
    d.mkdir()
    for name in ("responses.csv", "receptors.csv"):
        (d / name).write_text((hallem_carlson_dir() / name).read_text())
    return d


def test_malformed_or_missing_files_raise_data_error(tmp_path):
    d = _copy_table(tmp_path)
    assert len(load_hallem_carlson(d).odors) == 110
    resp = d / "responses.csv"
    lines = resp.read_text().splitlines()
    resp.write_text("\n".join(lines[:5] + [lines[5].replace(",", ",x", 1).rsplit(",", 1)[0] + ",abc"] + lines[6:]))
    with pytest.raises(DataError, match="responses.csv"):
        load_hallem_carlson(d)
    resp.write_text("\n".join(lines[:1] + lines[2:]))  # spontaneous row removed
    with pytest.raises(DataError, match="spontaneous"):
        load_hallem_carlson(d)
    (d / "receptors.csv").unlink()
    with pytest.raises(DataError, match="receptors.csv"):
        load_hallem_carlson(d)
    with pytest.raises(DataError, match="nowhere"):
        load_hallem_carlson(tmp_path / "nowhere")


def test_bad_arguments():
    with pytest.raises(ValueError, match="encoding"):
        OdorEncoder(["DM2"], encoding="spiky")
    with pytest.raises(ValueError):
        OdorEncoder([])
    with pytest.raises(ValueError):
        OdorEncoder(["DM2"], hill_k=-1.0)


# -- held-out split and mixtures --------------------------------------------------------
def test_chemical_classes_follow_the_table_order(data):
    from dmn_neuro.environment.odors import chemical_classes

    cls = chemical_classes(data)
    assert set(cls) == set(data.odors) and "unclassified" not in cls.values()
    assert cls["isopentyl acetate"] == "ester" and cls["1-hexanol"] == "alcohol"
    assert cls["benzaldehyde"] == "aromatic" and cls["hexanal"] == "aldehyde" and cls["linalool"] == "terpene"
    assert cls["2,3-butanedione"] == "ketone" and cls["2,3-butanediol"] == "alcohol"


def test_held_out_split_is_seeded_stratified_and_a_third(data):
    from dmn_neuro.environment.odors import chemical_classes, held_out_split, well_driving_odors

    good = well_driving_odors(data)
    assert len(good) == 67 and "glycerol" not in good and "isopentyl acetate" in good
    a, b, c = held_out_split(seed=0), held_out_split(seed=0), held_out_split(seed=1)
    assert a == b and a != c
    assert not set(a["train"]) & set(a["held_out"]) and set(a["train"]) | set(a["held_out"]) == set(good)
    assert len(a["held_out"]) == int(np.ceil(len(good) / 3))
    assert {"isopentyl acetate", "ethyl acetate"} <= set(a["train"])
    cls = chemical_classes(data)
    for k in set(cls[o] for o in good):  # each class holds out floor or ceil of a third
        n = sum(cls[o] == k for o in good if o not in ("isopentyl acetate", "ethyl acetate"))
        h = sum(cls[o] == k for o in a["held_out"])
        assert int(np.floor(n / 3)) <= h <= int(np.ceil(n / 3))


def test_mixture_adds_the_components_response_changes(enc):
    before = enc.n_odors
    name = enc.add_mixture(["ethyl acetate", "1-hexanol"])
    try:
        assert name == "ethyl acetate + 1-hexanol" and enc.n_odors == before + 1
        assert enc.odor_index(name) == before
        r = enc.response
        assert torch.equal(r[before], r[enc.odor_index("ethyl acetate")] + r[enc.odor_index("1-hexanol")])
        assert enc.add_mixture(["ethyl acetate", "1-hexanol"]) == name and enc.n_odors == before + 1
        with pytest.raises(ValueError, match="two odor names"):
            enc.add_mixture(["ethyl acetate"])
    finally:  # the fixture is shared: drop the mixture row again
        enc.response = enc.response[:before]
        enc.odors.pop()


def test_adaptation_gain_is_the_change_relative_to_the_running_mean(data):
    glom = ["DM2", "DL5", "VA2"]
    enc = OdorEncoder(glom, data=data, adaptation_tau_ms=100.0, adaptation_floor=0.01)
    plain = OdorEncoder(glom, data=data)
    i = torch.tensor([enc.odor_index("isopentyl acetate")] * 2)
    c = torch.tensor([[0.5, 0.3], [2.0, 1.2]])            # two episodes x (left, right)
    level = enc.adaptation_step(None, c)                    # starts adapted: the bilateral mean
    assert torch.allclose(level, torch.tensor([0.4, 1.6]))
    d = math.exp(-enc.dt_ms / 100.0)
    nxt = enc.adaptation_step(level, c * 2)
    assert torch.allclose(nxt, d * level + (1 - d) * 2 * level)
    r = enc.rates(i, c, level)
    expected = plain.rates(i, c / (level[:, None] + 0.01))  # f(c) / (a + K) in place of f(c)
    assert torch.allclose(r, expected)
    # the left/right contrast of episode 2 (4x the concentration) is that of episode 1, up to K
    rel = (r[:, 0] - r[:, 1]).abs().sum(-1)
    assert rel[1] == pytest.approx(float(rel[0]) * (0.41 / 0.40) * (1.6 / 1.61), rel=1e-5)
    # no odor: spontaneous exactly; a static input (level None) is adapted to itself
    assert torch.equal(enc.rates(i, torch.zeros(2, 2), torch.zeros(2)), plain.rates(i, torch.zeros(2, 2)))
    assert torch.allclose(enc.rates(i[:1], torch.tensor([3.0])), plain.rates(i[:1], torch.tensor([3.0 / 3.01])))
    assert not plain.adapting and plain.adaptation_step(None, c) is None
    with pytest.raises(ValueError, match="adaptation_tau_ms"):
        OdorEncoder(glom, data=data, adaptation_tau_ms=0.0)
    with pytest.raises(ValueError, match="level"):
        enc.rates(i, c, torch.ones(3))


def test_adaptation_level_is_the_response_to_a_steady_odor(data):
    enc = OdorEncoder(["DM2", "DL5"], data=data, adaptation_tau_ms=100.0, adaptation_floor=1e-6, adaptation_level=0.25)
    plain = OdorEncoder(["DM2", "DL5"], data=data)
    i = torch.tensor([enc.odor_index("isopentyl acetate")])
    for c in (0.1, 1.0, 10.0):  # any steady concentration reads as 0.25 of the reference
        assert torch.allclose(enc.rates(i, torch.tensor([c])), plain.rates(i, torch.tensor([0.25])), rtol=1e-4)
    with pytest.raises(ValueError, match="adaptation_level"):
        OdorEncoder(["DM2"], data=data, adaptation_tau_ms=100.0, adaptation_level=-1.0)


def test_adaptation_is_the_same_with_one_or_two_sources(data):
    enc = OdorEncoder(["DM2", "DL5"], data=data, adaptation_tau_ms=100.0, adaptation_level=0.25)
    i, j = enc.odor_index("isopentyl acetate"), enc.odor_index("1-hexanol")
    c = torch.tensor([[0.5, 0.3]])
    one = enc.rates(torch.tensor([i]), c, torch.tensor([0.4]))
    two = enc.rates(torch.tensor([[i, j]]), torch.stack([c, torch.zeros_like(c)], dim=-1), torch.tensor([0.4]))
    assert torch.allclose(one, two)  # a second source at zero adds nothing, with the same gain (level and L_a)
    assert torch.allclose(enc.adaptation_step(None, c), enc.adaptation_step(None, torch.stack([c, 0 * c], -1)))
