"""Point observations in physical units, checked on construction (docs/method.md §3.1).

:class:`ObsRecords` holds ``n`` observations as flat arrays: ``time`` (datetime64[s], UTC),
``lat`` (degrees, −90…90), ``lon`` (degrees, any range; wrapped to 0…360), ``pressure`` (Pa; NaN for
surface observations), ``variable`` (IODA names, :mod:`.variables`), ``value`` and ``error``
(the observation and its error standard deviation σ_o, in the state's units: K, m s⁻¹, kg kg⁻¹,
m² s⁻² for geopotential, Pa). Readers (:mod:`.ioda`, :mod:`.table`) build them; a bad value raises
:class:`~align_rl.errors.InputError` naming where it is, and nothing is returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from align_rl.errors import InputError
from align_rl.io.schema import LEVELS
from align_rl.observations.variables import VARIABLES, lookup

P_TOP = LEVELS[0] * 100.0
P_BOTTOM = LEVELS[-1] * 100.0
"""The pressure range of the state's levels, Pa (50 hPa … 1000 hPa)."""


def _where_default(fieldname: str, var: str | None) -> str:
    return f"{fieldname}" + (f" of {var}" if var else "")


@dataclass
class ObsRecords:
    """``n`` point observations, physical units (see the module docstring)."""

    time: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    pressure: np.ndarray
    variable: np.ndarray
    value: np.ndarray
    error: np.ndarray
    station: np.ndarray | None = field(default=None)
    preqc_dropped: int = 0
    """Observations the reader dropped for a non-zero PreQC flag (not held here)."""

    def __post_init__(self) -> None:
        n = len(self.value)
        self.time = np.asarray(self.time).astype("datetime64[s]")
        self.lat = np.asarray(self.lat, dtype=np.float64)
        self.lon = np.asarray(self.lon, dtype=np.float64)
        self.pressure = np.asarray(self.pressure, dtype=np.float64)
        self.variable = np.asarray(self.variable).astype(str)
        self.value = np.asarray(self.value, dtype=np.float64)
        self.error = np.asarray(self.error, dtype=np.float64)
        if self.station is not None:
            self.station = np.asarray(self.station).astype(str)
        for name in ("time", "lat", "lon", "pressure", "variable", "error"):
            if getattr(self, name).shape != (n,):
                raise InputError(f"observation field {name} has shape {getattr(self, name).shape}, "
                                 f"expected ({n},) like the values")

    def __len__(self) -> int:
        return len(self.value)

    def check(self, where: Callable[[str, str | None], str] = _where_default) -> "ObsRecords":
        """Raise InputError at the first bad entry; ``where(field, variable)`` names its place
        (``"MetaData/latitude"``, ``"ObsValue/airTemperature"``, a table column)."""
        for var in np.unique(self.variable):
            lookup(str(var), where("variable", str(var)))
        for name, arr, per_var in (("lat", self.lat, False), ("lon", self.lon, False),
                                   ("value", self.value, True), ("error", self.error, True)):
            bad = ~np.isfinite(arr)
            if bad.any():
                v = str(self.variable[np.flatnonzero(bad)[0]]) if per_var else None
                raise InputError(f"{where(name, v)}: {int(bad.sum())} NaN or infinite value(s); "
                                 "drop or flag them before loading")
        if np.isnat(self.time).any():
            raise InputError(f"{where('time', None)}: {int(np.isnat(self.time).sum())} missing time(s)")
        out = np.abs(self.lat) > 90
        if out.any():
            raise InputError(f"{where('lat', None)}: latitude {self.lat[out][0]:g} is outside ±90 "
                             f"degrees ({int(out.sum())} observation(s))")
        if (self.error <= 0).any():
            i = int(np.flatnonzero(self.error <= 0)[0])
            raise InputError(f"{where('error', str(self.variable[i]))}: observation error "
                             f"{self.error[i]:g} must be > 0")
        upper = self.is_upper_air
        for var in np.unique(self.variable):
            ov = VARIABLES[str(var)]
            sel = self.variable == var
            if (sel & upper).any() and ov.upper is None:
                raise InputError(f"{where('pressure', str(var))}: {var} is a surface variable but "
                                 "has pressures; give it without a pressure")
            if (sel & ~upper).any() and ov.surface is None:
                raise InputError(f"{where('pressure', str(var))}: {var} observes levels only and "
                                 "needs a pressure for every observation")
        p = self.pressure[upper]
        out = (p < P_TOP * (1 - 1e-9)) | (p > P_BOTTOM * (1 + 1e-9))
        if out.any():
            raise InputError(f"{where('pressure', None)}: pressure {p[out][0]:g} Pa is outside the "
                             f"state's levels {P_TOP:g}–{P_BOTTOM:g} Pa ({LEVELS[0]}–{LEVELS[-1]} "
                             f"hPa; {int(out.sum())} observation(s)); drop them or extend the levels")
        return self

    @property
    def is_upper_air(self) -> np.ndarray:
        """(n,) bool: the observation has a pressure (a level variable)."""
        return np.isfinite(self.pressure)

    @property
    def state_var(self) -> np.ndarray:
        """(n,) the state variable observed (``t``, ``t2m``, ``z`` …)."""
        names, inv = np.unique(self.variable, return_inverse=True)
        upper = np.array([VARIABLES[n].upper or "" for n in names] or [""])
        surface = np.array([VARIABLES[n].surface or "" for n in names] or [""])
        return np.where(self.is_upper_air, upper[inv], surface[inv]).astype(str)

    def subset(self, keep: np.ndarray) -> "ObsRecords":
        """The observations where ``keep`` (bool (n,) or indices)."""
        return ObsRecords(self.time[keep], self.lat[keep], self.lon[keep], self.pressure[keep],
                          self.variable[keep], self.value[keep], self.error[keep],
                          None if self.station is None else self.station[keep])

    def in_window(self, center, half_width) -> np.ndarray:
        """(n,) bool: ``|time − center| <= half_width`` (datetime64 and timedelta64)."""
        c = np.datetime64(center, "s")
        h = np.timedelta64(half_width).astype("timedelta64[s]")
        return np.abs(self.time - c) <= h

    def counts(self) -> dict[str, int]:
        """Number of observations per IODA variable name."""
        names, n = np.unique(self.variable, return_counts=True)
        return {str(a): int(b) for a, b in zip(names, n)}

    @staticmethod
    def concat(parts: list["ObsRecords"]) -> "ObsRecords":
        """One record set of several (stations kept only when every part has them)."""
        if not parts:
            raise InputError("no observations to concatenate")
        st = None
        if all(p.station is not None for p in parts):
            st = np.concatenate([p.station for p in parts])
        return ObsRecords(*(np.concatenate([getattr(p, k) for p in parts])
                            for k in ("time", "lat", "lon", "pressure", "variable", "value", "error")),
                          station=st)
