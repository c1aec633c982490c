"""The variance-preserving cosine schedule of Rozet & Louppe's SDA (docs/method.md §5).

``μ(t) = cos(arccos(√η) · t)²``, ``σ(t) = √(1 − μ(t)² + η²)``, ``η = 1e-3``, ``t ∈ [0, 1]``;
``z_t = μ(t) z_0 + σ(t) ε`` and the Tweedie estimate ``ẑ_0 = (z_t − σ(t) ε̂) / μ(t)``.
At ``t = 0``: ``μ = 1``, ``σ = η``; at ``t = 1``: ``μ = η``, ``σ = 1``.
Times are tensors of shape ``(B,)`` (one per sample), a 0-d tensor or a Python float; they are
broadcast over the trailing dimensions of the latent ``(B, C, h, w)``.
"""

from __future__ import annotations

import math

import torch

ETA: float = 1e-3
"""Smallest noise level and largest signal damping of the schedule."""

_ALPHA = math.acos(math.sqrt(ETA))


def _as_tensor(t, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t if t.is_floating_point() else t.float()
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    device = like.device if like is not None else None
    return torch.as_tensor(t, dtype=dtype, device=device)


def mu(t) -> torch.Tensor:
    """Signal scale ``μ(t) = cos(arccos(√η) t)²``; same shape as ``t`` (dimensionless)."""
    t = _as_tensor(t)
    return torch.cos(_ALPHA * t) ** 2


def sigma(t) -> torch.Tensor:
    """Noise scale ``σ(t) = √(1 − μ(t)² + η²)``; same shape as ``t``."""
    m = mu(t)
    return torch.sqrt(1 - m**2 + ETA**2)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` or scalar -> broadcastable to ``like`` ``(B, ...)``."""
    v = v.to(dtype=like.dtype, device=like.device)
    if v.ndim == 0:
        return v
    if v.shape[0] != like.shape[0] or v.ndim != 1:
        raise ValueError(f"times of shape {tuple(v.shape)} do not match a batch of {like.shape[0]}")
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(z0: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
    """``z_t = μ(t) z0 + σ(t) ε``; ``z0``, ``eps`` ``(B, ...)``, ``t`` ``(B,)`` or scalar."""
    t = _as_tensor(t, z0)
    return _expand(mu(t), z0) * z0 + _expand(sigma(t), z0) * eps


def tweedie(z_t: torch.Tensor, eps_hat: torch.Tensor, t) -> torch.Tensor:
    """Posterior-mean estimate ``ẑ_0 = (z_t − σ(t) ε̂) / μ(t)`` (differentiable)."""
    t = _as_tensor(t, z_t)
    return (z_t - _expand(sigma(t), z_t) * eps_hat) / _expand(mu(t), z_t)
