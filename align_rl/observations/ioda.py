"""JEDI IODA-v2 observation files (NetCDF-4/HDF5 groups, read with xarray through h5netcdf).

Layout (one dimension ``Location``)::

    MetaData/latitude (degrees_north), MetaData/longitude (degrees_east),
    MetaData/dateTime (int64, "seconds since 1970-01-01T00:00:00Z"),
    MetaData/pressure (Pa; absent for surface files), MetaData/stationIdentification (optional),
    ObsValue/<variable>, ObsError/<variable> (same units), PreQC/<variable> (optional, 0 = good)

Entries equal to the variable's ``_FillValue`` (or beyond ±1e30, IODA's missing value) are not
observations; NaN is an error. Entries with a non-zero PreQC flag are dropped. Every check runs
before anything is returned (docs/method.md §3.1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from align_rl.errors import InputError
from align_rl.observations.records import ObsRecords
from align_rl.observations.variables import VARIABLES, conversion, from_state_units, lookup, to_state_units

FILL_FLOAT = np.float32(-3.3687953e38)
"""IODA's missing value for floats."""

_EPOCH_UNITS = "seconds since 1970-01-01T00:00:00Z"
REQUIRED_GROUPS = ("MetaData", "ObsValue", "ObsError")


def _missing(v: np.ndarray, fill) -> np.ndarray:
    m = np.abs(np.where(np.isfinite(v), v, 0.0)) > 1e30
    if fill is not None:
        m |= v == np.asarray(fill, dtype=v.dtype)
    return m


def _times(da: xr.DataArray, where: str) -> np.ndarray:
    units = str(da.attrs.get("units", ""))
    if not units.startswith("seconds since "):
        raise InputError(f"{where}: dateTime units {units!r} are not 'seconds since <ISO time>' "
                         f"(IODA-v2: {_EPOCH_UNITS!r})")
    ref = pd.Timestamp(units[len("seconds since "):].strip().rstrip("Z")).to_datetime64()
    secs = np.asarray(da.values)
    if not np.issubdtype(secs.dtype, np.integer):
        if not np.all(np.isfinite(secs)):
            raise InputError(f"{where}: NaN or infinite dateTime values")
        secs = np.round(secs).astype(np.int64)
    return ref.astype("datetime64[s]") + secs.astype("timedelta64[s]")


def read_ioda(path: str | Path) -> ObsRecords:
    """The observations of one IODA-v2 file, in the state's units; InputError naming the group,
    variable or unit at fault (nothing is returned then)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"observation file {path} does not exist")
    try:
        tree = xr.open_datatree(path, engine="h5netcdf", mask_and_scale=False, decode_times=False)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        raise InputError(f"{path}: not a readable IODA-v2 NetCDF-4 file ({e})") from None
    with tree:
        groups = set(tree.children)
        missing = [g for g in REQUIRED_GROUPS if g not in groups]
        if missing:
            raise InputError(f"{path}: missing IODA group(s) {', '.join(missing)} (has "
                             f"{', '.join(sorted(groups)) or 'none'}); IODA-v2 files need "
                             f"{', '.join(REQUIRED_GROUPS)}")
        meta = tree["MetaData"].to_dataset()
        for k in ("latitude", "longitude", "dateTime"):
            if k not in meta:
                raise InputError(f"{path}: MetaData/{k} is missing")
        lat = np.asarray(meta["latitude"].values, dtype=np.float64)
        lon = np.asarray(meta["longitude"].values, dtype=np.float64)
        time = _times(meta["dateTime"], f"{path}: MetaData/dateTime")
        n_loc = len(lat)
        if "pressure" in meta:
            pv = meta["pressure"]
            sc, off = conversion(pv.attrs.get("units"), "Pa", f"{path}: MetaData/pressure")
            pressure = np.asarray(pv.values, dtype=np.float64) * sc + off
            if not np.all(np.isfinite(pressure)):
                raise InputError(f"{path}: MetaData/pressure holds NaN or infinite values")
        else:
            pressure = np.full(n_loc, np.nan)
        station = (np.asarray(meta["stationIdentification"].values).astype(str)
                   if "stationIdentification" in meta else None)
        values = tree["ObsValue"].to_dataset()
        errors = tree["ObsError"].to_dataset()
        preqc = tree["PreQC"].to_dataset() if "PreQC" in groups else None
        if not values.data_vars:
            raise InputError(f"{path}: group ObsValue holds no variables")
        parts: list[ObsRecords] = []
        dropped = 0
        for name in values.data_vars:
            name = str(name)
            var = lookup(name, f"{path}: ObsValue/{name}")
            if name not in errors:
                raise InputError(f"{path}: ObsError/{name} is missing; every observed variable "
                                 "needs its error standard deviation")
            v, e = values[name], errors[name]
            sv, ov = conversion(v.attrs.get("units"), var.units, f"{path}: ObsValue/{name}")
            se, _ = conversion(e.attrs.get("units"), var.units, f"{path}: ObsError/{name}")
            y = np.asarray(v.values, dtype=np.float64)
            err = np.asarray(e.values, dtype=np.float64)
            if y.shape != (n_loc,) or err.shape != (n_loc,):
                raise InputError(f"{path}: ObsValue/{name} or ObsError/{name} is not one value "
                                 f"per Location ({n_loc})")
            keep = ~_missing(y, v.attrs.get("_FillValue"))
            if np.isnan(y).any():
                raise InputError(f"{path}: ObsValue/{name} holds {int(np.isnan(y).sum())} NaN "
                                 "value(s); mark missing values with the _FillValue instead")
            if np.isnan(err[keep]).any() or _missing(err, e.attrs.get("_FillValue"))[keep].any():
                raise InputError(f"{path}: ObsError/{name} is NaN or missing where "
                                 f"ObsValue/{name} has a value")
            if preqc is not None and name in preqc:
                good = np.asarray(preqc[name].values) == 0
                dropped += int((keep & ~good).sum())
                keep &= good
            y = y[keep] * sv + ov
            err = err[keep] * se  # an error is a difference: no offset
            y, err = to_state_units(var, y, err)
            parts.append(ObsRecords(time[keep], lat[keep], lon[keep], pressure[keep],
                                    np.full(int(keep.sum()), name), y, err,
                                    None if station is None else station[keep]))
    rec = ObsRecords.concat(parts)
    groups_of = {"lat": "MetaData/latitude", "lon": "MetaData/longitude", "time": "MetaData/dateTime",
                 "pressure": "MetaData/pressure", "value": "ObsValue", "error": "ObsError",
                 "variable": "ObsValue"}

    def where(fieldname: str, var: str | None) -> str:
        g = groups_of[fieldname]
        return f"{path}: {g}/{var}" if var and g in ("ObsValue", "ObsError") else (
            f"{path}: {g}" + (f" ({var})" if var else ""))

    rec.check(where)
    rec.preqc_dropped = dropped
    return rec


def write_ioda(rec: ObsRecords, path: str | Path) -> Path:
    """Write ``rec`` as an IODA-v2 file: one Location per distinct (station, time, lat, lon,
    pressure), one ObsValue/ObsError/PreQC variable per IODA name, canonical units. Upper-air
    and surface observations go in separate files (a file has pressures for all or none)."""
    path = Path(path)
    upper = rec.is_upper_air
    if upper.any() and not upper.all():
        raise InputError("an IODA file holds upper-air or surface observations, not both; "
                         "write them to two files")
    st = rec.station if rec.station is not None else np.full(len(rec), "")
    df = pd.DataFrame({"station": st, "time": rec.time.astype(np.int64), "lat": rec.lat,
                       "lon": rec.lon, "p": np.nan_to_num(rec.pressure, nan=-1.0)})
    loc = df.groupby(["station", "time", "lat", "lon", "p"], sort=True).ngroup().to_numpy()
    first = pd.Series(np.arange(len(loc))).groupby(loc).first().to_numpy()
    n_loc = int(loc.max()) + 1 if len(loc) else 0
    epoch = np.datetime64("1970-01-01T00:00:00", "s")
    t = (rec.time[first] - epoch).astype(np.int64)
    meta = {"latitude": ("Location", rec.lat[first].astype(np.float32), {"units": "degrees_north"}),
            "longitude": ("Location", rec.lon[first].astype(np.float32), {"units": "degrees_east"}),
            "dateTime": ("Location", t, {"units": _EPOCH_UNITS})}
    if upper.any():
        meta["pressure"] = ("Location", rec.pressure[first].astype(np.float32), {"units": "Pa"})
    if rec.station is not None:
        meta["stationIdentification"] = ("Location", rec.station[first].astype(object), {})
    obs_v, obs_e, qc = {}, {}, {}
    for name in np.unique(rec.variable):
        var = VARIABLES[str(name)]
        sel = rec.variable == name
        y, e = from_state_units(var, rec.value[sel], rec.error[sel])
        vv = np.full(n_loc, FILL_FLOAT, dtype=np.float32)
        ee = np.full(n_loc, FILL_FLOAT, dtype=np.float32)
        vv[loc[sel]] = y
        ee[loc[sel]] = e
        obs_v[str(name)] = ("Location", vv, {"units": var.units, "_FillValue": FILL_FLOAT})
        obs_e[str(name)] = ("Location", ee, {"units": var.units, "_FillValue": FILL_FLOAT})
        qc[str(name)] = ("Location", np.where(vv == FILL_FLOAT, 1, 0).astype(np.int32), {})
    loc_coord = {"Location": np.arange(n_loc, dtype=np.int32)}
    tree = xr.DataTree.from_dict({
        "/": xr.Dataset(coords=loc_coord, attrs={"ioda_layout": "ObsGroup", "ioda_layout_version": 2}),
        "MetaData": xr.Dataset(meta), "ObsValue": xr.Dataset(obs_v),
        "ObsError": xr.Dataset(obs_e), "PreQC": xr.Dataset(qc)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tree.to_netcdf(tmp, engine="h5netcdf")
    tmp.replace(path)
    return path
