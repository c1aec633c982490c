"""Metrics against hand computations on small grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from align_rl.evaluation import metrics
from align_rl.errors import InputError
from align_rl.io.grid import Grid

G = Grid(8, 16)


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def test_mse_mae_hand():
    a, b = _rand(3, 69, 8, 16, seed=1), _rand(3, 69, 8, 16, seed=2)
    for i in range(3):
        d = (a[i] - b[i]).ravel()
        assert metrics.mse(a, b)[i] == pytest.approx(sum(x * x for x in d) / d.size, rel=1e-12)
        assert metrics.mae(a, b)[i] == pytest.approx(sum(abs(x) for x in d) / d.size, rel=1e-12)
    out = metrics.mse(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
    assert isinstance(out, torch.Tensor) and out.shape == (3,)
    np.testing.assert_allclose(out.numpy(), metrics.mse(a, b), rtol=1e-5)


def test_wrmse_equals_hand_computation():
    """Explicit loops over a 4 x 8 grid with non-trivial latitudes."""
    grid = Grid(4, 8)
    lat = grid.lat  # -67.5, -22.5, 22.5, 67.5
    a, b = _rand(2, 69, 4, 8, seed=3), _rand(2, 69, 4, 8, seed=4)
    cos = [math.cos(math.radians(x)) for x in lat]
    w = [c / (sum(cos) / len(cos)) for c in cos]
    got = metrics.wrmse(a, b, lat)
    assert got.shape == (2, 69)
    for n in range(2):
        for m in (0, 7, 68):
            acc = 0.0
            for i in range(4):
                for j in range(8):
                    acc += w[i] * (a[n, m, i, j] - b[n, m, i, j]) ** 2
            assert got[n, m] == pytest.approx(math.sqrt(acc / 32), rel=1e-12)


def test_wrmse_uses_the_latitude_coordinate_given():
    """A difference only at the equator-most rows scores higher than one at the polar rows."""
    a = np.zeros((69, 8, 16))
    near_eq, near_pole = a.copy(), a.copy()
    near_eq[:, 3:5] = 1.0
    near_pole[:, [0, 7]] = 1.0
    assert np.all(metrics.wrmse(near_eq, a, G.lat) > metrics.wrmse(near_pole, a, G.lat))
    # flipping the latitude coordinate together with the field leaves the value unchanged
    x, y = _rand(69, 8, 16, seed=5), _rand(69, 8, 16, seed=6)
    np.testing.assert_allclose(metrics.wrmse(x, y, G.lat),
                               metrics.wrmse(x[:, ::-1], y[:, ::-1], G.lat[::-1]), rtol=1e-12)


def test_wrmse_torch_is_differentiable_and_broadcasts():
    a = torch.randn(5, 69, 8, 16, requires_grad=True)
    b = torch.randn(69, 8, 16)
    out = metrics.wrmse(a, b, torch.tensor(G.lat))
    assert out.shape == (5, 69)
    out.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    with pytest.raises(InputError):
        metrics.wrmse(a, b, G.lat[:4])


def _crps_brute(ens, y, w):
    """Fair CRPS with the double sum written out, then latitude-weighted: (N, C, H, W) -> (C,)."""
    n = ens.shape[0]
    skill = np.abs(ens - y[None]).mean(axis=0)
    pair = np.zeros_like(y)
    for i in range(n):
        for j in range(n):
            pair += np.abs(ens[i] - ens[j])
    crps = skill - pair / (2 * n * (n - 1))
    return (crps * w[:, None]).mean(axis=(-2, -1))


def test_crps_fair_matches_brute_force():
    ens, y = _rand(2, 5, 69, 8, 16, seed=7), _rand(2, 69, 8, 16, seed=8)
    w = np.cos(np.deg2rad(G.lat)) / np.cos(np.deg2rad(G.lat)).mean()
    got = metrics.crps_ensemble(ens, y, G.lat)
    assert got.shape == (2, 69)
    for b in range(2):
        np.testing.assert_allclose(got[b], _crps_brute(ens[b], y[b], w), rtol=1e-10)


def test_crps_of_identical_members_is_the_weighted_mae():
    y = _rand(69, 8, 16, seed=9)
    x = _rand(69, 8, 16, seed=10)
    ens = np.stack([x] * 4)
    w = np.cos(np.deg2rad(G.lat)) / np.cos(np.deg2rad(G.lat)).mean()
    np.testing.assert_allclose(metrics.crps_ensemble(ens, y, G.lat),
                               (np.abs(x - y) * w[:, None]).mean(axis=(-2, -1)), rtol=1e-10)


def test_crps_gaussian_closed_form():
    """Members from N(0, 1), truth 0: E CRPS = 2φ(0) − 1/√π for the fair estimator."""
    ens = torch.randn(8, 69, 32, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.zeros(69, 32, 64, dtype=torch.float64)
    lat = Grid(32, 64).lat
    got = metrics.crps_ensemble(ens, y, lat).mean().item()
    exact = 2 / math.sqrt(2 * math.pi) - 1 / math.sqrt(math.pi)
    assert got == pytest.approx(exact, rel=0.01)


def test_spread_skill_is_one_for_a_reliable_ensemble_and_flags_underdispersion():
    g = torch.Generator().manual_seed(1)
    lat = Grid(32, 64).lat
    n = 4
    truth = torch.randn(69, 32, 64, generator=g, dtype=torch.float64)
    ens = torch.randn(n, 69, 32, 64, generator=g, dtype=torch.float64)
    ratio = metrics.spread_skill(ens, truth, lat)
    assert ratio.shape == (69,)
    assert ratio.mean().item() == pytest.approx(1.0, abs=0.01)  # (N+1)/N corrected
    # without the correction the ratio would be sqrt(N/(N+1)) ≈ 0.894
    raw = metrics.ensemble_spread(ens, lat) / metrics.wrmse(ens.mean(0), truth, lat)
    assert raw.mean().item() == pytest.approx(math.sqrt(n / (n + 1)), abs=0.01)
    narrow = metrics.spread_skill(0.5 * ens, truth, lat)
    assert narrow.mean().item() < 0.6


def test_ensemble_metrics_need_two_members():
    with pytest.raises(InputError, match="at least 2 members"):
        metrics.crps_ensemble(np.zeros((1, 69, 8, 16)), np.zeros((69, 8, 16)), G.lat)
