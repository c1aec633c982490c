"""Reading WeatherBench2-layout zarr stores (ERA5 or the embedded world) into :class:`States`.

A store holds the nine variables by their WeatherBench2 long names (``geopotential``,
``temperature``, … see :mod:`align_rl.io.schema`) on the coordinates ``time``, ``level`` (int hPa),
``latitude``, ``longitude`` (``lat``/``lon`` are accepted as aliases). Stores differ in dimension
order and latitude direction; the reader selects by name and value, never by position, and always
returns latitude ascending and the 69 channels in FengWu order, physical units, float32.

Accepted grids (:class:`align_rl.io.grid.LatLonGrid`): global and equiangular, either cell-centred
(``lat = −90 + d/2 + i·d``: WeatherBench 1's 32×64 … 128×256, WeatherBench2's ``64x32_equiangular``
and ``512x256_equiangular`` layouts) or with rows on both poles (``lat = −90 + i·d``: ERA5's
721×1440, WeatherBench2's ``1440x721`` and ``240x121_equiangular_with_poles`` layouts), longitudes
``j·360/nlon`` from 0 or from −180, latitude in either direction, dimensions in any order. Other
pressure levels (37-level ERA5) and other variables are ignored.

:func:`open_states` reads all 69 channels (the models need them; a store lacking a variable or a
level gets an error naming it) and regrids them conservatively to the model grid
(``expect_grid``, ``data.grid``) with :mod:`align_rl.io.regrid` (``xarray-regrid``) when the store is
on another grid. :func:`open_fields` reads whichever channels a store holds on its own grid (for
scoring). Normalisation statistics come from the store's ``normalization`` attribute, or from
:func:`register_normalizer` (a run computes them for a store without them and keeps them in its
workdir, never in the store: :func:`align_rl.world.dataset.ensure_normalization`).

Optional coarsening by an integer factor ``k`` is **conservative (area-weighted)**: in latitude,
blocks of ``k`` fine rows weighted by their exact cell areas ``sin φ_{i+½} − sin φ_{i−½}``; in
longitude, the fine cells that the coarse cell (centred on the coarse longitude, width ``k·d``)
covers, weighted by the covered fraction (for even ``k`` the two end cells count half). So
256×512 → 128×256 gives exactly the cell-centred 128×256 grid with longitudes from 0.

Reading is lazy (xarray without dask): only the selected times are read from disk or the bucket.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from align_rl.errors import InputError
from align_rl.io.grid import Grid, LatLonGrid
from align_rl.io.normalization import Normalizer
from align_rl.io.plausibility import check_units as check_plausible_units
from align_rl.io.regrid import regrid
from align_rl.io.schema import LEVELS, LONG_NAMES, N_CHANNELS
from align_rl.io.states import States
from align_rl.io.wb2_store import (Fields, Store, TimeRange, coarsen_values, open_dataset, parse_attrs,
                                   register_normalizer, registered_normalizer, store_info,
                                   store_times, time_mask)

__all__ = ["Fields", "TimeRange", "coarsen_values", "compute_normalizer", "load_normalizer",
           "open_fields", "open_states", "register_normalizer", "store_info", "store_times",
           "stream_normalizer"]

def open_fields(
    path: str | Path,
    channels: Sequence[str] | None = None,
    times: Iterable[np.datetime64] | None = None,
    time_range: TimeRange = None,
) -> Fields:
    """Read ``channels`` (default: every one of the 69 the store holds) on the store's own grid,
    physical units, latitude ascending. Any accepted grid (see the module doc); no regridding."""
    st = Store(path)
    chans = st.channels if channels is None else list(channels)
    if not chans:
        raise InputError(
            f"store {st.path} holds none of the 69 channels (variables by WeatherBench2 long names: "
            f"{', '.join(LONG_NAMES.values())}; levels {list(LEVELS)} hPa)"
        )
    tidx = st.time_positions(time_range, times)
    return Fields(st.read(tidx, chans), chans, st.times[tidx], st.lat, st.lon, st.grid, dict(st.attrs))


def open_states(
    path: str | Path,
    time_range: TimeRange = None,
    coarsen: int = 1,
    expect_grid: Grid | str | None = None,
    times: Iterable[np.datetime64] | None = None,
    check_units: bool = True,
    block_bytes: int = 1 << 30,
) -> States:
    """Read the 69 channels of a WeatherBench2-layout store as :class:`States` (physical units).

    ``time_range``: ``[start, end]`` inclusive (ISO strings or datetime64; a date-only end covers its
    day; ``None`` for an open end). ``times``: exact times to read instead (each must exist).
    ``coarsen``: exact conservative block coarsening of a cell-centred store (see module doc).
    ``expect_grid``: the model grid of the result, e.g. ``"32x64"``: a store on any other accepted
    grid is regridded to it conservatively (:func:`align_rl.io.regrid.regrid`, after ``coarsen``),
    ``block_bytes`` of stored values at a time. Without it the store's own grid is returned.
    Raises :class:`InputError` for missing variables or levels, NaNs, non-monotonic or duplicated
    coordinates, grids that are not global and equiangular, and empty selections; with
    ``check_units`` (default) also for values implausible in SI units
    (:func:`align_rl.io.plausibility.check_units`: temperature in °C, geopotential height in m, ...).
    """
    coarsen = int(coarsen)
    if coarsen < 1:
        raise InputError(f"coarsen={coarsen} must be a positive integer")
    st = Store(path)
    st.require_all()
    H, W = st.grid.shape
    grid = st.grid
    if coarsen > 1:
        if st.grid.model_grid() is None:
            raise InputError(
                f"store {st.path} has a {st.grid} grid; data.coarsen works on cell-centred NxN·2 "
                "grids only: leave data.coarsen=1 and set data.grid, the store is then regridded "
                "conservatively"
            )
        if H % coarsen or W % coarsen:
            raise InputError(
                f"store {st.path} has a {st.grid} grid that cannot be coarsened by {coarsen}; "
                "choose a factor that divides both sizes"
            )
        grid = LatLonGrid(H // coarsen, W // coarsen, False)
    target = grid
    if expect_grid is not None:
        want = Grid.parse(expect_grid) if isinstance(expect_grid, str) else expect_grid
        target = LatLonGrid.of(want)
    tidx = st.time_positions(time_range, times)
    per = max(1, int(block_bytes // (4 * N_CHANNELS * H * W)))
    values = np.empty((len(tidx), N_CHANNELS) + target.shape, dtype=np.float32)
    for s in range(0, len(tidx), per):
        block = st.read(tidx[s:s + per])
        if check_units:
            check_plausible_units(block, f"store {st.path}")
        if coarsen > 1:
            block = coarsen_values(block, st.lat, coarsen)
        if target != grid:
            block = regrid(block, grid, target, "conservative")
        values[s:s + per] = block
    attrs = dict(st.attrs)
    attrs.setdefault("source", st.path)
    if target != st.grid:
        how = f"coarsened by {coarsen}" if coarsen > 1 else ""
        if target != grid:
            how = (how + ", then " if how else "") + "regridded conservatively (xarray-regrid)"
        attrs["regridded"] = f"stored on {st.grid}, {how} to {target}"
    return States(values, st.times[tidx], target.lat, target.lon, attrs)


# ----------------------------------------------------------------------------- normalisation


def load_normalizer(path_or_states: str | Path | States) -> Normalizer:
    """Per-channel statistics: of :class:`States` (``attrs["normalization"]``), of a JSON file
    (``Normalizer.to_dict()``, as ``python -m align_rl.data stats STORE --out FILE`` writes it), or
    of a store (its ``normalization`` attribute, else those registered for it in this process)."""
    if isinstance(path_or_states, States):
        attrs, where = path_or_states.attrs, "the states"
    elif str(path_or_states).endswith(".json") and "://" not in str(path_or_states):
        where = str(path_or_states)
        try:
            attrs = {"normalization": json.loads(Path(where).read_text())}
        except FileNotFoundError:
            raise InputError(f"statistics file {where} does not exist") from None
        except ValueError:
            raise InputError(f"statistics file {where} is not valid JSON; recompute it") from None
    else:
        where = str(path_or_states)
        attrs = parse_attrs(dict(open_dataset(path_or_states).attrs))
        reg = registered_normalizer(where)
        if "normalization" not in attrs and reg is not None:
            return reg[0]
    stats = attrs.get("normalization")
    if stats is None:
        raise InputError(
            f"{where} has no normalisation statistics (attribute 'normalization'); compute them "
            "over the training split with `python -m align_rl.data stats STORE --out stats.json` "
            "and pass the file (data.normalization=stats.json, score --normalization stats.json); "
            "a run computes them itself when data.normalization is unset"
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
    keep = time_mask(states.times, train_range)
    if not keep.any():
        raise InputError(
            f"no states in the training range {train_range!r}; the data cover "
            f"{states.times[0] if len(states) else 'nothing'} … {states.times[-1] if len(states) else ''}"
        )
    return Normalizer.fit(states.values[keep])


def stream_normalizer(path: str | Path, train_range: TimeRange = None, expect_grid: Grid | str | None = None,
                      coarsen: int = 1, max_times: int = 0, block: int = 16) -> tuple[Normalizer, dict]:
    """Per-channel mean and std of a store over ``train_range`` on the model grid (``expect_grid``,
    regridded as :func:`open_states` does), read ``block`` times at a time; at most ``max_times``
    evenly spaced times when > 0. Same estimator as :meth:`Normalizer.fit` (unweighted over times
    and grid points, ddof 0), accumulated in float64 around the first block's means. Returns
    ``(normalizer, {"times": n, "first": ..., "last": ...})``."""
    st = Store(path)
    tidx = st.time_positions(train_range)
    if max_times and len(tidx) > max_times:
        tidx = tidx[np.unique(np.linspace(0, len(tidx) - 1, int(max_times)).round().astype(int))]
    times = st.times[tidx]
    ref = n = s1 = s2 = None
    for i in range(0, len(times), max(1, int(block))):
        v = open_states(path, times=times[i:i + block], coarsen=coarsen, expect_grid=expect_grid).values
        v = v.astype(np.float64)
        if ref is None:
            ref = v.mean(axis=(0, 2, 3))
            n, s1, s2 = 0, np.zeros_like(ref), np.zeros_like(ref)
        d = v - ref[None, :, None, None]
        n += d.shape[0] * d.shape[2] * d.shape[3]
        s1 += d.sum(axis=(0, 2, 3))
        s2 += (d * d).sum(axis=(0, 2, 3))
    mean_d = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean_d ** 2, 0.0))
    info = {"times": int(len(times)), "first": np.datetime_as_string(times[0], unit="h"),
            "last": np.datetime_as_string(times[-1], unit="h")}
    return Normalizer(ref + mean_d, np.maximum(std, 1e-12)), info
