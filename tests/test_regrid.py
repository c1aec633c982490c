"""Data grids and regridding: cell-area weights, grid recognition, and xarray-regrid's conservative
scheme measured against an exact spherical overlap computation written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from align_rl.errors import InputError
from align_rl.io.grid import Grid, LatLonGrid, cell_area_weights, lat_weights
from align_rl.io.regrid import regrid


def test_cell_area_weights():
    g = LatLonGrid(121, 240, poles=True)
    w = cell_area_weights(g.lat)
    d = np.deg2rad(1.5)
    area = np.where(np.abs(g.lat) == 90, 1 - np.cos(d / 2), 2 * np.sin(d / 2) * np.cos(np.deg2rad(g.lat)))
    np.testing.assert_allclose(w, area / area.mean(), rtol=1e-12)
    np.testing.assert_allclose(cell_area_weights(g.lat[::-1]), w[::-1])  # either direction
    c = Grid(32, 64)
    np.testing.assert_allclose(cell_area_weights(c.lat), lat_weights(c.lat), rtol=1e-12)


def test_grid_recognition():
    assert LatLonGrid.parse("721x1440") == LatLonGrid(721, 1440, True)
    assert LatLonGrid.parse("32x64") == LatLonGrid(32, 64, False)
    assert LatLonGrid.parse("33x64:centred") == LatLonGrid(33, 64, False)
    g = LatLonGrid.from_coords(np.linspace(-90, 90, 121), np.arange(240) * 1.5)
    assert g == LatLonGrid(121, 240, True) and str(g) == "121x240 with poles" and g.model_grid() is None
    assert LatLonGrid.from_coords(Grid(32, 64).lat, Grid(32, 64).lon).model_grid() == Grid(32, 64)
    with pytest.raises(InputError, match="neither cell-centred nor on the poles"):
        LatLonGrid.from_coords(np.linspace(-80, 80, 10), np.arange(16) * 22.5)
    with pytest.raises(InputError, match="NLATxNLON"):
        LatLonGrid.parse("big")


def _edges(lat):
    return np.deg2rad(np.concatenate([[-90.0], (lat[1:] + lat[:-1]) / 2, [90.0]]))


def exact_weights(src: LatLonGrid, dst: LatLonGrid):
    """Exact first-order conservative weights on the sphere: overlap areas of the cells, written
    out (latitude: sin differences of the overlapping bands; longitude: overlapping arcs)."""
    es, ed = _edges(src.lat), _edges(dst.lat)
    lo = np.maximum(es[None, :-1], ed[:-1, None])
    hi = np.minimum(es[None, 1:], ed[1:, None])
    mlat = np.where(hi > lo, np.sin(hi) - np.sin(lo), 0.0)
    a_lo, a_hi = src.lon - src.dlon / 2, src.lon + src.dlon / 2
    mlon = np.zeros((dst.nlon, src.nlon))
    for k in (-360.0, 0.0, 360.0):
        lo2 = np.maximum(a_lo[None] + k, (dst.lon - dst.dlon / 2)[:, None])
        hi2 = np.minimum(a_hi[None] + k, (dst.lon + dst.dlon / 2)[:, None])
        mlon += np.maximum(hi2 - lo2, 0.0)
    return mlat / mlat.sum(1, keepdims=True), mlon / mlon.sum(1, keepdims=True)


def _smooth(g: LatLonGrid):
    la, lo = np.meshgrid(np.deg2rad(g.lat), np.deg2rad(g.lon), indexing="ij")
    return 5.5e4 - 4000 * np.sin(la) ** 2 + 900 * np.cos(la) ** 2 * np.sin(la) * np.sin(3 * lo + 0.4)


@pytest.mark.parametrize("src,dst,noise_tol,smooth_tol", [
    (LatLonGrid(721, 1440, True), LatLonGrid(128, 256), 0.02, 1e-6),   # ERA5 → the paper's grid
    (LatLonGrid(121, 240, True), LatLonGrid(32, 64), 0.05, 2e-5),      # WB2 1.5° → the demo grid
])
def test_conservative_against_exact_overlaps(src, dst, noise_tol, smooth_tol):
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1,) + src.shape)
    smooth = _smooth(src)[None]
    ml, mn = exact_weights(src, dst)
    for f, tol in ((noise, noise_tol), (smooth, smooth_tol)):
        got = regrid(f, src, dst)
        want = ml @ f @ mn.T
        err = np.abs(got - want).max() / (1.0 if f is noise else np.abs(want).max())
        assert err < tol, err
    const = regrid(np.full(src.shape, 7.0), src, dst)
    np.testing.assert_allclose(const, 7.0, rtol=1e-12)


def test_linear_refinement_onto_pole_rows_and_refusals():
    model, native = LatLonGrid(32, 64), LatLonGrid(121, 240, True)
    up = regrid(_smooth(model)[None], model, native, "linear")
    assert np.isfinite(up).all()
    np.testing.assert_allclose(up[0, -1], up[0, -1, 0])  # the pole row is one value
    assert np.abs(up - _smooth(native)[None]).max() < 20  # m²/s² on a ±4000 field
    with pytest.raises(InputError, match="use method='linear'"):
        regrid(_smooth(model), model, native, "conservative")
    with pytest.raises(InputError, match="not on the"):
        regrid(np.zeros((3, 10, 20)), model, native)
    t = regrid(torch.ones(2, 32, 64, dtype=torch.float32), model, LatLonGrid(16, 32))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (2, 16, 32)
