"""The predictor–corrector sampler of docs/method.md §5 (SDA's DDIM predictor with Langevin corrections).

Reverse time runs on ``t_k = 1 − k/K``, ``k = 0 … K``, from ``z ~ N(0, I)`` at ``t = 1``. Each of
the K steps goes from ``t`` to ``s = t − Δ`` (``Δ = 1/K``):

- predictor: ``ε = ε_θ(z, t, z_b)``, ``r = μ(s)/μ(t)``, ``z ← r z + (σ(s) − r σ(t)) ε``;
- ``C`` Langevin corrections at ``s``: ``ε = ε_θ(z, s, z_b)``, ``δ = τ / mean(ε²)`` (one value per
  sample, the mean over that sample's latent elements), ``z ← z − (δ ε + √(2δ) ξ) σ(s)``,
  ``ξ ~ N(0, I)``;
- the guidance hook (``align_rl.diffusion.guidance``) may then change ``z``.

The N members of every background are drawn in one batch: latents are flattened to
``(B·N, C, h, w)`` (background-major: row ``b·N + n``), so every network call sees the whole
ensemble. Network calls: ``K · (1 + C)`` (plus the guidance's own). Everything runs under
``torch.no_grad`` except inside the guidance (DPS differentiates through ε_θ and the decoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from align_rl.errors import ConfigError, InputError
from align_rl.diffusion.schedule import mu, sigma

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``eps_fn(z_t (M, C, h, w), t (M,), z_b (M, C, h, w)) -> ε̂ (M, C, h, w)``."""


@dataclass
class StepContext:
    """What a guidance hook may use after the step ``t -> s``.

    ``z0_hat`` is the Tweedie estimate ``(z' − σ ε)/μ`` of the sampler's last network call (``z'``
    the latent that call saw, at time ``s`` when ``C ≥ 1``, at ``t`` when ``C = 0``): a clean
    estimate the guidance can use without another network call.
    """

    eps_fn: EpsFn
    z_b: torch.Tensor  # (B·N, C, h, w) background latent of every row
    members: int  # N: rows b·N … b·N + N − 1 belong to background b
    t: float  # time before the step
    s: float  # time after the step (the current time of z)
    step: int  # k = 0 … K − 1
    steps: int  # K
    z0_hat: torch.Tensor  # (B·N, C, h, w)
    generator: torch.Generator | None = None
    eps: torch.Tensor | None = None  # (B·N, C, h, w) the ε̂ of that last network call

    def z0_of(self, z: torch.Tensor) -> torch.Tensor:
        """Clean estimate of the *current* ``z`` at time ``s`` without a network call,
        ``(z − σ(s) ε̂)/μ(s)`` with the last call's ε̂ (``z0_hat`` when ε̂ is not given). After the
        Langevin corrections it differs from ``z0_hat`` by their move divided by μ(s)."""
        if self.eps is None:
            return self.z0_hat
        s = torch.tensor(self.s, dtype=torch.float64)
        return (z - float(sigma(s)) * self.eps) / float(mu(s))


class Guidance(Protocol):
    def __call__(self, z: torch.Tensor, ctx: StepContext) -> torch.Tensor: ...


def _randn_like(z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(z)
    if generator.device != z.device:
        # draw on the generator's device so that results do not depend on where the model runs
        return torch.randn(z.shape, generator=generator, dtype=z.dtype,
                           device=generator.device).to(z.device)
    return torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def sample(
    eps_fn: EpsFn,
    z_b: torch.Tensor,
    members: int,
    steps: int,
    corrections: int,
    tau: float,
    guidance: Guidance | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    z_init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw ``members`` latents per background from ``p(z | z_b)`` (guided when ``guidance``).

    ``z_b`` (B, C, h, w) standardised background latents; returns ``z`` (B, N, C, h, w) at t = 0.
    ``z_init`` (B, N, C, h, w) replaces the N(0, I) start (tests). ``tau`` is the Langevin step
    factor τ; ``progress`` shows a tqdm bar over the K steps.
    """
    if z_b.ndim != 4:
        raise InputError(f"z_b must have shape (B, C, h, w), got {tuple(z_b.shape)}")
    if steps < 1 or members < 1 or corrections < 0:
        raise ConfigError(
            f"sampler needs steps >= 1, members >= 1, corrections >= 0 "
            f"(got steps={steps}, members={members}, corrections={corrections})"
        )
    if corrections > 0 and not tau > 0:
        raise ConfigError(f"sampler.tau={tau} must be > 0 when corrections > 0")
    B = z_b.shape[0]
    zb = z_b.repeat_interleave(members, dim=0)  # (B·N, C, h, w), background-major
    if z_init is not None:
        if z_init.shape != (B, members, *z_b.shape[1:]):
            raise InputError(f"z_init must have shape {(B, members, *z_b.shape[1:])}, "
                             f"got {tuple(z_init.shape)}")
        z = z_init.reshape(zb.shape).to(zb)
    else:
        z = _randn_like(zb, generator)
    M = z.shape[0]
    dims = tuple(range(1, z.ndim))

    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sampling", unit="step", leave=False)
    # the schedule on the time grid, in float64, computed once
    grid = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps  # exactly t_k = 1 − k/K
    mus, sigs = mu(grid).tolist(), sigma(grid).tolist()
    times = [torch.full((M,), float(v), dtype=z.dtype, device=z.device) for v in grid.tolist()]
    with torch.no_grad():
        for k in it:
            t, s = float(grid[k]), float(grid[k + 1])
            mu_t, mu_s, sig_t, sig_s = mus[k], mus[k + 1], sigs[k], sigs[k + 1]
            r = mu_s / mu_t
            # predictor
            eps = eps_fn(z, times[k], zb).to(z.dtype)
            z_seen, t_seen = z, (mu_t, sig_t)
            z = r * z + (sig_s - r * sig_t) * eps
            # Langevin corrections at s
            for _ in range(corrections):
                eps = eps_fn(z, times[k + 1], zb).to(z.dtype)
                z_seen, t_seen = z, (mu_s, sig_s)
                delta = tau / eps.square().mean(dim=dims).clamp_min(1e-12)  # (M,)
                delta = _per_sample(delta, z)
                xi = _randn_like(z, generator)
                z = z - (delta * eps + torch.sqrt(2 * delta) * xi) * sig_s
            if guidance is not None:
                z0_hat = (z_seen - t_seen[1] * eps) / t_seen[0]
                ctx = StepContext(eps_fn=eps_fn, z_b=zb, members=members, t=t, s=s, step=k,
                                  steps=steps, z0_hat=z0_hat, generator=generator, eps=eps)
                z = guidance(z, ctx).detach()
    return z.reshape(B, members, *z.shape[1:])


def network_calls(steps: int, corrections: int) -> int:
    """Number of ε_θ evaluations of one unguided :func:`sample` call (each over the whole batch)."""
    return steps * (1 + corrections)
