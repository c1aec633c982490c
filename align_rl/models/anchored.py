"""Background-anchored decoding: analyses decode as increments on their background.

A plain latent analysis is ``x_a = D(z_a)``: every analysis carries the codec's full reconstruction
error, even where the observations and the prior agree with the background. Anchored decoding
adds only the decoded *change* to the background (``docs/method.md`` §4):

    x_a = x_b + D(z_a) − D(z_b),      z_b = E(x_b)

so ``z_a = z_b`` gives back ``x_b`` exactly, and what the decoder gets wrong in both ``D(z_a)`` and
``D(z_b)`` (the small scales it cannot represent, systematic biases) cancels. Only the increment
``D(z_a) − D(z_b)`` goes through the codec. The inverse map is ``Ẽ(x) = E(x − x_b + D(z_b))``, so
``Ẽ(D̃(z)) = E(D(z))`` as for the plain codec.

:class:`AnchoredCodec` wraps a :class:`~align_rl.models.vae.LatentCodec` for one batch of
backgrounds; it has the codec's ``encode``/``decode``/``latent_shape`` and works for any number of
rows that is a multiple of the backgrounds, background-major (row ``b·N + n`` belongs to background
``b``), which is how the sampler and the guidance lay out ensemble members.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError

DECODINGS = ("anchored", "plain")


class AnchoredCodec:
    """``decode(z) = D(z) + (x_b − D(E(x_b)))``, ``encode(x) = E(x − (x_b − D(E(x_b))))``.

    ``codec``: fields ``(·, 69, H, W)`` normalised ↔ standardised latents ``(·, C, h, w)``;
    ``x_b``: the backgrounds ``(B, 69, H, W)`` normalised. ``offset = x_b − D(E(x_b))`` (the
    background's own reconstruction error) is computed once, without gradient.
    """

    def __init__(self, codec: Any, x_b: torch.Tensor) -> None:
        if x_b.ndim != 4:
            raise InputError(f"backgrounds must be (B, 69, H, W) normalised, got {tuple(x_b.shape)}")
        self.codec = codec
        with torch.no_grad():
            self.z_b = codec.encode(x_b)
            self.offset = (x_b - codec.decode(self.z_b)).detach()

    @property
    def latent_shape(self):
        return self.codec.latent_shape

    def parameters(self):
        return self.codec.parameters()

    def _rows(self, like: torch.Tensor) -> torch.Tensor:
        B, M = self.offset.shape[0], like.shape[0]
        if M % B:
            raise InputError(f"{M} rows cannot be laid out over {B} backgrounds (background-major)")
        off = self.offset.to(device=like.device, dtype=like.dtype)
        return off.repeat_interleave(M // B, dim=0) if M != B else off

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised latents ``(M, C, h, w)`` → normalised fields ``x_b + D(z) − D(z_b)``."""
        x = self.codec.decode(z)
        return x + self._rows(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised fields ``(M, 69, H, W)`` → standardised latents ``E(x − offset)``."""
        return self.codec.encode(x - self._rows(x))


def decoder_for(codec: Any, x_b: torch.Tensor, decoding: str) -> Any:
    """The codec that analyses of the backgrounds ``x_b`` decode with (``anchored`` | ``plain``)."""
    if decoding == "plain":
        return codec
    if decoding == "anchored":
        return AnchoredCodec(codec, x_b)
    from ..errors import ConfigError

    raise ConfigError(f"sampler.decode={decoding!r} is not one of {', '.join(DECODINGS)}")
