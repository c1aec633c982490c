"""Synthetic observations: density, modes, noise, R, seeding, the mask operator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from align_rl.config import ObsConfig
from align_rl.errors import ConfigError, InputError
from align_rl.world.observations import MaskOperator, Observations, make_observations, observations_from_config


def _truth(B=4, H=32, W=64, seed=0):
    return torch.randn(B, 69, H, W, generator=torch.Generator().manual_seed(seed))


def test_point_mode_density_and_values():
    x = _truth()
    obs = make_observations(x, 0.05, generator=torch.Generator().manual_seed(1))
    m = obs.mask
    assert m.shape == x.shape and m.dtype == x.dtype
    assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
    n = m.numel()
    # Bernoulli(0.05) count within 5 standard deviations
    assert abs(m.sum().item() - 0.05 * n) < 5 * np.sqrt(n * 0.05 * 0.95)
    # σ_o = 0: y = m ⊙ x exactly, zeros where unobserved
    torch.testing.assert_close(obs.values, m * x, rtol=0, atol=0)
    assert torch.all(obs.values[m == 0] == 0)
    # per channel and point: channels of one point are not all observed together
    per_point = m.sum(dim=1)
    assert (per_point > 0).sum() > (per_point == 69).sum() * 10


def test_column_mode_observes_all_channels_of_a_point():
    x = _truth(B=2)
    obs = make_observations(x, 0.1, mode="column", generator=torch.Generator().manual_seed(2))
    m = obs.mask
    assert torch.all(m == m[:, :1])  # identical along the channel axis
    frac = m[:, 0].mean().item()
    assert abs(frac - 0.1) < 5 * np.sqrt(0.1 * 0.9 / m[:, 0].numel())


def test_noise_has_sigma_o_where_observed_and_R_has_a_floor():
    x = _truth(B=2)
    obs = make_observations(x, 0.5, sigma_o=0.05, generator=torch.Generator().manual_seed(3))
    e = (obs.values - x)[obs.mask == 1]
    assert e.std().item() == pytest.approx(0.05, rel=0.02)
    assert abs(e.mean().item()) < 5 * 0.05 / np.sqrt(e.numel())
    assert obs.variance == pytest.approx(1e-2)  # 0.05² = 2.5e-3 < floor 1e-2
    big = make_observations(x, 0.5, sigma_o=0.2, r_floor=1e-2)
    assert big.variance == pytest.approx(0.04)
    assert make_observations(x, 0.5, sigma_o=0.0, r_floor=1e-3).variance == pytest.approx(1e-3)


def test_seeded_and_independent_of_global_state():
    x = _truth(B=1)
    a = make_observations(x, 0.1, 0.02, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(123)
    b = make_observations(x, 0.1, 0.02, generator=torch.Generator().manual_seed(7))
    c = make_observations(x, 0.1, 0.02, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.values, b.values) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask, c.mask)


def test_mask_operator_slicing_and_repeat():
    x = _truth(B=3, H=8, W=16)
    obs = make_observations(x, 0.2, 0.0, generator=torch.Generator().manual_seed(4))
    H = obs.operator
    assert isinstance(H, MaskOperator)
    torch.testing.assert_close(H(x), obs.values)
    # an ensemble axis after the batch axis uses each row's mask for all its members
    ens = x.unsqueeze(1).repeat(1, 5, 1, 1, 1)
    hx = H(ens)
    assert hx.shape == ens.shape
    torch.testing.assert_close(hx[:, 3], obs.values)
    assert obs.residual(ens).abs().max().item() == 0.0
    rep = obs.repeat_interleave(5)
    assert len(rep) == 15
    torch.testing.assert_close(rep.mask[5:10], obs.mask[1:2].expand(5, -1, -1, -1))
    one = obs[1]
    assert len(one) == 1 and torch.equal(one.mask[0], obs.mask[1])
    assert obs[-1].mask.shape[0] == 1 and torch.equal(obs[-1].mask[0], obs.mask[2])
    assert obs.to("cpu").values.device.type == "cpu"
    assert 0.1 < obs.fraction < 0.3


def test_numpy_truth_and_config():
    x = _truth(B=1, H=8, W=16).numpy()
    obs = observations_from_config(x, ObsConfig(density=1.0, sigma_o=0.0, mode="point"))
    torch.testing.assert_close(obs.values, torch.from_numpy(x))


@pytest.mark.parametrize("kw,match", [
    (dict(density=0.0), "density"), (dict(density=1.5), "density"),
    (dict(density=0.1, sigma_o=-1.0), "sigma_o"), (dict(density=0.1, mode="grid"), "mode"),
    (dict(density=0.1, r_floor=0.0), "r_floor"),
])
def test_bad_config(kw, match):
    with pytest.raises(ConfigError, match=match):
        make_observations(_truth(B=1, H=8, W=16), **kw)


def test_bad_shapes():
    with pytest.raises(InputError, match=r"\(B, 69, H, W\)"):
        make_observations(torch.zeros(2, 10, 8, 16), 0.1)
    with pytest.raises(InputError):
        Observations(torch.zeros(1, 69, 8, 16), torch.zeros(1, 69, 8, 8))
