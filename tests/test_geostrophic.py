"""Geostrophic wind against MetPy on a spherical earth; imbalance D and Geo-Score.

MetPy reference call (MetPy >= 1.4): a DataArray of geopotential (units m^2/s^2) with 1-D
``latitude``/``longitude`` coordinates in degrees, given a spherical CRS of the project's radius::

    da = xr.DataArray(phi, dims=("latitude", "longitude"), coords=..., attrs={"units": "m^2/s^2"})
    da = da.metpy.assign_crs(grid_mapping_name="latitude_longitude", earth_radius=6371008.7714)
    u_g, v_g = metpy.calc.geostrophic_wind(da)

For a geographic CRS MetPy takes nominal grid deltas ``dx = a Δλ``, ``dy = a Δφ`` and the map
factors of the lat/lon "projection" (parallel scale ``1/cos φ``, meridional scale 1), i.e. the
spherical derivatives of docs/method.md §7; f = 2Ω sin φ with MetPy's Ω = 7.292115e-5 s⁻¹. MetPy does not
wrap in longitude, so the first and last longitude columns are excluded from the comparison.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import metpy.calc as mpcalc
import numpy as np
import pytest
import torch
import xarray as xr

from align_rl.evaluation.geostrophic import D_GT_FLOOR, EARTH_RADIUS, OMEGA, geo_imbalance, geo_reward, geo_score, geostrophic_wind
from align_rl.io.grid import Grid
from align_rl.io.schema import channel_index

IZ, IU, IV = channel_index("z500"), channel_index("u500"), channel_index("v500")


def metpy_geostrophic(phi: np.ndarray, lat: np.ndarray, lon: np.ndarray):
    da = xr.DataArray(
        phi, dims=("latitude", "longitude"),
        coords={"latitude": ("latitude", lat, {"units": "degrees_north"}),
                "longitude": ("longitude", lon, {"units": "degrees_east"})},
        attrs={"units": "m^2/s^2"},
    )
    da = da.metpy.assign_crs(grid_mapping_name="latitude_longitude", earth_radius=EARTH_RADIUS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pint's UnitStrippedWarning inside xarray
        ug, vg = mpcalc.geostrophic_wind(da)
        return (ug.metpy.convert_units("m/s").values, vg.metpy.convert_units("m/s").values)


def analytic_phi(grid: Grid, wave: int = 3):
    """Φ = Φ0 − A sin²φ + B cos²φ sin φ sin(kλ + 0.4) (m²/s²) and its exact derivatives (per radian)."""
    la, lo = np.meshgrid(np.deg2rad(grid.lat), np.deg2rad(grid.lon), indexing="ij")
    A, B = 4000.0, 900.0
    s = np.sin(wave * lo + 0.4)
    phi = 5.5e4 - A * np.sin(la) ** 2 + B * np.cos(la) ** 2 * np.sin(la) * s
    dphi_dlam = B * np.cos(la) ** 2 * np.sin(la) * wave * np.cos(wave * lo + 0.4)
    dphi_dphi = (-2 * A * np.sin(la) * np.cos(la)
                 + B * (np.cos(la) ** 3 - 2 * np.cos(la) * np.sin(la) ** 2) * s)
    return phi, dphi_dlam, dphi_dphi, la


def assert_matches_metpy(phi, lat, lon):
    ug, vg = geostrophic_wind(phi, lat, lon)
    mu, mv = metpy_geostrophic(phi, lat, lon)
    inner = (slice(1, -1), slice(1, -1))
    rows = (slice(None), slice(1, -1))  # pole-side rows too: both use 2nd-order one-sided differences
    for ours, ref in ((ug, mu), (vg, mv)):
        scale = np.abs(ref[inner]).max()
        np.testing.assert_allclose(ours[inner], ref[inner], rtol=1e-6, atol=1e-6 * scale)
        assert np.abs(ours[inner] - ref[inner]).max() / scale <= 1e-6
        np.testing.assert_allclose(ours[rows], ref[rows], rtol=1e-6, atol=1e-6 * np.abs(ref[rows]).max())


@pytest.mark.parametrize("grid", [Grid(32, 64), Grid(16, 32)])
def test_matches_metpy_on_an_analytic_field(grid):
    phi, _, _, _ = analytic_phi(grid)
    assert_matches_metpy(phi, grid.lat, grid.lon)


def test_periodic_seam_and_descending_latitude():
    grid = Grid(16, 32)
    phi, _, _, _ = analytic_phi(grid)
    ug, vg = geostrophic_wind(phi, grid.lat, grid.lon)
    # rolling the field in longitude rolls the wind: the seam is treated like every other column
    ur, vr = geostrophic_wind(np.roll(phi, 5, axis=1), grid.lat, grid.lon)
    np.testing.assert_allclose(ur, np.roll(ug, 5, axis=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(vr, np.roll(vg, 5, axis=1), rtol=1e-12, atol=1e-12)
    # a north-to-south field with its coordinate gives the same wind
    ud, vd = geostrophic_wind(phi[::-1], grid.lat[::-1], grid.lon)
    np.testing.assert_allclose(ud[::-1], ug, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(vd[::-1], vg, rtol=1e-12, atol=1e-10)


def test_converges_to_the_exact_geostrophic_wind():
    """Centred differences: the error against the analytic wind falls ~4x per halving of d."""
    errs = []
    for grid in (Grid(32, 64), Grid(64, 128)):
        phi, dl, dp, la = analytic_phi(grid)
        f = 2 * OMEGA * np.sin(la)
        u_exact = -dp / (EARTH_RADIUS * f)
        v_exact = dl / (EARTH_RADIUS * np.cos(la) * f)
        ug, vg = geostrophic_wind(phi, grid.lat, grid.lon)
        band = np.abs(grid.lat) >= 15
        errs.append(max(np.abs(ug - u_exact)[band].max(), np.abs(vg - v_exact)[band].max()))
    assert 3.0 < errs[0] / errs[1] < 5.0


def test_torch_matches_numpy_and_is_differentiable():
    grid = Grid(16, 32)
    phi, _, _, _ = analytic_phi(grid)
    t = torch.tensor(np.stack([phi, 1.1 * phi]), dtype=torch.float64, requires_grad=True)
    ug, vg = geostrophic_wind(t, torch.tensor(grid.lat), torch.tensor(grid.lon))
    un, vn = geostrophic_wind(phi, grid.lat, grid.lon)
    np.testing.assert_allclose(ug[0].detach().numpy(), un, rtol=1e-12, atol=1e-12 * np.abs(un).max())
    np.testing.assert_allclose(vg[1].detach().numpy(), 1.1 * vn, rtol=1e-12, atol=1e-12 * np.abs(vn).max())
    (ug.square().mean() + vg.square().mean()).backward()
    assert torch.isfinite(t.grad).all()
    f32 = geostrophic_wind(t.detach().float(), grid.lat, grid.lon)[0]
    assert f32.dtype == torch.float32


# ----------------------------------------------------------------------------- balanced states


def balanced_states(grid: Grid, n: int = 1, ageo: float = 0.15, seed: int = 0) -> np.ndarray:
    """States (n, 69, H, W) whose 500 hPa wind is the exact geostrophic wind of an analytic z500
    plus a smooth ageostrophic part of relative size ``ageo``; other channels random."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 69, *grid.shape))
    for i in range(n):
        phi, dl, dp, la = analytic_phi(grid, wave=3 + i)
        f = 2 * OMEGA * np.sin(la)
        ug = -dp / (EARTH_RADIUS * f)
        vg = dl / (EARTH_RADIUS * np.cos(la) * f)
        lo = np.deg2rad(grid.lon)[None, :]
        x[i, IZ] = phi
        x[i, IU] = ug + ageo * np.abs(ug).mean() * np.cos(la) * np.cos(2 * lo)
        x[i, IV] = vg + ageo * np.abs(vg).mean() * np.cos(la) * np.sin(5 * lo)
    return x


def hand_imbalance(x: np.ndarray, lat: np.ndarray, band: float = 15.0) -> float:
    """D of docs/method.md §7 for one state, with numpy.gradient (2nd-order edges) and a periodic roll."""
    a = 6371008.7714
    phi, u, v = x[IZ], x[IU], x[IV]
    la = np.deg2rad(lat)[:, None]
    dlam = 2 * np.pi / phi.shape[1]
    dpdlam = (np.roll(phi, -1, 1) - np.roll(phi, 1, 1)) / (2 * dlam)
    dpdphi = np.gradient(phi, np.deg2rad(lat), axis=0, edge_order=2)
    f = 2 * 7.292115e-5 * np.sin(la)
    ug = -dpdphi / (a * f)
    vg = dpdlam / (a * np.cos(la) * f)
    keep = np.abs(lat) >= band
    w = np.cos(la)[keep]
    du = (w * np.abs(u - ug)[keep]).sum() / (w * np.abs(u)[keep]).sum()
    dv = (w * np.abs(v - vg)[keep]).sum() / (w * np.abs(v)[keep]).sum()
    return 0.5 * (du + dv)


def test_imbalance_equals_hand_computation():
    grid = Grid(32, 64)
    x = balanced_states(grid, n=3)
    d = geo_imbalance(x, grid.lat, grid.lon)
    assert d.shape == (3,)
    for i in range(3):
        assert d[i] == pytest.approx(hand_imbalance(x[i], grid.lat), rel=1e-10)
    # a different band changes the points used
    assert geo_imbalance(x[0], grid.lat, grid.lon, band=30.0) == pytest.approx(
        hand_imbalance(x[0], grid.lat, band=30.0), rel=1e-10)


def test_exactly_balanced_flow_has_small_imbalance_converging_to_zero():
    ds = [float(geo_imbalance(balanced_states(g, ageo=0.0)[0], g.lat, g.lon))
          for g in (Grid(32, 64), Grid(64, 128))]
    assert ds[0] < 0.02 and 3.0 < ds[0] / ds[1] < 5.0
    wrong_sign = balanced_states(Grid(32, 64), ageo=0.0)[0]
    wrong_sign[IU] *= -1
    assert geo_imbalance(wrong_sign, Grid(32, 64).lat, Grid(32, 64).lon) > 0.9


def test_reward_formula():
    assert geo_reward(0.2, 0.2) == pytest.approx(1.0)
    assert geo_reward(0.3, 0.2) == pytest.approx(2 / (1 + np.exp(0.5)))
    assert geo_reward(0.1, 0.2) == pytest.approx(2 / (1 + np.exp(0.5)))
    r = geo_reward(torch.tensor([0.2, 0.4]), torch.tensor(0.2))
    assert isinstance(r, torch.Tensor)
    torch.testing.assert_close(r, torch.tensor([1.0, float(2 / (1 + np.exp(1.0)))]))


def test_geo_score_is_100_for_the_truth_and_falls_with_noise():
    grid = Grid(32, 64)
    truth = balanced_states(grid, n=2)
    assert np.allclose(geo_score(truth, truth, grid.lat, grid.lon), 100.0)
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(truth.shape)
    scale = truth.std(axis=(-2, -1), keepdims=True)  # per-channel spatial std
    scores = [geo_score(truth + s * scale * noise, truth, grid.lat, grid.lon) for s in (0, 1e-3, 3e-3, 1e-2, 3e-2)]
    scores = np.stack(scores)  # (levels, 2)
    assert np.allclose(scores[0], 100.0)
    assert np.all(np.diff(scores, axis=0) < 0), scores
    assert scores[-1].max() < 60
    # N candidates of one truth broadcast; torch in, torch out
    cand = torch.tensor(truth[0][None] + np.array([0.0, 3e-3, 1e-2])[:, None, None, None] * scale[0] * noise[0])
    out = geo_score(cand, torch.tensor(truth[0]), grid.lat, grid.lon)
    assert isinstance(out, torch.Tensor) and out.shape == (3,)
    assert out[0].item() == pytest.approx(100.0) and out[0] > out[1] > out[2]


def test_geo_score_is_finite_when_the_truth_is_perfectly_balanced():
    """D_gt = 0 (issue: geo_reward(0, 0) was NaN and reached the JSON as an invalid value)."""
    import json

    assert geo_reward(0.0, 0.0) == pytest.approx(1.0)
    assert geo_reward(D_GT_FLOOR, 0.0) == pytest.approx(2 / (1 + np.exp(1.0)))  # |D − 0| / floor = 1
    r = geo_reward(torch.tensor([0.0, 0.05]), torch.tensor(0.0))
    assert torch.isfinite(r).all() and r[0] == 1.0 and r[1] < 1e-10
    assert geo_reward(0.3, 0.2) == pytest.approx(2 / (1 + np.exp(0.5)))  # above the floor: unchanged
    # a truth whose 500 hPa wind IS its discrete geostrophic wind: D_gt = 0 exactly
    grid = Grid(16, 32)
    truth = balanced_states(grid, ageo=0.0)
    ug, vg = geostrophic_wind(truth[:, IZ], grid.lat, grid.lon)
    truth[:, IU], truth[:, IV] = ug, vg
    assert geo_imbalance(truth, grid.lat, grid.lon)[0] == 0.0
    ana = truth.copy()
    ana[:, IU] *= 1.001
    scores = geo_score(np.concatenate([truth, ana]), truth, grid.lat, grid.lon)
    assert np.all(np.isfinite(scores)) and scores[0] == 100.0 and 0 < scores[1] < 100
    json.loads(json.dumps({"geo_score": float(scores[1])}, allow_nan=False))
    # no wind at all: D = 0, not NaN
    calm = np.zeros_like(truth)
    assert geo_imbalance(calm, grid.lat, grid.lon)[0] == 0.0


def test_pole_rows_are_left_out_of_the_imbalance():
    from align_rl.io.grid import LatLonGrid

    g = LatLonGrid(17, 32, poles=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((69, 17, 32))
    la, lo = np.meshgrid(np.deg2rad(g.lat), np.deg2rad(g.lon), indexing="ij")
    x[IZ] = 5.5e4 - 4000 * np.sin(la) ** 2 + 900 * np.cos(la) ** 2 * np.sin(la) * np.sin(3 * lo)
    d = geo_imbalance(x, g.lat, g.lon)
    assert np.isfinite(d) and d > 0


# ----------------------------------------------------------------------------- the embedded world


def _world_ready() -> bool:
    """The simulator's command and its committed spun-up restart are both present."""
    spec = importlib.util.find_spec("align_rl.data")
    if spec is None or importlib.util.find_spec("align_rl.data.__main__") is None:
        return False
    restart = Path(spec.submodule_search_locations[0]) / "restart"
    return any(restart.glob("*.npz"))


def _world_z500(tmp_path):
    """z500 (T, H, W), states, lat, lon of the embedded Held–Suarez world when its simulator is
    ready, else of a balanced analytic stand-in (and a flag saying which)."""
    if _world_ready():
        from align_rl.io.era5 import open_states

        out = tmp_path / "w.zarr"
        subprocess.run([sys.executable, "-m", "align_rl.data", "simulate", "--out", str(out),
                        "--days", "1", "--grid", "32x64", "--members", "1"], check=True)
        s = open_states(out)
        return s.values[:, IZ].astype(np.float64), s.values.astype(np.float64), s.lat, s.lon, True
    grid = Grid(32, 64)
    x = balanced_states(grid, n=2, seed=3)
    return x[:, IZ], x, grid.lat, grid.lon, False


@pytest.mark.slow
def test_matches_metpy_on_the_embedded_world(tmp_path):
    z, states, lat, lon, is_world = _world_z500(tmp_path)
    for t in range(len(z)):
        assert_matches_metpy(z[t], lat, lon)
    d = geo_imbalance(states, lat, lon)
    # extratropical 500 hPa flow is close to geostrophic: a sign or orientation error gives D ~ 2
    assert np.all(d < 0.5), (d, is_world)
    assert np.allclose(geo_score(states, states, lat, lon), 100.0)
