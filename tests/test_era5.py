"""The WeatherBench2-layout reader: layouts, coarsening, time ranges, bad input, normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from align_rl.io import era5
from align_rl.errors import InputError
from align_rl.io.grid import Grid
from align_rl.io.normalization import Normalizer
from align_rl.io.schema import CHANNEL_INFO, LEVELS, LONG_NAMES, N_CHANNELS
from align_rl.io.states import States
from align_rl.io.store import states_to_dataset

CANONICAL = ("time", "level", "latitude", "longitude")

_BASE = {"u10": (0, 5), "v10": (0, 4), "t2m": (280, 15), "msl": (101325, 900), "z": (None, None),
         "q": (4e-3, 2e-3), "u": (8, 10), "v": (0, 6), "t": (None, None)}


def make_states(grid: Grid = Grid(8, 16), T: int = 4, seed: int = 0, start: str = "2000-01-01",
                attrs: dict | None = None) -> States:
    """Random but physically scaled states (T, 69, H, W), 6-hourly from ``start``."""
    rng = np.random.default_rng(seed)
    v = np.empty((T, N_CHANNELS, *grid.shape), dtype=np.float32)
    for c in CHANNEL_INFO:
        if c.var == "z":  # geopotential of a standard atmosphere, about 7 km scale height
            mean, std = 9.80665 * 7000 * np.log(1000 / c.level), 600.0
        elif c.var == "t":
            mean, std = 200 + 80 * c.level / 1000, 8.0
        else:
            mean, std = _BASE[c.var]
        v[:, c.index] = mean + std * rng.standard_normal((T, *grid.shape))
    times = np.datetime64(start, "ns") + np.arange(T) * np.timedelta64(6, "h")
    return States(v, times, grid.lat, grid.lon, dict(attrs or {}))


def write_layout(path: Path, states: States, order: tuple[str, ...] = CANONICAL, lat_desc: bool = False,
                 edit=None, times=None, lat=None) -> Path:
    """Write ``states`` as a WeatherBench2-style zarr in dimension ``order`` (level dropped for
    surface variables), latitude descending if asked; ``edit(ds) -> ds`` breaks it on purpose."""
    ds = states_to_dataset(states)
    if times is not None:
        ds = ds.assign_coords(time=np.asarray(times, dtype="datetime64[ns]"))
    if lat is not None:
        ds = ds.assign_coords(latitude=np.asarray(lat))
    if lat_desc:
        ds = ds.isel(latitude=slice(None, None, -1))
    for name in list(ds.data_vars):
        dims = [d for d in order if d in ds[name].dims]
        ds[name] = ds[name].transpose(*dims)
    if edit is not None:
        ds = edit(ds)
    enc = {name: {"chunks": tuple(1 if d == "time" else ds.sizes[d] for d in ds[name].dims)}
           for name in ds.data_vars}
    ds.to_zarr(path, mode="w", encoding=enc, consolidated=False)
    return path


@pytest.mark.parametrize("order", [CANONICAL, ("time", "level", "longitude", "latitude"),
                                   ("longitude", "latitude", "level", "time")])
@pytest.mark.parametrize("lat_desc", [False, True])
def test_layouts_read_identically(tmp_path, order, lat_desc):
    s = make_states(T=3)
    p = write_layout(tmp_path / "s.zarr", s, order=order, lat_desc=lat_desc)
    r = era5.open_states(p)
    assert np.all(np.diff(r.lat) > 0)
    np.testing.assert_array_equal(r.lat, s.lat)
    np.testing.assert_array_equal(r.lon, s.lon)
    np.testing.assert_array_equal(r.times, s.times)
    np.testing.assert_array_equal(r.values, s.values)  # channel order, levels, orientation
    assert r.values.dtype == np.float32


def test_levels_are_selected_by_value(tmp_path):
    s = make_states(T=2)
    # a store with its levels in reverse order and an extra level must still give FengWu order
    def edit(ds):
        extra = ds.isel(level=[0]).assign_coords(level=[1])
        return xr.concat([ds, extra], dim="level", data_vars="minimal").isel(level=slice(None, None, -1))
    p = write_layout(tmp_path / "s.zarr", s, edit=edit)
    r = era5.open_states(p)
    np.testing.assert_array_equal(r.values, s.values)


def test_time_range_is_inclusive(tmp_path):
    s = make_states(T=8)  # 2000-01-01 00 … 2000-01-02 18
    p = write_layout(tmp_path / "s.zarr", s)
    r = era5.open_states(p, time_range=["2000-01-01T06", "2000-01-01T18"])
    np.testing.assert_array_equal(r.times, s.times[1:4])
    np.testing.assert_array_equal(r.values, s.values[1:4])
    r = era5.open_states(p, time_range=["2000-01-02", "2000-01-02"])  # a date covers its day
    np.testing.assert_array_equal(r.times, s.times[4:8])
    r = era5.open_states(p, time_range=[None, "2000-01-01T00"])
    assert len(r) == 1
    with pytest.raises(InputError, match="no times"):
        era5.open_states(p, time_range=["2001-01-01", "2001-02-01"])


def test_reading_a_time_range_touches_only_its_chunks(tmp_path):
    """Chunks (one per time step) outside the range are garbage: reading the range must not need them."""
    s = make_states(T=6)
    p = write_layout(tmp_path / "s.zarr", s)
    broken = 0
    for var in LONG_NAMES.values():
        for t in (0, 4, 5):
            for f in (p / var / "c" / str(t)).rglob("*"):
                if f.is_file():
                    f.write_bytes(b"not a chunk")
                    broken += 1
    assert broken >= 9
    r = era5.open_states(p, time_range=[s.times[1], s.times[3]])
    np.testing.assert_array_equal(r.values, s.values[1:4])
    with pytest.raises(Exception):
        era5.open_states(p)


def _hand_coarsen(v: np.ndarray, lat: np.ndarray, k: int) -> np.ndarray:
    """Conservative coarsening written out cell by cell, for the test."""
    H, W = v.shape[-2:]
    d = 180.0 / H
    area = np.sin(np.deg2rad(lat + d / 2)) - np.sin(np.deg2rad(lat - d / 2))
    out = np.zeros(v.shape[:-2] + (H // k, W // k))
    for I in range(H // k):
        for J in range(W // k):
            lo, hi = (J * k - k / 2) * d, (J * k + k / 2) * d  # coarse cell edges in degrees
            acc = 0.0
            wsum = 0.0
            for i in range(I * k, I * k + k):
                for j in range(-W, 2 * W):  # fine cells, unwrapped
                    a, b = (j - 0.5) * d, (j + 0.5) * d
                    frac = max(0.0, min(b, hi) - max(a, lo)) / d
                    if frac > 0:
                        acc = acc + area[i] * frac * v[..., i, j % W]
                        wsum += area[i] * frac
            out[..., I, J] = acc / wsum
    return out


@pytest.mark.parametrize("k", [2, 3])
def test_coarsening_is_conservative_and_gives_the_coarse_grid(tmp_path, k):
    fine = Grid(16, 32) if k == 2 else Grid(12, 24)
    s = make_states(grid=fine, T=2)
    p = write_layout(tmp_path / "s.zarr", s, order=("time", "level", "longitude", "latitude"),
                     lat_desc=True)
    r = era5.open_states(p, coarsen=k)
    coarse = Grid(fine.nlat // k, fine.nlon // k)
    assert r.grid == coarse
    np.testing.assert_allclose(r.lat, coarse.lat)
    np.testing.assert_allclose(r.lon, coarse.lon)
    want = _hand_coarsen(s.values.astype(np.float64), s.lat, k)
    np.testing.assert_allclose(r.values, want, rtol=2e-6, atol=1e-6 * np.abs(want).max())
    # the area-weighted global mean is conserved (exact cell areas)
    def gmean(v, lat):
        d = 180.0 / len(lat)
        a = np.sin(np.deg2rad(lat + d / 2)) - np.sin(np.deg2rad(lat - d / 2))
        return (v.astype(np.float64) * a[:, None]).sum(axis=(-2, -1)) / (a.sum() * v.shape[-1])
    np.testing.assert_allclose(gmean(r.values, r.lat), gmean(s.values, s.lat), rtol=1e-6)


def test_coarsen_256x512_to_128x256_grid():
    v = np.random.default_rng(0).standard_normal((1, 256, 512)).astype(np.float32)
    out = era5.coarsen_values(v, Grid(256, 512).lat, 2)
    assert out.shape == (1, 128, 256)
    const = era5.coarsen_values(np.full((256, 512), 3.5), Grid(256, 512).lat, 2)
    np.testing.assert_allclose(const, 3.5)


def test_longitudes_from_minus_180_are_rolled(tmp_path):
    s = make_states(T=1)
    def edit(ds):
        ds = ds.assign_coords(longitude=(((ds.longitude + 180) % 360) - 180))
        return ds.sortby("longitude")
    r = era5.open_states(write_layout(tmp_path / "s.zarr", s, edit=edit))
    np.testing.assert_array_equal(r.values, s.values)
    np.testing.assert_allclose(r.lon, s.lon)


def test_lat_lon_aliases(tmp_path):
    s = make_states(T=1)
    r = era5.open_states(write_layout(tmp_path / "s.zarr", s,
                                      edit=lambda ds: ds.rename(latitude="lat", longitude="lon",
                                                                level="pressure_level",
                                                                time="valid_time")))
    np.testing.assert_array_equal(r.values, s.values)


# ------------------------------------------------------------------ bad input


def test_missing_variable(tmp_path):
    p = write_layout(tmp_path / "s.zarr", make_states(T=2), edit=lambda ds: ds.drop_vars("temperature"))
    with pytest.raises(InputError, match="lacks the variable.*temperature"):
        era5.open_states(p)


def test_missing_level(tmp_path):
    keep = [lev for lev in LEVELS if lev != 850]
    p = write_layout(tmp_path / "s.zarr", make_states(T=2), edit=lambda ds: ds.sel(level=keep))
    with pytest.raises(InputError, match=r"level\(s\) \[850\]"):
        era5.open_states(p)


def test_nan_names_variable_level_and_time(tmp_path):
    s = make_states(T=3)
    s.values[2, [c.index for c in CHANNEL_INFO if c.name == "t500"][0], 3, 4] = np.nan
    p = write_layout(tmp_path / "s.zarr", s)
    with pytest.raises(InputError, match="temperature at level 500 hPa.*NaN.*2000-01-01T12"):
        era5.open_states(p)
    # a range without the bad time reads
    assert len(era5.open_states(p, time_range=[None, "2000-01-01T06"])) == 2


def test_duplicated_time(tmp_path):
    s = make_states(T=3)
    t = s.times.copy()
    t[2] = t[1]
    p = write_layout(tmp_path / "s.zarr", s, times=t)
    with pytest.raises(InputError, match="'time'.*duplicated"):
        era5.open_states(p)


def test_non_monotonic_time(tmp_path):
    s = make_states(T=3)
    p = write_layout(tmp_path / "s.zarr", s, times=s.times[[0, 2, 1]])
    with pytest.raises(InputError, match="'time'.*not monotonic"):
        era5.open_states(p)


def test_non_monotonic_latitude(tmp_path):
    s = make_states(T=1)
    lat = s.lat.copy()
    lat[[2, 3]] = lat[[3, 2]]
    p = write_layout(tmp_path / "s.zarr", s, lat=lat)
    with pytest.raises(InputError, match="'latitude'.*not monotonic"):
        era5.open_states(p)


def test_duplicated_longitude(tmp_path):
    s = make_states(T=1)
    lon = s.lon.copy()
    lon[5] = lon[4]
    p = write_layout(tmp_path / "s.zarr", s, edit=lambda ds: ds.assign_coords(longitude=lon))
    with pytest.raises(InputError, match="'longitude'.*duplicated"):
        era5.open_states(p)


def test_other_grid_is_regridded_to_the_expected_one(tmp_path):
    from align_rl.io.regrid import regrid

    s = make_states(T=1)  # 8x16
    p = write_layout(tmp_path / "s.zarr", s)
    r = era5.open_states(p, expect_grid="16x32")
    assert r.grid == Grid(16, 32) and "regridded" in r.attrs
    np.testing.assert_allclose(r.values, regrid(s.values, "8x16:centred", "16x32:centred"), rtol=1e-6)
    r = era5.open_states(p, expect_grid=Grid(8, 16), coarsen=2)  # 4x8 exactly, then regridded
    assert r.grid == Grid(8, 16)
    assert era5.open_states(p, expect_grid="4x8", coarsen=2).grid == Grid(4, 8)
    assert "regridded" not in era5.open_states(p, expect_grid="8x16").attrs
    with pytest.raises(InputError, match="cannot be coarsened by 3"):
        era5.open_states(p, coarsen=3)


def test_grid_outside_the_accepted_ones(tmp_path):
    s = make_states(T=1)
    uneven = np.sort(np.r_[s.lat[:-1], 89.0])  # not equiangular
    with pytest.raises(InputError, match="neither cell-centred nor on the poles"):
        era5.open_states(write_layout(tmp_path / "a.zarr", s, lat=uneven))
    s2 = States(s.values[..., :12], s.times, s.lat, np.arange(12) * 10.0)  # 120° of longitude
    with pytest.raises(InputError, match="not the uniform global"):
        era5.open_states(write_layout(tmp_path / "b.zarr", s2))
    s3 = States(s.values[..., :12], s.times, s.lat, np.arange(12) * 30.0)  # global, nlon ≠ 2·nlat
    r = era5.open_states(write_layout(tmp_path / "c.zarr", s3), expect_grid="8x16")
    assert r.grid == Grid(8, 16)
    with pytest.raises(InputError, match="cell-centred"):
        era5.open_states(write_layout(tmp_path / "d.zarr", s3), coarsen=2)


def test_missing_store_and_gcs_without_gcsfs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        era5.open_states(tmp_path / "nope.zarr")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="pip install gcsfs"):
            era5.open_states("gs://weatherbench2/datasets/era5/x.zarr")


# ------------------------------------------------------------------ normalisation


def test_normalizer_round_trip_and_missing(tmp_path):
    s = make_states(T=8)
    norm = era5.compute_normalizer(s, ["2000-01-01", "2000-01-01"])
    ref = s.values[:4].astype(np.float64)
    np.testing.assert_allclose(norm.mean, ref.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(norm.std, ref.std(axis=(0, 2, 3)), rtol=1e-10)
    s.attrs["normalization"] = norm.to_dict()
    p = write_layout(tmp_path / "s.zarr", s)
    with open(p / "zarr.json") as f:  # stored as a JSON string, as store.write_states does
        assert isinstance(json.load(f)["attributes"]["normalization"], str)
    got = era5.load_normalizer(p)
    np.testing.assert_allclose(got.mean, norm.mean)
    np.testing.assert_allclose(got.std, norm.std)
    opened = era5.open_states(p)
    assert isinstance(opened.attrs["normalization"], dict)
    np.testing.assert_allclose(era5.load_normalizer(opened).std, norm.std)

    bare = write_layout(tmp_path / "bare.zarr", make_states(T=1))
    with pytest.raises(InputError, match="python -m align_rl.data stats STORE --out"):
        era5.load_normalizer(bare)
    with pytest.raises(InputError, match="no states in the training range"):
        era5.compute_normalizer(s, ["1990-01-01", "1990-12-31"])
    assert isinstance(norm, Normalizer)


def test_reads_what_the_project_writer_writes(tmp_path):
    from align_rl.io.store import write_states

    s = make_states(T=5, attrs={"splits": {"train": ["2000-01-01", "2000-01-01"]}})
    s.attrs["normalization"] = era5.compute_normalizer(s).to_dict()
    p = write_states(tmp_path / "w.zarr", s, derived=("q", "msl"))
    r = era5.open_states(p, time_range=[s.times[1], None])
    np.testing.assert_array_equal(r.values, s.values[1:])
    assert r.attrs["splits"] == {"train": ["2000-01-01", "2000-01-01"]}
    np.testing.assert_allclose(era5.load_normalizer(p).mean, era5.compute_normalizer(s).mean)
