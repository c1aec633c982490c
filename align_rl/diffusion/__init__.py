"""Latent diffusion: the VP cosine schedule (``schedule``), the sampler and the guidance."""

from align_rl.diffusion.schedule import ETA, add_noise, mu, sigma, tweedie

__all__ = ["ETA", "mu", "sigma", "add_noise", "tweedie"]
