"""Background-anchored decoding: analyses decode as increments on their background.

A plain latent analysis is ``x_a = D(z_a)``: every analysis carries the codec's full reconstruction
error, even where the observations and the prior agree with the background. Anchored decoding
adds only the decoded *change* to the background (``docs/method.md`` §4):

    x_a = x_b + D(z_a) − D(z_b),      z_b = E(x_b)

so ``z_a = z_b`` gives back ``x_b`` exactly, and what the decoder gets wrong in both ``D(z_a)`` and
``D(z_b)`` (the small scales it cannot represent, systematic biases) cancels. Only the increment
``D(z_a) − D(z_b)`` goes through the codec. The inverse map is ``Ẽ(x) = E(x − x_b + D(z_b))``, so
``Ẽ(D̃(z)) = E(D(z))`` as for the plain codec.

How much of the background's reconstruction error to carry over depends on the codec: the two
errors ``e(x) = x − D(E(x))`` and ``e(x_b)`` are strongly correlated for a codec whose errors are
systematic (measured on the demo world: correlation ~0.6 after 1,000 VAE steps) and weakly for a
good one (~0.25 after 3,000 steps, where the full correction doubles the error it should remove).
So the carried-over error is weighted per channel, ``x_a = D(z_a) + α ⊙ (x_b − D(z_b))`` with
``α_c = Σ e_c(x) e_c(x_b) / Σ e_c(x_b)²`` (clipped to [0, 1]), the least-squares weight over
training pairs (:func:`fit_anchor_weights`): ``α = 1`` is the full anchoring above, ``α = 0``
plain decoding. A codec carries its weights as ``codec.anchor_weights`` ((69,); 1 when absent).

:class:`AnchoredCodec` wraps a :class:`~align_rl.models.vae.LatentCodec` for one batch of
backgrounds; it has the codec's ``encode``/``decode``/``latent_shape`` and works for any number of
rows that is a multiple of the backgrounds, background-major (row ``b·N + n`` belongs to background
``b``), which is how the sampler and the guidance lay out ensemble members.
"""

from __future__ import annotations

from typing import Any

import torch

from align_rl.errors import ConfigError, InputError

DECODINGS = ("anchored", "plain")


class AnchoredCodec:
    """``decode(z) = D(z) + offset``, ``encode(x) = E(x − offset)``,
    ``offset = α ⊙ (x_b − D(E(x_b)))``.

    ``codec``: fields ``(·, 69, H, W)`` normalised ↔ standardised latents ``(·, C, h, w)``;
    ``x_b``: the backgrounds ``(B, 69, H, W)`` normalised; ``alpha`` (69,) per-channel weights
    (default ``codec.anchor_weights``, else 1). The offset (the background's own reconstruction
    error, weighted) is computed once, without gradient.
    """

    def __init__(self, codec: Any, x_b: torch.Tensor, alpha: torch.Tensor | None = None) -> None:
        if x_b.ndim != 4:
            raise InputError(f"backgrounds must be (B, 69, H, W) normalised, got {tuple(x_b.shape)}")
        self.codec = codec
        alpha = getattr(codec, "anchor_weights", None) if alpha is None else alpha
        with torch.no_grad():
            self.z_b = codec.encode(x_b)
            self.offset = (x_b - codec.decode(self.z_b)).detach()
            if alpha is not None:
                a = torch.as_tensor(alpha, dtype=self.offset.dtype, device=self.offset.device)
                self.offset = self.offset * a.reshape(1, -1, 1, 1)

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

    raise ConfigError(f"sampler.decode={decoding!r} is not one of {', '.join(DECODINGS)}")


@torch.no_grad()
def fit_anchor_weights(codec: Any, truth: torch.Tensor, x_b: torch.Tensor,
                       batch_size: int = 32) -> torch.Tensor:
    """Least-squares per-channel weights ``α`` (69,) of the background's reconstruction error in
    anchored decoding: ``α_c = Σ e_c(x) e_c(x_b) / Σ e_c(x_b)²`` over the pairs (``truth``,
    ``x_b``), each ``(T, 69, H, W)`` normalised, clipped to [0, 1] (float64 sums)."""
    num = torch.zeros(truth.shape[1], dtype=torch.float64)
    den = torch.zeros_like(num)
    for i in range(0, truth.shape[0], batch_size):
        x, xb = truth[i:i + batch_size], x_b[i:i + batch_size]
        both = torch.cat([x, xb])
        e = (both - codec.decode(codec.encode(both))).double()
        ex, eb = e[: len(x)], e[len(x):]
        num += (ex * eb).sum(dim=(0, 2, 3))
        den += (eb * eb).sum(dim=(0, 2, 3))
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(num)).clamp(0.0, 1.0).float()
