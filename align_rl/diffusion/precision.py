"""Reduced precision of the sampler's network passes (``sampler.autocast``, docs/method.md §5.3).

``none`` (default): everything in float32. ``bf16``: on CUDA, the score network's forward passes
of the predictor and the Langevin corrections and the final decode run under
``torch.autocast("cuda", torch.bfloat16)``; DPS's differentiated pass (ε_θ and the decoder inside
the likelihood gradient) stays float32. ``bf16_dps``: that pass in bf16 too (the fastest; the
gradient then carries bf16 rounding, ~1e-2 relative). Latents, the sampler's update, the
likelihood and its reduction stay float32 in every mode, and so does Diffusion-DPO's loss (the
learner never autocasts). On a CPU the modes are ignored: CPU runs stay float32 and give the
numbers they gave before.
"""

from __future__ import annotations

from typing import Any

import torch

from align_rl.errors import ConfigError

AUTOCAST_MODES = ("none", "bf16", "bf16_dps")


def autocast_policy(mode: str, device: torch.device | str) -> tuple[dict | None, bool]:
    """``(torch.autocast kwargs or None, whether DPS's gradient pass autocasts too)`` for
    ``sampler.autocast=mode`` with the networks on ``device``."""
    if mode not in AUTOCAST_MODES:
        raise ConfigError(f"sampler.autocast={mode!r} is not one of {', '.join(AUTOCAST_MODES)}")
    if mode == "none" or torch.device(device).type != "cuda":
        return None, False
    return {"device_type": "cuda", "dtype": torch.bfloat16}, mode == "bf16_dps"


def wrap_eps(eps_model: Any, autocast: dict | None, in_grad: bool):
    """``eps_fn(z, t, z_b)`` of ``eps_model`` (float32 out): under ``autocast`` when given, and
    inside a gradient computation (DPS) only when ``in_grad``."""
    if not autocast:
        return eps_model

    def eps_fn(z, t, zb):
        if torch.is_grad_enabled() and not in_grad:
            return eps_model(z, t, zb)
        with torch.autocast(**autocast):
            return eps_model(z, t, zb).float()

    return eps_fn


def decode_with(codec: Any, z: torch.Tensor, autocast: dict | None) -> torch.Tensor:
    """``codec.decode(z)`` as float32, under ``autocast`` when given."""
    if not autocast:
        return codec.decode(z)
    with torch.autocast(**autocast):
        return codec.decode(z).float()
