"""Plausibility of physical inputs: the units the project expects, checked on every store it reads.

Fields are expected in SI units (:data:`align_rl.io.schema.UNITS`): temperature in K, geopotential in
m²/s² (not geopotential height in m), wind in m/s, specific humidity in kg/kg, pressure in Pa.
:func:`check_units` looks at the range of each variable and raises :class:`InputError` naming the
variable, the values seen and the likely conversion (°C → K, m → m²/s², hPa → Pa, g/kg → kg/kg,
km/h or kn → m/s). The bounds are wide (any weather on Earth, or a Held–Suarez world, passes);
data outside them on purpose is read with ``checks.units=false`` (``--no-unit-check`` for
``python -m align_rl.score``).
"""

from __future__ import annotations

import numpy as np

from align_rl.errors import InputError
from align_rl.io.schema import CHANNEL_INFO

G = 9.80665

# variable -> (lowest, highest plausible value, unit, what a value outside suggests)
BOUNDS: dict[str, tuple[float, float, str, str]] = {
    "t": (100.0, 400.0, "K", "temperatures in °C? add 273.15"),
    "t2m": (100.0, 400.0, "K", "temperatures in °C? add 273.15"),
    "u": (-200.0, 200.0, "m/s", "wind in km/h or knots? convert to m/s"),
    "v": (-200.0, 200.0, "m/s", "wind in km/h or knots? convert to m/s"),
    "u10": (-200.0, 200.0, "m/s", "wind in km/h or knots? convert to m/s"),
    "v10": (-200.0, 200.0, "m/s", "wind in km/h or knots? convert to m/s"),
    "q": (-0.01, 0.1, "kg/kg", "specific humidity in g/kg? divide by 1000"),
    "msl": (3.0e4, 1.2e5, "Pa", "pressure in hPa? multiply by 100"),
    "z": (-2.0e4, 4.0e5, "m²/s²", "geopotential height in m? multiply by g = 9.80665"),
}
Z500_MEAN = (3.0e4, 7.0e4)  # the mean 500 hPa geopotential (≈ 5.5e4 m²/s² on Earth)


def check_units(values: np.ndarray, source: str = "the data", channels=None) -> None:
    """Raise :class:`InputError` when ``values`` ``(T, C, H, W)`` (physical units) are not plausible
    in the expected units. ``channels``: the short names along axis 1 (default: the 69 channels in
    the project's order)."""
    v = np.asarray(values)
    info = {c.name: c for c in CHANNEL_INFO}
    names = [c.name for c in CHANNEL_INFO] if channels is None else list(channels)
    if v.ndim != 4 or v.shape[1] != len(names) or v.size == 0:
        return
    lo_all = np.nanmin(v, axis=(0, 2, 3))
    hi_all = np.nanmax(v, axis=(0, 2, 3))
    for i, name in enumerate(names):
        if name not in info:
            continue
        lo, hi, unit, hint = BOUNDS[info[name].var]
        a, b = float(lo_all[i]), float(hi_all[i])
        if a < lo or b > hi:
            raise InputError(
                f"{source}: {name} ranges over [{a:.4g}, {b:.4g}], outside the plausible "
                f"[{lo:g}, {hi:g}] {unit} ({hint}); convert the data to SI units, or set "
                "checks.units=false (score: --no-unit-check) for unusual data"
            )
    if "z500" not in names:
        return
    m = float(np.nanmean(v[:, names.index("z500")]))
    if not Z500_MEAN[0] <= m <= Z500_MEAN[1]:
        hint = (" (looks like geopotential height in m: multiply by g = 9.80665)"
                if Z500_MEAN[0] / G <= m <= Z500_MEAN[1] / G else "")
        raise InputError(
            f"{source}: the mean z500 is {m:.4g}, not a 500 hPa geopotential in m²/s² "
            f"(expected {Z500_MEAN[0]:g}–{Z500_MEAN[1]:g}){hint}; convert the data, or set "
            "checks.units=false (score: --no-unit-check) for unusual data"
        )
