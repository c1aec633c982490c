"""Per-channel normalisation: ``x_norm = (x_phys − mean) / std``, channel axis at −3.

Statistics are computed over the training split and stored with the dataset (zarr attributes,
key ``normalization``), so every consumer normalises the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from align_rl.errors import InputError
from align_rl.io.schema import CHANNELS, N_CHANNELS


@dataclass
class Normalizer:
    """Means and standard deviations of the 69 channels, physical units, shape (69,)."""

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=np.float64).reshape(N_CHANNELS)
        self.std = np.asarray(self.std, dtype=np.float64).reshape(N_CHANNELS)
        if not (np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.std))):
            raise InputError("normalisation statistics hold NaN or inf; recompute them")
        if np.any(self.std <= 0):
            bad = [CHANNELS[i] for i in np.flatnonzero(self.std <= 0)]
            raise InputError(f"normalisation std is not positive for {bad}; the channel is constant")

    def _stats_like(self, x):
        shape = (N_CHANNELS, 1, 1)
        if isinstance(x, torch.Tensor):
            m = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).reshape(shape)
            s = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).reshape(shape)
        else:
            m = self.mean.reshape(shape).astype(x.dtype, copy=False)
            s = self.std.reshape(shape).astype(x.dtype, copy=False)
        return m, s

    def normalize(self, x):
        """Physical (…, 69, H, W) -> normalised; numpy or torch."""
        m, s = self._stats_like(x)
        return (x - m) / s

    def denormalize(self, x):
        """Normalised (…, 69, H, W) -> physical; numpy or torch."""
        m, s = self._stats_like(x)
        return x * s + m

    @classmethod
    def fit(cls, values: np.ndarray) -> "Normalizer":
        """Statistics of physical values (T, 69, H, W), in float64."""
        v = np.asarray(values)
        if v.ndim != 4 or v.shape[1] != N_CHANNELS:
            raise InputError(f"expected values of shape (T, 69, H, W), got {v.shape}")
        mean = v.mean(axis=(0, 2, 3), dtype=np.float64)
        std = v.std(axis=(0, 2, 3), dtype=np.float64)
        return cls(mean, np.maximum(std, 1e-12))

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": list(CHANNELS),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Normalizer":
        if list(d.get("channels", CHANNELS)) != list(CHANNELS):
            raise InputError("normalisation statistics are for another channel list; recompute them")
        return cls(np.array(d["mean"]), np.array(d["std"]))
