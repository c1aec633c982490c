"""Latent diffusion: the VP cosine schedule (``schedule``), the sampler and the guidance."""

from .schedule import ETA, add_noise, mu, sigma, tweedie

__all__ = ["ETA", "mu", "sigma", "add_noise", "tweedie"]
