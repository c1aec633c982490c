"""Observations as a plain table: CSV, or Parquet when pyarrow is installed.

One row per observation, columns::

    time (ISO 8601, UTC), latitude (degrees), longitude (degrees), pressure (Pa; empty for
    surface observations), variable (IODA name), value, error (σ_o), units (of value and error)
    [, station]

Values are converted to the state's units (:mod:`.variables`); a bad table raises InputError
naming the column and variable, before anything is returned (docs/method.md §3.1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from align_rl.errors import InputError
from align_rl.observations.records import ObsRecords
from align_rl.observations.variables import VARIABLES, conversion, from_state_units, lookup, to_state_units

COLUMNS = ("time", "latitude", "longitude", "pressure", "variable", "value", "error", "units")
_FIELD_COLUMN = {"time": "time", "lat": "latitude", "lon": "longitude", "pressure": "pressure",
                 "variable": "variable", "value": "value", "error": "error"}


def _read_frame(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            return pd.read_parquet(path)
        except ImportError:
            raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or "
                             "give the table as CSV") from None
    if suffix == ".csv":
        return pd.read_csv(path, dtype={"variable": str, "units": str, "station": str})
    raise InputError(f"{path}: observation tables are .csv or .parquet files")


def read_table(path: str | Path) -> ObsRecords:
    """The observations of a CSV/Parquet table, in the state's units."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"observation table {path} does not exist")
    try:
        df = _read_frame(path)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad file
        raise InputError(f"{path}: not a readable table ({e})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; a table needs "
                         f"{', '.join(COLUMNS)}")
    for c in ("latitude", "longitude", "pressure", "value", "error"):
        try:
            df[c] = pd.to_numeric(df[c], errors="raise").astype(np.float64)
        except (ValueError, TypeError) as e:
            raise InputError(f"{path}: column {c} is not numeric ({e})") from None
    try:
        time = pd.to_datetime(df["time"], utc=True).dt.tz_localize(None).to_numpy().astype("datetime64[s]")
    except (ValueError, TypeError) as e:
        raise InputError(f"{path}: column time is not ISO 8601 times ({e})") from None
    value = df["value"].to_numpy().copy()
    error = df["error"].to_numpy().copy()
    variable = df["variable"].astype(str).to_numpy()
    units = df["units"].astype(str).to_numpy()
    for name in np.unique(variable):
        var = lookup(str(name), f"{path}: column variable")
        sel = variable == name
        for u in np.unique(units[sel]):
            s, o = conversion(None if u == "nan" else u, var.units, f"{path}: column units of {name}")
            k = sel & (units == u)
            value[k] = value[k] * s + o
            error[k] = error[k] * s
        value[sel], error[sel] = to_state_units(var, value[sel], error[sel])
    rec = ObsRecords(time, df["latitude"].to_numpy(), df["longitude"].to_numpy(),
                     df["pressure"].to_numpy(), variable, value, error,
                     df["station"].astype(str).to_numpy() if "station" in df.columns else None)

    def where(fieldname: str, var: str | None) -> str:
        return f"{path}: column {_FIELD_COLUMN[fieldname]}" + (f" ({var})" if var else "")

    return rec.check(where)


def write_table(rec: ObsRecords, path: str | Path) -> Path:
    """Write ``rec`` as a table (.csv, or .parquet) in canonical IODA units."""
    path = Path(path)
    value, error, units = rec.value.copy(), rec.error.copy(), np.empty(len(rec), dtype=object)
    for name in np.unique(rec.variable):
        var = VARIABLES[str(name)]
        sel = rec.variable == name
        value[sel], error[sel] = from_state_units(var, value[sel], error[sel])
        units[sel] = var.units
    df = pd.DataFrame({"time": pd.to_datetime(rec.time).strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "latitude": rec.lat, "longitude": rec.lon, "pressure": rec.pressure,
                       "variable": rec.variable, "value": value, "error": error, "units": units})
    if rec.station is not None:
        df["station"] = rec.station
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix.lower() == ".parquet":
        df.to_parquet(tmp, index=False)
    else:
        df.to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def read_observations(path: str | Path) -> ObsRecords:
    """An IODA-v2 file (.nc, .nc4, .h5) or a table (.csv, .parquet), by suffix."""
    from align_rl.observations.ioda import read_ioda

    p = Path(path)
    if p.suffix.lower() in (".nc", ".nc4", ".h5", ".hdf5"):
        return read_ioda(p)
    if p.suffix.lower() in (".csv", ".parquet"):
        return read_table(p)
    raise InputError(f"{p}: observation files are IODA-v2 (.nc, .nc4, .h5) or tables (.csv, .parquet)")
