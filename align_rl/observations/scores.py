"""Observation-space statistics: O−B and O−A (docs/method.md §3.1).

``d = y − H(x)`` at every observation, with ``x`` the background (O−B, the innovations) or an
analysis (O−A, the residuals), per state variable: count, mean (bias), RMS in physical units, and
``χ² = mean(d² / σ_o²)`` (≈ 1 + σ_b²/σ_o² for O−B of a calibrated system, below 1 for O−A).
"""

from __future__ import annotations

import numpy as np
import torch

from align_rl.observations.operator import STATE_VARS, PointObservations


def departures(obs: PointObservations, x: torch.Tensor) -> torch.Tensor:
    """``y − H(x)`` in physical units: x (B, 69, H, W) -> (n,); (B, N, 69, H, W) -> (N, n)."""
    r = obs.residual(x.to(obs.values.device)).detach().double()
    return r * obs.scale.to(r.device).double()


def departure_stats(obs: PointObservations, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per state variable: ``n``, ``bias`` (mean of y − H(x)), ``rms`` (physical units), ``chi2``
    (mean of d²/σ_o²). With an ensemble (B, N, 69, H, W) the statistics pool the members."""
    d = departures(obs, x).cpu().numpy()
    d = d.reshape(-1, obs.n_obs)
    sig2 = (obs.variance.double() * obs.scale.double() ** 2).cpu().numpy()
    code = obs.var_code.cpu().numpy()
    out: dict[str, dict[str, float]] = {}
    for c in np.unique(code):
        sel = code == c
        dv = d[:, sel]
        out[STATE_VARS[int(c)]] = {"n": int(sel.sum()), "bias": float(dv.mean()),
                                   "rms": float(np.sqrt((dv**2).mean())),
                                   "chi2": float((dv**2 / sig2[sel]).mean())}
    return out


def omb_oma(obs: PointObservations, x_b: torch.Tensor, x_a: torch.Tensor) -> dict[str, dict]:
    """``{"O-B": departure_stats(x_b), "O-A": departure_stats(x_a)}``."""
    return {"O-B": departure_stats(obs, x_b), "O-A": departure_stats(obs, x_a)}


def normalised_rms(obs: PointObservations, x: torch.Tensor) -> np.ndarray:
    """Per sample and state variable ``sqrt(mean(r̃² / σ̃_o²))``: x (B, N, 69, H, W) -> (B·N, V),
    V the variables present (for observation-space rewards; NaN never, as every row has its
    own observations or 0 when it has none of a variable)."""
    B, N = x.shape[0], x.shape[1]
    r = obs.residual(x).detach().double()  # (N, n)
    q = (r.square() / obs.variance.double().to(r.device)).cpu()
    codes = torch.unique(obs.var_code).cpu()
    out = np.zeros((B * N, len(codes)))
    sample = (obs.row.cpu()[None, :] * N + torch.arange(N)[:, None]).reshape(-1)
    for k, c in enumerate(codes):
        sel = (obs.var_code.cpu() == c)[None, :].expand(N, -1).reshape(-1)
        s = torch.zeros(B * N, dtype=torch.float64).index_add(0, sample[sel], q.reshape(-1)[sel])
        cnt = torch.zeros(B * N, dtype=torch.float64).index_add(0, sample[sel], torch.ones(int(sel.sum()), dtype=torch.float64))
        out[:, k] = torch.sqrt(s / cnt.clamp_min(1)).numpy()
    return out
