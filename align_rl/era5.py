"""Reading WeatherBench2-layout zarr stores (ERA5 or the embedded world) into :class:`States`.

A store holds the nine variables by their WeatherBench2 long names (``geopotential``,
``temperature``, … see :mod:`align_rl.schema`) on the coordinates ``time``, ``level`` (int hPa),
``latitude``, ``longitude`` (``lat``/``lon`` are accepted as aliases). Stores differ in dimension
order and latitude direction; the reader selects by name and value, never by position, and always
returns latitude ascending and the 69 channels in FengWu order, physical units, float32.

The grid must be a cell-centred grid of the WeatherBench 1 family (:class:`align_rl.grid.Grid`).
Optional coarsening by an integer factor ``k`` is **conservative (area-weighted)**: in latitude,
blocks of ``k`` fine rows weighted by their exact cell areas ``sin φ_{i+½} − sin φ_{i−½}``; in
longitude, the fine cells that the coarse cell (centred on the coarse longitude, width ``k·d``)
covers, weighted by the covered fraction (for even ``k`` the two end cells count half). So
256×512 → 128×256 gives exactly the cell-centred 128×256 grid with longitudes from 0.

Reading is lazy (xarray without dask): only the selected times are read from disk or the bucket.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import xarray as xr

from .errors import InputError
from .grid import Grid
from .normalization import Normalizer
from .schema import CHANNEL_INFO, LEVEL_VARS, LEVELS, LONG_NAMES, N_CHANNELS, SURFACE_VARS
from .states import States

_ALIASES = {"lat": "latitude", "lon": "longitude", "pressure_level": "level"}
TimeRange = Sequence[Any] | None


# ----------------------------------------------------------------------------- opening


def _open_dataset(path: str | Path) -> xr.Dataset:
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


def _check_variables(ds: xr.Dataset, path: str) -> None:
    missing = [LONG_NAMES[v] for v in SURFACE_VARS + LEVEL_VARS if LONG_NAMES[v] not in ds.data_vars]
    if missing:
        raise InputError(
            f"store {path} lacks the variable(s) {', '.join(missing)}; a WeatherBench2 store needs "
            f"{', '.join(LONG_NAMES[v] for v in SURFACE_VARS + LEVEL_VARS)} (long names)"
        )
    have = set(int(v) for v in np.asarray(ds["level"].values).round().astype(np.int64))
    missing_lev = [lev for lev in LEVELS if lev not in have]
    if missing_lev:
        raise InputError(
            f"store {path} lacks the pressure level(s) {missing_lev} hPa of 'level' "
            f"(it has {sorted(have)}); the 69 channels need {list(LEVELS)}"
        )
    for var in SURFACE_VARS + LEVEL_VARS:
        name = LONG_NAMES[var]
        want = {"time", "latitude", "longitude"} | ({"level"} if var in LEVEL_VARS else set())
        dims = set(ds[name].dims)
        if dims != want:
            raise InputError(
                f"variable {name} of {path} has dimensions {sorted(dims)}, expected {sorted(want)}; "
                "select or squeeze the extra dimensions (e.g. an ensemble member) first"
            )


def _parse_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
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


def _time_mask(times: np.ndarray, time_range: TimeRange) -> np.ndarray:
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


class _Store:
    """An opened, validated store: coordinates checked, variables present."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        ds = _open_dataset(path)
        for name in ("time", "level", "latitude", "longitude"):
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
        _check_variables(ds, self.path)
        self.lat = lat if self.lat_ascending else lat[::-1]
        # longitudes given as −180…180 are rolled to start at 0
        self.lon_shift = 0
        if lon[0] < 0:
            lon360 = np.mod(lon, 360.0)
            self.lon_shift = int(np.argmin(lon360))
            lon = np.roll(lon360, -self.lon_shift)
        self.lon = lon
        try:
            self.grid = Grid.from_coords(self.lat, self.lon)
        except InputError as exc:
            raise InputError(f"store {self.path}: {exc}") from None
        levels = np.asarray(ds["level"].values).round().astype(np.int64)
        self.level_idx = np.array([int(np.flatnonzero(levels == lev)[0]) for lev in LEVELS])
        self.ds = ds
        self.attrs = _parse_attrs(dict(ds.attrs))

    def read(self, tidx: np.ndarray) -> np.ndarray:
        """Values (T, 69, H, W) float32 of the time positions ``tidx``, latitude ascending."""
        H, W = self.grid.shape
        out = np.empty((len(tidx), N_CHANNELS, H, W), dtype=np.float32)
        for var in SURFACE_VARS + LEVEL_VARS:
            name = LONG_NAMES[var]
            da = self.ds[name]
            if var in LEVEL_VARS:
                da = da.isel(time=tidx, level=self.level_idx).transpose(
                    "time", "level", "latitude", "longitude")
                arr = np.asarray(da.values, dtype=np.float32)
            else:
                da = da.isel(time=tidx).transpose("time", "latitude", "longitude")
                arr = np.asarray(da.values, dtype=np.float32)[:, None]
            if not self.lat_ascending:
                arr = arr[..., ::-1, :]
            if self.lon_shift:
                arr = np.roll(arr, -self.lon_shift, axis=-1)
            idx = [c.index for c in CHANNEL_INFO if c.var == var]
            bad = ~np.isfinite(arr)
            if bad.any():
                t, lev = np.argwhere(bad)[0][:2]
                where = f" at level {LEVELS[lev]} hPa" if var in LEVEL_VARS else ""
                raise InputError(
                    f"variable {name}{where} of {self.path} holds {int(bad.sum())} NaN/inf value(s), "
                    f"first at time {np.datetime_as_string(self.times[tidx[t]], unit='h')}; "
                    "fill or drop those times (choose a time_range without them)"
                )
            out[:, idx] = arr
        return out


def store_times(path: str | Path) -> np.ndarray:
    """The (validated) time coordinate of a store, datetime64[ns] ascending; reads no data."""
    return _Store(path).times


def open_states(
    path: str | Path,
    time_range: TimeRange = None,
    coarsen: int = 1,
    expect_grid: Grid | str | None = None,
    times: Iterable[np.datetime64] | None = None,
    check_units: bool = True,
) -> States:
    """Read the 69 channels of a WeatherBench2-layout store as :class:`States` (physical units).

    ``time_range``: ``[start, end]`` inclusive (ISO strings or datetime64; a date-only end covers its
    day; ``None`` for an open end). ``times``: exact times to read instead (each must exist).
    ``coarsen``: conservative coarsening factor (see module doc). ``expect_grid``: the grid the
    result must have (after coarsening), e.g. ``"32x64"``. Raises :class:`InputError` for missing
    variables or levels, NaNs, non-monotonic or duplicated coordinates, grids outside the
    WeatherBench family or not the expected one, and empty selections; with ``check_units``
    (default) also for values implausible in SI units (:func:`align_rl.plausibility.check_units`:
    temperature in °C, geopotential height in m, ...).
    """
    coarsen = int(coarsen)
    if coarsen < 1:
        raise InputError(f"coarsen={coarsen} must be a positive integer")
    st = _Store(path)
    H, W = st.grid.shape
    if H % coarsen or W % coarsen:
        raise InputError(
            f"store {st.path} has a {st.grid} grid that cannot be coarsened by {coarsen}; "
            "choose a factor that divides both sizes"
        )
    out_grid = Grid(H // coarsen, W // coarsen)
    if expect_grid is not None:
        want = Grid.parse(expect_grid) if isinstance(expect_grid, str) else expect_grid
        if want != out_grid:
            hint = ""
            if H % want.nlat == 0 and H // want.nlat > 1 and W == 2 * H:
                hint = f" (coarsen={H // want.nlat} would give it)"
            raise InputError(
                f"store {st.path} gives a {out_grid} grid (stored {st.grid}, coarsen={coarsen}) "
                f"but {want} is expected; set data.grid={out_grid} or data.coarsen{hint}"
            )
    if times is not None:
        want_t = np.asarray(list(times), dtype="datetime64[ns]")
        tidx = np.searchsorted(st.times, want_t)
        ok = (tidx < len(st.times)) & (st.times[np.minimum(tidx, len(st.times) - 1)] == want_t)
        if not ok.all():
            raise InputError(f"store {st.path} lacks the time(s) {want_t[~ok][:3]}")
        if time_range is not None:
            tidx = tidx[_time_mask(want_t, time_range)]
    else:
        tidx = np.flatnonzero(_time_mask(st.times, time_range))
    if len(tidx) == 0:
        span = (f"{np.datetime_as_string(st.times[0], unit='h')} … "
                f"{np.datetime_as_string(st.times[-1], unit='h')}") if len(st.times) else "no times"
        raise InputError(f"store {st.path} has no times in {time_range!r} (it holds {span})")
    values = st.read(np.asarray(tidx))
    if check_units:
        from .plausibility import check_units as _check_units

        _check_units(values, f"store {st.path}")
    lat, lon = st.lat, st.lon
    if coarsen > 1:
        values = coarsen_values(values, lat, coarsen)
        lat, lon = out_grid.lat, out_grid.lon
    attrs = dict(st.attrs)
    attrs.setdefault("source", st.path)
    return States(values, st.times[tidx], lat, lon, attrs)


# ----------------------------------------------------------------------------- normalisation


def load_normalizer(path_or_states: str | Path | States) -> Normalizer:
    """The per-channel statistics stored with a dataset (``attrs["normalization"]``)."""
    if isinstance(path_or_states, States):
        attrs, where = path_or_states.attrs, "the states"
    else:
        where = str(path_or_states)
        attrs = _parse_attrs(dict(_open_dataset(path_or_states).attrs))
    stats = attrs.get("normalization")
    if stats is None:
        raise InputError(
            f"{where} has no normalisation statistics (attribute 'normalization'); compute them "
            "over the training split with `python -m align_rl.data stats` (or "
            "align_rl.era5.compute_normalizer), or pass the store that holds them "
            "(e.g. score --normalization STORE)"
        )
    if isinstance(stats, str):
        try:
            stats = json.loads(stats)
        except ValueError:
            raise InputError(f"the normalisation attribute of {where} is not valid JSON; recompute it") from None
    try:
        return Normalizer.from_dict(stats)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"the normalisation statistics of {where} are malformed ({exc}); recompute them") from None


def compute_normalizer(states: States, train_range: TimeRange = None) -> Normalizer:
    """Per-channel mean and std (physical units) over the times of ``states`` in ``train_range``."""
    keep = _time_mask(states.times, train_range)
    if not keep.any():
        raise InputError(
            f"no states in the training range {train_range!r}; the data cover "
            f"{states.times[0] if len(states) else 'nothing'} … {states.times[-1] if len(states) else ''}"
        )
    return Normalizer.fit(states.values[keep])
