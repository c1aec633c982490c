"""Verification metrics: MSE, MAE, latitude-weighted RMSE, ensemble CRPS and spread/skill.

Conventions (docs/method.md §7, §10):
- Fields are ``(..., 69, H, W)`` (channel axis −3), ensembles ``(..., N, 69, H, W)`` (member axis −4).
- ``mse``/``mae`` average over the trailing ``(69, H, W)`` (unweighted; the paper's tables use them
  on normalised channels).
- Latitude weights ``w_i = cos(lat_i) / mean_i cos(lat_i)`` from the actual latitude coordinate
  (degrees) of the data; spatial means are ``mean_{ij} w_i f_ij`` (so they average 1).
- Every per-channel metric returns ``(..., 69)`` for ONE forecast/analysis; averaging over time
  steps is the caller's (the score command averages per-step values, as the paper does).

Torch in → torch out (differentiable); numpy in → numpy out (computed in float64).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from align_rl.errors import InputError


def _to_torch(*xs: Any) -> tuple[list[torch.Tensor], bool]:
    """Tensors of the inputs; the flag says whether to hand numpy back."""
    as_numpy = not any(isinstance(x, torch.Tensor) for x in xs)
    ref = next((x for x in xs if isinstance(x, torch.Tensor)), None)
    out = []
    for x in xs:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif ref is not None:
            out.append(torch.as_tensor(np.ascontiguousarray(x), dtype=ref.dtype, device=ref.device))
        else:
            out.append(torch.as_tensor(np.ascontiguousarray(x, dtype=np.float64)))
    return out, as_numpy


def _back(x: torch.Tensor, as_numpy: bool):
    return x.detach().cpu().numpy() if as_numpy else x


def lat_weight_column(lat: Any, like: torch.Tensor) -> torch.Tensor:
    """``cos(lat)/mean(cos(lat))`` as a column ``(H, 1)`` of ``like``'s dtype and device."""
    lat_np = lat.detach().cpu().numpy() if isinstance(lat, torch.Tensor) else lat
    lat_t = torch.tensor(np.array(lat_np, dtype=np.float64))
    if lat_t.ndim != 1 or lat_t.numel() != like.shape[-2]:
        raise InputError(f"latitude of shape {tuple(lat_t.shape)} does not match the field's "
                         f"{like.shape[-2]} rows")
    c = torch.cos(torch.deg2rad(lat_t))
    return (c / c.mean()).to(dtype=like.dtype, device=like.device)[:, None]


def weighted_mean(x: torch.Tensor, lat: Any) -> torch.Tensor:
    """``mean_{ij} w_i x_ij`` over the trailing (H, W) of a tensor ``(..., H, W)``."""
    return (x * lat_weight_column(lat, x)).mean(dim=(-2, -1))


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise InputError(f"fields of shapes {tuple(a.shape)} and {tuple(b.shape)} do not broadcast") from None
    if a.ndim < 3:
        raise InputError(f"expected fields (..., 69, H, W), got {tuple(a.shape)}")


def mse(a, b):
    """Mean squared error over the trailing ``(69, H, W)`` → ``(...)``."""
    (a, b), np_ = _to_torch(a, b)
    _check_pair(a, b)
    return _back(((a - b) ** 2).mean(dim=(-3, -2, -1)), np_)


def mae(a, b):
    """Mean absolute error over the trailing ``(69, H, W)`` → ``(...)``."""
    (a, b), np_ = _to_torch(a, b)
    _check_pair(a, b)
    return _back((a - b).abs().mean(dim=(-3, -2, -1)), np_)


def wrmse(a, b, lat):
    """Latitude-weighted RMSE per channel, ``sqrt(mean_{ij} w_i (a − b)²)`` → ``(..., 69)``.

    Units are those of the inputs (physical for the paper's tables).
    """
    (a, b), np_ = _to_torch(a, b)
    _check_pair(a, b)
    return _back(torch.sqrt(weighted_mean((a - b) ** 2, lat)), np_)


def _check_ens(ens: torch.Tensor, truth: torch.Tensor) -> int:
    if ens.ndim < 4:
        raise InputError(f"expected an ensemble (..., N, 69, H, W), got {tuple(ens.shape)}")
    try:
        torch.broadcast_shapes(ens.shape[:-4] + ens.shape[-3:], truth.shape)
    except RuntimeError:
        raise InputError(f"ensemble {tuple(ens.shape)} and truth {tuple(truth.shape)} do not match") from None
    n = ens.shape[-4]
    if n < 2:
        raise InputError(f"an ensemble metric needs at least 2 members, got {n}")
    return n


def crps_ensemble(ens, truth, lat):
    """Fair (unbiased) ensemble CRPS per channel, latitude-weighted → ``(..., 69)``.

    Pointwise ``CRPS = 1/N Σ_n |x_n − y| − 1/(2N(N−1)) Σ_{n,m} |x_n − x_m|`` (the "fair" estimator,
    unbiased for the CRPS of the distribution the members are drawn from); the pair sum is
    computed from the sorted members, ``Σ_{n,m}|x_n − x_m| = 2 Σ_k (2k − N + 1) x_(k)``
    (k = 0 … N−1). Then ``mean_{ij} w_i CRPS_ij``.
    """
    (ens, truth), np_ = _to_torch(ens, truth)
    n = _check_ens(ens, truth)
    skill = (ens - truth.unsqueeze(-4)).abs().mean(dim=-4)
    srt, _ = torch.sort(ens, dim=-4)
    k = torch.arange(n, dtype=ens.dtype, device=ens.device)
    coef = (2 * k - n + 1).reshape(n, 1, 1, 1)
    pair_sum = 2 * (coef * srt).sum(dim=-4)
    crps = skill - pair_sum / (2 * n * (n - 1))
    return _back(weighted_mean(crps, lat), np_)


def ensemble_spread(ens, lat):
    """``sqrt(mean_{ij} w_i s²_ij)`` with ``s²`` the unbiased (ddof 1) member variance → ``(..., 69)``."""
    (ens,), np_ = _to_torch(ens)
    var = ens.var(dim=-4, unbiased=True)
    return _back(torch.sqrt(weighted_mean(var, lat)), np_)


def spread_skill(ens, truth, lat):
    """Spread/skill ratio per channel → ``(..., 69)``; 1 for a reliable ensemble.

    ``sqrt((N+1)/N) · spread / RMSE(ensemble mean)``, spread from :func:`ensemble_spread`.
    The ``(N+1)/N`` factor: for members and truth drawn from one distribution of variance σ²,
    ``E (mean − y)² = σ²/N + σ² = (N+1)/N · σ²`` while the unbiased member variance estimates σ².
    """
    (ens, truth), np_ = _to_torch(ens, truth)
    n = _check_ens(ens, truth)
    spread = ensemble_spread(ens, lat)
    skill = wrmse(ens.mean(dim=-4), truth, lat)
    return _back(np.sqrt((n + 1) / n) * spread / skill, np_)
