"""The 69 channels of the state, in FengWu order, with names, levels and units.

Order: ``u10, v10, t2m, msl``, then ``z, q, u, v, t``, each on the 13 pressure levels
``50 … 1000`` hPa (``z50 … z1000, q50 …``). ``z`` is geopotential in m²/s² (not height).
Every module takes channel names and indices from here, never from literals.
"""

from __future__ import annotations

from dataclasses import dataclass

LEVELS: tuple[int, ...] = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)
"""Pressure levels in hPa, top to bottom (FengWu / WeatherBench2 order)."""

SURFACE_VARS: tuple[str, ...] = ("u10", "v10", "t2m", "msl")
LEVEL_VARS: tuple[str, ...] = ("z", "q", "u", "v", "t")

LONG_NAMES: dict[str, str] = {
    "u10": "10m_u_component_of_wind",
    "v10": "10m_v_component_of_wind",
    "t2m": "2m_temperature",
    "msl": "mean_sea_level_pressure",
    "z": "geopotential",
    "q": "specific_humidity",
    "u": "u_component_of_wind",
    "v": "v_component_of_wind",
    "t": "temperature",
}
"""Short variable name -> WeatherBench2 long name."""

SHORT_NAMES: dict[str, str] = {v: k for k, v in LONG_NAMES.items()}

UNITS: dict[str, str] = {
    "u10": "m s**-1",
    "v10": "m s**-1",
    "t2m": "K",
    "msl": "Pa",
    "z": "m**2 s**-2",
    "q": "kg kg**-1",
    "u": "m s**-1",
    "v": "m s**-1",
    "t": "K",
}


@dataclass(frozen=True)
class Channel:
    """One of the 69 channels: ``name`` like ``z500``, ``var`` like ``z``, ``level`` in hPa or None."""

    index: int
    name: str
    var: str
    level: int | None

    @property
    def long_name(self) -> str:
        return LONG_NAMES[self.var]

    @property
    def units(self) -> str:
        return UNITS[self.var]


def _build() -> tuple[Channel, ...]:
    out: list[Channel] = []
    for v in SURFACE_VARS:
        out.append(Channel(len(out), v, v, None))
    for v in LEVEL_VARS:
        for lev in LEVELS:
            out.append(Channel(len(out), f"{v}{lev}", v, lev))
    return tuple(out)


CHANNEL_INFO: tuple[Channel, ...] = _build()
CHANNELS: tuple[str, ...] = tuple(c.name for c in CHANNEL_INFO)
N_CHANNELS: int = len(CHANNELS)
assert N_CHANNELS == 69

_INDEX = {c.name: c.index for c in CHANNEL_INFO}


def channel_index(name: str) -> int:
    """Index of a short channel name (``"z500"`` -> 7 + 4 … ); raises KeyError naming valid names."""
    try:
        return _INDEX[name]
    except KeyError:
        raise KeyError(f"unknown channel {name!r}; channels are {', '.join(CHANNELS)}") from None


def channels_of(var: str) -> list[int]:
    """Indices of every channel of a variable (``"z"`` -> the 13 levels, ``"u10"`` -> [0])."""
    idx = [c.index for c in CHANNEL_INFO if c.var == var]
    if not idx:
        raise KeyError(f"unknown variable {var!r}; variables are {', '.join(LONG_NAMES)}")
    return idx

