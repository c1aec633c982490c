"""The embedded Held–Suarez world (align_rl.data): physics pieces against hand computations and
analytic fields, and a short simulation against the Held–Suarez climate.

Reference climate: Held, I. M. and M. J. Suarez, 1994: A proposal for the intercomparison of the
dynamical cores of atmospheric general circulation models. Bull. Amer. Meteor. Soc., 75,
1825–1830 (Fig. 1/2: the time- and zonal-mean zonal wind has westerly jets of ≈ 28–30 m/s at
≈ 45° latitude near σ ≈ 0.2–0.25 (200–250 hPa); the zonal-mean temperature near σ = 0.85 falls
from ≈ 295–300 K at the equator to ≈ 255–260 K near the poles).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from align_rl import identity
from align_rl.config import load_config
from align_rl.io.grid import Grid, lat_weights
from align_rl.io.schema import LEVELS, LONG_NAMES
from align_rl.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
DAY = 86400.0


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align_rl.data", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dycore():
    from align_rl.world.dycore import get_dycore

    return get_dycore()


# -- pieces ---------------------------------------------------------------------------------


def test_equilibrium_temperature_matches_held_suarez_formula():
    from align_rl.world.held_suarez import HeldSuarezParams, equilibrium_temperature

    hs = HeldSuarezParams()
    lat = torch.tensor([0.0, np.pi / 2, np.pi / 4], dtype=torch.float64)
    p = torch.tensor([1.0e5, 1.0e5, 5.0e4], dtype=torch.float64)
    t = equilibrium_temperature(lat, p, 2 / 7, hs).numpy()
    # by hand: 315 K at the equator surface; 315 − 60 at the pole; at 45°N, 500 hPa:
    # (315 − 60·½ − 10·ln(0.5)·½)·0.5^(2/7)
    expected_45 = (315 - 30 - 10 * np.log(0.5) * 0.5) * 0.5 ** (2 / 7)
    np.testing.assert_allclose(t, [315.0, 255.0, expected_45], rtol=1e-12)
    # the stratosphere is capped at 200 K: (315 + 10 ln 10)·0.1^(2/7) ≈ 175 K < 200 K
    assert float(equilibrium_temperature(torch.tensor(0.0), torch.tensor(1.0e4), 2 / 7, hs)) == 200.0


def test_held_suarez_tendencies(dycore):
    """Rayleigh friction −k_v ζ with k_v = k_f (σ − 0.7)/0.3 below σ_b, zero above; Newtonian
    cooling −k_T (T − T_eq) with k_T = k_s at the equator surface-most level's cos⁴ weight."""
    from align_rl.world.dycore import broadcast_members
    from dinosaur_torch import scales

    d = dycore
    state = broadcast_members(d.rest_state(1), 1)
    gen = torch.Generator().manual_seed(1)
    state.vorticity = d.grid.clip_wavenumbers(torch.randn(state.vorticity.shape, generator=gen)
                                              * torch.as_tensor(d.grid.mask, dtype=torch.float32))
    tend = d.forcing.explicit_terms(state)
    per_day = d.physics_specs.nondimensionalize(1 / scales.units.day)
    sigma = d.sigma
    ratio = (tend.vorticity / state.vorticity.where(state.vorticity != 0, torch.tensor(1.0)))
    for j in (0, 10, len(sigma) - 1):
        expected = -max(0.0, (sigma[j] - 0.7) / 0.3) * per_day
        got = ratio[0, j][state.vorticity[0, j] != 0]
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-9)
    # isothermal 288 K at rest: at the surface-most level near the equator T_eq ≈ 315 K·σ^κ-ish,
    # the tendency there is k_T·(T_eq − 288) > 0 and near the poles < 0 (T_eq ≈ 255 K)
    dt_nodal = d.grid.to_nodal(tend.temperature_variation)[0, -1].mean(0)  # (lat,)
    lat = d.grid.spec.latitudes
    assert dt_nodal[np.argmin(np.abs(lat))] > 0 > dt_nodal[0]
    p = torch.tensor(sigma[-1] * 1.0e5)
    from align_rl.world.held_suarez import equilibrium_temperature

    k_s = 1 / 4 * per_day
    k_a = 1 / 40 * per_day
    eq = int(np.argmin(np.abs(lat)))
    k_t = k_a + (k_s - k_a) * (sigma[-1] - 0.7) / 0.3 * np.cos(lat[eq]) ** 4
    want = -k_t * (288.0 - float(equilibrium_temperature(torch.tensor(lat[eq]), p, 2 / 7,
                                                         d.forcing.params)))
    # spectral truncation of the forcing smooths it slightly: compare within 2 %
    np.testing.assert_allclose(float(dt_nodal[eq]), want, rtol=0.02)


def test_spectral_evaluation_is_exact_on_any_grid(dycore):
    from align_rl.world.diagnostics import SpectralEvaluator

    lon, sinlat = dycore.grid.spec.nodal_mesh
    lat = np.arcsin(sinlat)

    def f(lo, la):  # a band-limited field (total wavenumber ≤ 4)
        return (np.cos(la) * np.sin(la) * np.cos(lo) + np.sin(la)
                + 0.3 * np.cos(la) ** 3 * np.sin(3 * lo + 0.4))

    modal = dycore.grid.to_modal(torch.tensor(f(lon, lat), dtype=torch.float32))
    for g in ("32x64", "8x16", "64x128"):
        grid = Grid.parse(g)
        out = SpectralEvaluator(dycore, grid)(modal).numpy()
        lo, la = np.meshgrid(np.deg2rad(grid.lon), np.deg2rad(grid.lat))
        assert out.shape == grid.shape
        np.testing.assert_allclose(out, f(lo, la), atol=2e-6)


def test_saturation_specific_humidity_hand_value():
    from align_rl.world.diagnostics import saturation_specific_humidity

    # Bolton (1980): e_s(20 °C) = 611.2·exp(17.67·20/263.5) = 2338.3 Pa;
    # q_s = 0.622·e_s / (1e5 − 0.378·e_s) = 0.014672 kg/kg at 1000 hPa
    es = 611.2 * np.exp(17.67 * 20 / 263.5)
    want = 0.622 * es / (1e5 - 0.378 * es)
    got = float(saturation_specific_humidity(torch.tensor(293.15, dtype=torch.float64),
                                             torch.tensor(1e5, dtype=torch.float64)))
    assert abs(got - want) < 1e-9 and abs(got - 0.01467) < 2e-5


def test_isothermal_column_geopotential_is_hydrostatic(dycore):
    """For an isothermal atmosphere Φ(p) = R T0 ln(p_s/p) exactly; the sigma→pressure
    interpolation must reproduce it at every level above the ground."""
    from align_rl.world.diagnostics import R_SI, Diagnoser, sigma_to_pressure

    grid = Grid.parse("8x16")
    diag = Diagnoser(dycore, grid)
    t0 = 250.0
    m, L = 1, dycore.spec.layers
    t = torch.full((m, L) + grid.shape, t0, dtype=torch.float64)
    ps = torch.full((m,) + grid.shape, 98_000.0, dtype=torch.float64)
    ps[..., :4] = 101_500.0  # part of the grid has 1000 hPa above the ground
    f = {"t": t, "u": torch.zeros_like(t), "v": torch.zeros_like(t), "ps": ps,
         "z": torch.einsum("gh,...hij->...gij", diag.g_weights.double(), t)}
    diag.log_sigma, diag.log_sigma_ext = diag.log_sigma.double(), diag.log_sigma_ext.double()
    p = torch.tensor([float(lv) * 100 for lv in LEVELS], dtype=torch.float64)
    out = sigma_to_pressure(f, diag, p)
    exact = R_SI * t0 * torch.log(ps[:, None] / p[:, None, None])
    above = p[:, None, None] < ps[:, None] * diag.sigma_l
    # Durran's discrete hydrostatic weights are exact for an isothermal column up to the
    # midpoint rule of the lowest half layer (< 0.1 %)
    err = (out["z"] - exact).abs()[above.expand_as(exact)]
    assert float(err.max()) < 1e-3 * float(exact.abs().max())
    assert bool((out["z"][:, -1, :, 4:] < 0).all())  # 1000 hPa below a 980 hPa surface: Φ < 0
    np.testing.assert_allclose(out["t"][above.expand_as(exact)].numpy(), t0)


# -- the whole world ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "w.zarr"
    r = _run("simulate", "--out", str(out), "--days", "2", "--grid", "32x64", "--members", "2",
             "--burn-in", "1", "--gap", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    return out


def test_store_layout(world):
    ds = xr.open_zarr(world)
    assert set(ds.data_vars) == set(LONG_NAMES.values())
    assert ds["level"].values.tolist() == list(LEVELS)
    lat = ds["latitude"].values
    assert len(lat) == 32 and np.all(np.diff(lat) > 0)
    np.testing.assert_allclose(lat, Grid(32, 64).lat)
    assert len(ds["longitude"]) == 64
    times = ds["time"].values
    assert len(times) == 2 * 2 * 4  # members × days × 4
    # member m is the year 2000 + m, 6-hourly from Jan 1 00 UTC
    for m in range(2):
        tm = times[m * 8:(m + 1) * 8]
        assert tm[0] == np.datetime64(f"{2000 + m}-01-01T00:00")
        assert np.all(np.diff(tm) == np.timedelta64(6, "h"))
    for name in ds.data_vars:
        assert np.isfinite(ds[name].values).all(), name
    derived = {LONG_NAMES[v] for v in ("q", "msl", "u10", "v10", "t2m")}
    for name in ds.data_vars:
        assert ds[name].attrs["derived"] == (name in derived), name
    assert ds.attrs["source"] == "held-suarez dinosaur-torch"
    norm = json.loads(ds.attrs["normalization"])
    assert len(norm["mean"]) == len(norm["std"]) == 69
    assert np.all(np.isfinite(norm["mean"])) and np.all(np.array(norm["std"]) > 0)
    # the training range 2000–2002 holds both members (years 2000 and 2001): 16 states
    assert ds.attrs["normalization_split"].startswith("train") and "(16 states)" in \
        ds.attrs["normalization_split"]
    z500 = ds["geopotential"].sel(level=500).sel(time=slice("2000", "2002")).values
    np.testing.assert_allclose(norm["mean"][4 + 7], z500.astype(np.float64).mean(), rtol=1e-6)
    assert set(json.loads(ds.attrs["splits"])) == {"train", "val", "pref", "test"}
    assert len(ds.attrs["config_hash"]) == identity.DIGEST_CHARS
    # the members are stretches of one run, gap_days apart: different weather, same climate
    assert ds.attrs["layout"].startswith("one run") and float(ds.attrs["gap_days"]) == 1.0
    a = ds["geopotential"].sel(level=500).values.astype(np.float64)
    assert np.abs(a[0:8] - a[8:16]).mean() > 100.0  # m²/s²: not a copy


def test_members_are_consecutive_stretches_of_one_run():
    """With no gap, two members of one day are exactly one member of two days: member 1 begins
    6 h after member 0's last state (the same run, not a perturbed copy)."""
    from align_rl.world.simulate import simulate

    two = simulate("8x16", days=1, members=2, seed=4, burn_in_days=0.0, gap_days=0.0, progress=False)
    one = simulate("8x16", days=2, members=1, seed=4, burn_in_days=0.0, gap_days=0.0, progress=False)
    np.testing.assert_allclose(two.values, one.values, rtol=1e-5, atol=1e-3)
    # a gap moves member 1 later in the run: its first state is no longer day 1 of the run
    gap = simulate("8x16", days=1, members=2, seed=4, burn_in_days=0.0, gap_days=0.25, progress=False)
    np.testing.assert_allclose(gap.values[:4], one.values[:4], rtol=1e-5, atol=1e-3)
    assert np.abs(gap.values[4] - one.values[4]).max() > 1.0


def test_held_suarez_climate(world):
    """Zonal- and time-mean u250, z500 and t850 of a short run lie in the Held–Suarez ranges.

    Held & Suarez (T63): jet maxima ≈ 28–30 m/s at ≈ 45°, 200–250 hPa. This T21 model puts them
    at ≈ 37 m/s near 37° (coarse resolution resolves fewer eddies, so the eddy-driven jet merges
    with the subtropical jet: stronger and more equatorward). Bounds are tolerant for that and
    because 2 days × 2 members sample the eddies thinly (the zonal-mean jet varies by several
    m/s from day to day); they still fail for a wrong forcing (no jet, or the jet at the
    equator or at the surface), wrong units (z in m instead of m²/s²), or a flipped latitude.
    """
    ds = xr.open_zarr(world)
    lat = ds["latitude"].values
    u250 = ds["u_component_of_wind"].sel(level=250).mean(("time", "longitude")).values
    for hemi in (lat > 0, lat < 0):
        la, u = np.abs(lat[hemi]), u250[hemi]
        k = int(np.argmax(u))
        assert 20.0 <= u[k] <= 42.0, f"jet maximum {u[k]:.1f} m/s (HS94: 28–30 m/s)"
        assert 30.0 <= la[k] <= 55.0, f"jet at {la[k]:.1f}° (HS94: ~45°)"
    assert abs(u250[np.argmin(np.abs(lat))]) < 12.0  # weak winds at the equator
    # the jet is strongest near 200–250 hPa, not at the surface
    u_prof = ds["u_component_of_wind"].mean(("time", "longitude")).max("latitude")
    assert float(u_prof.sel(level=250)) > float(u_prof.sel(level=850)) + 10.0
    w = lat_weights(lat)
    z500 = ds["geopotential"].sel(level=500).mean(("time", "longitude")).values
    zg = float((z500 * w).mean())
    assert 5.3e4 <= zg <= 5.9e4, f"global-mean z500 {zg:.0f} m²/s² (≈ 5,400–5,900 gpm × g)"
    assert z500[np.argmin(np.abs(lat))] - z500[0] > 2.0e3  # lower heights at the poles
    t850 = ds["temperature"].sel(level=850).mean(("time", "longitude")).values
    t_eq, t_pole = float(t850[np.abs(lat) < 10].mean()), float(t850[np.abs(lat) > 75].mean())
    assert 285.0 <= t_eq <= 305.0, t_eq
    assert 240.0 <= t_pole <= 275.0, t_pole
    # diagnosed channels: msl ≈ p_s (no orography), q positive, t2m close to t at 1000 hPa
    msl = ds["mean_sea_level_pressure"].values
    assert 9.5e4 < float(msl.mean()) < 1.05e5
    q = ds["specific_humidity"].values
    assert (q > 0).all() and float(q.max()) < 0.04  # 70 % of q_sat(310 K, 1000 hPa) ≈ 0.032
    u10 = ds["10m_u_component_of_wind"].values
    assert 5.0 <= float(np.abs(u10).max()) <= 40.0  # friction keeps near-surface winds moderate


# -- ensure_world and bad input ------------------------------------------------------------------


def test_ensure_world_caches_by_config_hash(tmp_path, monkeypatch):
    from align_rl.world import dataset as world_mod
    from align_rl.world.dataset import ensure_world, stored_attrs

    cfg = load_config(overrides=[f"run.workdir={tmp_path / 'run'}", "data.days=1",
                                 "data.members=1", "data.burn_in_days=0",
                                 "data.train=[1990-01-01, 1990-12-31]"])
    ws = Workspace.from_config(cfg)
    path = ensure_world(cfg, ws, progress=False)
    assert path == ws.world and path.exists()
    attrs = stored_attrs(path)
    assert attrs["config_hash"] == identity.world(cfg)
    assert attrs["normalization_split"].startswith("all")  # train range empty: fallback, said so
    # unchanged config: reused, not simulated again
    import align_rl.world.simulate as sim

    def boom(*a, **k):
        raise AssertionError("simulated again")

    monkeypatch.setattr(sim, "build_world", boom)
    assert ensure_world(cfg, ws) == path
    # a changed data section: simulated again
    cfg2 = load_config(overrides=[f"run.workdir={tmp_path / 'run'}", "data.days=1",
                                  "data.members=1", "data.burn_in_days=0", "data.seed=3"])
    with pytest.raises(AssertionError, match="simulated again"):
        ensure_world(cfg2, ws)
    # an external store: returned unchanged (after its statistics are made sure of, see
    # tests/test_real_era5.py; these paths do not exist)
    monkeypatch.setattr(world_mod, "ensure_normalization", lambda *a, **k: None)
    cfg3 = load_config(overrides=["data.source=zarr", "data.path=/some/where.zarr"])
    assert ensure_world(cfg3, ws) == Path("/some/where.zarr")
    cfg4 = load_config(overrides=["data.source=zarr", "data.path=gs://bucket/era5.zarr"])
    assert ensure_world(cfg4, ws) == "gs://bucket/era5.zarr"
    assert world_mod.ensure_world is ensure_world


def _main(*args: str) -> int:
    from align_rl.data.__main__ import main

    try:
        return main(list(args))
    except SystemExit as exc:
        return int(exc.code)


@pytest.mark.parametrize("args, words", [
    (["--grid", "33x64"], "grid"),
    (["--grid", "banana"], "grid"),
    (["--days", "0"], "days"),
    (["--days", "-3"], "days"),
    (["--members", "0"], "members"),
    (["--days", "400"], "days"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, words):
    out = tmp_path / "bad.zarr"
    assert _main("simulate", "--out", str(out), *args, "--quiet") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and words in err
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "w.zarr"
    out.mkdir()
    (out / "keep").write_text("x")
    assert _main("simulate", "--out", str(out), "--days", "1", "--members", "1", "--quiet") == 2
    assert "exists" in capsys.readouterr().err
    assert (out / "keep").read_text() == "x"


def test_thread_governor_drops_to_one_thread_when_steps_collapse():
    """Steps of 0.1 s, then 5 s (another job took a core): the governor switches to one thread
    after the slow window fills, and never on ordinary jitter."""
    from align_rl.world.simulate import ThreadGovernor

    before = torch.get_num_threads()
    try:
        now = [0.0]
        gov = ThreadGovernor(2, window=4, factor=4.0, clock=lambda: now[0])
        for dt in [0.1, 0.12, 0.09, 0.11, 0.1, 0.15, 0.1, 0.13] * 3:  # jitter: stays at 2
            now[0] += dt
            gov.tick()
        assert gov.threads == 2 and gov.switched_at is None
        for _ in range(4):
            now[0] += 5.0
            gov.tick()
        assert gov.threads == 1 and gov.switched_at is not None
        assert torch.get_num_threads() == 1
        one = ThreadGovernor(1, clock=lambda: now[0])  # already single-threaded: nothing to do
        for _ in range(20):
            now[0] += 1.0 + 9 * (_ > 10)
            one.tick()
        assert one.threads == 1 and one.switched_at is None
    finally:
        torch.set_num_threads(before)
