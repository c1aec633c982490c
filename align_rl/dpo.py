"""Diffusion-DPO loss (docs/method.md §9; Wallace et al. 2023) for the latent score model.

For a batch of pairs ``(z^w, z^l, z_b)``, each ``(B, C, h, w)`` standardised latents:

- ONE time ``t ~ U(0, 1)`` and ONE noise ``ε ~ N(0, I)`` per pair, shared by its two members:
  ``z^w_t = μ(t) z^w + σ(t) ε``, ``z^l_t = μ(t) z^l + σ(t) ε``;
- ``Δ(z_t) = ‖ε − ε_θ(z_t, t, z_b)‖² − ‖ε − ε_ref(z_t, t, z_b)‖²`` where ``‖·‖²`` is the **mean**
  over the ``C·h·w`` latent elements (not the sum);
- ``L = −log σ(−β (Δ(z^w_t) − Δ(z^l_t)))``, averaged over the batch.

β convention: no factor ½ (Diffusion-DPO's reference code multiplies by ½), the weighting
``ω(λ_t) ≡ 1``, and the paper's ``T`` is folded into β. Because Δ is a per-element mean, β scales
with the latent size: β = 8000 (the paper) on a mean-squared error is β/(C·h·w) on a summed one.

Metrics (TRL's DPOTrainer names where one exists): ``loss``; ``rewards/chosen`` = mean ``−β Δ_w``,
``rewards/rejected`` = mean ``−β Δ_l`` (the implicit rewards); ``rewards/margins`` = mean
``−β (Δ_w − Δ_l)`` (the inner term); ``rewards/accuracies`` = fraction of pairs with inner term > 0;
``model_minus_ref/chosen`` = mean ``Δ_w``, ``model_minus_ref/rejected`` = mean ``Δ_l`` (the policy's
denoising error minus the reference's on winners / losers; negative = policy better);
``mse/policy_chosen``, ``mse/policy_rejected``, ``mse/ref_chosen``, ``mse/ref_rejected`` (the four
errors); ``grad_norm`` and ``learning_rate`` are added by the learner.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .diffusion.schedule import add_noise
from .errors import InputError

EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def dpo_loss(
    policy: EpsModel,
    reference: EpsModel,
    z_w: torch.Tensor,
    z_l: torch.Tensor,
    z_b: torch.Tensor,
    beta: float,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Diffusion-DPO loss of a batch of pairs → ``(loss (scalar, differentiable), metrics)``.

    ``policy``/``reference``: ``(z_t, t, z_b) -> ε̂``; the reference runs under ``no_grad``.
    ``t`` (B,) and ``eps`` (B, C, h, w) may be given (tests); otherwise drawn with ``generator``.
    Policy and reference each see one batch of ``2B`` rows (winners then losers).
    """
    if z_w.shape != z_l.shape or z_w.shape != z_b.shape or z_w.ndim < 2:
        raise InputError(f"z_w {tuple(z_w.shape)}, z_l {tuple(z_l.shape)} and z_b {tuple(z_b.shape)} "
                         "must share one shape (B, C, h, w)")
    B = z_w.shape[0]
    dev, dt = z_w.device, z_w.dtype
    gdev = generator.device if generator is not None else dev
    if t is None:
        t = torch.rand(B, generator=generator, device=gdev, dtype=dt).to(dev)
    if eps is None:
        eps = torch.randn(z_w.shape, generator=generator, device=gdev, dtype=dt).to(dev)
    tt = torch.cat([t, t])
    ee = torch.cat([eps, eps])
    zt = add_noise(torch.cat([z_w, z_l]), tt, ee)
    zb = torch.cat([z_b, z_b])
    dims = tuple(range(1, z_w.ndim))
    err_pol = (ee - policy(zt, tt, zb)).square().mean(dim=dims)  # (2B,)
    with torch.no_grad():
        err_ref = (ee - reference(zt, tt, zb)).square().mean(dim=dims)
    delta = err_pol - err_ref
    d_w, d_l = delta[:B], delta[B:]
    inner = -beta * (d_w - d_l)
    loss = F.softplus(-inner).mean()  # = −log σ(inner)
    with torch.no_grad():
        metrics = {
            "loss": float(loss),
            "rewards/chosen": float((-beta * d_w).mean()),
            "rewards/rejected": float((-beta * d_l).mean()),
            "rewards/margins": float(inner.mean()),
            "rewards/accuracies": float((inner > 0).float().mean()),
            "model_minus_ref/chosen": float(d_w.mean()),
            "model_minus_ref/rejected": float(d_l.mean()),
            "mse/policy_chosen": float(err_pol[:B].mean()),
            "mse/policy_rejected": float(err_pol[B:].mean()),
            "mse/ref_chosen": float(err_ref[:B].mean()),
            "mse/ref_rejected": float(err_ref[B:].mean()),
        }
    return loss, metrics
