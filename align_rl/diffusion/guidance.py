"""Observation guidance in latent space (docs/method.md §6), applied by the sampler after each step.

A guidance is a callable ``guidance(z (B·N, C, h, w), ctx: StepContext) -> z`` (see
:mod:`align_rl.diffusion.sampler`). Rows are background-major (row ``b·N + n`` is member ``n`` of
background ``b``); the observations hold one row per background and are repeated over members here.

- :class:`ObsFree`: no guidance.
- :class:`LatentRepaint`: the observations are mixed into the *clean* estimate and only the change
  is added to the noisy state, ``z ← z + μ(s) [E(m ⊙ y + (1 − m) ⊙ x̂_0) − E(x̂_0)]`` with
  ``x̂_0 = D(ẑ_0)`` the decoded Tweedie estimate of the current state (``StepContext.z0_of``). Where nothing is observed the increment is only
  the codec's response to the innovations, and the noisy state keeps its noise: decoding and
  re-encoding the noisy latent itself (``E(D(z_t))``) keeps only 0.57–0.70 correlation with
  ``z_t`` at ``t ≥ 0.5`` on the demo codec.
- :class:`LatentDPS`: ``z ← z − ζ ∇_z L(z)``, ``L = Σ_rows ℓ_row``, with one likelihood term per
  sample (per ensemble member): ``ℓ = ‖y − H(D(ẑ_0(z)))‖_R = √(rᵀ R⁻¹ r)`` (``likelihood="norm"``,
  the paper) or ``ℓ = ½ rᵀ (R + γ (σ/μ)²)⁻¹ r`` (``"gaussian"``, SDA's variant). Since each ℓ
  depends on its own row only, ``∂L/∂z_row = ∂ℓ_row/∂z_row``: members never couple (no batch-level
  reduction enters a row's gradient). The gradient flows through ε_θ and the decoder D.

Fields are normalised ``(…, 69, H, W)``; ``R = obs.variance`` (σ_o² with a floor) in normalised
units. The observation operator is any callable ``H(x (B·N, 69, H, W)) -> y-shaped``; the default
masks with ``obs.mask`` (``y = m ⊙ (x + e)``). Point observations
(:class:`align_rl.observations.operator.PointObservations`, ``obs.is_point``) bring their own
interpolating operator and per-observation variances (docs/method.md §3.1); Repaint takes them
projected to grid nodes (``obs.to_grid(x_b)``, done by :func:`align_rl.diffusion.analysis.analyse`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from align_rl.errors import ConfigError, InputError
from align_rl.diffusion.sampler import StepContext
from align_rl.diffusion.schedule import mu, sigma

def _rows(v: torch.Tensor, ctx: StepContext, like: torch.Tensor) -> torch.Tensor:
    """Observation tensor with one row per background -> one row per sample (B·N rows)."""
    v = v.to(device=like.device, dtype=like.dtype)
    if v.shape[0] * ctx.members == like.shape[0]:
        return v.repeat_interleave(ctx.members, dim=0)
    if v.shape[0] == like.shape[0]:
        return v
    raise InputError(
        f"observations have {v.shape[0]} rows but the sampler runs {like.shape[0]} samples of "
        f"{ctx.members} members; give one observation row per background"
    )


def _variance(obs: Any) -> float | torch.Tensor:
    var = getattr(obs, "variance", None)
    if var is None:
        sigma_o = float(getattr(obs, "sigma_o", 0.0))
        var = max(sigma_o**2, float(getattr(obs, "r_floor", 1e-2)))
    return var


class ObsFree:
    """No observation guidance: samples of the background-conditioned prior ``p(z | z_b)``."""

    name = "obsfree"

    def __call__(self, z: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return z


class LatentRepaint:
    """Latent Repaint (docs/method.md §6.2); ``codec.encode``/``codec.decode`` map normalised fields <-> latents."""

    name = "repaint"

    def __init__(self, codec: Any, obs: Any) -> None:
        if getattr(obs, "mask", None) is None:
            raise ConfigError("Repaint needs observations on grid points (obs.mask); project point "
                              "observations with obs.to_grid(x_b) (docs/method.md §6.2) or use DPS")
        self.codec = codec
        self.obs = obs

    def __call__(self, z: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        m = _rows(self.obs.mask, ctx, z)
        y = _rows(self.obs.values, ctx, z)
        mu_s = float(mu(torch.tensor(ctx.s, dtype=torch.float64)))
        with torch.no_grad():
            x0 = self.codec.decode(ctx.z0_of(z))
            x_obs = x0 + m * (y - x0)  # = m ⊙ y + (1 − m) ⊙ x̂_0
            dz = self.codec.encode(x_obs) - self.codec.encode(x0)
            return (z + mu_s * dz).to(z.dtype)


class LatentDPS:
    """Latent diffusion posterior sampling (docs/method.md §6.3) with one likelihood term per sample.

    ``zeta`` ζ is the guidance scale; ``likelihood`` is ``"norm"`` (``‖r‖_R``) or ``"gaussian"``
    (``½ ‖r‖²_{R + γ(σ/μ)²}``, ``gamma`` γ); ``operator`` H defaults to masking with ``obs.mask``.
    ``autocast`` (a ``torch.autocast`` kwargs dict, e.g. ``{"device_type": "cuda",
    "dtype": torch.bfloat16}``) runs ε_θ and D in reduced precision.
    """

    name = "dps"

    def __init__(
        self,
        codec: Any,
        obs: Any,
        zeta: float = 1.0,
        likelihood: str = "norm",
        gamma: float = 1e-2,
        operator: Callable[[torch.Tensor], torch.Tensor] | None = None,
        autocast: dict | None = None,
    ) -> None:
        if likelihood not in ("norm", "gaussian"):
            raise ConfigError(f"guidance.dps_likelihood={likelihood!r} is not one of norm, gaussian")
        if not zeta >= 0 or not math.isfinite(zeta):
            raise ConfigError(f"guidance.dps_zeta={zeta} must be a finite number >= 0")
        if gamma < 0:
            raise ConfigError(f"guidance.dps_gamma={gamma} must be >= 0")
        self.codec = codec
        self.obs = obs
        self.zeta = float(zeta)
        self.likelihood = likelihood
        self.gamma = float(gamma)
        self.operator = operator
        self.autocast = autocast

    def per_sample_loss(self, z: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """``ℓ`` of every row ``(B·N,)``, differentiable in ``z`` (needs grad enabled)."""
        M = z.shape[0]
        tt = torch.full((M,), ctx.s, dtype=z.dtype, device=z.device)
        s = torch.tensor(ctx.s, dtype=torch.float64)
        mu_s, sig_s = float(mu(s)), float(sigma(s))
        if self.autocast:
            with torch.autocast(**self.autocast):
                eps = ctx.eps_fn(z, tt, ctx.z_b)
                x0 = self.codec.decode((z - sig_s * eps.float()) / mu_s)
        else:
            eps = ctx.eps_fn(z, tt, ctx.z_b)
            x0 = self.codec.decode((z - sig_s * eps) / mu_s)
        if x0.dtype in (torch.float16, torch.bfloat16):
            x0 = x0.float()
        if getattr(self.obs, "is_point", False):  # interpolating H and per-observation R (§3.1)
            extra = 0.0 if self.likelihood == "norm" else self.gamma * (sig_s / mu_s) ** 2
            q = self.obs.misfit(x0, ctx.members, extra)
            return torch.sqrt(q + 1e-12) if self.likelihood == "norm" else 0.5 * q
        y = _rows(self.obs.values, ctx, x0)
        if self.operator is None:
            hx = _rows(self.obs.mask, ctx, x0) * x0
        else:
            hx = self.operator(x0)
        r = (y - hx).reshape(M, -1)
        var = _variance(self.obs)
        if isinstance(var, torch.Tensor):
            var = _rows(var.reshape(var.shape[0], -1), ctx, r) if var.ndim > 0 else var.to(r)
        if self.likelihood == "norm":
            return torch.sqrt((r.square() / var).sum(dim=1) + 1e-12)
        return 0.5 * (r.square() / (var + self.gamma * (sig_s / mu_s) ** 2)).sum(dim=1)

    def gradient(self, z: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """``∇_z Σ_rows ℓ_row`` ``(B·N, C, h, w)``; row i depends on row i of ``z`` only."""
        with torch.enable_grad():
            zg = z.detach().requires_grad_(True)
            loss = self.per_sample_loss(zg, ctx)
            (g,) = torch.autograd.grad(loss.sum(), zg)
        return g

    def __call__(self, z: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self.zeta == 0:
            return z
        return z - self.zeta * self.gradient(z, ctx).to(z.dtype)


def _get(g: Any, key: str, default: Any) -> Any:
    if g is None:
        return default
    return g.get(key, default) if isinstance(g, dict) else getattr(g, key, default)


@dataclass(frozen=True)
class GuidanceMethod:
    """A guidance method of the registry :data:`METHODS`.

    ``name``: its config name (``guidance.methods``, ``pairs.guidance``); ``label``: its name in
    reports (``Align-<label>-M``); ``build(codec, obs, guidance_cfg, **kwargs)`` returns the
    guidance callable ``(z, ctx) -> z`` (``guidance_cfg``: a ``GuidanceConfig``-like object or
    dict); ``needs_obs``: it reads the observations (else it gets none, and the evaluation's
    observation ablations skip it); ``differentiates``: it back-propagates through the networks
    and takes the sampler's ``autocast`` keyword for that pass (DPS)."""

    name: str
    label: str
    build: Callable[..., Callable]
    needs_obs: bool = True
    differentiates: bool = False


METHODS: dict[str, GuidanceMethod] = {}
"""The guidance methods by name, in registration order (the config accepts these names)."""


def register_guidance(method: GuidanceMethod) -> GuidanceMethod:
    """Add ``method`` to :data:`METHODS` (a ``run.plugins`` module adds its own this way: one
    module, no other file to edit)."""
    METHODS[method.name] = method
    return method


def guidance_method(name: str) -> GuidanceMethod:
    """The registered method ``name``; :class:`ConfigError` listing the known ones otherwise."""
    if name not in METHODS:
        raise ConfigError(f"guidance method {name!r} is not one of {', '.join(METHODS)} (a "
                          "run.plugins module can register more)")
    return METHODS[name]


def label(name: str) -> str:
    """A method's name in reports (its own name when it is not registered)."""
    return METHODS[name].label if name in METHODS else name


def needs_obs(name: str) -> bool:
    """Whether the method reads observations."""
    return guidance_method(name).needs_obs


register_guidance(GuidanceMethod("obsfree", "ObsFree", lambda codec, obs, g, **kw: ObsFree(),
                                  needs_obs=False))
register_guidance(GuidanceMethod("repaint", "Repaint", lambda codec, obs, g, **kw: LatentRepaint(codec, obs)))
register_guidance(GuidanceMethod(
    "dps", "DPS", lambda codec, obs, g, **kw: LatentDPS(
        codec, obs, zeta=_get(g, "dps_zeta", 1.0), likelihood=_get(g, "dps_likelihood", "norm"),
        gamma=_get(g, "dps_gamma", 1e-2), **kw),
    differentiates=True))


def make_guidance(method: str, codec: Any, obs: Any, guidance_cfg: Any = None, **kwargs):
    """Guidance named ``method`` (a name of :data:`METHODS`) from a ``GuidanceConfig``-like object;
    ``kwargs`` go to a method that ``differentiates`` (``autocast``)."""
    m = guidance_method(method)
    if m.needs_obs and obs is None:
        raise InputError(f"guidance {method!r} needs observations")
    return m.build(codec, obs, guidance_cfg, **kwargs)


__all__ = ["GuidanceMethod", "LatentDPS", "LatentRepaint", "METHODS", "ObsFree", "guidance_method",
           "label", "make_guidance", "needs_obs", "register_guidance"]
