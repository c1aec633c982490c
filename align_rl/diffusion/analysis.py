"""One call from a background and observations to an ensemble of analyses (docs/method.md §5, §6).

``analyse(codec, eps_model, x_b, obs, method, sampler_cfg, guidance_cfg, generator)``:
``z_b = E(x_b)`` → ``N`` guided latent samples per background → ``x_a = x_b + D(z_a) − D(z_b)``
(``sampler.decode=anchored``, the default; :mod:`align_rl.models.anchored`) or ``x_a = D(z_a)``
(``plain``, the paper's). The guidance decodes and encodes with the same rule. The sampler
actors of the alignment, the evaluation and the benchmarks all call this function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from align_rl.diffusion.guidance import guidance_method, make_guidance
from align_rl.diffusion.precision import autocast_policy, decode_with, wrap_eps
from align_rl.diffusion.sampler import sample
from align_rl.errors import ConfigError, InputError
from align_rl.models.anchored import AnchoredCodec, decoder_for


@dataclass
class Analysis:
    """``latents`` (B, N, C, h, w) standardised; ``fields`` (B, N, 69, H, W) normalised units."""

    latents: torch.Tensor
    fields: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        """Ensemble-mean field (B, 69, H, W), normalised."""
        return self.fields.mean(dim=1)


def _device_of(module: Any) -> torch.device:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _get(cfg: Any, key: str, default: Any) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def analyse(
    codec: Any,
    eps_model: Any,
    x_b: torch.Tensor,
    obs: Any,
    method: str,
    sampler_cfg: Any,
    guidance_cfg: Any = None,
    generator: torch.Generator | None = None,
    members: int | None = None,
    batch_size: int | None = None,
    autocast: dict | None = None,
    progress: bool = False,
    autocast_guidance: bool | None = None,
) -> Analysis:
    """Analyses of the backgrounds ``x_b`` (B, 69, H, W) normalised given ``obs`` (Observations
    with ``values``/``mask`` (B, 69, H, W) normalised, or PointObservations of B times
    (docs/method.md §3.1); may be None for ``method="obsfree"``).

    ``method``: obsfree | repaint | dps. ``sampler_cfg``: ``steps``, ``corrections``, ``tau``,
    ``members`` (``members`` argument overrides), ``decode`` (anchored | plain; plain when the
    key is absent); ``guidance_cfg``: ``dps_zeta``,
    ``dps_likelihood``, ``dps_gamma``. ``eps_model(z_t, t, z_b)`` is the score network (e.g.
    ``LatentDiT``). ``batch_size``: most backgrounds per sampler call (all when None; every call
    runs ``batch_size · N`` rows). ``autocast``: ``torch.autocast`` kwargs for the network passes
    (default: from ``sampler_cfg.autocast`` on the networks' device, :mod:`.precision`);
    ``autocast_guidance``: DPS's differentiated pass autocasts too (default: ``bf16_dps``; False
    with an explicit ``autocast``). Randomness comes from ``generator`` only; the networks run on
    their device.
    """
    differentiates = guidance_method(method).differentiates  # ConfigError for an unknown name
    if x_b.ndim != 4:
        raise InputError(f"x_b must be (B, 69, H, W) normalised, got {tuple(x_b.shape)}")
    if not torch.isfinite(x_b).all():
        raise InputError("the background holds NaN or inf values; check the background store")
    point = getattr(obs, "is_point", False)
    if obs is not None and not point and obs.values.shape != x_b.shape:
        raise InputError(f"observations {tuple(obs.values.shape)} do not match the backgrounds "
                         f"{tuple(x_b.shape)}")
    if point and (len(obs) != x_b.shape[0] or tuple(obs.field_shape) != tuple(x_b.shape[1:])):
        raise InputError(f"point observations of {len(obs)} times on a {obs.field_shape} grid do "
                         f"not match the backgrounds {tuple(x_b.shape)}")
    n = int(members if members is not None else _get(sampler_cfg, "members", 8))
    steps = int(_get(sampler_cfg, "steps", 32))
    corr = int(_get(sampler_cfg, "corrections", 1))
    tau = float(_get(sampler_cfg, "tau", 0.1))
    decoding = str(_get(sampler_cfg, "decode", "plain"))
    dev = _device_of(codec)
    B = x_b.shape[0]
    bs = B if not batch_size else max(1, int(batch_size))

    if autocast is None:
        autocast, in_grad = autocast_policy(str(_get(sampler_cfg, "autocast", "none")), dev)
    else:
        in_grad = False
    in_grad = bool(autocast) and (in_grad if autocast_guidance is None else bool(autocast_guidance))
    eps_fn = wrap_eps(eps_model, autocast, in_grad)

    lat_out, fld_out = [], []
    for i in range(0, B, bs):
        xb = x_b[i:i + bs].to(dev, torch.float32)
        o = obs[i:i + bs].to(dev) if obs is not None and hasattr(obs, "to") else obs
        extra = {"autocast": autocast} if differentiates and in_grad else {}
        with torch.no_grad():
            dec = decoder_for(codec, xb, decoding)
            z_b = dec.z_b if isinstance(dec, AnchoredCodec) else codec.encode(xb)  # encoded once
        if point and method == "repaint":  # Repaint mixes on grid points only (§6.2)
            o = o.to_grid(xb)
        guidance = make_guidance(method, dec, o, guidance_cfg, **extra)
        z = sample(eps_fn, z_b, n, steps, corr, tau, guidance=guidance, generator=generator,
                   progress=progress)
        with torch.no_grad():
            x = decode_with(dec, z.reshape(-1, *z.shape[2:]), autocast)
            x = x.reshape(z.shape[0], n, *xb.shape[1:])
        lat_out.append(z)
        fld_out.append(x)
    fields = torch.cat(fld_out)
    if not torch.isfinite(fields).all():
        raise InputError(
            f"the {method} analyses hold NaN or inf values; lower guidance.dps_zeta or sampler.tau, "
            "or check the checkpoints"
        )
    return Analysis(torch.cat(lat_out), fields)
