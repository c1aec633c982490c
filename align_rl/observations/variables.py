"""IODA variable names -> the state's variables (align_rl.io.schema), with unit conversion.

An observation with a pressure (``MetaData/pressure``) is an upper-air observation of a level
variable (``z q u v t``), interpolated in log-pressure between the 13 levels; one without is a
surface observation of ``u10 v10 t2m msl``. Values are converted to the state's units
(:data:`align_rl.io.schema.UNITS`); ``geopotentialHeight`` (m) becomes geopotential
``g0 · h`` (m² s⁻²). Surface/station pressure is refused: the state holds mean sea-level
pressure only, and the two differ by the station's height (docs/method.md §3.1).
"""

from __future__ import annotations

from dataclasses import dataclass

from align_rl.errors import InputError

G0 = 9.80665
"""Standard gravity, m s⁻², geopotential = G0 × geopotential height."""


@dataclass(frozen=True)
class ObsVariable:
    """One IODA variable: the state variable it observes aloft (``upper``) and at the surface."""

    ioda: str
    upper: str | None
    surface: str | None
    units: str
    """Canonical IODA units of the variable (CF-style)."""


VARIABLES: dict[str, ObsVariable] = {v.ioda: v for v in (
    ObsVariable("airTemperature", "t", "t2m", "K"),
    ObsVariable("windEastward", "u", "u10", "m s-1"),
    ObsVariable("windNorthward", "v", "v10", "m s-1"),
    ObsVariable("specificHumidity", "q", None, "kg kg-1"),
    ObsVariable("geopotentialHeight", "z", None, "m"),
    ObsVariable("pressureReducedToMeanSeaLevel", None, "msl", "Pa"),
)}
"""IODA name -> :class:`ObsVariable`."""

REFUSED: dict[str, str] = {
    "stationPressure": "the state holds mean sea-level pressure (msl), not station pressure; "
                       "give pressureReducedToMeanSeaLevel (reduce to sea level first)",
    "surfacePressure": "the state holds mean sea-level pressure (msl), not surface pressure; "
                       "give pressureReducedToMeanSeaLevel (reduce to sea level first)",
}

# unit spelling -> (canonical unit, scale, offset): value_canonical = value * scale + offset
_UNIT_ALIASES: dict[str, tuple[str, float, float]] = {
    "k": ("K", 1.0, 0.0), "kelvin": ("K", 1.0, 0.0),
    "degc": ("K", 1.0, 273.15), "c": ("K", 1.0, 273.15), "celsius": ("K", 1.0, 273.15),
    "degree_celsius": ("K", 1.0, 273.15),
    "ms-1": ("m s-1", 1.0, 0.0), "m/s": ("m s-1", 1.0, 0.0), "ms**-1": ("m s-1", 1.0, 0.0),
    "ms^-1": ("m s-1", 1.0, 0.0),
    "kgkg-1": ("kg kg-1", 1.0, 0.0), "kg/kg": ("kg kg-1", 1.0, 0.0),
    "kgkg**-1": ("kg kg-1", 1.0, 0.0), "1": ("kg kg-1", 1.0, 0.0),
    "gkg-1": ("kg kg-1", 1e-3, 0.0), "g/kg": ("kg kg-1", 1e-3, 0.0),
    "m": ("m", 1.0, 0.0), "gpm": ("m", 1.0, 0.0),
    "pa": ("Pa", 1.0, 0.0), "hpa": ("Pa", 100.0, 0.0), "mb": ("Pa", 100.0, 0.0),
    "mbar": ("Pa", 100.0, 0.0),
}


def lookup(name: str, where: str) -> ObsVariable:
    """The :class:`ObsVariable` of IODA name ``name``; InputError naming it (and ``where``) otherwise."""
    if name in VARIABLES:
        return VARIABLES[name]
    if name in REFUSED:
        raise InputError(f"{where}: variable {name!r} is not observable here: {REFUSED[name]}")
    raise InputError(f"{where}: unknown observation variable {name!r}; known: "
                     f"{', '.join(VARIABLES)}")


def conversion(units: str | None, expected: str, where: str) -> tuple[float, float]:
    """``(scale, offset)`` taking values in ``units`` to ``expected`` (canonical); InputError when
    the units are missing or are not a spelling of ``expected``."""
    if units is None or str(units).strip() == "":
        raise InputError(f"{where}: no units attribute; give units {expected!r}")
    key = str(units).strip().lower().replace(" ", "")
    hit = _UNIT_ALIASES.get(key)
    if hit is None or hit[0] != expected:
        raise InputError(f"{where}: units {units!r} are not units of {expected!r}; convert the "
                         f"values or give them in {expected!r}")
    return hit[1], hit[2]


def to_state_units(var: ObsVariable, values, errors):
    """Values and errors in canonical IODA units -> the state's units (geopotential for z)."""
    if var.ioda == "geopotentialHeight":
        return values * G0, errors * G0
    return values, errors


def from_state_units(var: ObsVariable, values, errors):
    """Inverse of :func:`to_state_units`."""
    if var.ioda == "geopotentialHeight":
        return values / G0, errors / G0
    return values, errors


def ioda_name(state_var: str) -> str:
    """The IODA name observing state variable ``state_var`` (``"t"`` or ``"t2m"`` -> airTemperature)."""
    for v in VARIABLES.values():
        if state_var in (v.upper, v.surface):
            return v.ioda
    raise KeyError(f"no IODA variable observes {state_var!r}")
