"""A WeatherBench2-layout zarr store on disk or in a bucket: opened lazily, its coordinates checked
(monotonic, no duplicates, a global equiangular grid), its times selected and its channels read in
FengWu order, physical units, latitude ascending, longitudes from 0 (:class:`Store`); conservative
block coarsening (:func:`coarsen_values`); normalisation statistics registered for a store in this
process (:func:`register_normalizer`). The public readers are in :mod:`align_rl.io.era5`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import xarray as xr

from align_rl.errors import InputError
from align_rl.io.grid import LatLonGrid
from align_rl.io.normalization import Normalizer
from align_rl.io.schema import CHANNEL_INFO, CHANNELS, LEVEL_VARS, LEVELS, LONG_NAMES, SURFACE_VARS

_ALIASES = {"lat": "latitude", "lon": "longitude", "pressure_level": "level", "valid_time": "time"}
TimeRange = Sequence[Any] | None
_REGISTERED: dict[str, tuple[Normalizer, str]] = {}


def store_key(path: str | Path) -> str:
    """The key of a store in this process: its resolved local path, or the URL as given."""
    p = str(path)
    return p if "://" in p else str(Path(p).expanduser().resolve())


def register_normalizer(path: str | Path, normalizer: Normalizer, source: str) -> None:
    """Use ``normalizer`` as the statistics of the store at ``path`` in this process (for a store
    without a ``normalization`` attribute; the store itself is never written). ``source`` says
    where they come from (a file, or the run's cache)."""
    _REGISTERED[store_key(path)] = (normalizer, str(source))


def registered_normalizer(path: str | Path) -> tuple[Normalizer, str] | None:
    """``(normalizer, source)`` registered for the store at ``path`` in this process, or None."""
    return _REGISTERED.get(store_key(path))


# ----------------------------------------------------------------------------- opening


def open_dataset(path: str | Path) -> xr.Dataset:
    """Open the store lazily (no dask); ``gs://`` needs gcsfs."""
    p = str(path)
    if p.startswith("gs://"):
        try:
            import gcsfs  # noqa: F401
        except ImportError:
            raise InputError(
                f"reading {p} needs the gcsfs package: pip install gcsfs "
                "(or pip install -e '.[gcs]')"
            ) from None
        kwargs: dict[str, Any] = {"storage_options": {"token": "anon"}}
    elif "://" in p:  # another fsspec URL (https://, s3://, …): let fsspec resolve it
        kwargs = {}
    else:
        if not Path(p).exists():
            raise InputError(f"store {p} does not exist; check the path (data.path)")
        kwargs = {}
    try:
        with warnings.catch_warnings():  # stores written without consolidated metadata are fine
            warnings.filterwarnings("ignore", message=".*consolidated.*")
            ds = xr.open_zarr(p, chunks=None, decode_timedelta=False, **kwargs)
    except InputError:
        raise
    except Exception as exc:  # a folder that is not a zarr store, a broken store
        raise InputError(f"cannot open {p} as a zarr store: {exc}") from None
    return ds.rename({k: v for k, v in _ALIASES.items()
                      if (k in ds.dims or k in ds.coords) and v not in ds.dims and v not in ds.coords})


def _check_coord(ds: xr.Dataset, name: str, path: str) -> np.ndarray:
    if name not in ds.coords:
        raise InputError(
            f"store {path} has no coordinate {name!r} (coordinates: {sorted(ds.coords)}); "
            "a WeatherBench2 store has time, level, latitude, longitude"
        )
    values = np.asarray(ds[name].values)
    if values.ndim != 1:
        raise InputError(f"coordinate {name!r} of {path} must be one-dimensional")
    if name != "time" and not np.all(np.isfinite(values.astype(np.float64))):
        raise InputError(f"coordinate {name!r} of {path} holds NaN or inf values; repair the store")
    uniq, counts = np.unique(values, return_counts=True)
    if np.any(counts > 1):
        raise InputError(
            f"coordinate {name!r} of {path} holds duplicated values {uniq[counts > 1][:5]}; "
            "remove the duplicates (e.g. ds.drop_duplicates) and rewrite the store"
        )
    return values


def _monotonic(values: np.ndarray, name: str, path: str, allow_descending: bool) -> bool:
    """True when ascending, False when descending (if allowed); InputError otherwise."""
    d = np.diff(values.astype(np.float64) if values.dtype.kind != "M" else values.astype(np.int64))
    if np.all(d > 0):
        return True
    if allow_descending and np.all(d < 0):
        return False
    raise InputError(
        f"coordinate {name!r} of {path} is not monotonic "
        f"({'ascending or descending' if allow_descending else 'ascending'} order is needed); "
        f"sort the store by {name} (ds.sortby('{name}')) and rewrite it"
    )


LEVEL_UNITS_HPA = {"hpa": 1.0, "millibar": 1.0, "millibars": 1.0, "mbar": 1.0, "mb": 1.0,
                   "pa": 0.01, "pascal": 0.01, "pascals": 0.01, "kpa": 10.0}
"""Factors from the ``units`` attribute of a store's ``level`` coordinate to hPa."""


def _levels_hpa(ds: xr.Dataset, values: np.ndarray, path: str) -> np.ndarray:
    """The ``level`` coordinate in whole hPa: converted from Pa or kPa when its ``units`` say so,
    or from Pa when it has no ``units`` and values above 1100 (no pressure level in hPa is);
    InputError for another unit, naming it."""
    units = str(ds["level"].attrs.get("units", "")).strip()
    v = values.astype(np.float64)
    if units:
        f = LEVEL_UNITS_HPA.get(units.lower())
        if f is None:
            raise InputError(
                f"the level coordinate of {path} has units {units!r}; pressure levels must be in hPa "
                f"(or {', '.join(sorted(set(LEVEL_UNITS_HPA) - {'hpa'}))}, which are converted): convert it"
            )
        v = v * f
    elif v.size and np.nanmax(v) > 1100:
        v = v / 100.0  # levels of up to 100000 without units: Pa (no pressure level exceeds 1100 hPa)
    return np.round(v).astype(np.int64)


def parse_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Store attributes; JSON strings of dicts or lists (``normalization``, ``splits``) decoded."""
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if isinstance(v, str) and v[:1] in "{[":
            try:
                v = json.loads(v)
            except ValueError:
                pass
        out[k] = v
    return out


def time_mask(times: np.ndarray, time_range: TimeRange) -> np.ndarray:
    keep = np.ones(len(times), dtype=bool)
    if time_range is None:
        return keep
    if len(time_range) != 2:
        raise InputError(f"time_range must be [start, end], got {time_range!r}")
    start, end = time_range
    if start is not None:
        keep &= times >= np.datetime64(start, "ns")
    if end is not None:
        e = np.datetime64(end)
        if e.dtype == np.dtype("datetime64[D]"):  # a date covers its whole day
            e = e + np.timedelta64(1, "D") - np.timedelta64(1, "ns")
        keep &= times <= np.datetime64(e, "ns")
    return keep


# ----------------------------------------------------------------------------- coarsening


def _lat_cell_areas(lat: np.ndarray) -> np.ndarray:
    """Relative areas ``sin φ_{i+½} − sin φ_{i−½}`` of the rows of a cell-centred grid (ascending)."""
    d = 180.0 / len(lat)
    edges = np.deg2rad(np.concatenate([lat - d / 2, lat[-1:] + d / 2]))
    return np.diff(np.sin(edges))


def coarsen_values(values: np.ndarray, lat: np.ndarray, factor: int) -> np.ndarray:
    """Conservative coarsening of ``values`` (..., H, W) on a cell-centred grid (lat ascending).

    Returns (..., H/k, W/k) on the cell-centred coarse grid with longitudes from 0 (see module doc).
    """
    k = int(factor)
    if k == 1:
        return values
    H, W = values.shape[-2:]
    if H % k or W % k:
        raise InputError(f"cannot coarsen a {H}x{W} grid by {k}: {k} must divide both sizes")
    v = values.astype(np.float64, copy=False)
    # latitude: blocks of k rows weighted by the exact cell areas
    area = _lat_cell_areas(np.asarray(lat, dtype=np.float64)).reshape(H // k, k)
    vb = v.reshape(*v.shape[:-2], H // k, k, W)
    v = np.einsum("...ikw,ik->...iw", vb, area) / area.sum(axis=1)[:, None]
    # longitude: the coarse cell centred on coarse lon j·k·d covers fine offsets −k/2 … k/2
    if k % 2:
        offsets = np.arange(-(k // 2), k // 2 + 1)
        weights = np.ones(k)
    else:
        offsets = np.arange(-(k // 2), k // 2 + 1)
        weights = np.ones(k + 1)
        weights[0] = weights[-1] = 0.5
    centres = np.arange(W // k) * k
    out = np.zeros(v.shape[:-1] + (W // k,), dtype=np.float64)
    for off, w in zip(offsets, weights):
        out += w * v[..., (centres + off) % W]
    return (out / k).astype(values.dtype, copy=False)


# ----------------------------------------------------------------------------- reading


@dataclass
class Fields:
    """Some of the 69 channels of a store: ``values`` (T, C, H, W) float32 in physical units,
    ``channels`` their short names (FengWu order), ``times`` (T,), ``lat`` ascending (H,),
    ``lon`` from 0 (W,), ``grid`` the :class:`LatLonGrid`, ``attrs`` the store's attributes."""

    values: np.ndarray
    channels: list[str]
    times: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    grid: LatLonGrid
    attrs: dict[str, Any]


class Store:
    """An opened, validated store: coordinates checked, the available channels listed."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        ds = open_dataset(path)
        for name in ("time", "latitude", "longitude"):
            _check_coord(ds, name, self.path)
        self.times = np.asarray(ds["time"].values)
        if self.times.dtype.kind != "M":
            raise InputError(
                f"coordinate 'time' of {self.path} is not a datetime ({self.times.dtype}); "
                "store times as datetime64 with CF units"
            )
        self.times = self.times.astype("datetime64[ns]")
        _monotonic(self.times, "time", self.path, allow_descending=False)
        lat = np.asarray(ds["latitude"].values, dtype=np.float64)
        self.lat_ascending = _monotonic(lat, "latitude", self.path, allow_descending=True)
        lon = np.asarray(ds["longitude"].values, dtype=np.float64)
        _monotonic(lon, "longitude", self.path, allow_descending=False)
        self.lat = lat if self.lat_ascending else lat[::-1]
        # longitudes given as −180…180 are rolled to start at 0
        self.lon_shift = 0
        if lon[0] < 0:
            lon360 = np.mod(lon, 360.0)
            self.lon_shift = int(np.argmin(lon360))
            lon = np.roll(lon360, -self.lon_shift)
        self.lon = lon
        self.grid = LatLonGrid.from_coords(self.lat, self.lon, where=f"store {self.path}")
        self.levels: np.ndarray | None = None
        if "level" in ds.coords:
            self.levels = _levels_hpa(ds, _check_coord(ds, "level", self.path), self.path)
        self.ds = ds
        self.attrs = parse_attrs(dict(ds.attrs))
        key = store_key(self.path)
        if "normalization" not in self.attrs and key in _REGISTERED:
            self.attrs["normalization"] = _REGISTERED[key][0].to_dict()
            self.attrs["normalization_source"] = _REGISTERED[key][1]
        # the channels this store holds: variable present with the right dimensions and level
        self.available: dict[str, tuple[str, int | None]] = {}
        for var in SURFACE_VARS + LEVEL_VARS:
            name = LONG_NAMES[var]
            if name not in ds.data_vars:
                continue
            want = {"time", "latitude", "longitude"} | ({"level"} if var in LEVEL_VARS else set())
            dims = set(ds[name].dims)
            if dims != want:
                raise InputError(
                    f"variable {name} of {self.path} has dimensions {sorted(dims)}, expected "
                    f"{sorted(want)}; select or squeeze the extra dimensions (e.g. an ensemble "
                    "member) first"
                )
            if var in SURFACE_VARS:
                self.available[var] = (var, None)
                continue
            if self.levels is None:
                raise InputError(f"store {self.path} has pressure-level variables but no 'level' "
                                 "coordinate (hPa)")
            for lev in LEVELS:
                pos = np.flatnonzero(self.levels == lev)
                if len(pos):
                    self.available[f"{var}{lev}"] = (var, int(pos[0]))

    @property
    def channels(self) -> list[str]:
        """Available channels in FengWu order."""
        return [c.name for c in CHANNEL_INFO if c.name in self.available]

    def require_all(self) -> None:
        """InputError naming the missing variables or levels unless all 69 channels are here."""
        missing = [LONG_NAMES[v] for v in SURFACE_VARS + LEVEL_VARS if LONG_NAMES[v] not in self.ds.data_vars]
        if missing:
            raise InputError(
                f"store {self.path} lacks the variable(s) {', '.join(missing)}; the models need "
                f"all 69 channels: {', '.join(LONG_NAMES[v] for v in SURFACE_VARS + LEVEL_VARS)} "
                f"(long names) on the levels {list(LEVELS)} hPa (scoring accepts a subset)"
            )
        have = set(int(v) for v in self.levels) if self.levels is not None else set()
        missing_lev = [lev for lev in LEVELS if lev not in have]
        if missing_lev:
            raise InputError(
                f"store {self.path} lacks the pressure level(s) {missing_lev} hPa of 'level' "
                f"(it has {sorted(have)}); the 69 channels need {list(LEVELS)} (scoring accepts a subset)"
            )

    def read(self, tidx: np.ndarray, channels: Sequence[str] | None = None) -> np.ndarray:
        """Values (T, C, H, W) float32 of the time positions ``tidx`` and ``channels`` (default:
        all 69, FengWu order), latitude ascending, longitudes from 0."""
        channels = list(CHANNELS if channels is None else channels)
        unknown = [c for c in channels if c not in self.available]
        if unknown:
            raise InputError(f"store {self.path} lacks the channel(s) {', '.join(unknown[:8])}")
        pos = {c: i for i, c in enumerate(channels)}
        H, W = self.grid.shape
        out = np.empty((len(tidx), len(channels), H, W), dtype=np.float32)
        for var in SURFACE_VARS + LEVEL_VARS:
            want = [c for c in channels if self.available[c][0] == var]
            if not want:
                continue
            name = LONG_NAMES[var]
            da = self.ds[name]
            try:
                if var in LEVEL_VARS:
                    lidx = [self.available[c][1] for c in want]
                    da = da.isel(time=tidx, level=lidx).transpose("time", "level", "latitude", "longitude")
                    arr = np.asarray(da.values, dtype=np.float32)
                else:
                    da = da.isel(time=tidx).transpose("time", "latitude", "longitude")
                    arr = np.asarray(da.values, dtype=np.float32)[:, None]
            except Exception as exc:  # noqa: BLE001 - a chunk that does not decode or is cut
                span = (f"{np.datetime_as_string(self.times[int(np.min(tidx))], unit='h')} to "
                        f"{np.datetime_as_string(self.times[int(np.max(tidx))], unit='h')}"
                        if len(tidx) else "no times")
                raise InputError(
                    f"variable {name} of the store {self.path} cannot be read for the times {span}: "
                    f"a chunk is damaged ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}); "
                    "restore the store from its source or copy it again"
                ) from None
            if not self.lat_ascending:
                arr = arr[..., ::-1, :]
            if self.lon_shift:
                arr = np.roll(arr, -self.lon_shift, axis=-1)
            bad = ~np.isfinite(arr)
            if bad.any():
                t, k = np.argwhere(bad)[0][:2]
                lev = self.available[want[k]][1]
                where = f" at level {int(self.levels[lev])} hPa" if lev is not None else ""
                raise InputError(
                    f"variable {name}{where} of {self.path} holds {int(bad.sum())} NaN/inf value(s), "
                    f"first at time {np.datetime_as_string(self.times[tidx[t]], unit='h')}; "
                    "fill or drop those times (choose a time_range without them)"
                )
            out[:, [pos[c] for c in want]] = arr
        return out

    def time_positions(self, time_range: TimeRange = None,
                       times: Iterable[np.datetime64] | None = None) -> np.ndarray:
        """Positions of ``times`` (each must exist) or of the times in ``time_range``."""
        if times is not None:
            want_t = np.asarray(list(times), dtype="datetime64[ns]")
            tidx = np.searchsorted(self.times, want_t)
            ok = (tidx < len(self.times)) & (self.times[np.minimum(tidx, len(self.times) - 1)] == want_t)
            if not ok.all():
                raise InputError(f"store {self.path} lacks the time(s) {want_t[~ok][:3]}")
            if time_range is not None:
                tidx = tidx[time_mask(want_t, time_range)]
        else:
            tidx = np.flatnonzero(time_mask(self.times, time_range))
        if len(tidx) == 0:
            span = (f"{np.datetime_as_string(self.times[0], unit='h')} … "
                    f"{np.datetime_as_string(self.times[-1], unit='h')}") if len(self.times) else "no times"
            raise InputError(f"store {self.path} has no times in {time_range!r} (it holds {span})")
        return np.asarray(tidx)


def store_times(path: str | Path) -> np.ndarray:
    """The (validated) time coordinate of a store, datetime64[ns] ascending; reads no data."""
    return Store(path).times


def store_info(path: str | Path) -> dict[str, Any]:
    """What a store holds, reading no data: ``grid`` (LatLonGrid), ``channels`` (short names,
    FengWu order), ``times``, ``attrs``."""
    st = Store(path)
    return {"grid": st.grid, "channels": st.channels, "times": st.times, "attrs": st.attrs}
