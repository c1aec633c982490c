"""Diffusion-DPO loss (docs/method.md §9; Wallace et al. 2023) for the latent score model.

For a batch of pairs ``(z^w, z^l, z_b)``, each ``(B, C, h, w)`` standardised latents:

- ONE time ``t ~ U(t_min, t_max)`` (``dpo.t_range``; the paper: U(0, 1)) and ONE noise
  ``ε ~ N(0, I)`` per pair, shared by its two members:
  ``z^w_t = μ(t) z^w + σ(t) ε``, ``z^l_t = μ(t) z^l + σ(t) ε``;
- ``Δ(z_t) = ‖ε − ε_θ(z_t, t, z_b)‖² − ‖ε − ε_ref(z_t, t, z_b)‖²`` where ``‖·‖²`` is the **mean**
  over the ``C·h·w`` latent elements (not the sum);
- ``L = −log σ(−β (Δ(z^w_t) − Δ(z^l_t))) + λ Δ(z^w_t)``, averaged over the batch. The anchor
  ``λ Δ(z^w_t)`` (``dpo.anchor``; λ = 0 is plain Diffusion-DPO) has the gradient of the denoising
  loss on the winners: the DPO term alone only sees the *difference* of the two errors and cannot
  tell a policy that gets worse on winners and losers alike (measured on the demo world: the
  winners' error rose 57 % above the reference's while every pair stayed ranked right).

β convention: no factor ½, the weighting ``ω(λ_t) ≡ 1``, and the paper's ``T`` folded into β.
Diffusion-DPO's reference code computes ``−½ β_dpo (Δ_w − Δ_l)``, so its (and most likely the
paper's) β = 8000 is β = 4000 here. Because Δ is a per-element mean, β scales with the latent size:
β on a mean-squared error is β/(C·h·w) on a summed one.

Metrics (TRL's DPOTrainer names where one exists): ``loss``; ``rewards/chosen`` = mean ``−β Δ_w``,
``rewards/rejected`` = mean ``−β Δ_l`` (the implicit rewards); ``rewards/margins`` = mean
``−β (Δ_w − Δ_l)`` (the inner term); ``rewards/accuracies`` = fraction of pairs with inner term > 0;
``model_minus_ref/chosen`` = mean ``Δ_w``, ``model_minus_ref/rejected`` = mean ``Δ_l`` (the policy's
denoising error minus the reference's on winners / losers; negative = policy better);
``mse/policy_chosen``, ``mse/policy_rejected``, ``mse/ref_chosen``, ``mse/ref_rejected`` (the four
errors); ``loss/dpo`` and ``loss/anchor`` (the two terms); ``t_bucket/sum_chosen_<i>`` and
``t_bucket/count_<i>`` (sum and count of ``Δ_w`` with t in the i-th quarter of [0, 1], so that
the learner can log the winners' error-minus-reference per t bucket after reducing over workers);
``grad_norm`` and ``learning_rate`` are added by the learner.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from align_rl.diffusion.schedule import add_noise
from align_rl.errors import InputError

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
    t_range: tuple[float, float] = (0.0, 1.0),
    anchor: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Diffusion-DPO loss of a batch of pairs → ``(loss (scalar, differentiable), metrics)``.

    ``policy``/``reference``: ``(z_t, t, z_b) -> ε̂``; the reference runs under ``no_grad``.
    ``t`` (B,) and ``eps`` (B, C, h, w) may be given (tests); otherwise drawn with ``generator``,
    ``t ~ U(t_range)``. ``anchor``: λ of the winners' denoising term.
    Policy and reference each see one batch of ``2B`` rows (winners then losers).
    """
    if z_w.shape != z_l.shape or z_w.shape != z_b.shape or z_w.ndim < 2:
        raise InputError(f"z_w {tuple(z_w.shape)}, z_l {tuple(z_l.shape)} and z_b {tuple(z_b.shape)} "
                         "must share one shape (B, C, h, w)")
    B = z_w.shape[0]
    dev, dt = z_w.device, z_w.dtype
    gdev = generator.device if generator is not None else dev
    if t is None:
        lo, hi = float(t_range[0]), float(t_range[1])
        if not 0.0 <= lo < hi <= 1.0:
            raise InputError(f"dpo.t_range={list(t_range)} must satisfy 0 <= t_min < t_max <= 1")
        t = (lo + (hi - lo) * torch.rand(B, generator=generator, device=gdev, dtype=dt)).to(dev)
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
    l_dpo = F.softplus(-inner).mean()  # = −log σ(inner)
    l_anchor = d_w.mean()
    loss = l_dpo + float(anchor) * l_anchor if anchor else l_dpo
    with torch.no_grad():
        bucket = torch.clamp((t.detach() * 4).long(), 0, 3)
        metrics = {
            "loss": float(loss),
            "loss/dpo": float(l_dpo),
            "loss/anchor": float(l_anchor),
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
        for i in range(4):
            sel = bucket == i
            metrics[f"t_bucket/sum_chosen_{i}"] = float(d_w[sel].sum())
            metrics[f"t_bucket/count_{i}"] = float(sel.sum())
    return loss, metrics
