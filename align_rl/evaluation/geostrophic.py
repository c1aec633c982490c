"""Geostrophic wind on the sphere, the geostrophic imbalance D and the Geo-Score (docs/method.md §7).

``u_g = −(1/f) ∂Φ/∂y``, ``v_g = (1/f) ∂Φ/∂x`` with ``f = 2Ω sin φ``, Ω = 7.292115e-5 s⁻¹,
``∂/∂x = 1/(a cos φ) ∂/∂λ`` (centred differences, periodic in λ), ``∂/∂y = 1/a ∂/∂φ`` (centred
differences inside, second-order one-sided differences on the first and last rows),
a = 6371008.7714 m. This is what MetPy's ``geostrophic_wind`` computes for a latitude/longitude
grid with a spherical CRS of that radius, away from the longitude seam that MetPy does not wrap.
Φ is geopotential in m² s⁻² (the ``z`` channels), winds in m s⁻¹.

``D = ½ (Σ w|u − u_g| / Σ w|u| + Σ w|v − v_g| / Σ w|v|)`` over the points with ``|lat| ≥ band``
(default 15°, the equatorial band where f → 0 is excluded; rows on a pole, where the zonal
derivative is undefined, too), ``w = cos(lat)``; ``u, v, Φ`` at
``level`` hPa (default 500). ``R_phys = 2 σ(−|D − D_gt| / max(D_gt, D_GT_FLOOR))``, Geo-Score =
100 · R_phys. The floor (:data:`D_GT_FLOOR` = 1e-3, a thousandth of the typical D ≈ 0.1–0.5 of
real and simulated atmospheres) keeps the score finite for a perfectly balanced truth (D_gt = 0):
an analysis as balanced scores 100, one with D = 0.001 scores 2σ(−1) · 100 ≈ 53.8. A ratio whose
denominator ``Σ w|u|`` is 0 (no wind at all) counts as 0 when ``u = u_g`` there too.

Torch in → torch out (computed in float64, returned in the input dtype; differentiable);
numpy in → numpy out (float64).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from align_rl.errors import InputError
from align_rl.io.schema import channel_index

OMEGA = 7.292115e-5
"""Earth's angular velocity, s⁻¹."""
EARTH_RADIUS = 6371008.7714
"""Mean Earth radius, m."""
D_GT_FLOOR = 1e-3
"""Floor on the truth's imbalance D_gt in the Geo-Score's denominator (dimensionless)."""


def _coords(lat: Any, lon: Any, H: int, W: int) -> tuple[np.ndarray, np.ndarray, float]:
    lat = np.asarray(lat.detach().cpu().numpy() if isinstance(lat, torch.Tensor) else lat, dtype=np.float64)
    lon = np.asarray(lon.detach().cpu().numpy() if isinstance(lon, torch.Tensor) else lon, dtype=np.float64)
    if lat.shape != (H,) or lon.shape != (W,):
        raise InputError(f"lat {lat.shape} / lon {lon.shape} do not match a field of {H}x{W}")
    if H < 3:
        raise InputError(f"the geostrophic wind needs at least 3 latitudes, got {H}")
    dlat = np.diff(lat)
    if not np.allclose(dlat, dlat[0], rtol=1e-6, atol=1e-9) or dlat[0] == 0:
        raise InputError("latitudes must be uniformly spaced for the geostrophic wind")
    dlon = np.diff(lon)
    if not (np.allclose(dlon, 360.0 / W, rtol=1e-6) and dlon.size == W - 1):
        raise InputError(
            "longitudes must cover the globe uniformly (spacing 360/W) for the periodic "
            "geostrophic-wind derivative"
        )
    return np.deg2rad(lat), np.deg2rad(lon), float(np.deg2rad(dlat[0]))


def _as64(x: Any) -> tuple[torch.Tensor, Any]:
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64), x.dtype
    return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float64)), None


def _back(x: torch.Tensor, dtype: Any):
    return x.numpy() if dtype is None else x.to(dtype)


def _grad_lambda(phi: torch.Tensor, dlam: float) -> torch.Tensor:
    """∂Φ/∂λ (per radian), centred, periodic along the last axis."""
    return (torch.roll(phi, -1, dims=-1) - torch.roll(phi, 1, dims=-1)) / (2.0 * dlam)


def _grad_phi(phi: torch.Tensor, dphi: float) -> torch.Tensor:
    """∂Φ/∂φ (per radian) along axis −2: centred inside, second-order one-sided on the edges."""
    inner = (phi[..., 2:, :] - phi[..., :-2, :]) / (2.0 * dphi)
    first = (-3.0 * phi[..., 0, :] + 4.0 * phi[..., 1, :] - phi[..., 2, :]) / (2.0 * dphi)
    last = (3.0 * phi[..., -1, :] - 4.0 * phi[..., -2, :] + phi[..., -3, :]) / (2.0 * dphi)
    return torch.cat([first.unsqueeze(-2), inner, last.unsqueeze(-2)], dim=-2)


def geostrophic_wind(phi, lat, lon):
    """Geostrophic wind ``(u_g, v_g)`` (..., H, W) in m/s of geopotential ``phi`` (..., H, W) m²/s².

    ``lat`` (H,) and ``lon`` (W,) in degrees (uniform; lon global). Where ``sin φ = 0`` the result
    is not finite.
    """
    p, dtype = _as64(phi)
    if p.ndim < 2:
        raise InputError(f"expected a field (..., H, W), got shape {tuple(p.shape)}")
    H, W = p.shape[-2:]
    latr, lonr, dphi = _coords(lat, lon, H, W)
    dlam = 2.0 * np.pi / W
    lat_t = torch.as_tensor(latr, dtype=torch.float64, device=p.device)[:, None]
    f = 2.0 * OMEGA * torch.sin(lat_t)
    dpdx = _grad_lambda(p, dlam) / (EARTH_RADIUS * torch.cos(lat_t))
    dpdy = _grad_phi(p, dphi) / EARTH_RADIUS
    return _back(-dpdy / f, dtype), _back(dpdx / f, dtype)


def geo_imbalance(x_phys, lat, lon, level: int = 500, band: float = 15.0):
    """Geostrophic imbalance ``D`` (...) of states ``x_phys`` (..., 69, H, W), physical units.

    Uses ``z{level}``, ``u{level}``, ``v{level}``; points with ``|lat| ≥ band`` degrees,
    area weights ``cos(lat)``.
    """
    x, dtype = _as64(x_phys)
    if x.ndim < 3:
        raise InputError(f"expected states (..., 69, H, W), got shape {tuple(x.shape)}")
    try:
        iz, iu, iv = (channel_index(f"{v}{int(level)}") for v in ("z", "u", "v"))
    except KeyError as exc:
        raise InputError(f"no channels at level {level} hPa: {exc}") from None
    H, W = x.shape[-2:]
    lat_np = np.asarray(lat.detach().cpu().numpy() if isinstance(lat, torch.Tensor) else lat, dtype=np.float64)
    keep = (np.abs(lat_np) >= band) & (np.abs(lat_np) < 90.0 - 1e-9)  # rows on a pole: no ∂/∂x
    if not keep.any():
        raise InputError(f"no latitudes with |lat| >= {band}°; lower the band")
    ug, vg = geostrophic_wind(x[..., iz, :, :], lat, lon)
    rows = torch.as_tensor(np.flatnonzero(keep), device=x.device)
    w = torch.as_tensor(np.cos(np.deg2rad(lat_np[keep])), dtype=torch.float64, device=x.device)[:, None]
    u = x[..., iu, :, :].index_select(-2, rows)
    v = x[..., iv, :, :].index_select(-2, rows)
    ug = ug.index_select(-2, rows)
    vg = vg.index_select(-2, rows)

    def ratio(a, b):
        num = (w * (a - b).abs()).sum(dim=(-2, -1))
        den = (w * a.abs()).sum(dim=(-2, -1))
        # no wind at all: 0 when the geostrophic wind is 0 too, else the absolute imbalance
        return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                           torch.where(num > 0, num, torch.zeros_like(num)))

    d = 0.5 * (ratio(u, ug) + ratio(v, vg))
    return _back(d, dtype)


def geo_reward(d, d_gt, floor: float = D_GT_FLOOR):
    """``R_phys = 2 σ(−|D − D_gt| / max(D_gt, floor))`` in [0, 1]; 1 when ``D == D_gt`` (also at
    ``D_gt = 0``); NaN only for NaN input."""
    (a, dt_a), (b, _) = _as64(d), _as64(d_gt)
    r = 2.0 * torch.sigmoid(-(a - b).abs() / b.clamp_min(float(floor)))
    return _back(r, dt_a)


def geo_score(x_phys, truth_phys, lat, lon, level: int = 500, band: float = 15.0):
    """Geo-Score ``100 · R_phys`` (...) of states ``x_phys`` against ``truth_phys`` (…, 69, H, W).

    ``truth_phys`` broadcasts against ``x_phys`` (e.g. N candidates of one truth).
    """
    d = geo_imbalance(x_phys, lat, lon, level, band)
    d_gt = geo_imbalance(truth_phys, lat, lon, level, band)
    if isinstance(d, torch.Tensor) and not isinstance(d_gt, torch.Tensor):
        d_gt = torch.as_tensor(d_gt, dtype=d.dtype, device=d.device)
    elif isinstance(d_gt, torch.Tensor) and not isinstance(d, torch.Tensor):
        d = torch.as_tensor(d, dtype=d_gt.dtype, device=d_gt.device)
    return 100.0 * geo_reward(d, d_gt)
