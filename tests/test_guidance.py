"""Observation guidance (docs/method.md §6) against the analytic posterior of a linear-Gaussian model."""

from __future__ import annotations

import pytest
import torch

from align_rl.config import GuidanceConfig
from align_rl.diffusion.guidance import LatentDPS, LatentRepaint, ObsFree, make_guidance
from align_rl.diffusion.sampler import StepContext, sample
from align_rl.diffusion.schedule import mu, sigma
from align_rl.errors import ConfigError, InputError
from tests.analytic_models import LATENT, GaussianPrior, LinearCodec, observe, posterior

SIGMA_O = 0.1


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(1)
    prior = GaussianPrior(a=0.5, s=0.8)
    codec = LinearCodec(g)
    z_b = torch.randn(1, *LATENT, generator=g)
    z_true = prior.mean(z_b) + prior.s * torch.randn(1, *LATENT, generator=g)
    obs = observe(codec, z_true, n_obs=6, sigma_o=SIGMA_O, generator=g)
    pm, P = posterior(prior, codec, z_b, obs)
    return prior, codec, z_b, obs, pm, P


def _ctx(prior, z_b, members, s, z=None):
    return StepContext(eps_fn=prior, z_b=z_b.repeat_interleave(members, 0), members=members,
                       t=s + 1 / 32, s=s, step=0, steps=32,
                       z0_hat=torch.zeros(z_b.shape[0] * members, *LATENT))


@pytest.mark.parametrize("likelihood,zeta", [("gaussian", 0.005), ("norm", 0.05)])
def test_dps_recovers_the_posterior(problem, likelihood, zeta):
    """Ensemble of 2000 DPS members: mean within 10 % of the prior→posterior distance of the exact
    posterior mean (the estimate's own standard error is ~4 %), spread within 10 % of the
    posterior std; ObsFree stays at the prior (distance ≈ 100 %)."""
    prior, codec, z_b, obs, pm, P = problem
    dist = (pm - prior.mean(z_b).double().view(-1)).norm()
    dps = LatentDPS(codec, obs, zeta=zeta, likelihood=likelihood, gamma=0.1)
    z = sample(prior, z_b, members=2000, steps=64, corrections=1, tau=0.01, guidance=dps,
               generator=torch.Generator().manual_seed(2))
    err = (z[0].double().mean(0).view(-1) - pm).norm()
    assert err < 0.1 * dist
    assert z[0].std(0).mean().item() == pytest.approx(P.diag().sqrt().mean().item(), rel=0.1)
    free = sample(prior, z_b, members=2000, steps=64, corrections=1, tau=0.01, guidance=ObsFree(),
                  generator=torch.Generator().manual_seed(2))
    assert (free[0].double().mean(0).view(-1) - pm).norm() > 0.8 * dist


def test_dps_gradient_matches_hand_derivation(problem):
    """Gaussian variant: ∇_z ½ Σ r²/(R + γ(σ/μ)²) with ẑ_0 = (z − σ ε)/μ and the exact linear ε:
    dẑ_0/dz = μ s² / (μ² s² + σ²), so ∇ = −(μ s²/v) Wᵀ (m ⊙ r) / (R + γ (σ/μ)²)."""
    prior, codec, z_b, obs, _, _ = problem
    s_time, gamma = 0.3, 0.2
    z = torch.randn(3, *LATENT, generator=torch.Generator().manual_seed(5))
    ctx = _ctx(prior, z_b, 3, s_time)
    g = LatentDPS(codec, obs, zeta=1.0, likelihood="gaussian", gamma=gamma).gradient(z, ctx)
    m, sg = float(mu(torch.tensor(s_time))), float(sigma(torch.tensor(s_time)))
    v = m**2 * prior.s**2 + sg**2
    zb = z_b.expand(3, *LATENT)
    z0 = (z - sg * prior(z, torch.full((3,), s_time), zb)) / m
    r = obs.mask * (obs.values - codec.decode(z0))
    expected = -(m * prior.s**2 / v) * codec.encode(r) / (obs.variance + gamma * (sg / m) ** 2)
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-5)
    # the norm variant: the same direction, scaled by 1/‖r‖_R per sample
    gn = LatentDPS(codec, obs, likelihood="norm").gradient(z, ctx)
    norm_r = (r.reshape(3, -1).square().sum(1) / obs.variance).sqrt().reshape(3, 1, 1, 1)
    torch.testing.assert_close(gn, -(m * prior.s**2 / v) * codec.encode(r) / obs.variance / norm_r,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("likelihood", ["norm", "gaussian"])
def test_members_do_not_couple(problem, likelihood):
    """Two members in one batch get the same DPS step as each alone (1e-6; float64 so that BLAS
    rounding of a 1-row against a 2-row product stays far below the tolerance)."""
    prior, codec, z_b, obs, _, _ = problem
    z = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    z = z * torch.tensor([1.0, 3.0], dtype=torch.float64).reshape(2, 1, 1, 1)  # different norms
    z_b = z_b.double()
    dps = LatentDPS(codec, obs, zeta=0.7, likelihood=likelihood)
    both = dps(z, _ctx(prior, z_b, 2, 0.4))
    alone = torch.cat([dps(z[i:i + 1], _ctx(prior, z_b, 1, 0.4)) for i in range(2)])
    torch.testing.assert_close(both - z, alone - z, rtol=0, atol=1e-6)  # the guidance steps
    assert (both - z).abs().max() > 1e-2


def test_backgrounds_get_their_own_observations(problem):
    """Two backgrounds × two members: each row is guided by its own background's observations."""
    prior, codec, z_b, obs, _, _ = problem
    g = torch.Generator().manual_seed(3)
    obs2 = observe(codec, torch.randn(1, *LATENT, generator=g), 5, SIGMA_O, g)
    both_obs = type(obs)(torch.cat([obs.values, obs2.values]), torch.cat([obs.mask, obs2.mask]),
                         obs.variance)
    zb2 = torch.cat([z_b, -z_b])
    z = torch.randn(4, *LATENT, generator=g)
    joint = LatentDPS(codec, both_obs, zeta=0.5)(z, _ctx(prior, zb2, 2, 0.2))
    first = LatentDPS(codec, obs, zeta=0.5)(z[:2], _ctx(prior, zb2[:1], 2, 0.2))
    second = LatentDPS(codec, obs2, zeta=0.5)(z[2:], _ctx(prior, zb2[1:], 2, 0.2))
    torch.testing.assert_close(joint, torch.cat([first, second]), rtol=0, atol=1e-6)


def test_repaint_keeps_observed_points_at_the_observations(problem):
    """With an exact codec the final Repaint step fixes the observed points up to σ(0)·|noise|."""
    prior, codec, z_b, obs, pm, _ = problem
    z = sample(prior, z_b, members=200, steps=32, corrections=1, tau=0.01,
               guidance=LatentRepaint(codec, obs), generator=torch.Generator().manual_seed(2))
    x = codec.decode(z[0])
    assert ((x - obs.values) * obs.mask).abs().max() < 0.01
    free = codec.decode(sample(prior, z_b, members=200, steps=32, corrections=1, tau=0.01,
                               generator=torch.Generator().manual_seed(2))[0])
    assert ((free - obs.values) * obs.mask).abs().max() > 0.5


def test_make_guidance_and_errors(problem):
    _, codec, _, obs, _, _ = problem
    cfg = GuidanceConfig(dps_zeta=0.3, dps_likelihood="gaussian", dps_gamma=0.5)
    g = make_guidance("dps", codec, obs, cfg)
    assert isinstance(g, LatentDPS) and (g.zeta, g.likelihood, g.gamma) == (0.3, "gaussian", 0.5)
    g = make_guidance("dps", codec, obs, {"dps_zeta": 0.2, "dps_likelihood": "gaussian"})
    assert (g.zeta, g.likelihood, g.gamma) == (0.2, "gaussian", 1e-2)
    assert isinstance(make_guidance("repaint", codec, obs, cfg), LatentRepaint)
    assert isinstance(make_guidance("obsfree", codec, None, cfg), ObsFree)
    with pytest.raises(ConfigError, match="not one of"):
        make_guidance("ddpm", codec, obs, cfg)
    with pytest.raises(InputError, match="needs observations"):
        make_guidance("dps", codec, None, cfg)
    with pytest.raises(ConfigError, match="dps_likelihood"):
        LatentDPS(codec, obs, likelihood="laplace")
