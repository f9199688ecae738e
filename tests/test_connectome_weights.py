"""Weights from counts: mask/sign invariants, init, normalisation, ConstrainedWeight training."""
import numpy as np
import pytest
import torch

from connectome.adjacency_matrix import AdjacencyMatrixGenerator, ConstrainedWeight
from connectome.errors import ConfigError, DataError


def test_seed_stage1_snippet(tmp_path, capsys):
    from connectome.fetch_data import FlyWireConnectome
    fetcher = FlyWireConnectome(cache_dir=tmp_path)
    data = fetcher.fetch_olfactory_circuit(include_layers=['ORN', 'PN', 'KC', 'MBON', 'DN'])
    generator = AdjacencyMatrixGenerator()
    weights, mask = generator.create_weight_matrix(data, 'PN', 'KC')
    print(f"Sparsity: {1 - mask.float().mean():.3f}")
    assert capsys.readouterr().out.strip() == f"Sparsity: {1 - 9841 / (124 * 2597):.3f}"
    assert isinstance(weights, ConstrainedWeight) and weights.weight.shape == (2597, 124)


def test_mask_sign_dale(flywire_circuit):
    g = AdjacencyMatrixGenerator()
    counts = flywire_circuit.count_matrix("APL", "KC")
    w, mask = g.create_weight_matrix(flywire_circuit, "APL", "KC", learnable=False)
    np.testing.assert_array_equal(mask.numpy(), counts > 0)
    assert (w[mask] < 0).all() and (w[~mask] == 0).all()
    w, mask = g.create_weight_matrix(flywire_circuit, "MBON", "DN", learnable=False)
    sign = torch.as_tensor(flywire_circuit.presynaptic_sign("MBON"), dtype=w.dtype)
    assert (torch.sign(w) == sign[None, :].expand_as(w)).all()


def test_log_init_monotone_and_fan_in():
    g = AdjacencyMatrixGenerator()
    counts = np.array([[0, 1, 5, 50], [3, 0, 0, 0], [0, 0, 0, 0]], float)
    m = g.magnitudes(counts, init="log", normalize=False)
    assert m[0, 1] < m[0, 2] < m[0, 3] and m[0, 0] == 0
    np.testing.assert_allclose(m[0, 3], np.log1p(50))
    for init in ("log", "linear", "uniform"):
        n = g.magnitudes(counts, init=init, normalize=True, gain=2.5)
        np.testing.assert_allclose(n.sum(axis=1), [2.5, 2.5, 0.0])
    np.testing.assert_allclose(g.magnitudes(counts, init="uniform", normalize=False)[0], [0, 1, 1, 1])
    with pytest.raises(ConfigError, match="unknown init"):
        g.magnitudes(counts, init="normal")
    with pytest.raises(DataError, match="NaN"):
        g.magnitudes(np.array([[np.nan]]))


def test_fan_in_on_data(flywire_circuit):
    w, mask = AdjacencyMatrixGenerator().create_weight_matrix(flywire_circuit, "PN", "KC", gain=3.0)
    rows = w.magnitude().detach().sum(1)
    has_in = mask.any(1)
    torch.testing.assert_close(rows[has_in], torch.full_like(rows[has_in], 3.0), rtol=1e-5, atol=1e-5)


def test_sparse_output(flywire_circuit):
    g = AdjacencyMatrixGenerator()
    dense, dmask = g.create_weight_matrix(flywire_circuit, "PN", "KC", learnable=False)
    w, mask = g.create_weight_matrix(flywire_circuit, "PN", "KC", learnable=False, sparse=True)
    assert w.layout == torch.sparse_csr
    torch.testing.assert_close(w.to_dense(), dense)
    assert g.sparsity(mask) == pytest.approx(g.sparsity(dmask))
    assert f"{1 - mask.to_dense().float().mean():.3f}" == f"{1 - dmask.float().mean():.3f}"
    with pytest.raises(ConfigError, match="sparse=True"):
        g.create_weight_matrix(flywire_circuit, "PN", "KC", sparse=True)


def _toy():
    torch.manual_seed(0)
    mask = torch.rand(6, 5) < 0.5
    mask[0, 0] = True
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    mag = torch.rand(6, 5) * mask
    return mag, sign, mask


def test_constrained_weight_contract():
    mag, sign, mask = _toy()
    cw = ConstrainedWeight(mag, sign, mask)
    assert [n for n, _ in cw.named_parameters()] == ["raw"]
    assert set(dict(cw.named_buffers())) == {"sign", "mask"}
    assert cw.n_pre == 5 and cw.n_post == 6 and cw.mask.dtype == torch.bool
    w = cw()
    torch.testing.assert_close(w, cw.weight)
    torch.testing.assert_close(w[mask], (mag.clamp_min(1e-6) * sign[None, :])[mask])
    assert (w[~mask] == 0).all()
    assert "n_edges" in repr(cw)
    (cw.weight ** 2).sum().backward()
    assert (cw.raw.grad[~mask] == 0).all() and (cw.raw.grad[mask] != 0).all()


def test_constrained_weight_bad_input():
    mag, sign, mask = _toy()
    with pytest.raises(DataError, match="NaN"):
        ConstrainedWeight(mag.masked_fill(mask, float("nan")), sign, mask)
    with pytest.raises(DataError, match="sign"):
        ConstrainedWeight(mag, torch.zeros(5), mask)
    with pytest.raises(DataError, match="shape"):
        ConstrainedWeight(mag, sign[:4], mask)


def test_signs_never_flip_under_adam():
    mag, sign, mask = _toy()
    cw = ConstrainedWeight(mag, sign, mask)
    opt = torch.optim.Adam(cw.parameters(), lr=0.5)
    target = -3.0 * sign[None, :].expand(6, 5)  # pushes every weight across zero
    raw_off = cw.raw.detach()[~mask].clone()
    for _ in range(200):
        opt.zero_grad()
        loss = ((cw.weight - target) ** 2).sum()
        loss.backward()
        assert (cw.raw.grad[~mask] == 0).all()
        opt.step()
    w = cw.weight.detach()
    assert (w[~mask] == 0).all()
    assert (torch.sign(w[mask]) == sign[None, :].expand(6, 5)[mask]).all()
    assert (w * sign[None, :] >= 0).all()
    torch.testing.assert_close(cw.raw.detach()[~mask], raw_off)  # Adam with zero grad leaves them
