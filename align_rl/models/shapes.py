"""What the networks' sizes must satisfy, as messages naming the full config key (no torch).

Checked by :func:`align_rl.config.validate` before any work, and again by the model builders
(:func:`align_rl.models.vae.build_vae`, :func:`align_rl.models.dit.build_dit`):

- the VAE (docs/method.md §2): ``vae.patch`` divides the grid ``H x W``; ``vae.window`` (in tokens)
  divides the token grid ``(H/p) x (W/p)``; ``vae.embed_dim`` is divisible by ``vae.heads``;
  the latent is ``(vae.latent_channels, H/p, W/p)``;
- the score model: ``diffusion.patch`` divides the latent ``h x w``; ``diffusion.embed_dim`` is
  divisible by ``diffusion.heads`` and at least a patch token's ``C·p²`` values (below that the
  tokens lose information and the denoising loss stalls).
"""

from __future__ import annotations

from typing import Any


def _get(c: Any, key: str) -> Any:
    return c[key] if isinstance(c, dict) else getattr(c, key)


def _divisors(n: int, limit: int = 8) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def vae_problems(c: Any, grid: tuple[int, int]) -> list[str]:
    """Problems of the ``vae`` section ``c`` (dataclass or dict) on the grid ``(H, W)``."""
    H, W = (int(v) for v in grid)
    p, win = int(_get(c, "patch")), int(_get(c, "window"))
    D, heads = int(_get(c, "embed_dim")), int(_get(c, "heads"))
    out: list[str] = []
    if p < 1 or H % p or W % p:
        ok = [d for d in _divisors(H) if W % d == 0]
        out.append(f"vae.patch={p} does not divide the grid {H}x{W} (data.grid); use a divisor "
                   f"such as {ok[-1] if ok else 1}")
    else:
        h, w = H // p, W // p
        if win < 1 or h % win or w % win:
            ok = [d for d in _divisors(h) if w % d == 0]
            out.append(f"vae.window={win} does not divide the {h}x{w} token grid ({H}x{W} / "
                       f"vae.patch {p}); choose a window that divides {h} and {w}, e.g. {ok[-1]}")
    if heads >= 1 and D % heads:
        out.append(f"vae.embed_dim={D} is not divisible by vae.heads={heads} (each attention head "
                   f"takes embed_dim / heads channels); use heads among "
                   f"{', '.join(map(str, _divisors(D, 32)))}")
    return out


def vae_latent_shape(c: Any, grid: tuple[int, int]) -> tuple[int, int, int]:
    """``(C, h, w)`` of the latent of the ``vae`` section ``c`` on the grid ``(H, W)``."""
    p = int(_get(c, "patch"))
    return int(_get(c, "latent_channels")), int(grid[0]) // p, int(grid[1]) // p


def dit_problems(c: Any, latent_shape: tuple[int, int, int]) -> list[str]:
    """Problems of the ``diffusion`` section ``c`` (dataclass or dict) on latents ``(C, h, w)``."""
    C, h, w = (int(v) for v in latent_shape)
    p, D, heads = int(_get(c, "patch")), int(_get(c, "embed_dim")), int(_get(c, "heads"))
    out: list[str] = []
    if p < 1 or h % p or w % p:
        out.append(f"diffusion.patch={p} does not divide the latent {h}x{w} (data.grid / vae.patch); "
                   "use 1 or 2")
    if heads >= 1 and D % heads:
        out.append(f"diffusion.embed_dim={D} is not divisible by diffusion.heads={heads}; use heads "
                   f"among {', '.join(map(str, _divisors(D, 32)))}")
    if p >= 1 and D < C * p * p:
        need = C * p * p
        out.append(f"diffusion.embed_dim={D} is smaller than a patch token's {C}·{p}² = {need} values "
                   f"(vae.latent_channels · diffusion.patch²): the score model cannot represent its "
                   f"input; use diffusion.embed_dim >= {need} (divisible by diffusion.heads)")
    return out
