"""A synthetic conventional observing network written as IODA-v2 files (docs/method.md §3.1).

Fixed stations, drawn once from a seed: radiosondes reporting profiles of ``t u v q`` and
geopotential height at :data:`SONDE_PRESSURES` (mandatory levels and significant levels between
the state's levels), and surface stations reporting ``t2m u10 v10`` and mean sea-level pressure.
Stations are denser over land regions with dense networks (:data:`DENSE_REGIONS`: North America,
Europe, East Asia) than elsewhere, like the real network. Values are the truth interpolated by the
same operator (:mod:`.operator`) plus Gaussian noise with the error magnitudes of
:data:`SONDE_ERRORS` / :data:`SURFACE_ERRORS` (typical of radiosonde and SYNOP observation errors
in operational systems). Every station reports at every analysis time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from align_rl.io.schema import N_CHANNELS
from align_rl.observations.ioda import write_ioda
from align_rl.observations.operator import physical_nodes
from align_rl.observations.records import ObsRecords
from align_rl.observations.variables import G0

SONDE_PRESSURES = (92500.0, 85000.0, 77500.0, 70000.0, 50000.0, 40000.0, 35000.0, 30000.0,
                   25000.0, 20000.0, 15000.0, 10000.0, 7000.0)
"""Radiosonde report pressures, Pa (775, 350 and 70 hPa lie between the state's levels)."""

SONDE_ERRORS = {"airTemperature": 1.0, "windEastward": 2.0, "windNorthward": 2.0,
                "specificHumidity": 5e-4, "geopotentialHeight": 12.0 * G0}
"""σ_o of radiosonde reports in the state's units (K, m s⁻¹, kg kg⁻¹, m² s⁻² = 12 m height)."""

SURFACE_ERRORS = {"airTemperature": 1.5, "windEastward": 2.5, "windNorthward": 2.5,
                  "pressureReducedToMeanSeaLevel": 100.0}
"""σ_o of surface reports (K, m s⁻¹, Pa)."""

DENSE_REGIONS = ((25.0, 60.0, 235.0, 295.0), (35.0, 65.0, 350.0, 40.0), (20.0, 50.0, 100.0, 145.0))
"""(lat_min, lat_max, lon_min, lon_max) degrees of the dense regions; lon ranges may wrap 360."""


@dataclass(frozen=True)
class Stations:
    """Fixed station coordinates, degrees: ``lat``, ``lon`` (n,), ``ids`` (n,)."""

    lat: np.ndarray
    lon: np.ndarray
    ids: np.ndarray


def draw_stations(n: int, seed: int, prefix: str, dense_fraction: float = 0.6) -> Stations:
    """``n`` stations: ``dense_fraction`` of them uniformly in :data:`DENSE_REGIONS` (by area),
    the rest uniformly over the sphere (``sin(lat)`` uniform)."""
    rng = np.random.default_rng(seed)
    nd = int(round(n * dense_fraction))
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    lon = rng.uniform(0, 360, n)
    reg = rng.integers(0, len(DENSE_REGIONS), nd)
    for k, (la0, la1, lo0, lo1) in enumerate(DENSE_REGIONS):
        sel = np.flatnonzero(reg == k)
        s0, s1 = np.sin(np.radians(la0)), np.sin(np.radians(la1))
        lat[sel] = np.degrees(np.arcsin(rng.uniform(s0, s1, len(sel))))
        width = (lo1 - lo0) % 360.0
        lon[sel] = (lo0 + rng.uniform(0, width, len(sel))) % 360.0
    ids = np.array([f"{prefix}{i:05d}" for i in range(n)])
    return Stations(np.round(lat, 3), np.round(lon, 3), ids)


def _interpolate(truth: np.ndarray, rec: ObsRecords, grid_lat, grid_lon) -> np.ndarray:
    chan, point, w = physical_nodes(rec, grid_lat, grid_lon)
    flat = truth.reshape(N_CHANNELS, -1)
    return (flat[chan, point] * w).sum(1)


def synthesize(truth: np.ndarray, times: np.ndarray, grid_lat: np.ndarray, grid_lon: np.ndarray,
               sondes: Stations, surface: Stations, seed: int = 0) -> tuple[ObsRecords, ObsRecords]:
    """Radiosonde and surface observations of ``truth`` (T, 69, H, W) physical at ``times`` (T,):
    ``(upper_air, surface)`` records, state units."""
    rng = np.random.default_rng(seed)
    up_parts, sf_parts = [], []
    for t, x in zip(np.asarray(times).astype("datetime64[s]"), truth):
        for kind, st, names, press in (("up", sondes, SONDE_ERRORS, SONDE_PRESSURES),
                                       ("sf", surface, SURFACE_ERRORS, (np.nan,))):
            n_st, n_p, n_v = len(st.lat), len(press), len(names)
            shape = (n_v, n_st, n_p)
            var = np.broadcast_to(np.array(list(names))[:, None, None], shape).reshape(-1)
            lat = np.broadcast_to(st.lat[None, :, None], shape).reshape(-1)
            lon = np.broadcast_to(st.lon[None, :, None], shape).reshape(-1)
            ids = np.broadcast_to(st.ids[None, :, None], shape).reshape(-1)
            p = np.broadcast_to(np.asarray(press, np.float64)[None, None, :], shape).reshape(-1)
            err = np.broadcast_to(np.array(list(names.values()))[:, None, None], shape).reshape(-1)
            rec = ObsRecords(np.full(len(var), t), lat, lon, p, var, np.zeros(len(var)), err, ids)
            rec.value = _interpolate(x, rec, grid_lat, grid_lon) + err * rng.standard_normal(len(var))
            if kind == "up":
                rec.value = np.where(rec.variable == "specificHumidity", np.maximum(rec.value, 0.0),
                                     rec.value)
            (up_parts if kind == "up" else sf_parts).append(rec)
    return ObsRecords.concat(up_parts).check(), ObsRecords.concat(sf_parts).check()


def write_network(truth: np.ndarray, times: np.ndarray, grid_lat: np.ndarray, grid_lon: np.ndarray,
                  out: str | Path, n_sondes: int = 60, n_surface: int = 200, seed: int = 0
                  ) -> list[Path]:
    """Write ``<out>/sondes.nc`` and ``<out>/surface.nc`` (IODA-v2) for ``truth`` (T, 69, H, W)
    physical at ``times``; stations from ``seed`` (the same network for every call)."""
    out = Path(out)
    sondes = draw_stations(n_sondes, seed, "S")
    surface = draw_stations(n_surface, seed + 1, "F")
    up, sf = synthesize(truth, times, grid_lat, grid_lon, sondes, surface, seed + 2)
    return [write_ioda(up, out / "sondes.nc"), write_ioda(sf, out / "surface.nc")]
