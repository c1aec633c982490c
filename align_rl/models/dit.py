"""Background-conditioned latent score model ``ε_θ(z_t, t, z_b)`` (DiT; docs/method.md §4, §5).

``z_t (B, C, h, w)`` → (2, 2) patches → tokens ``(B, h/2 · w/2, D)`` + learned latitude / longitude
embeddings. The background latent ``z_b`` is patchified the same way by its own embedding and
enters every block by **cross-attention** (tokens of ``z_b`` as keys and values). The diffusion
time enters by a sinusoidal embedding → MLP → adaLN-Zero modulation (shift, scale, gate) of the
self-attention and MLP sub-blocks, as in DiT. Block: ``x += g₁·SA(mod(LN x))``,
``x += CA(LN x, z_b)``, ``x += g₂·MLP(mod(LN x))``. Output: adaLN final layer, linear to the
``2 · 2 · C`` values of each patch, zero-initialised.

Output skip (``eps_skip``): ``ε̂ = σ (z_t − μ a z_b) / (μ² s² + σ²) + F_θ``, the first term being
``E[ε | z_t]`` when ``z_0 ~ N(a z_b, s² I)``: ``background`` (default) takes ``a = 1`` and ``s²`` the
per-channel latent background error of the training pairs (buffer ``skip_var``, set by
:meth:`LatentDiT.set_skip_var`), ``gaussian`` ``a = 0, s² = 1``, ``none`` no skip. The network
learns a residual and ε̂ is that Gaussian optimum at initialisation. Without a skip the final LayerNorm makes ε̂'s size
independent of ``z_t``'s: a sampler that drifts off the data (an early ε error is amplified by
``μ(t−Δ)/μ(t)``, up to 6× per step near t = 1) is never pulled back, and its latents grew to a
variance of ~1000 with the trained demo model (``bench/bench_sampler.py --trained``). With the
skip, ``∂ε̂/∂z_t ≈ σ`` and each DDIM step contracts (``μ_s μ_t + σ_s σ_t ≤ 1``).

Also :func:`dsm_loss`, denoising score matching ``E‖ε_θ(μ z + σ ε, t, z_b) − ε‖²``, ``t ~ U(0, 1)``.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, is_dataclass
from typing import Any

import torch
from torch import nn

from align_rl.diffusion.schedule import add_noise, mu, sigma
from align_rl.errors import ConfigError, InputError
from align_rl.models.layers import CrossAttention, GridPosEmbed, Mlp, SelfAttention, timestep_embedding


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention + cross-attention to the background + MLP; ``22D² + 21D`` params."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = SelfAttention(dim, heads)
        self.norm_ca = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = Mlp(dim, mlp_ratio)
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.ada(torch.nn.functional.silu(c)).chunk(6, dim=-1)
        x = x + g1[:, None] * self.attn(_modulate(self.norm1(x), s1, sc1))
        x = x + self.cross(self.norm_ca(x), ctx)
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), s2, sc2))


class LatentDiT(nn.Module):
    """``forward(z_t (B,C,h,w), t (B,) in [0,1], z_b (B,C,h,w)) -> ε̂ (B,C,h,w)``; latents are the
    standardised latents of :class:`~align_rl.models.vae.LatentCodec`."""

    def __init__(self, latent_shape: tuple[int, int, int], patch: int = 2, embed_dim: int = 192,
                 depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0,
                 background_skip: bool = False, eps_skip: str | bool = "background"):
        super().__init__()
        self.eps_skip = _skip_mode(eps_skip)
        C, h, w = (int(v) for v in latent_shape)
        self.latent_shape = (C, h, w)
        self.patch = p = int(patch)
        self.th, self.tw = h // p, w // p
        D = embed_dim
        self.embed_dim = D
        if self.eps_skip == "background":
            self.register_buffer("skip_var", torch.ones(C))
        self.x_embed = nn.Linear(C * p * p, D)
        self.b_embed = nn.Linear(C * p * p, D)
        self.x_pos = GridPosEmbed(self.th, self.tw, D)
        self.b_pos = GridPosEmbed(self.th, self.tw, D)
        self.b_norm = nn.LayerNorm(D)
        self.background_skip = bool(background_skip)
        if self.background_skip:
            self.skip = nn.Linear(C * p * p, D)
        self.t_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList(DiTBlock(D, heads, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False)
        self.final_ada = nn.Linear(D, 2 * D)
        self.out = nn.Linear(D, C * p * p)
        for lin in (self.final_ada, self.out):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _tokens(self, z: torch.Tensor) -> torch.Tensor:
        b, C, h, w = z.shape
        p = self.patch
        z = z.reshape(b, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return z.reshape(b, h // p, w // p, C * p * p)

    def _untokens(self, tok: torch.Tensor) -> torch.Tensor:
        b = tok.shape[0]
        C, h, w = self.latent_shape
        p = self.patch
        tok = tok.reshape(b, h // p, w // p, C, p, p).permute(0, 3, 1, 4, 2, 5)
        return tok.reshape(b, C, h, w)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        for name, z in (("z_t", z_t), ("z_b", z_b)):
            if z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
                raise InputError(
                    f"{name} must be (B, {', '.join(map(str, self.latent_shape))}), got {tuple(z.shape)}"
                )
        b = z_t.shape[0]
        t = torch.as_tensor(t, dtype=z_t.dtype, device=z_t.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,) or z_b.shape[0] != b:
            raise InputError(f"t {tuple(t.shape)} and z_b {tuple(z_b.shape)} must match a batch of {b}")
        x = self.x_embed(self._tokens(z_t))
        if self.background_skip:
            x = x + self.skip(self._tokens(z_b))
        x = self.x_pos(x).flatten(1, 2)
        ctx = self.b_norm(self.b_pos(self.b_embed(self._tokens(z_b))).flatten(1, 2))
        c = self.t_mlp(timestep_embedding(t, self.embed_dim).to(z_t.dtype))
        for blk in self.blocks:
            x = blk(x, c, ctx)
        shift, scale = self.final_ada(torch.nn.functional.silu(c)).chunk(2, dim=-1)
        x = self.out(_modulate(self.final_norm(x), shift, scale))
        eps = self._untokens(x.reshape(b, self.th, self.tw, -1))
        if self.eps_skip == "none":
            return eps
        m, s = mu(t)[:, None, None, None], sigma(t)[:, None, None, None]
        if self.eps_skip == "gaussian":
            return eps + s / (m * m + s * s) * z_t
        var = self.skip_var.to(z_t.dtype)[None, :, None, None]
        return eps + s * (z_t - m * z_b) / (m * m * var + s * s)

    @torch.no_grad()
    def set_skip_var(self, var) -> None:
        """Set the background skip's per-channel latent error variance ``s²`` (C,), > 0."""
        v = torch.as_tensor(var, dtype=torch.float32).reshape(-1)
        if self.eps_skip != "background":
            raise ConfigError(f"set_skip_var needs diffusion.eps_skip=background, not {self.eps_skip!r}")
        if v.shape != self.skip_var.shape or not bool(torch.all(torch.isfinite(v) & (v > 0))):
            raise InputError(f"skip_var must hold {self.skip_var.numel()} positive finite values")
        self.skip_var.copy_(v.clamp_min(1e-4))


def build_dit(diff_cfg: Any, latent_shape: tuple[int, int, int]) -> LatentDiT:
    """The score model of a ``diffusion`` config section (dataclass or dict) for latents
    ``(C, h, w)``; ConfigError when the latent does not divide into patches."""
    c = asdict(diff_cfg) if is_dataclass(diff_cfg) else dict(diff_cfg)
    C, h, w = (int(v) for v in latent_shape)
    p, D, heads = int(c["patch"]), int(c["embed_dim"]), int(c["heads"])
    if p < 1 or h % p or w % p:
        raise ConfigError(f"diffusion.patch={p} does not divide the latent {h}x{w}; use 1 or 2")
    if D % heads:
        raise ConfigError(f"diffusion.embed_dim={D} is not divisible by diffusion.heads={heads}")
    if int(c["depth"]) < 1:
        raise ConfigError("diffusion.depth must be >= 1")
    if D < C * p * p:
        warnings.warn(
            f"diffusion.embed_dim={D} is smaller than a patch token's {C}·{p}² = {C * p * p} values: "
            "the score model cannot represent its input and its denoising loss stalls; "
            f"use diffusion.embed_dim >= {C * p * p}", stacklevel=2)
    return LatentDiT((C, h, w), patch=p, embed_dim=D, depth=int(c["depth"]), heads=heads,
                     mlp_ratio=float(c.get("mlp_ratio", 4.0)),
                     background_skip=bool(c.get("background_skip", False)),
                     eps_skip=c.get("eps_skip", "none"))  # a checkpoint without the key: none


def _skip_mode(v: str | bool) -> str:
    """``eps_skip`` as a mode; ``True``/``False`` (early checkpoints) read as gaussian/none."""
    if isinstance(v, bool):
        return "gaussian" if v else "none"
    if v not in ("background", "gaussian", "none"):
        raise ConfigError(f"diffusion.eps_skip={v!r} must be background, gaussian or none")
    return str(v)


def background_error_var(z: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of ``(z − z_b)²`` over samples and positions: ``(C,)`` (for ``skip_var``)."""
    z, z_b = torch.as_tensor(z), torch.as_tensor(z_b)
    return ((z.double() - z_b.double()) ** 2).mean(dim=(0, 2, 3)).float()


def dsm_loss(model, z0: torch.Tensor, z_b: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Denoising score matching ``mean ‖ε_θ(μ(t) z0 + σ(t) ε, t, z_b) − ε‖²`` (mean over batch and
    latent elements), ``t ~ U(0, 1)`` per sample, ``ε ~ N(0, I)``; ``z0``, ``z_b`` ``(B, C, h, w)``."""
    b = z0.shape[0]
    t = torch.rand(b, generator=generator, device=z0.device, dtype=z0.dtype)
    eps = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    z_t = add_noise(z0, t, eps)
    return torch.mean((model(z_t, t, z_b) - eps) ** 2)
