"""Transformer blocks shared by the VAE and the DiT.

Tokens live on a 2-D latitude × longitude grid, ``(B, h, w, D)``. Longitude is periodic: shifted
windows are a cyclic roll, which is exact in longitude (no mask), while in latitude the rows that
the roll carries from one pole to the other are masked out (they are not neighbours).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """``Linear(D, rD) → GELU → Linear(rD, D)``; ``8D² + 5D`` parameters at ratio 4."""

    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class GridPosEmbed(nn.Module):
    """Factorised learned position embedding: one vector per latitude row plus one per longitude
    column, ``(h + w) D`` parameters; added to tokens ``(B, h, w, D)``."""

    def __init__(self, h: int, w: int, dim: int):
        super().__init__()
        self.lat = nn.Parameter(torch.zeros(h, 1, dim))
        self.lon = nn.Parameter(torch.zeros(1, w, dim))
        nn.init.trunc_normal_(self.lat, std=0.02)
        nn.init.trunc_normal_(self.lon, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lat + self.lon


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(..., N, D)`` -> ``(..., heads, N, D/heads)``."""
    *lead, n, d = x.shape
    return x.reshape(*lead, n, heads, d // heads).transpose(-3, -2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """``(..., heads, N, d)`` -> ``(..., N, heads d)``."""
    x = x.transpose(-3, -2)
    return x.reshape(*x.shape[:-2], -1)


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``(B, N, D)``; ``4D² + 4D`` parameters."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(
            _heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads), attn_mask=mask
        )
        return self.proj(_merge(out))


class CrossAttention(nn.Module):
    """Queries from ``x (B, N, D)``, keys and values from ``ctx (B, M, D)``; ``4D² + 4D`` params."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(ctx).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(
            _heads(self.q(x), self.heads), _heads(k, self.heads), _heads(v, self.heads)
        )
        return self.proj(_merge(out))


def _lat_shift_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """Boolean mask ``(nW, N, N)`` (True = may attend) for windows of a grid rolled by ``-shift``
    in latitude: tokens that the roll brought across the poles only see each other."""
    region = torch.zeros(h, w, dtype=torch.long)
    if shift > 0:
        region[h - window : h - shift] = 1
        region[h - shift :] = 2
    win = region.reshape(h // window, window, w // window, window).permute(0, 2, 1, 3)
    win = win.reshape(-1, window * window)
    return win[:, :, None] == win[:, None, :]


class WindowBlock(nn.Module):
    """Pre-norm Swin-style block on tokens ``(B, h, w, D)``: window attention (optionally with
    windows shifted by half a window) and an MLP; ``12D² + 13D`` parameters."""

    def __init__(self, dim: int, heads: int, h: int, w: int, window: int, shifted: bool,
                 mlp_ratio: float = 4.0):
        super().__init__()
        if h % window or w % window:
            raise ValueError(f"token grid {h}x{w} is not divisible by the window {window}")
        self.window = window
        self.shift_lon = window // 2 if shifted and w > window else 0
        self.shift_lat = window // 2 if shifted and h > window else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        mask = _lat_shift_mask(h, w, window, self.shift_lat) if self.shift_lat else None
        self.register_buffer("mask", mask, persistent=False)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, d = x.shape
        s = self.window
        if self.shift_lat or self.shift_lon:
            x = torch.roll(x, shifts=(-self.shift_lat, -self.shift_lon), dims=(1, 2))
        win = x.reshape(b, h // s, s, w // s, s, d).permute(0, 1, 3, 2, 4, 5)
        nw = (h // s) * (w // s)
        win = win.reshape(b * nw, s * s, d)
        mask = None
        if self.mask is not None:
            mask = self.mask[None, :, None].expand(b, -1, -1, -1, -1).reshape(b * nw, 1, s * s, s * s)
        out = self.attn(win, mask)
        out = out.reshape(b, h // s, w // s, s, s, d).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, d)
        if self.shift_lat or self.shift_lon:
            out = torch.roll(out, shifts=(self.shift_lat, self.shift_lon), dims=(1, 2))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of diffusion times ``t (B,)`` in [0, 1] (scaled by 1000) -> ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
