"""The two trivial baselines an alignment gain must beat (docs/method.md §10), made from the
stored reference members, with no extra sampling:

- *shrink*: the reference members pulled towards their ensemble mean, ``m + a (x_n − m)``, with
  ``a`` per time such that their spread term (single-member MSE − ensemble-mean MSE, i.e.
  ``mean_n mean_{c,i,j} (x_n − m)²``) equals the aligned model's: the ensemble mean, hence its MSE,
  is the reference's, only the spread narrows;
- *towards the background*: the reference members blended with the background,
  ``x_n + w (x_b − x_n)``, one ``w ∈ [0, 1]`` per row such that the time-mean single-member MSE
  equals the aligned model's: Geo-Scores compared at equal MSE cost;
- *towards the background, w from val* (``Blend-val``): the same blend, ``w`` the least-squares
  weight of the reference's ensemble mean fitted on validation times (:func:`least_squares_weight`),
  so a model must be better than the best blend a user could pick without seeing the test times.

Fields are normalised tensors: members ``(T, N, 69, H, W)``, background and truth ``(T, 69, H, W)``.
"""

from __future__ import annotations

import numpy as np
import torch

from align_rl.errors import InputError


def spread_term(members: torch.Tensor) -> torch.Tensor:
    """``mean_n mean_{c,i,j} (x_n − m)²`` per time (T,), float64: the part of the single-member MSE
    that is not the ensemble mean's (``mean_n |x_n − y|² = |m − y|² + mean_n |x_n − m|²``)."""
    if members.ndim != 5:
        raise InputError(f"members must be (T, N, 69, H, W), got {tuple(members.shape)}")
    x = members.double()
    return ((x - x.mean(dim=1, keepdim=True)) ** 2).mean(dim=(1, 2, 3, 4))


def shrink(members: torch.Tensor, target: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The members pulled towards their mean so that their :func:`spread_term` per time equals
    ``target`` (T,): ``m + a_t (x_n − m)``, ``a_t = sqrt(target_t / spread_t)``. A time with no
    spread, or a non-finite target, keeps its members (``a = 1``); returns the dtype of ``members``."""
    s = spread_term(members)
    tgt = torch.as_tensor(np.asarray(target, np.float64)).reshape(-1)
    if tgt.numel() != members.shape[0]:
        raise InputError(f"{tgt.numel()} target spreads for {members.shape[0]} times")
    with torch.no_grad():
        a = torch.sqrt(tgt.clamp(min=0) / s)
        a = torch.where(torch.isfinite(a) & (s > 0), a, torch.ones_like(a))
        x = members.double()
        m = x.mean(dim=1, keepdim=True)
        out = m + a.reshape(-1, 1, 1, 1, 1) * (x - m)
    return out.to(members.dtype)


def blend_weight(members: torch.Tensor, background: torch.Tensor, truth: torch.Tensor,
                 target_mse: float) -> float:
    """The smallest ``w ∈ [0, 1]`` whose blend ``x_n + w (x_b − x_n)`` has the time-mean
    single-member MSE ``target_mse`` (normalised): the root of the quadratic
    ``(1−w)² A + 2 w (1−w) B + w² C`` with ``A = mean |x_n − y|²``, ``B = mean ⟨x_n − y, x_b − y⟩``,
    ``C = mean |x_b − y|²`` (means over times, members and grid). 0 when the members already cost
    at least ``target_mse``; 1 when even the background costs less. Times with non-finite members
    are left out."""
    x, b, y = members.double(), background.double(), truth.double()
    ok = torch.isfinite(x).flatten(1).all(dim=1)
    if not bool(ok.any()) or not np.isfinite(target_mse):
        return 0.0
    e = x[ok] - y[ok].unsqueeze(1)
    eb = (b[ok] - y[ok]).unsqueeze(1)
    A = float((e ** 2).mean())
    B = float((e * eb).expand_as(e).mean())
    C = float((eb ** 2).mean())
    if target_mse <= A:
        return 0.0
    if target_mse >= max(A, C) and C <= A:
        return 1.0
    qa, qb, qc = A - 2 * B + C, 2 * (B - A), A - target_mse
    roots = np.roots([qa, qb, qc]) if abs(qa) > 1e-300 else np.array([-qc / qb])
    real = sorted(float(r.real) for r in np.atleast_1d(roots) if abs(r.imag) < 1e-12 and 0 <= r.real <= 1)
    return real[0] if real else 1.0


def blend(members: torch.Tensor, background: torch.Tensor, w: float) -> torch.Tensor:
    """``x_n + w (x_b − x_n)`` for every member (T, N, 69, H, W), background (T, 69, H, W)."""
    return members + float(w) * (background.unsqueeze(1).to(members.dtype) - members)


def least_squares_weight(members: torch.Tensor, background: torch.Tensor, truth: torch.Tensor) -> float:
    """The ``w ∈ [0, 1]`` whose blend of the ensemble mean ``m`` towards the background,
    ``(1 − w) m + w x_b``, has the least squared error summed over times, channels and grid
    (normalised, unweighted, as the MSE): the blend's error is ``(m − y) − w (m − x_b)``, a convex
    quadratic in ``w``, so

        w* = clip(Σ ⟨m − y, m − x_b⟩ / Σ |m − x_b|², 0, 1)

    (the unconstrained minimum clipped to the interval is the constrained one). The blended members
    ``x_n + w (x_b − x_n)`` (:func:`blend`) have this ensemble mean. ``members`` (T, N, 69, H, W),
    ``background`` and ``truth`` (T, 69, H, W); times with non-finite members are left out. Returns
    NaN when no time is finite, 0 when the mean equals the background everywhere."""
    if members.ndim != 5 or background.shape != truth.shape or members.shape[:1] + members.shape[2:] != truth.shape:
        raise InputError(f"members (T, N, 69, H, W) {tuple(members.shape)}, background {tuple(background.shape)} "
                         f"and truth {tuple(truth.shape)} (T, 69, H, W) do not match")
    x = members.double()
    ok = torch.isfinite(x).flatten(1).all(dim=1)
    if not bool(ok.any()):
        return float("nan")
    m = x[ok].mean(dim=1)
    d = m - background[ok].double()
    num, den = float((d * (m - truth[ok].double())).sum()), float((d * d).sum())
    return 0.0 if den <= 0 else float(np.clip(num / den, 0.0, 1.0))
