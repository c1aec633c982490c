"""Mapping fields between global latitude/longitude grids with ``xarray-regrid``.

``regrid(values (..., H, W), src, dst, method)`` with ``src``/``dst`` :class:`LatLonGrid` (or a
model :class:`Grid`, or a string such as ``"721x1440"``), latitude ascending on both sides:

- ``conservative`` (data → model grid, a forecaster's output → model grid): ``xarray-regrid``'s
  first-order conservative scheme, factorised along latitude and longitude with its spherical
  (cell-area) correction, periodic in longitude. How it treats the poles: a source grid without
  pole rows is padded with one row at each pole (the zonal mean of the last row, ESMF's
  ``Pole="all"``), and a source row on a pole weighs nothing (its cell area is taken as 0). The
  scheme is exact for constants and conserves the area mean away from the polar cells; measured
  against an exact spherical overlap computation (``tests/test_regrid.py``), 721×1440 → 128×256
  differs by < 2 % of a unit-variance white noise field and by 4e-7 relative on a smooth
  geopotential.
- ``linear`` (model grid → a finer model's grid, e.g. FengWu's 721 × 1440): bilinear
  interpolation, periodic in longitude; target rows beyond the source's first and last rows
  (the poles) take the zonal-mean pole values of the padding. The library's conservative scheme
  cannot fill target rows on the poles from a cell-centred source at least twice as coarse (it
  returns 0 there), so such a refinement must be ``linear``; :func:`regrid` refuses the other.

Computation in float64 on blocks of leading entries (memory), returned in the input dtype.
NaN in the input gives NaN where it reaches; an output that is not finite raises ``InputError``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from align_rl.errors import ConfigError, InputError
from align_rl.io.grid import Grid, LatLonGrid

METHODS = ("conservative", "linear")


def _grid(g: Any) -> LatLonGrid:
    try:
        return LatLonGrid.of(g)
    except InputError as exc:
        raise InputError(f"regrid: {exc}") from None


def _xr():
    try:
        import xarray as xr
        import xarray_regrid  # noqa: F401  (registers the .regrid accessor)
    except ImportError:  # pragma: no cover - a dependency of the package
        raise ConfigError("regridding needs xarray-regrid: pip install xarray-regrid") from None
    return xr


def regrid(values: Any, src: Grid | LatLonGrid | str, dst: Grid | LatLonGrid | str,
           method: str = "conservative", block_bytes: int = 1 << 28) -> Any:
    """``values`` (..., H, W) on ``src`` → (..., H', W') on ``dst`` (both latitude ascending).

    numpy in → numpy out (input dtype); a torch tensor in → a tensor out on its device and dtype
    (not differentiable). Same grids: returned unchanged.
    """
    s, d = _grid(src), _grid(dst)
    if method not in METHODS:
        raise ConfigError(f"regrid method {method!r} is not one of {', '.join(METHODS)}")
    torch_in = type(values).__module__.startswith("torch")
    if torch_in:
        import torch

        arr = values.detach().to("cpu", torch.float64).numpy()
    else:
        arr = np.asarray(values)
    if arr.ndim < 2 or arr.shape[-2:] != s.shape:
        raise InputError(f"regrid: fields of shape {arr.shape} are not on the {s} grid (…, {s.nlat}, {s.nlon})")
    if s == d:
        out = arr
    else:
        if method == "conservative" and d.poles and not s.poles and d.dlat <= s.dlat / 2 + 1e-9:
            raise InputError(
                f"conservative regridding from {s} onto {d} (twice as fine or more, with rows on the "
                "poles) leaves the pole rows empty in xarray-regrid; use method='linear' for it"
            )
        lead = arr.shape[:-2]
        flat = arr.reshape((-1,) + s.shape)
        per = max(1, int(block_bytes // (8 * max(s.nlat * s.nlon, d.nlat * d.nlon))))
        parts = [_regrid_block(flat[i:i + per], s, d, method) for i in range(0, flat.shape[0], per)]
        out = np.concatenate(parts, axis=0).reshape(lead + d.shape) if parts else \
            np.zeros(lead + d.shape)
        if not np.all(np.isfinite(out)) and np.all(np.isfinite(arr)):
            raise InputError(f"regridding {s} → {d} ({method}) gave non-finite values; "
                             "check that both grids are global")
    if torch_in:
        import torch

        return torch.as_tensor(np.ascontiguousarray(out), dtype=values.dtype, device=values.device)
    return out.astype(arr.dtype, copy=False) if out is not arr else arr


def _regrid_block(block: np.ndarray, s: LatLonGrid, d: LatLonGrid, method: str) -> np.ndarray:
    xr = _xr()
    da = xr.DataArray(np.asarray(block, dtype=np.float64), dims=("n", "latitude", "longitude"),
                      coords={"latitude": s.lat, "longitude": s.lon})
    target = xr.Dataset(coords={"latitude": d.lat, "longitude": d.lon})
    if method == "conservative":
        out = da.regrid.conservative(target, latitude_coord="latitude", time_dim=None, skipna=False)
    else:
        out = da.regrid.linear(target, time_dim=None)
    out = out.transpose("n", "latitude", "longitude")
    if not (np.allclose(out["latitude"].values, d.lat) and np.allclose(out["longitude"].values, d.lon)):
        raise InputError(f"regridding {s} → {d} returned other coordinates")  # pragma: no cover
    return np.asarray(out.values, dtype=np.float64)
