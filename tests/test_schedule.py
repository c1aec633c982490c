"""The VP cosine schedule against docs/method.md §5's check values and its closed forms."""

import math

import torch

from align_rl.diffusion.schedule import ETA, add_noise, mu, sigma, tweedie


def test_check_values_at_half():
    t = torch.tensor(0.5, dtype=torch.float64)
    assert abs(mu(t).item() - 0.5158113883) < 1e-9
    assert abs(sigma(t).item() - 0.8567027557) < 1e-9


def test_endpoints_and_closed_form():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    a = math.acos(math.sqrt(ETA))
    ref_mu = torch.tensor([math.cos(a * v) ** 2 for v in t.tolist()], dtype=torch.float64)
    torch.testing.assert_close(mu(t), ref_mu)
    torch.testing.assert_close(sigma(t) ** 2 + mu(t) ** 2, torch.full_like(t, 1 + ETA**2))
    assert abs(mu(torch.tensor(0.0)).item() - 1) < 1e-7
    assert abs(mu(torch.tensor(1.0, dtype=torch.float64)).item() - ETA) < 1e-12
    assert abs(sigma(torch.tensor(0.0, dtype=torch.float64)).item() - ETA) < 1e-12
    assert torch.all(torch.diff(mu(t)) < 0) and torch.all(torch.diff(sigma(t)) > 0)
    assert mu(0.25).dtype == torch.get_default_dtype()  # floats are accepted


def test_add_noise_broadcast_and_tweedie_inverts():
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(3, 2, 4, 8, generator=g)
    eps = torch.randn(3, 2, 4, 8, generator=g)
    t = torch.tensor([0.0, 0.3, 0.9])
    z_t = add_noise(z0, t, eps)
    for i in range(3):
        ref = mu(t[i]) * z0[i] + sigma(t[i]) * eps[i]
        torch.testing.assert_close(z_t[i], ref)
    torch.testing.assert_close(tweedie(z_t, eps, t), z0, atol=1e-5, rtol=1e-5)
    # scalar time
    torch.testing.assert_close(add_noise(z0, 0.5, eps), mu(torch.tensor(0.5)) * z0 + sigma(torch.tensor(0.5)) * eps)
