"""Latitude/longitude grids.

:class:`Grid`, the models' grid: cell-centred, of the WeatherBench 1 family,
``lat = arange(-90 + d/2, 90, d)`` (ascending inside the code), ``lon = arange(0, 360, d)``,
``nlon = 2 * nlat``. Examples: 32 × 64 (d = 5.625°, the demo), 128 × 256 (d = 1.40625°, the paper).

:class:`LatLonGrid`, the grids data and external models come on: any global equiangular grid,
cell-centred or with rows on the poles (ERA5's 721 × 1440, WeatherBench2's 121 × 240), mapped to
and from the model grid by :mod:`align_rl.io.regrid`. :func:`cell_area_weights` gives the cell-area
weights of any latitude coordinate (pole rows are half cells).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from align_rl.errors import InputError


@dataclass(frozen=True)
class Grid:
    """A grid of ``nlat`` × ``nlon`` cells; coordinates in degrees."""

    nlat: int
    nlon: int

    def __post_init__(self) -> None:
        if self.nlat < 2 or self.nlon != 2 * self.nlat:
            raise InputError(
                f"model grid {self.nlat}x{self.nlon} is not of the cell-centred WeatherBench family "
                "(nlon must be 2 × nlat, e.g. 32x64, 64x128, 128x256); data on other global "
                "grids (e.g. 121x240 or 721x1440 with rows on the poles) are regridded to it"
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


# ----------------------------------------------------------------------------- data grids


def cell_area_weights(lat_deg: np.ndarray) -> np.ndarray:
    """Relative cell areas of the rows of a regular latitude/longitude grid, mean 1, shape (H,).

    From the actual latitude coordinate (degrees, either direction): the cell edges are the
    midpoints between neighbouring rows, and the outermost edges lie half a spacing beyond the
    first and last rows, clipped at ±90°. Row ``i`` weighs ``sin φ_{i+½} − sin φ_{i−½}``. So rows
    on the poles are half cells (as in WeatherBench2's ``get_lat_weights``), and on a cell-centred
    grid the weights equal ``cos φ / mean cos φ`` (the paper's weights, docs/method.md §7.1).
    """
    lat = np.asarray(lat_deg, dtype=np.float64)
    if lat.ndim != 1 or lat.size < 1:
        raise InputError(f"latitudes must be a non-empty 1-D array, got shape {lat.shape}")
    if lat.size == 1:
        return np.ones(1)
    order = np.argsort(lat)
    s = lat[order]
    mid = (s[1:] + s[:-1]) / 2
    edges = np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])
    edges = np.clip(edges, -90.0, 90.0)
    area = np.diff(np.sin(np.deg2rad(edges)))
    if np.any(area <= 0):
        raise InputError("latitudes give cells of no area; check the latitude coordinate")
    out = np.empty_like(area)
    out[order] = area
    return out / out.mean()


@dataclass(frozen=True)
class LatLonGrid:
    """A global equiangular latitude/longitude grid as data come on it; coordinates in degrees.

    ``poles=False``: cell-centred rows ``lat = −90 + d/2 + i·d`` with ``d = 180/nlat`` (the
    WeatherBench 1 family, WeatherBench2's ``64x32_equiangular`` and ``512x256_equiangular``
    layouts, the models' grids). ``poles=True``: rows on both poles, ``lat = −90 + i·d`` with
    ``d = 180/(nlat − 1)`` (ERA5's 721 × 1440, WeatherBench2's ``240x121_equiangular_with_poles``,
    FengWu's grid). Longitudes ``lon = j·360/nlon`` from 0; ``nlon`` is free. Latitude is
    ascending here; stores and models may hold either direction.
    """

    nlat: int
    nlon: int
    poles: bool = False

    def __post_init__(self) -> None:
        if self.nlat < (3 if self.poles else 2) or self.nlon < 4:
            raise InputError(f"grid {self.nlat}x{self.nlon} is too small for a global grid")

    @property
    def dlat(self) -> float:
        return 180.0 / (self.nlat - 1) if self.poles else 180.0 / self.nlat

    @property
    def dlon(self) -> float:
        return 360.0 / self.nlon

    @property
    def lat(self) -> np.ndarray:
        """Row latitudes, ascending, shape (nlat,)."""
        if self.poles:
            return np.linspace(-90.0, 90.0, self.nlat)
        return -90.0 + self.dlat / 2 + self.dlat * np.arange(self.nlat, dtype=np.float64)

    @property
    def lon(self) -> np.ndarray:
        return self.dlon * np.arange(self.nlon, dtype=np.float64)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.nlat, self.nlon)

    def weights(self) -> np.ndarray:
        """Cell-area weights of the rows, mean 1 (:func:`cell_area_weights`)."""
        return cell_area_weights(self.lat)

    def model_grid(self) -> "Grid | None":
        """The model grid (:class:`Grid`) this is, or None (rows on the poles, nlon ≠ 2·nlat)."""
        if self.poles or self.nlon != 2 * self.nlat:
            return None
        return Grid(self.nlat, self.nlon)

    def __str__(self) -> str:
        return f"{self.nlat}x{self.nlon}{' with poles' if self.poles else ''}"

    @classmethod
    def of(cls, grid: "Grid | LatLonGrid | str") -> "LatLonGrid":
        """A LatLonGrid from a model :class:`Grid`, itself, or a string (:meth:`parse`)."""
        if isinstance(grid, LatLonGrid):
            return grid
        if isinstance(grid, Grid):
            return cls(grid.nlat, grid.nlon, False)
        return cls.parse(grid)

    @classmethod
    def parse(cls, text: str) -> "LatLonGrid":
        """``"NLATxNLON"`` with an optional ``:poles`` or ``:centred`` suffix.

        Without a suffix an odd ``NLAT`` means rows on the poles (``121x240``, ``721x1440``) and an
        even one a cell-centred grid (``32x64``, ``128x256``).
        """
        t = str(text).strip().lower()
        kind = None
        if ":" in t:
            t, kind = t.split(":", 1)
            if kind not in ("poles", "centred", "centered"):
                raise InputError(f"grid {text!r}: the suffix must be :poles or :centred")
        try:
            a, b = t.split("x")
            nlat, nlon = int(a), int(b)
        except ValueError:
            raise InputError(f"grid {text!r} is not of the form NLATxNLON[:poles|:centred], "
                             "e.g. 721x1440 or 32x64") from None
        poles = (nlat % 2 == 1) if kind is None else kind == "poles"
        return cls(nlat, nlon, poles)

    @classmethod
    def from_coords(cls, lat: np.ndarray, lon: np.ndarray, atol: float = 1e-4,
                    where: str = "") -> "LatLonGrid":
        """The grid whose coordinates are ``lat`` (ascending) and ``lon`` (from 0); InputError
        naming what is wrong otherwise."""
        lat = np.asarray(lat, dtype=np.float64)
        lon = np.asarray(lon, dtype=np.float64)
        pre = f"{where}: " if where else ""
        accepted = ("accepted grids are global and equiangular: cell-centred rows "
                    "(lat = -90 + d/2 + i·d, e.g. 32x64, 128x256) or rows on both poles "
                    "(lat = -90 + i·d, e.g. 121x240, 721x1440), longitudes j·360/nlon")
        if len(lat) < 2 or len(lon) < 4:
            raise InputError(f"{pre}a {len(lat)}x{len(lon)} grid is too small; {accepted}")
        for poles in (True, False):
            try:
                g = cls(len(lat), len(lon), poles)
            except InputError:
                continue
            if np.allclose(lat, g.lat, atol=atol, rtol=0):
                break
        else:
            raise InputError(f"{pre}latitudes {lat[:3]}… are neither cell-centred nor on the poles "
                             f"with uniform spacing; {accepted}. Regrid the data to such a grid")
        if not np.allclose(lon, g.lon, atol=atol, rtol=0):
            raise InputError(f"{pre}longitudes {lon[:3]}… are not the uniform global j·{g.dlon:g}° of "
                             f"a {g} grid; {accepted}")
        return g
