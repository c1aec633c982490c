"""Transformer VAE of the 69 normalised fields (VAEformer-like; docs/method.md §4).

``(B, 69, H, W)`` normalised → 4 × 4 patch embedding → ``depth`` window-attention blocks (Swin
style, every second block with windows shifted by half a window) → per-token linear head →
posterior mean and log-variance ``(B, C, H/4, W/4)``; the decoder mirrors it (linear token
embedding of the latent, ``depth`` window blocks, linear head to the 4 × 4 × 69 pixels of each
patch). Periodicity in longitude: the shifted windows are a cyclic roll of the token grid, so
windows wrap across the date line (no mask in longitude); rows carried across the poles by the
roll are masked out. Positions: a learned embedding per latitude row plus one per longitude
column. Paper preset: 69 × 128 × 256 → 69 × 32 × 64, embedding 1024, 24 blocks each way.

:class:`LatentCodec` standardises the latent per channel, ``z = (mean_E(x) − m) / s``, which is the
space the diffusion model works in.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, Iterable

import torch
from torch import nn

from align_rl.errors import ConfigError, InputError
from align_rl.io.grid import Grid
from align_rl.io.schema import N_CHANNELS
from align_rl.models.layers import GridPosEmbed, WindowBlock

LOGVAR_RANGE = (-30.0, 20.0)


class FieldVAE(nn.Module):
    """VAE ``(B, 69, H, W)`` normalised ↔ latent ``(B, C, H/p, W/p)``.

    ``grid``: ``(H, W)``; ``patch`` p; ``latent_channels`` C; ``embed_dim`` D; ``depth`` blocks in the
    encoder and again in the decoder; ``window`` in tokens.
    """

    def __init__(self, grid: tuple[int, int], latent_channels: int = 69, patch: int = 4,
                 embed_dim: int = 128, depth: int = 4, heads: int = 4, window: int = 4,
                 in_channels: int = N_CHANNELS, mlp_ratio: float = 4.0):
        super().__init__()
        H, W = int(grid[0]), int(grid[1])
        self.grid = (H, W)
        self.patch = p = int(patch)
        self.in_channels = in_channels
        self.latent_channels = C = int(latent_channels)
        self.h, self.w = H // p, W // p
        D = embed_dim
        self.patch_embed = nn.Conv2d(in_channels, D, kernel_size=p, stride=p)
        self.enc_pos = GridPosEmbed(self.h, self.w, D)
        self.enc_blocks = nn.ModuleList(
            WindowBlock(D, heads, self.h, self.w, window, shifted=bool(i % 2), mlp_ratio=mlp_ratio)
            for i in range(depth)
        )
        self.enc_norm = nn.LayerNorm(D)
        self.to_moments = nn.Linear(D, 2 * C)
        self.from_latent = nn.Linear(C, D)
        self.dec_pos = GridPosEmbed(self.h, self.w, D)
        self.dec_blocks = nn.ModuleList(
            WindowBlock(D, heads, self.h, self.w, window, shifted=bool(i % 2), mlp_ratio=mlp_ratio)
            for i in range(depth)
        )
        self.dec_norm = nn.LayerNorm(D)
        self.to_pixels = nn.Linear(D, in_channels * p * p)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)``."""
        return (self.latent_channels, self.h, self.w)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != self.grid:
            raise InputError(
                f"VAE expects fields (B, {self.in_channels}, {self.grid[0]}, {self.grid[1]}), got "
                f"{tuple(x.shape)}; regrid the data or build the VAE for this grid"
            )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``x (B, 69, H, W)`` -> posterior ``(mean, logvar)``, each ``(B, C, h, w)``."""
        self._check(x)
        tok = self.patch_embed(x).permute(0, 2, 3, 1)  # (B, h, w, D)
        tok = self.enc_pos(tok)
        for blk in self.enc_blocks:
            tok = blk(tok)
        mom = self.to_moments(self.enc_norm(tok)).permute(0, 3, 1, 2)
        mean, logvar = mom.chunk(2, dim=1)
        return mean.contiguous(), logvar.clamp(*LOGVAR_RANGE).contiguous()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``z (B, C, h, w)`` (unstandardised) -> normalised fields ``(B, 69, H, W)``."""
        if z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise InputError(
                f"VAE decoder expects latents (B, {', '.join(map(str, self.latent_shape))}), "
                f"got {tuple(z.shape)}"
            )
        tok = self.from_latent(z.permute(0, 2, 3, 1))
        tok = self.dec_pos(tok)
        for blk in self.dec_blocks:
            tok = blk(tok)
        pix = self.to_pixels(self.dec_norm(tok))  # (B, h, w, 69 p p)
        b, p = pix.shape[0], self.patch
        pix = pix.reshape(b, self.h, self.w, self.in_channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return pix.reshape(b, self.in_channels, self.h * p, self.w * p)

    def forward(self, x: torch.Tensor, sample: bool | None = None,
                generator: torch.Generator | None = None):
        """``x`` -> ``(recon, mean, logvar)``; the latent is sampled (reparameterised) in training
        mode (or when ``sample=True``), the posterior mean otherwise."""
        mean, logvar = self.encode(x)
        if self.training if sample is None else sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        else:
            z = mean
        return self.decode(z), mean, logvar


def _section(cfg: Any) -> dict[str, Any]:
    if is_dataclass(cfg):
        return asdict(cfg)
    return dict(cfg)


def grid_shape(grid: Any) -> tuple[int, int]:
    if isinstance(grid, Grid):
        return grid.shape
    if isinstance(grid, str):
        return Grid.parse(grid).shape
    return (int(grid[0]), int(grid[1]))


def build_vae(vae_cfg: Any, grid: Any) -> FieldVAE:
    """The VAE of a ``vae`` config section (dataclass or dict) for ``grid`` (Grid, "32x64", (H, W)).

    Raises ConfigError when the grid does not divide into patches and windows.
    """
    c = _section(vae_cfg)
    H, W = grid_shape(grid)
    p, win, D, heads = int(c["patch"]), int(c["window"]), int(c["embed_dim"]), int(c["heads"])
    if p < 1 or H % p or W % p:
        raise ConfigError(f"vae.patch={p} does not divide the grid {H}x{W}; use a divisor such as 4")
    h, w = H // p, W // p
    if win < 1 or h % win or w % win:
        raise ConfigError(
            f"vae.window={win} does not divide the {h}x{w} token grid ({H}x{W} / patch {p}); "
            f"choose a window that divides {h}, e.g. {max(d for d in range(1, h + 1) if h % d == 0 and w % d == 0 and d <= 8)}"
        )
    if D % heads:
        raise ConfigError(f"vae.embed_dim={D} is not divisible by vae.heads={heads}")
    if int(c["depth"]) < 1 or int(c["latent_channels"]) < 1:
        raise ConfigError("vae.depth and vae.latent_channels must be >= 1")
    return FieldVAE((H, W), latent_channels=int(c["latent_channels"]), patch=p, embed_dim=D,
                    depth=int(c["depth"]), heads=heads, window=win,
                    mlp_ratio=float(c.get("mlp_ratio", 4.0)))


def vae_loss(recon: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
             kl_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``MSE(recon, x) + kl_weight · KL`` with both terms means over elements (normalised units);
    KL of ``N(mean, e^logvar)`` against ``N(0, I)``. Returns ``(loss, {"recon", "kl"})`` (parts
    detached)."""
    rec = torch.mean((recon - x) ** 2)
    kl = 0.5 * torch.mean(mean**2 + torch.exp(logvar) - 1.0 - logvar)
    return rec + kl_weight * kl, {"recon": rec.detach(), "kl": kl.detach()}


class LatentCodec(nn.Module):
    """Fields ↔ standardised latents: ``encode(x) = (mean_E(x) − m) / s``, ``decode(z) = D(z s + m)``.

    ``latent_mean``, ``latent_std``: per-channel statistics ``(C,)`` of the posterior means over the
    training set (:func:`fit_latent_stats`). Both directions are differentiable.
    """

    def __init__(self, vae: FieldVAE, latent_mean, latent_std):
        super().__init__()
        self.vae = vae
        C = vae.latent_channels
        m = torch.as_tensor(latent_mean, dtype=torch.float32).reshape(-1)
        s = torch.as_tensor(latent_std, dtype=torch.float32).reshape(-1)
        if m.numel() != C or s.numel() != C:
            raise InputError(f"latent statistics must have {C} entries, got {m.numel()} and {s.numel()}")
        if not torch.all(s > 0) or not torch.all(torch.isfinite(m)):
            raise InputError("latent std must be positive and the mean finite; refit the statistics")
        self.register_buffer("latent_mean", m)
        self.register_buffer("latent_std", s)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.vae.latent_shape

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised fields ``(B, 69, H, W)`` -> standardised latent ``(B, C, h, w)``."""
        mean, _ = self.vae.encode(x)
        return (mean - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised latent ``(B, C, h, w)`` -> normalised fields ``(B, 69, H, W)``."""
        return self.vae.decode(z * self.latent_std[:, None, None] + self.latent_mean[:, None, None])


def _batches(data, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        for i in range(0, data.shape[0], batch_size):
            yield data[i : i + batch_size]
        return
    for item in data:
        if isinstance(item, (tuple, list)):
            item = item[0]
        if isinstance(item, dict):
            item = item["x"]
        yield torch.as_tensor(item)


@torch.no_grad()
def fit_latent_stats(vae: FieldVAE, data, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std ``(C,)`` of the posterior means of ``data``: a tensor
    ``(T, 69, H, W)`` normalised, or an iterable of such batches (or of tuples / dicts with key
    ``x`` whose first item is one). Float64 accumulation."""
    was_training = vae.training
    vae.eval()
    C = vae.latent_channels
    dev = next(vae.parameters()).device
    s1 = torch.zeros(C, dtype=torch.float64)
    s2 = torch.zeros(C, dtype=torch.float64)
    n = 0
    try:
        for xb in _batches(data, batch_size):
            mean, _ = vae.encode(xb.to(dev, torch.float32))
            m = mean.double().cpu()
            s1 += m.sum(dim=(0, 2, 3))
            s2 += (m**2).sum(dim=(0, 2, 3))
            n += m.shape[0] * m.shape[2] * m.shape[3]
    finally:
        vae.train(was_training)
    if n == 0:
        raise InputError("no data to fit the latent statistics; give at least one sample")
    mean = s1 / n
    std = torch.sqrt(torch.clamp(s2 / n - mean**2, min=0.0)).clamp_min(1e-6)
    return mean.float(), std.float()
