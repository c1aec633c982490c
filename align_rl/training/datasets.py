"""Torch datasets over normalised states for pretraining.

All arrays are float32 and normalised (``(x − mean) / std`` per channel). Times are 6-hourly; a
sample that needs several consecutive frames only exists where the frames are exactly 6 h apart
(the embedded world stores its members as separate years, so a member's last frames and the
next member's first frames never form a sample).

- :class:`FrameDataset`: single frames ``(69, H, W)`` (the VAE).
- :class:`SequenceDataset`: ``n_frames`` consecutive frames ``(n_frames, 69, H, W)`` (the
  forecaster: triples ``x_{t−6h}, x_t, x_{t+6h}``).
- :class:`LatentPairDataset`: ``(z_t, z_b)`` standardised latents ``(C, h, w)`` of the truth at ``t``
  and of the background at ``t`` (the diffusion model), made by :func:`latent_pairs`.

Every dataset also offers ``batch(indices) -> tuple of tensors`` (one gather instead of a python
collate loop) and ``len``; training draws random indices with :func:`draw_indices`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from align_rl.errors import InputError
from align_rl.io.normalization import Normalizer
from align_rl.io.states import States

SIX_HOURS = np.timedelta64(6, "h")


def normalized_values(states: States, normalizer: Normalizer) -> np.ndarray:
    """``states.values`` (T, 69, H, W) physical -> normalised float32 (T, 69, H, W)."""
    v = normalizer.normalize(states.values.astype(np.float32, copy=False))
    v = np.ascontiguousarray(v, dtype=np.float32)
    if not np.all(np.isfinite(v)):
        raise InputError("normalised states hold NaN or inf; check the data and its statistics")
    return v


def consecutive_starts(times: np.ndarray, n_frames: int, step: np.timedelta64 = SIX_HOURS) -> np.ndarray:
    """Indices ``i`` such that ``times[i + k] == times[i] + k · step`` for ``k < n_frames``.

    ``times`` (T,) datetime64 ascending. Returns int64 (S,), possibly empty.
    """
    t = np.asarray(times, dtype="datetime64[ns]")
    n = len(t) - n_frames + 1
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    ok = np.ones(n, dtype=bool)
    st = np.timedelta64(step, "ns")
    for k in range(1, n_frames):
        ok &= (t[k : k + n] - t[:n]) == k * st
    return np.flatnonzero(ok).astype(np.int64)


class FrameDataset(Dataset):
    """Single normalised frames: item ``i`` -> ``(69, H, W)`` tensor."""

    def __init__(self, values: np.ndarray):
        if values.ndim != 4:
            raise InputError(f"frames must be (T, 69, H, W), got {values.shape}")
        if len(values) == 0:
            raise InputError("no frames to train on; check the time range of the split")
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.values[i], dtype=np.float32))

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor]:
        """``(B, 69, H, W)``."""
        return (torch.from_numpy(np.ascontiguousarray(self.values[np.asarray(idx)], dtype=np.float32)),)


class SequenceDataset(Dataset):
    """``n_frames`` consecutive 6-hourly normalised frames: item -> ``(n_frames, 69, H, W)``."""

    def __init__(self, values: np.ndarray, times: np.ndarray, n_frames: int = 3):
        if values.ndim != 4 or len(values) != len(times):
            raise InputError(f"values {values.shape} and times ({len(times)}) do not match")
        self.values = values
        self.n_frames = int(n_frames)
        self.starts = consecutive_starts(times, self.n_frames)
        if len(self.starts) == 0:
            raise InputError(
                f"no {self.n_frames} consecutive 6-hourly frames in the split "
                f"({len(times)} times); widen its time range"
            )

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        s = int(self.starts[i])
        return torch.from_numpy(np.array(self.values[s : s + self.n_frames], dtype=np.float32))

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, ...]:
        """One tensor ``(B, 69, H, W)`` per frame, oldest first."""
        s = self.starts[np.asarray(idx)]
        return tuple(
            torch.from_numpy(np.ascontiguousarray(self.values[s + k], dtype=np.float32))
            for k in range(self.n_frames)
        )


class LatentPairDataset(Dataset):
    """``(z, z_b)``: standardised latents ``(C, h, w)`` of the truth and of the background."""

    def __init__(self, z: np.ndarray, z_b: np.ndarray):
        if z.shape != z_b.shape or z.ndim != 4:
            raise InputError(f"latents {z.shape} and background latents {z_b.shape} must match (N, C, h, w)")
        if len(z) == 0:
            raise InputError("no (truth, background) latent pairs to train on")
        self.z, self.z_b = z, z_b

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(np.array(self.z[i], dtype=np.float32)),
                torch.from_numpy(np.array(self.z_b[i], dtype=np.float32)))

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(idx)
        return (torch.from_numpy(np.ascontiguousarray(self.z[idx], dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(self.z_b[idx], dtype=np.float32)))


def draw_indices(n: int, batch_size: int, seed: int, step: int, rank: int = 0) -> np.ndarray:
    """The batch indices of optimiser step ``step`` on worker ``rank``: ``batch_size`` draws
    without replacement from ``range(n)`` (with replacement when ``n < batch_size``).

    A function of ``(seed, step, rank)`` only, so a run resumed at step ``k`` sees the batches it
    would have seen without the interruption, and the workers of a DDP run see different ones.
    """
    rng = np.random.default_rng([int(seed), int(rank), int(step)])
    return rng.choice(n, size=batch_size, replace=n < batch_size)


def fixed_subset(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``min(n, size)`` sorted indices of ``range(n)``, spread evenly (validation subsets)."""
    if size >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, size).round().astype(np.int64))


@torch.no_grad()
def encode_all(codec, values: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Standardised latents ``(T, C, h, w)`` float32 of normalised fields ``(T, 69, H, W)``."""
    codec.eval()
    out = [codec.encode(torch.from_numpy(np.ascontiguousarray(values[i:i + batch_size]))).numpy()
           for i in range(0, len(values), batch_size)]
    return np.concatenate(out).astype(np.float32)


def latent_pairs(codec, truth: States, truth_norm: np.ndarray, bg: States, normalizer: Normalizer):
    """``(z, z_b)``, each ``(N, C, h, w)`` float32, of the truth (``truth_norm`` ``(T, 69, H, W)``
    normalised, at the times of ``truth``) and of the background ``bg`` (physical) at every
    background time."""
    idx = np.searchsorted(truth.times, bg.times)
    if not np.array_equal(truth.times[np.minimum(idx, len(truth) - 1)], bg.times):
        raise InputError("background times are not all in the truth; recompute the backgrounds")
    z = encode_all(codec, truth_norm[idx])
    zb = encode_all(codec, np.ascontiguousarray(normalizer.normalize(bg.values), dtype=np.float32))
    return z, zb
