"""Synthetic sparse observations ``y = m ⊙ (x + e)`` (docs/method.md §3), in normalised units.

- The mask ``m`` is Bernoulli with density ``p``: per channel and grid point (``mode="point"``) or
  per grid point for all 69 channels at once (``mode="column"``).
- The noise ``e ~ N(0, σ_o²)`` (normalised units) is drawn everywhere and kept only where observed.
- The observation-error covariance is ``R = max(σ_o², r_floor) · I``: the floor keeps the
  guidance finite when σ_o = 0.
The observation operator is ``H(x) = m ⊙ x`` (:class:`MaskOperator`); guidance modules accept any
callable of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from align_rl.errors import ConfigError, InputError
from align_rl.io.schema import N_CHANNELS


class MaskOperator:
    """``H(x) = mask ⊙ x`` for ``x`` (B, 69, H, W), or (B, N, 69, H, W) with one mask per batch row."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask
        if x.ndim == m.ndim + 1:  # an ensemble axis after the batch axis
            m = m.unsqueeze(1)
        return m * x

    def to(self, device) -> "MaskOperator":
        return MaskOperator(self.mask.to(device))


@dataclass
class Observations:
    """Observations of a batch of states, normalised units.

    ``values`` (B, 69, H, W): ``m ⊙ (x + e)``, zeros where unobserved; ``mask`` (B, 69, H, W) float
    {0, 1}; ``sigma_o``: noise std; ``r_floor``: floor on the variance of ``R``.
    """

    values: torch.Tensor
    mask: torch.Tensor
    sigma_o: float = 0.0
    r_floor: float = 1e-2

    def __post_init__(self) -> None:
        if self.values.shape != self.mask.shape:
            raise InputError(f"observation values {tuple(self.values.shape)} and mask "
                             f"{tuple(self.mask.shape)} differ in shape")
        if self.values.ndim != 4 or self.values.shape[1] != N_CHANNELS:
            raise InputError(f"observations must be (B, 69, H, W), got {tuple(self.values.shape)}")

    @property
    def variance(self) -> float:
        """Diagonal of ``R``: ``max(σ_o², r_floor)`` (normalised units squared)."""
        return max(float(self.sigma_o) ** 2, float(self.r_floor))

    @property
    def operator(self) -> MaskOperator:
        return MaskOperator(self.mask)

    def __len__(self) -> int:
        return self.values.shape[0]

    def __getitem__(self, idx) -> "Observations":
        """Rows of the batch (an int keeps the batch axis)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        return Observations(self.values[idx], self.mask[idx], self.sigma_o, self.r_floor)

    def to(self, device) -> "Observations":
        return Observations(self.values.to(device), self.mask.to(device), self.sigma_o, self.r_floor)

    def repeat_interleave(self, n: int) -> "Observations":
        """Each row repeated ``n`` times (B·n rows), to pair with N ensemble members per background."""
        return Observations(self.values.repeat_interleave(n, dim=0),
                            self.mask.repeat_interleave(n, dim=0), self.sigma_o, self.r_floor)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """``y − H(x)`` for ``x`` (B, 69, H, W) or (B, N, 69, H, W)."""
        hx = self.operator(x)
        y = self.values.unsqueeze(1) if x.ndim == self.values.ndim + 1 else self.values
        return y - hx

    @property
    def fraction(self) -> float:
        """Observed fraction of (channel, point) entries."""
        return float(self.mask.float().mean())


def make_observations(
    truth,
    density: float,
    sigma_o: float = 0.0,
    mode: str = "point",
    r_floor: float = 1e-2,
    generator: torch.Generator | None = None,
) -> Observations:
    """Observations of ``truth`` (B, 69, H, W) normalised (torch or numpy).

    Randomness is drawn on the generator's device (CPU when none) and moved to ``truth``'s, so a
    seed gives the same observations on every device.
    """
    if not 0.0 < float(density) <= 1.0:
        raise ConfigError(f"observation density {density} must lie in (0, 1] (obs.density)")
    if float(sigma_o) < 0:
        raise ConfigError(f"observation noise sigma_o={sigma_o} must be >= 0 (obs.sigma_o)")
    if float(r_floor) <= 0:
        raise ConfigError(f"r_floor={r_floor} must be > 0 (obs.r_floor)")
    if mode not in ("point", "column"):
        raise ConfigError(f"observation mode {mode!r} must be 'point' or 'column' (obs.mode)")
    x = truth if isinstance(truth, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(truth, dtype=np.float32))
    if x.ndim != 4 or x.shape[1] != N_CHANNELS:
        raise InputError(f"truth must be (B, 69, H, W), got {tuple(x.shape)}")
    B, C, H, W = x.shape
    gdev = generator.device if generator is not None else torch.device("cpu")
    mshape = (B, C, H, W) if mode == "point" else (B, 1, H, W)
    u = torch.rand(mshape, generator=generator, device=gdev, dtype=torch.float32)
    mask = (u < float(density)).to(x.dtype).to(x.device).expand(B, C, H, W).contiguous()
    if sigma_o > 0:
        e = float(sigma_o) * torch.randn((B, C, H, W), generator=generator, device=gdev,
                                         dtype=torch.float32).to(dtype=x.dtype, device=x.device)
    else:
        e = torch.zeros_like(x)
    values = mask * (x + e)
    return Observations(values, mask, float(sigma_o), float(r_floor))


def observations_from_config(truth, obs_cfg, generator: torch.Generator | None = None) -> Observations:
    """:func:`make_observations` with the ``obs`` section of the config."""
    return make_observations(truth, obs_cfg.density, obs_cfg.sigma_o, obs_cfg.mode,
                             obs_cfg.r_floor, generator)
