"""The interpolating observation operator ``H`` for point observations (docs/method.md §3.1).

Horizontal: bilinear in latitude and longitude on an equiangular grid (``lat`` ascending, cell-
centred like the models' grid or with rows on the poles like ERA5's 721 × 1440), periodic in
longitude. Between the last row and a pole (cell-centred grids) the point is interpolated between
the last row at its longitude and the same row across the pole (longitude + 180°); wind components
change sign across the pole (the local east/north directions turn over), scalars do not. At the
pole itself a scalar is the mean of the two opposite points.

Vertical: linear in ``ln p`` between the two neighbouring levels of :data:`LEVELS`; surface
observations take the surface channels (``u10 v10 t2m msl``). Each observation thus has at most
8 nodes (2 levels × 4 points) with physical weights ``w_j`` summing to 1 (±1 across a pole).

Normalised units: with channel statistics ``m_c``, ``s_c``, ``H_phys(x) = Σ_j w_j x_j =
o + Σ_j w_j s_j x̃_j`` (``x̃`` normalised) with ``o = Σ_j w_j m_j``. The observation is normalised by
its own scale ``s_o = Σ_j |w_j| s_j``: ``ỹ = (y − o) / s_o``, ``σ̃_o = σ_o / s_o`` and
``H̃(x̃) = Σ_j (w_j s_j / s_o) x̃_j``. On a grid point this is the usual per-channel normalisation and
``H̃`` is the mask operator. ``H̃`` is stored as indices and weights (n, 8) and applied with one
``index_select`` (adjoint: ``index_add``), never as a dense matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from align_rl.errors import InputError
from align_rl.io.schema import LEVELS, LEVEL_VARS, N_CHANNELS, SURFACE_VARS, channel_index, channels_of
from align_rl.observations.records import ObsRecords
from align_rl.world.observations import Observations

STATE_VARS: tuple[str, ...] = SURFACE_VARS + LEVEL_VARS
"""Codes of :attr:`PointObservations.var_code`: the observed state variable."""
WIND_VARS = ("u10", "v10", "u", "v")
NODES = 8
_CHUNK = 1 << 24
"""Most gathered entries per ``index_select`` (members are gathered in chunks of this size)."""


def _grid_axes(lat: np.ndarray, lon: np.ndarray) -> tuple[float, float, float, float]:
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    dlat, dlon = np.diff(lat), np.diff(lon)
    if len(lat) < 2 or not np.allclose(dlat, dlat[0]) or dlat[0] <= 0:
        raise InputError("the grid's latitudes must be ascending and equally spaced")
    if not np.allclose(dlon, dlon[0]) or not np.isclose(dlon[0] * len(lon), 360.0):
        raise InputError("the grid's longitudes must be equally spaced and cover 360 degrees")
    return float(lat[0]), float(dlat[0]), float(lon[0]), float(dlon[0])


def horizontal_weights(lat: np.ndarray, lon: np.ndarray, grid_lat: np.ndarray, grid_lon: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear nodes of points ``lat``, ``lon`` (n,) degrees: ``(row, col, w, across)`` each (n, 4);
    ``across`` marks nodes reached across a pole (wind components change sign there)."""
    lat0, dlat, lon0, dlon = _grid_axes(grid_lat, grid_lon)
    H, W = len(grid_lat), len(grid_lon)
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    lat_top = lat0 + dlat * (H - 1)

    def cols(lo):
        fj = np.mod(lo - lon0, 360.0) / dlon
        j0 = np.floor(fj).astype(np.int64)
        b = fj - j0
        return j0 % W, (j0 + 1) % W, b

    j0, j1, b = cols(lon)
    k0, k1, bk = cols(lon + 180.0)
    n = len(lat)
    row = np.zeros((n, 4), np.int64)
    col = np.zeros((n, 4), np.int64)
    w = np.zeros((n, 4), np.float64)
    across = np.zeros((n, 4), bool)
    fi = (lat - lat0) / dlat
    inside = (fi >= 0) & (fi <= H - 1)
    i0 = np.clip(np.floor(fi), 0, H - 2).astype(np.int64)
    a = fi - i0
    # inside the rows: (i0, j0) (i0, j1) (i0+1, j0) (i0+1, j1)
    row[inside] = np.stack([i0, i0, i0 + 1, i0 + 1], 1)[inside]
    col[inside] = np.stack([j0, j1, j0, j1], 1)[inside]
    w[inside] = np.stack([(1 - a) * (1 - b), (1 - a) * b, a * (1 - b), a * b], 1)[inside]
    for pole, edge, gap in ((lat > lat_top, H - 1, 90.0 - lat_top), (lat < lat0, 0, lat0 + 90.0)):
        sel = pole & ~inside
        if not sel.any():
            continue
        # the edge row at the point's longitude, and the same row across the pole; the distance
        # between them through the pole is 2·gap degrees
        c = np.abs(lat[sel] - (lat_top if edge else lat0)) / (2 * gap)
        row[sel] = edge
        col[sel] = np.stack([j0, j1, k0, k1], 1)[sel]
        w[sel] = np.stack([(1 - c) * (1 - b[sel]), (1 - c) * b[sel], c * (1 - bk[sel]), c * bk[sel]], 1)
        across[sel] = np.array([False, False, True, True])
    return row, col, w, across


def vertical_weights(pressure: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Levels and weights (n, 2) of pressures (n,) Pa, linear in ``ln p`` between the levels of
    :data:`LEVELS` (indices into LEVELS)."""
    lnl = np.log(np.asarray(LEVELS, dtype=np.float64) * 100.0)
    lnp = np.log(np.asarray(pressure, dtype=np.float64))
    if np.any(lnp < lnl[0] - 1e-9) or np.any(lnp > lnl[-1] + 1e-9):
        raise InputError(f"pressures must lie within the levels {LEVELS[0]}–{LEVELS[-1]} hPa")
    k0 = np.clip(np.searchsorted(lnl, lnp, side="right") - 1, 0, len(lnl) - 2)
    a = np.clip((lnp - lnl[k0]) / (lnl[k0 + 1] - lnl[k0]), 0.0, 1.0)
    return np.stack([k0, k0 + 1], 1), np.stack([1 - a, a], 1)


def physical_nodes(rec: ObsRecords, grid_lat: np.ndarray, grid_lon: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(channel, flat point, weight)`` each (n, 8) of the records: ``H_phys(x) = Σ_j w_j x[c_j, p_j]``
    for ``x`` (69, H, W) physical, flat point ``p = i·W + j``. Surface observations use 4 nodes
    (the others have weight 0)."""
    n = len(rec)
    W = len(grid_lon)
    row, col, wh, across = horizontal_weights(rec.lat, rec.lon, grid_lat, grid_lon)
    svar = rec.state_var
    sign = np.where(across & np.isin(svar, WIND_VARS)[:, None], -1.0, 1.0)
    wh = wh * sign
    chan = np.zeros((n, NODES), np.int64)
    point = np.zeros((n, NODES), np.int64)
    weight = np.zeros((n, NODES), np.float64)
    pt = row * W + col
    up = rec.is_upper_air
    for v in np.unique(svar):
        sel = svar == v
        if v in SURFACE_VARS:
            chan[sel, :4] = channel_index(str(v))
            point[sel, :4] = pt[sel]
            weight[sel, :4] = wh[sel]
            continue
        s = sel & up
        lev, wv = vertical_weights(rec.pressure[s])
        cidx = np.asarray(channels_of(str(v)))[lev]  # (m, 2)
        chan[s] = np.repeat(cidx, 4, axis=1)
        point[s] = np.tile(pt[s], 2)
        weight[s] = np.repeat(wv, 4, axis=1) * np.tile(wh[s], 2)
    return chan, point, weight


@dataclass
class PointObservations:
    """Point observations of ``batch`` states, normalised units, with their operator ``H̃``.

    ``values`` ỹ (n,), ``variance`` σ̃_o² (n,), ``row`` (n,) the batch row (analysis time) each
    belongs to, ``index`` (n, 8) flat indices into one (69, H, W) field, ``weight`` (n, 8),
    ``var_code`` (n,) index into :data:`STATE_VARS`, ``scale`` s_o and ``offset`` o (n,) back to
    physical units (``y = ỹ s_o + o``), ``records`` the physical records in the same order.
    """

    values: torch.Tensor
    variance: torch.Tensor
    row: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor
    var_code: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    batch: int
    field_shape: tuple[int, int, int]
    records: ObsRecords | None = field(default=None, repr=False)
    _stats: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    """The normaliser's (mean, std) (69,) float64, for :meth:`to_grid`."""

    is_point = True
    """Marks point observations for the guidance (gridded ones have a ``mask``)."""

    @property
    def n_obs(self) -> int:
        return int(self.values.shape[0])

    @property
    def field_size(self) -> int:
        c, h, w = self.field_shape
        return c * h * w

    def __len__(self) -> int:
        return self.batch

    def _select(self, keep: torch.Tensor, row: torch.Tensor, batch: int) -> "PointObservations":
        rec = None if self.records is None else self.records.subset(keep.cpu().numpy())
        return PointObservations(self.values[keep], self.variance[keep], row, self.index[keep],
                                 self.weight[keep], self.var_code[keep], self.scale[keep],
                                 self.offset[keep], batch, self.field_shape, rec, self._stats)

    def __getitem__(self, idx) -> "PointObservations":
        """Batch rows ``idx`` (an int or a slice with step 1), renumbered from 0."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        start, stop, step = idx.indices(self.batch)
        if step != 1:
            raise InputError("point observations are sliced by contiguous batch rows")
        keep = (self.row >= start) & (self.row < stop)
        return self._select(keep, self.row[keep] - start, max(0, stop - start))

    def subset(self, keep: np.ndarray | torch.Tensor) -> "PointObservations":
        """The observations where ``keep`` (n,) bool (all batch rows kept)."""
        k = torch.as_tensor(np.asarray(keep, dtype=bool) if not isinstance(keep, torch.Tensor) else keep)
        k = k.to(self.row.device)
        return self._select(k, self.row[k], self.batch)

    def to(self, device) -> "PointObservations":
        t = {k: getattr(self, k).to(device) for k in ("values", "variance", "row", "index", "weight",
                                                       "var_code", "scale", "offset")}
        return PointObservations(**t, batch=self.batch, field_shape=self.field_shape, records=self.records,
                                 _stats=self._stats)

    # ----------------------------------------------------------------- the operator
    def _check(self, x: torch.Tensor) -> tuple[int, int]:
        if tuple(x.shape[-3:]) != tuple(self.field_shape):
            raise InputError(f"fields {tuple(x.shape)} do not match the observations' grid "
                             f"{self.field_shape}")
        if x.ndim == 4 and x.shape[0] == self.batch:
            return self.batch, 1
        if x.ndim == 5 and x.shape[0] == self.batch:
            return self.batch, int(x.shape[1])
        raise InputError(f"fields {tuple(x.shape)} are not (B, 69, H, W) or (B, N, 69, H, W) with "
                         f"B = {self.batch} observation rows")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``H̃(x)``: x (B, 69, H, W) -> (n,); x (B, N, 69, H, W) -> (N, n). Normalised units."""
        B, N = self._check(x)
        D = self.field_size
        flat = x.reshape(-1)
        base = self.row[:, None] * (N * D) + self.index  # (n, 8)
        w = self.weight.to(x.dtype)
        if N == 1:
            g = flat.index_select(0, base.reshape(-1)).view(base.shape)
            return (g * w).sum(-1)
        off = torch.arange(N, device=x.device, dtype=base.dtype) * D
        step = max(1, _CHUNK // max(1, base.numel()))  # members per gather: index memory bounded
        out = []
        for k in range(0, N, step):
            pos = base[None] + off[k:k + step, None, None]
            g = flat.index_select(0, pos.reshape(-1)).view(pos.shape)
            out.append((g * w).sum(-1))
        return torch.cat(out)

    def adjoint(self, r: torch.Tensor) -> torch.Tensor:
        """``H̃ᵀ r``: r (n,) -> (B, 69, H, W); r (N, n) -> (B, N, 69, H, W)."""
        D = self.field_size
        N = 1 if r.ndim == 1 else int(r.shape[0])
        rr = r.reshape(N, -1)
        out = torch.zeros(self.batch * N * D, dtype=r.dtype, device=r.device)
        base = self.row[:, None] * (N * D) + self.index
        w = self.weight.to(r.dtype)
        step = max(1, _CHUNK // max(1, base.numel()))
        for k in range(0, N, step):
            pos = base[None] + (torch.arange(k, min(N, k + step), device=r.device) * D)[:, None, None]
            out.index_add_(0, pos.reshape(-1), (w[None] * rr[k:k + step, :, None]).reshape(-1))
        shape = (self.batch, *self.field_shape) if r.ndim == 1 else (self.batch, N, *self.field_shape)
        return out.view(shape)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """``ỹ − H̃(x)``, shaped like :meth:`apply`'s output."""
        return self.values.to(x.dtype) - self.apply(x)

    def misfit(self, x: torch.Tensor, members: int | None = None, extra_variance: float = 0.0
               ) -> torch.Tensor:
        """Per-sample ``Σ r² / (σ̃_o² + extra)`` over each sample's observations: x (B·N, 69, H, W)
        background-major (row ``b·N + n``) -> (B·N,). Differentiable in ``x``."""
        M = x.shape[0]
        N = M // self.batch if members is None else int(members)
        if N * self.batch != M:
            raise InputError(f"{M} samples are not {self.batch} backgrounds × members")
        r = self.residual(x.reshape(self.batch, N, *x.shape[1:]))  # (N, n)
        q = r.square() / (self.variance.to(x.dtype) + extra_variance)
        sample = self.row[None, :] * N + torch.arange(N, device=x.device)[:, None]
        return torch.zeros(M, dtype=x.dtype, device=x.device).index_add(0, sample.reshape(-1), q.reshape(-1))

    def physical(self, v: torch.Tensor) -> torch.Tensor:
        """Normalised observation-space values -> physical (``ỹ s_o + o``)."""
        return v * self.scale.to(v.dtype) + self.offset.to(v.dtype)

    # ----------------------------------------------------------------- Repaint's projection
    def to_grid(self, x_b: torch.Tensor) -> "GriddedObservations":
        """Each observation moved to its nearest node (largest |weight|) for Repaint
        (docs/method.md §6.2): the node gets ``x_b[node] + sign·(y − H(x_b))`` (the innovation moves,
        in physical units), with variance ``σ_o² + σ_r²``, the representativeness error
        ``σ_r = |H(x_b) − sign·x_b[node]|`` (what the background changes over the displacement);
        several observations on one node are averaged with inverse-variance weights.
        ``x_b`` (B, 69, H, W) normalised; returns normalised (B, 69, H, W) values, mask, variance."""
        B, _ = self._check(x_b)
        D = self.field_size
        xb = x_b.detach().reshape(-1).double()
        j = self.weight.abs().argmax(dim=1)
        node = self.index.gather(1, j[:, None])[:, 0]
        sgn = torch.sign(self.weight.gather(1, j[:, None])[:, 0]).double()
        pos = self.row * D + node
        c = torch.div(node, D // self.field_shape[0], rounding_mode="floor")
        mean_c, std_c = self._stats
        mean_c, std_c = mean_c.to(xb.device)[c], std_c.to(xb.device)[c]
        scale, offset = self.scale.double(), self.offset.double()
        hxb = self.apply(x_b.detach()).double() * scale + offset  # physical
        xnode = xb[pos] * std_c + mean_c  # physical
        y = self.values.double() * scale + offset
        v_node = xnode + sgn * (y - hxb)
        var_phys = self.variance.double() * scale**2 + (hxb - sgn * xnode) ** 2
        v_n, var_n = (v_node - mean_c) / std_c, var_phys / std_c**2
        wsum = torch.zeros(B * D, dtype=torch.float64, device=xb.device).index_add_(0, pos, 1 / var_n)
        vsum = torch.zeros_like(wsum).index_add_(0, pos, v_n / var_n)
        mask = wsum > 0
        values = torch.where(mask, vsum / wsum.clamp_min(1e-300), torch.zeros_like(vsum))
        variance = torch.where(mask, 1 / wsum.clamp_min(1e-300), torch.ones_like(vsum))
        shape = (B, *self.field_shape)
        dt = x_b.dtype
        return GriddedObservations(values.view(shape).to(dt), mask.view(shape).to(dt),
                                   variance_field=variance.view(shape).to(dt),
                                   representativeness=(hxb - sgn * xnode).abs().float())


class GriddedObservations(Observations):
    """Gridded observations with a per-entry variance (``variance_field`` (B, 69, H, W),
    normalised units; 1 where unobserved), made by :meth:`PointObservations.to_grid`;
    ``representativeness`` (n,) physical σ_r of each projected observation."""

    def __init__(self, values, mask, variance_field, representativeness=None):
        super().__init__(values, mask, 0.0, 1e-12)
        self.variance_field = variance_field
        self.representativeness = representativeness

    @property
    def variance(self):  # type: ignore[override]
        return self.variance_field


def point_observations(rec: ObsRecords, times: Any, window: Any, grid_lat: np.ndarray,
                       grid_lon: np.ndarray, normalizer: Any) -> PointObservations:
    """The records within ``±window`` of each analysis time of ``times`` (T,), one batch row per
    time, with their operator on the grid ``grid_lat`` (ascending), ``grid_lon`` and normalised by
    ``normalizer`` (mean/std (69,)). An observation in two windows belongs to both rows."""
    times = np.atleast_1d(np.asarray(times).astype("datetime64[s]"))
    parts, rows = [], []
    for b, t in enumerate(times):
        keep = np.flatnonzero(rec.in_window(t, window))
        parts.append(keep)
        rows.append(np.full(len(keep), b, np.int64))
    sel = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    r = rec.subset(sel)
    H, W = len(grid_lat), len(grid_lon)
    chan, point, w = physical_nodes(r, grid_lat, grid_lon)
    mean = np.asarray(normalizer.mean, np.float64)[chan]
    std = np.asarray(normalizer.std, np.float64)[chan]
    offset = (w * mean).sum(1)
    scale = (np.abs(w) * std).sum(1)
    wn = w * std / scale[:, None]
    svar = r.state_var
    names, inv = np.unique(svar, return_inverse=True)
    code = np.array([STATE_VARS.index(v) for v in names], np.int64)[inv] if len(svar) else np.zeros(0, np.int64)
    stats = (torch.as_tensor(np.asarray(normalizer.mean, np.float64)),
             torch.as_tensor(np.asarray(normalizer.std, np.float64)))
    return PointObservations(
        values=torch.as_tensor((r.value - offset) / scale, dtype=torch.float32),
        variance=torch.as_tensor((r.error / scale) ** 2, dtype=torch.float32),
        row=torch.as_tensor(np.concatenate(rows) if rows else np.zeros(0, np.int64)),
        index=torch.as_tensor(chan * (H * W) + point),
        weight=torch.as_tensor(wn, dtype=torch.float32),
        var_code=torch.as_tensor(code),
        scale=torch.as_tensor(scale), offset=torch.as_tensor(offset),
        batch=len(times), field_shape=(N_CHANNELS, H, W), records=r, _stats=stats)
