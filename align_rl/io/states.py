"""A stack of atmospheric states on the 69 channels, the unit every module passes around."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from align_rl.errors import InputError
from align_rl.io.grid import Grid
from align_rl.io.schema import N_CHANNELS


@dataclass
class States:
    """``values`` (T, 69, H, W) float32, physical units; ``times`` (T,) datetime64[ns] ascending;
    ``lat`` (H,) ascending degrees; ``lon`` (W,) degrees from 0; ``attrs`` carried to the store."""

    values: np.ndarray
    times: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.times = np.asarray(self.times, dtype="datetime64[ns]")
        self.lat = np.asarray(self.lat, dtype=np.float64)
        self.lon = np.asarray(self.lon, dtype=np.float64)
        v = self.values
        if v.ndim != 4 or v.shape[1] != N_CHANNELS:
            raise InputError(f"states must have shape (T, 69, H, W), got {v.shape}")
        if v.shape[0] != len(self.times) or v.shape[2:] != (len(self.lat), len(self.lon)):
            raise InputError(
                f"values {v.shape} do not match times ({len(self.times)}), lat ({len(self.lat)}), "
                f"lon ({len(self.lon)})"
            )

    @property
    def grid(self) -> Grid:
        return Grid.from_coords(self.lat, self.lon)

    def __len__(self) -> int:
        return len(self.times)

    def time_index(self, t: np.datetime64) -> int | None:
        """Position of time ``t`` or None when the stack does not hold it."""
        i = int(np.searchsorted(self.times, np.datetime64(t, "ns")))
        if i < len(self.times) and self.times[i] == np.datetime64(t, "ns"):
            return i
        return None

    def select(self, start: str | np.datetime64 | None, end: str | np.datetime64 | None) -> "States":
        """States with ``start <= time <= end`` (inclusive; a date-only ``end`` covers its whole day)."""
        keep = np.ones(len(self.times), dtype=bool)
        if start is not None:
            keep &= self.times >= np.datetime64(start, "ns")
        if end is not None:
            e = np.datetime64(end)
            if e.dtype == np.dtype("datetime64[D]"):
                e = e + np.timedelta64(1, "D") - np.timedelta64(1, "ns")
            keep &= self.times <= np.datetime64(e, "ns")
        return States(self.values[keep], self.times[keep], self.lat, self.lon, dict(self.attrs))
