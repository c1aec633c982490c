"""Analytic models with known answers for the sampler and guidance tests.

Prior in latent space, conditioned on the background latent: ``z_0 | z_b ~ N(a · z_b, s² I)``.
Then ``z_t = μ z_0 + σ ε ~ N(μ a z_b, (μ² s² + σ²) I)``, the score is
``∇ log p(z_t) = −(z_t − μ a z_b) / (μ² s² + σ²)`` and the exact noise predictor
``ε(z_t, t, z_b) = −σ ∇ log p = σ (z_t − μ a z_b) / (μ² s² + σ²)``.
Decoder: a linear map ``D(z) = W z`` (``W`` orthogonal, so ``E = Wᵀ`` is its exact inverse).
With observations ``y = H W z + e``, ``e ~ N(0, R)``, the posterior is Gaussian with
``P = (I/s² + AᵀR⁻¹A)⁻¹``, ``mean = P (a z_b / s² + Aᵀ R⁻¹ y_obs)``, ``A = H W``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align_rl.diffusion.schedule import mu, sigma

LATENT = (2, 2, 4)  # C, h, w
FIELD = (1, 4, 4)  # channels, H, W (same number of values: D is square)


@dataclass
class GaussianPrior:
    a: float = 0.5
    s: float = 0.8

    def mean(self, z_b: torch.Tensor) -> torch.Tensor:
        return self.a * z_b

    def __call__(self, z: torch.Tensor, t: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        m = mu(t).to(z).reshape(-1, 1, 1, 1)
        sg = sigma(t).to(z).reshape(-1, 1, 1, 1)
        return sg * (z - m * self.mean(z_b)) / (m**2 * self.s**2 + sg**2)


class LinearCodec:
    """``decode(z (B, *LATENT)) = W z`` reshaped to ``(B, *FIELD)``; ``encode`` is its inverse."""

    def __init__(self, generator: torch.Generator) -> None:
        d = LATENT[0] * LATENT[1] * LATENT[2]
        self.W, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
        self.W = self.W.float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (z.reshape(z.shape[0], -1) @ self.W.T.to(z.dtype)).reshape(z.shape[0], *FIELD)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x.reshape(x.shape[0], -1) @ self.W.to(x.dtype)).reshape(x.shape[0], *LATENT)


@dataclass
class Obs:
    values: torch.Tensor
    mask: torch.Tensor
    variance: float


def observe(codec: LinearCodec, z_true: torch.Tensor, n_obs: int, sigma_o: float,
            generator: torch.Generator) -> Obs:
    """Observe ``n_obs`` field points of ``D(z_true)`` (B = 1) with noise of std ``sigma_o``."""
    n = FIELD[0] * FIELD[1] * FIELD[2]
    mask = torch.zeros(1, *FIELD)
    mask.view(-1)[torch.randperm(n, generator=generator)[:n_obs]] = 1
    noise = sigma_o * torch.randn(1, *FIELD, generator=generator)
    return Obs(mask * (codec.decode(z_true) + noise), mask, sigma_o**2)


def posterior(prior: GaussianPrior, codec: LinearCodec, z_b: torch.Tensor, obs: Obs):
    """Exact posterior mean (d,) and covariance (d, d) of ``z_0`` given ``y`` (float64)."""
    keep = obs.mask.view(-1) > 0
    A = codec.W.double()[keep]
    d = A.shape[1]
    s2 = prior.s**2
    P = torch.linalg.inv(torch.eye(d, dtype=torch.float64) / s2 + A.T @ A / obs.variance)
    m = P @ (prior.mean(z_b).double().view(-1) / s2 + A.T @ obs.values.double().view(-1)[keep] / obs.variance)
    return m, P
