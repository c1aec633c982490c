"""Writing states as a WeatherBench2-layout zarr store, atomically.

Layout: variables with WeatherBench2 long names; pressure-level variables have dims
(time, level, latitude, longitude), surface variables (time, latitude, longitude); ``level`` is int
hPa, latitude ascending. A store is written into a staging folder beside ``PATH`` and renamed into
place (:func:`align_rl.owned.staged`), so a crash never leaves a half-written ``PATH``; an existing
``PATH`` is replaced only when the project created it (marker file), and staging folders of dead
processes are cleaned on the next write. Reading is in :mod:`align_rl.io.era5`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from align_rl.errors import InputError
from align_rl.io.schema import LEVEL_VARS, LEVELS, LONG_NAMES, SURFACE_VARS, UNITS, channels_of
from align_rl.io.states import States
from align_rl.owned import require_owned, staged


def states_to_dataset(states: States, derived: tuple[str, ...] = ()) -> xr.Dataset:
    """WeatherBench2-layout dataset of ``states``; variables in ``derived`` are labelled so."""
    v = states.values
    coords = {
        "time": states.times,
        "level": np.array(LEVELS, dtype=np.int64),
        "latitude": states.lat,
        "longitude": states.lon,
    }
    data_vars: dict[str, Any] = {}
    for var in SURFACE_VARS:
        (i,) = channels_of(var)
        data_vars[LONG_NAMES[var]] = (("time", "latitude", "longitude"), v[:, i])
    for var in LEVEL_VARS:
        idx = channels_of(var)
        data_vars[LONG_NAMES[var]] = (("time", "level", "latitude", "longitude"), v[:, idx])
    ds = xr.Dataset(data_vars, coords=coords)
    for var in SURFACE_VARS + LEVEL_VARS:
        a = ds[LONG_NAMES[var]].attrs
        a["units"] = UNITS[var]
        a["short_name"] = var
        a["derived"] = var in derived
    ds["level"].attrs["units"] = "hPa"
    ds["latitude"].attrs["units"] = "degrees_north"
    ds["longitude"].attrs["units"] = "degrees_east"
    ds.attrs.update({k: (json.dumps(val) if isinstance(val, (dict, list)) else val)
                     for k, val in states.attrs.items()})
    return ds


def write_states(
    path: str | Path,
    states: States,
    derived: tuple[str, ...] = (),
    overwrite: bool = False,
    time_chunk: int = 8,
) -> Path:
    """Write ``states`` (physical units) to a zarr store at ``path``, atomically.

    Dict- or list-valued ``states.attrs`` are stored as JSON strings (e.g. ``normalization``).
    """

    path = Path(path)
    if not np.all(np.isfinite(states.values)):
        raise InputError(f"refusing to write {path}: the states hold NaN or inf values")
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists; remove it or pass overwrite")
    if path.exists():
        require_owned(path, "store")  # before any work
    ds = states_to_dataset(states, derived)
    ds = ds.chunk({"time": time_chunk})
    with staged(path, "states") as new:
        ds.to_zarr(new, mode="w", consolidated=True)
    return path

