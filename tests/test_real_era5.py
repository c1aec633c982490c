"""Real ERA5 as WeatherBench2 publishes it: grids with pole rows, either dimension order and latitude
direction, subsets of variables and levels, conservative regridding to the model grid, and
normalisation statistics that a run computes without writing into the store."""

from __future__ import annotations

import json

import numpy as np
import pytest

from align_rl.io import era5
from align_rl.config import load_config
from align_rl.world.dataset import ensure_normalization, ensure_world
from align_rl.errors import InputError
from align_rl.io.grid import Grid, LatLonGrid, cell_area_weights
from align_rl.io.regrid import regrid
from align_rl.io.schema import CHANNELS, LEVELS
from align_rl.io.states import States
from align_rl.workspace import Workspace
from tests.test_era5 import make_states, write_layout

WB2_ORDER = ("time", "level", "longitude", "latitude")  # WeatherBench2 writes (lon, lat) grids


def pole_states(nlat: int = 17, nlon: int = 32, T: int = 3, seed: int = 0) -> States:
    """Physically scaled states on a grid with rows on both poles (latitude ascending)."""
    g = LatLonGrid(nlat, nlon, poles=True)
    base = make_states(grid=Grid(8, 16), T=T, seed=seed)
    rng = np.random.default_rng(seed)
    mean = base.values.mean(axis=(0, 2, 3))[None, :, None, None]
    std = base.values.std(axis=(0, 2, 3))[None, :, None, None]
    la = np.deg2rad(g.lat)[:, None]
    lo = np.deg2rad(g.lon)[None, :]
    smooth = np.cos(la) * np.sin(2 * lo + 0.3) + 0.5 * np.sin(la)
    noise = 0.3 * rng.standard_normal((T, len(CHANNELS), nlat, nlon))
    v = (mean + std * (smooth[None, None] + noise)).astype(np.float32)
    return States(v, base.times, g.lat, g.lon)


@pytest.mark.parametrize("lat_desc", [True, False])
def test_pole_row_store_is_read_and_regridded_conservatively(tmp_path, lat_desc):
    s = pole_states()
    p = write_layout(tmp_path / "era5.zarr", s, order=WB2_ORDER, lat_desc=lat_desc)
    assert era5.store_info(p)["grid"] == LatLonGrid(17, 32, poles=True)
    native = era5.open_states(p)  # the store's own grid, latitude ascending
    np.testing.assert_array_equal(native.lat, s.lat)
    np.testing.assert_array_equal(native.values, s.values)
    r = era5.open_states(p, expect_grid="16x32")
    assert r.grid == Grid(16, 32)
    assert r.attrs["regridded"].startswith("stored on 17x32 with poles")
    np.testing.assert_allclose(r.values, regrid(s.values.astype(np.float64), "17x32", "16x32"), rtol=1e-6)
    # area means survive the regridding (the library gives the pole rows no weight: small loss)
    gm_src = np.einsum("tchw,h->tc", s.values.astype(np.float64), cell_area_weights(s.lat)) / (17 * 32)
    gm_dst = np.einsum("tchw,h->tc", r.values.astype(np.float64), cell_area_weights(r.lat)) / (16 * 32)
    spread = s.values.std(axis=(2, 3))
    assert np.max(np.abs(gm_dst - gm_src) / spread) < 0.01


def test_wb2_1440x721_style_longitudes_and_level_order(tmp_path):
    """Longitudes from −180 and levels stored bottom-up with extra levels, as some ERA5 copies."""
    s = pole_states(nlat=9, nlon=16, T=2)

    def edit(ds):
        import xarray as xr

        ds = ds.assign_coords(longitude=(((ds.longitude + 180) % 360) - 180)).sortby("longitude")
        extra = ds.isel(level=[0]).assign_coords(level=[1])
        return xr.concat([ds, extra], dim="level", data_vars="minimal").isel(level=slice(None, None, -1))

    p = write_layout(tmp_path / "s.zarr", s, order=WB2_ORDER, lat_desc=True, edit=edit)
    np.testing.assert_array_equal(era5.open_states(p).values, s.values)


def test_subset_store_names_what_the_models_miss_and_scoring_reads_it(tmp_path):
    s = pole_states(T=2)
    keep_vars = ["geopotential", "temperature"]
    p = write_layout(tmp_path / "zt.zarr", s, order=WB2_ORDER, lat_desc=True,
                     edit=lambda ds: ds[keep_vars].sel(level=[500, 850]))
    with pytest.raises(InputError, match="lacks the variable.*10m_u_component_of_wind.*all 69 channels"):
        era5.open_states(p, expect_grid="16x32")
    info = era5.store_info(p)
    assert info["channels"] == ["z500", "z850", "t500", "t850"]
    f = era5.open_fields(p)
    assert f.channels == info["channels"] and f.values.shape == (2, 4, 17, 32)
    np.testing.assert_array_equal(f.values[:, 0], s.values[:, CHANNELS.index("z500")])
    np.testing.assert_array_equal(f.values[:, 3], s.values[:, CHANNELS.index("t850")])
    # all variables but one level short: the level is named
    q = write_layout(tmp_path / "lev.zarr", s, edit=lambda ds: ds.sel(level=[lv for lv in LEVELS if lv != 50]))
    with pytest.raises(InputError, match=r"level\(s\) \[50\].*scoring accepts a subset"):
        era5.open_states(q)


def _zarr_snapshot(path):
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_run_computes_statistics_in_its_workdir_never_in_the_store(tmp_path):
    s = pole_states(T=6)
    p = write_layout(tmp_path / "era5.zarr", s, order=WB2_ORDER, lat_desc=True)
    before = _zarr_snapshot(p)
    cfg = load_config(overrides={"data": {"source": "zarr", "path": str(p), "grid": "16x32",
                                          "train": ["2000-01-01", "2000-01-01"], "stats_times": 3},
                                 "run": {"workdir": str(tmp_path / "run")}})
    ws = Workspace.from_config(cfg)
    store = ensure_world(cfg, ws, progress=False)
    files = list((ws.root / "normalization").glob("*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["computed_over"]["times"] == 3
    # the statistics of 3 evenly spaced training times, on the model grid
    on_model = era5.open_states(p, expect_grid="16x32")
    sel = on_model.values[[0, 2, 3]].astype(np.float64)  # linspace(0, 3, 3) -> 0, 2 (1.5 → 2), 3
    np.testing.assert_allclose(stored["mean"], sel.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(stored["std"], sel.std(axis=(0, 2, 3)), rtol=1e-6)
    # every reader of the store sees them; the store is unchanged
    norm = era5.load_normalizer(store)
    np.testing.assert_allclose(norm.mean, stored["mean"])
    assert "normalization" in era5.open_states(store, expect_grid="16x32").attrs
    from align_rl.training.pretraining import load_data  # what pretraining reads: the model grid, these statistics

    data = load_data(cfg, ws, progress=False)
    assert data.train.grid == Grid(16, 32) and data.train_norm.shape == (4, 69, 16, 32)
    np.testing.assert_allclose(data.normalizer.std, stored["std"])
    assert _zarr_snapshot(p) == before
    # a second run reuses the file; a given file wins
    mtime = files[0].stat().st_mtime_ns
    ensure_normalization(cfg, ws, store, progress=False)
    assert files[0].stat().st_mtime_ns == mtime
    other = tmp_path / "stats.json"
    other.write_text(json.dumps({"channels": list(CHANNELS), "mean": [1.0] * 69, "std": [2.0] * 69}))
    cfg2 = load_config(overrides={"data": {"source": "zarr", "path": str(p), "grid": "16x32",
                                           "normalization": str(other)},
                                  "run": {"workdir": str(tmp_path / "run")}})
    assert ensure_normalization(cfg2, ws, store, progress=False).std[0] == 2.0
    assert era5.load_normalizer(store).std[0] == 2.0
    assert _zarr_snapshot(p) == before


def test_stats_command_writes_a_file_not_the_store(tmp_path, capsys):
    from align_rl.data.__main__ import main

    s = pole_states(T=4)
    p = write_layout(tmp_path / "era5.zarr", s, order=WB2_ORDER)
    before = _zarr_snapshot(p)
    with pytest.raises(SystemExit) as exc:
        main(["stats", str(p)])
    assert exc.value.code == 2 and "--out FILE" in capsys.readouterr().err
    out = tmp_path / "stats.json"
    assert main(["stats", str(p), "--out", str(out), "--grid", "16x32", "--train", "2000-01-01",
                 "2000-01-01"]) == 0
    norm = era5.load_normalizer(out)
    ref = era5.open_states(p, expect_grid="16x32").values.astype(np.float64)
    np.testing.assert_allclose(norm.mean, ref.mean(axis=(0, 2, 3)), rtol=1e-9)
    assert _zarr_snapshot(p) == before


def test_section_hash_ignores_new_keys_at_their_default():
    a = load_config()
    b = load_config(overrides={"data": {"stats_times": 1000}})
    c = load_config(overrides={"data": {"stats_times": 10}})
    assert a.section_hash("data") == b.section_hash("data") != c.section_hash("data")
