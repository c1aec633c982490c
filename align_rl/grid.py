"""Regular cell-centred latitude/longitude grids of the WeatherBench 1 family.

``lat = arange(-90 + d/2, 90, d)`` (ascending inside the code), ``lon = arange(0, 360, d)``,
``nlon = 2 * nlat``. Examples: 32 × 64 (d = 5.625°, the demo), 128 × 256 (d = 1.40625°, the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class Grid:
    """A grid of ``nlat`` × ``nlon`` cells; coordinates in degrees."""

    nlat: int
    nlon: int

    def __post_init__(self) -> None:
        if self.nlat < 2 or self.nlon != 2 * self.nlat:
            raise InputError(
                f"grid {self.nlat}x{self.nlon} is not of the WeatherBench family "
                "(nlon must be 2 × nlat, e.g. 32x64, 64x128, 128x256)"
            )

    @property
    def spacing(self) -> float:
        """Grid spacing d in degrees."""
        return 180.0 / self.nlat

    @property
    def lat(self) -> np.ndarray:
        """Cell-centre latitudes, ascending, degrees, shape (nlat,)."""
        d = self.spacing
        return -90.0 + d / 2 + d * np.arange(self.nlat, dtype=np.float64)

    @property
    def lon(self) -> np.ndarray:
        """Longitudes from 0, degrees, shape (nlon,)."""
        return self.spacing * np.arange(self.nlon, dtype=np.float64)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.nlat, self.nlon)

    def __str__(self) -> str:
        return f"{self.nlat}x{self.nlon}"

    @classmethod
    def parse(cls, text: str) -> "Grid":
        """``"32x64"`` -> Grid(32, 64)."""
        try:
            a, b = str(text).lower().split("x")
            return cls(int(a), int(b))
        except ValueError:
            raise InputError(f"grid {text!r} is not of the form NLATxNLON, e.g. 32x64") from None

    @classmethod
    def from_coords(cls, lat: np.ndarray, lon: np.ndarray, atol: float = 1e-4) -> "Grid":
        """The grid whose coordinates are ``lat`` (ascending) and ``lon``; InputError otherwise."""
        lat = np.asarray(lat, dtype=np.float64)
        lon = np.asarray(lon, dtype=np.float64)
        grid = cls(len(lat), len(lon))
        if not np.allclose(lat, grid.lat, atol=atol):
            raise InputError(
                f"latitudes {lat[:3]}… are not the cell-centred {grid} grid's "
                f"{grid.lat[:3]}…; regrid the data to a WeatherBench-style grid"
            )
        if not np.allclose(lon, grid.lon, atol=atol):
            raise InputError(
                f"longitudes {lon[:3]}… are not the {grid} grid's {grid.lon[:3]}…; "
                "longitudes must start at 0 with spacing 180/nlat"
            )
        return grid

    def weights(self) -> np.ndarray:
        """Area weights ``cos(lat) / mean(cos(lat))``, shape (nlat,)."""
        return lat_weights(self.lat)


def lat_weights(lat_deg: np.ndarray) -> np.ndarray:
    """``w_i = cos(lat_i) / mean(cos(lat))`` from the actual latitude coordinate (degrees)."""
    c = np.cos(np.deg2rad(np.asarray(lat_deg, dtype=np.float64)))
    return c / c.mean()
