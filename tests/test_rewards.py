"""Rewards of docs/method.md §7 against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from align_rl.errors import ConfigError, InputError
from align_rl.io.normalization import Normalizer
from align_rl.alignment.rewards import (REWARDS, RewardContext, check_names, composite, normalise_component,
                              pairwise_sigmoid,
                              register_reward, score_all)
from align_rl.io.schema import N_CHANNELS, channel_index


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_pairwise_sigmoid_by_hand():
    # N = 3 candidates, M = 2 channels with known errors
    err = np.array([[0.1, 0.3], [0.2, 0.2], [0.5, 0.1]])
    want = []
    for n in range(3):
        tot = 0.0
        for j in range(3):
            if j != n:
                tot += 0.5 * (sig(-err[n, 0] + err[j, 0]) + sig(-err[n, 1] + err[j, 1]))
        want.append(tot / 2)
    got = pairwise_sigmoid(err)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got.sum() == pytest.approx(1.5)  # N/2
    # equal errors -> everybody 1/2
    np.testing.assert_allclose(pairwise_sigmoid(np.ones((4, 3))), 0.5)


def _ctx(analyses, truth, lat, lon, norm, **kw):
    return RewardContext(torch.as_tensor(analyses), torch.as_tensor(truth), norm, lat, lon, **kw)


def test_assim_and_forecast_rewards_match_hand_wrmse():
    rng = np.random.default_rng(0)
    H, W = 8, 16
    lat = np.arange(-90 + 90 / H, 90, 180 / H)
    lon = np.arange(0, 360, 360 / W)
    truth = rng.normal(size=(N_CHANNELS, H, W))
    # candidate n = truth + a constant offset c_n in every channel: wrmse = |c_n| exactly
    offs = np.array([0.1, -0.4, 0.9])
    an = truth[None] + offs[:, None, None, None]
    norm = Normalizer(np.zeros(N_CHANNELS), np.ones(N_CHANNELS))
    fc = truth[None] + np.array([0.5, 0.0, 0.2])[:, None, None, None]
    ctx = _ctx(an, truth, lat, lon, norm, forecasts=torch.as_tensor(fc), truth_forecast=torch.as_tensor(truth))
    r = score_all(ctx, ["assim", "forecast"])
    e = np.abs(offs)
    want = [np.mean([sig(-e[n] + e[j]) for j in range(3) if j != n]) for n in range(3)]
    np.testing.assert_allclose(r["assim"], want, rtol=1e-9)
    assert np.argmax(r["forecast"]) == 1 and np.argmin(r["forecast"]) == 0
    ctx2 = _ctx(an, truth, lat, lon, norm)
    with pytest.raises(InputError, match="forecast"):
        score_all(ctx2, ["forecast"])


def test_phys_reward_is_one_for_truth_and_ordered():
    H, W = 16, 32
    lat = np.arange(-90 + 90 / H, 90, 180 / H)
    lon = np.arange(0, 360, 360 / W)
    rng = np.random.default_rng(1)
    phys = np.zeros((N_CHANNELS, H, W))
    la, lo = np.meshgrid(np.deg2rad(lat), np.deg2rad(lon), indexing="ij")
    iz, iu, iv = channel_index("z500"), channel_index("u500"), channel_index("v500")
    phys[iz] = 5.5e4 + 2e3 * np.sin(2 * la) * np.cos(3 * lo)
    phys[iu] = 10 + 3 * np.cos(la)
    phys[iv] = 4 * np.sin(lo)
    norm = Normalizer(np.zeros(N_CHANNELS), np.ones(N_CHANNELS))
    noisy = [phys.copy() for _ in range(3)]
    noisy[1][iu] += rng.normal(scale=2.0, size=(H, W))
    noisy[2][iu] += rng.normal(scale=8.0, size=(H, W))
    ctx = _ctx(np.stack(noisy), phys, lat, lon, norm)
    r = REWARDS["phys"](ctx)
    assert r[0] == pytest.approx(1.0)
    assert r[0] > r[1] > r[2] > 0
    from align_rl.evaluation.geostrophic import geo_imbalance
    d = geo_imbalance(np.stack(noisy), lat, lon)
    dgt = geo_imbalance(phys, lat, lon)
    np.testing.assert_allclose(r, 2 / (1 + np.exp(np.abs(d - dgt) / dgt)), rtol=1e-9)


def test_composite_and_registry():
    s = {"assim": np.array([0.2, 0.8]), "phys": np.array([1.0, 0.0])}
    # raw weighted sum
    np.testing.assert_allclose(composite(s, {"assim": 2.0, "phys": 0.5}, "none"), [0.9, 1.6])
    np.testing.assert_allclose(composite(s, {"assim": 1.0, "phys": 0.0, "forecast": 0}, "none"),
                               [0.2, 0.8])
    # z-scores within the background (the default): two candidates are −1 and +1 in each component
    np.testing.assert_allclose(composite(s, {"assim": 2.0, "phys": 0.5}), [2 * -1 + 0.5 * 1, 2 * 1 - 0.5])
    np.testing.assert_allclose(composite(s, {"assim": 1.0, "phys": 1.0}, "rank"), [0.0, 0.0])
    with pytest.raises(ConfigError, match="forecast"):
        composite(s, {"forecast": 1.0})
    with pytest.raises(ConfigError, match="unknown reward"):
        check_names(["nope"])

    @register_reward("neg_mean")
    def neg_mean(ctx):
        return -ctx.analyses.double().mean(dim=(1, 2, 3)).numpy()

    try:
        H, W = 4, 8
        lat = np.arange(-90 + 90 / H, 90, 180 / H)
        lon = np.arange(0, 360, 360 / W)
        an = np.stack([np.full((N_CHANNELS, H, W), v) for v in (1.0, -1.0)])
        ctx = _ctx(an, np.zeros((N_CHANNELS, H, W)), lat, lon, None)
        np.testing.assert_allclose(score_all(ctx, ["neg_mean"])["neg_mean"], [-1.0, 1.0])
    finally:
        REWARDS.pop("neg_mean")


def test_composite_normalised_within_the_background():
    """Components of very different spreads (assim 3e-4, phys 7e-3, as measured on the demo world)
    weigh equally after normalisation; the raw sum is a physics-only ranking."""
    rng = np.random.default_rng(3)
    a = 0.5 + 3e-4 * rng.standard_normal(32)
    p = 0.6 + 7e-3 * rng.standard_normal(32)
    w = {"assim": 1.0, "phys": 1.0}
    raw = composite({"assim": a, "phys": p}, w, "none")
    z = composite({"assim": a, "phys": p}, w)
    assert np.corrcoef(raw, p)[0, 1] > 0.99  # the raw sum follows phys alone
    za, zp = (a - a.mean()) / a.std(), (p - p.mean()) / p.std()
    np.testing.assert_allclose(z, za + zp, rtol=1e-12)
    assert abs(np.corrcoef(z, a)[0, 1] - np.corrcoef(z, p)[0, 1]) < 0.3
    # invariant to shifting or scaling one component (a reward's units do not matter)
    np.testing.assert_allclose(composite({"assim": 10 * a + 4, "phys": p}, w), z, rtol=1e-9)
    # equal values carry no information: zero, not NaN
    np.testing.assert_array_equal(normalise_component(np.full(5, 0.3)), np.zeros(5))
    r = normalise_component(np.array([0.1, 0.5, 0.3]), "rank")
    np.testing.assert_allclose(r, [-1.0, 1.0, 0.0])
    with pytest.raises(ConfigError, match="rewards.normalize"):
        normalise_component(a, "minmax")


def test_bad_inputs():
    lat = np.arange(-67.5, 90, 45.0)
    lon = np.arange(0, 360, 45.0)
    with pytest.raises(InputError, match="at least 2"):
        _ctx(np.zeros((1, N_CHANNELS, 4, 8)), np.zeros((N_CHANNELS, 4, 8)), lat, lon, None)
    bad = np.zeros((2, N_CHANNELS, 4, 8))
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        _ctx(bad, np.zeros((N_CHANNELS, 4, 8)), lat, lon, None)
