"""Rewards of the N candidate analyses of one background (docs/method.md §7), as plain functions in a registry.

A reward is ``fn(ctx: RewardContext) -> (N,)`` float64 numpy array, registered by name with
:func:`register_reward`; the config selects rewards by name (``rewards.names``) and weighs them
(``rewards.weights``). Built in:

- ``assim``: pairwise-sigmoid accuracy of the analyses against the truth,
  ``R(n) = 1/(N−1) Σ_{j≠n} 1/69 Σ_m σ(−wrmse[n][m] + wrmse[j][m])`` with the per-channel
  latitude-weighted RMSE in normalised units (:func:`pairwise_sigmoid`);
- ``assim_obs``: the same with the observation-space misfit of point observations
  (:mod:`align_rl.observations`) in place of the truth, per state variable;
- ``forecast``: the same on the forecaster's 48 h forecasts from each analysis against the truth
  48 h later;
- ``phys``: ``R_phys = 2 σ(−|D − D_GT| / D_GT)`` with the geostrophic imbalance ``D`` at 500 hPa in
  physical units (Geo-Score = 100 · R_phys).

Every candidate keeps every component (:func:`score_all`); the composite is
``R = Σ_k w_k r̃_k`` (:func:`composite`), each component ``r̃_k`` normalised within the background
first (z-scores over its N candidates by default, ``rewards.normalize``): the raw components have
very different spreads within a background (measured on the demo world: assim 0.0003, forecast
0.0025, phys 0.0073), so a raw sum ranks by the widest one alone (docs/method.md §7).

A user-defined reward::

    from align_rl.alignment.rewards import register_reward

    @register_reward("t850_bias")
    def t850_bias(ctx):
        ...  # return an (N,) array, higher is better

then ``rewards.names=[assim, t850_bias] rewards.weights={assim: 1, t850_bias: 0.5}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from align_rl.errors import ConfigError, InputError
from align_rl.evaluation.geostrophic import geo_imbalance, geo_reward
from align_rl.evaluation.metrics import wrmse
from align_rl.observations.scores import normalised_rms

RewardFn = Callable[["RewardContext"], np.ndarray]

REWARDS: dict[str, RewardFn] = {}
"""Registry: reward name -> ``fn(ctx) -> (N,)`` (higher is better)."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn(ctx) -> (N,)`` under ``name`` (replaces an earlier one)."""

    def deco(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return deco


@dataclass
class RewardContext:
    """What the rewards of one background's N candidates may use.

    ``analyses`` (N, 69, H, W) and ``truth`` (69, H, W): normalised; ``forecasts`` (N, 69, H, W) the
    48 h forecasts from each analysis and ``truth_forecast`` (69, H, W) the truth 48 h later
    (normalised; None when no forecast reward is asked); ``normalizer`` maps to physical units;
    ``lat`` (H,), ``lon`` (W,) degrees; ``geo_level`` hPa and ``geo_band`` degrees for ``phys``.
    """

    analyses: torch.Tensor
    truth: torch.Tensor
    normalizer: Any
    lat: np.ndarray
    lon: np.ndarray
    forecasts: torch.Tensor | None = None
    truth_forecast: torch.Tensor | None = None
    geo_level: int = 500
    geo_band: float = 15.0
    observations: Any = None  # point observations of this background (batch 1) for ``assim_obs``

    def __post_init__(self) -> None:
        a = self.analyses
        if a.ndim != 4:
            raise InputError(f"candidate analyses must be (N, 69, H, W), got {tuple(a.shape)}")
        if a.shape[0] < 2:
            raise InputError("rewards compare candidates: need at least 2 per background")
        if tuple(self.truth.shape) != tuple(a.shape[1:]):
            raise InputError(f"truth {tuple(self.truth.shape)} does not match analyses {tuple(a.shape)}")
        if not torch.isfinite(a).all():
            raise InputError("candidate analyses hold NaN or inf; check the sampler and the decoder")

    @property
    def members(self) -> int:
        return int(self.analyses.shape[0])


def pairwise_sigmoid(err: Any) -> np.ndarray:
    """``R(n) = 1/(N−1) Σ_{j≠n} mean_m σ(err[j][m] − err[n][m])`` of errors ``err`` (N, M) → (N,).

    Lower error → higher reward; values in (0, 1); the N rewards sum to N/2.
    """
    e = torch.as_tensor(np.asarray(err, dtype=np.float64))
    if e.ndim != 2 or e.shape[0] < 2:
        raise InputError(f"pairwise rewards need errors of shape (N >= 2, M), got {tuple(e.shape)}")
    n = e.shape[0]
    s = torch.sigmoid(-e[:, None, :] + e[None, :, :]).mean(dim=-1)  # (n, j)
    s.fill_diagonal_(0.0)
    return (s.sum(dim=1) / (n - 1)).numpy()


def _wrmse_norm(a: torch.Tensor, b: torch.Tensor, lat: np.ndarray) -> np.ndarray:
    return np.asarray(wrmse(a.double().cpu().numpy(), b.double().cpu().numpy()[None], lat))


@register_reward("assim")
def assim_reward(ctx: RewardContext) -> np.ndarray:
    """Pairwise-sigmoid accuracy of the analyses (normalised per-channel WRMSE vs the truth)."""
    return pairwise_sigmoid(_wrmse_norm(ctx.analyses, ctx.truth, ctx.lat))


@register_reward("assim_obs")
def assim_obs_reward(ctx: RewardContext) -> np.ndarray:
    """Pairwise-sigmoid fit to point observations (no truth needed): per state variable
    ``sqrt(mean((y − H(x_a))² / σ_o²))`` of each candidate (docs/method.md §7.2)."""
    if ctx.observations is None:
        raise InputError("the assim_obs reward needs the background's point observations "
                         "(RewardContext.observations); use 'assim' to score against the truth")
    return pairwise_sigmoid(normalised_rms(ctx.observations, ctx.analyses[None]))


@register_reward("forecast")
def forecast_reward(ctx: RewardContext) -> np.ndarray:
    """Pairwise-sigmoid skill of the 48 h forecasts from the analyses vs the truth 48 h later."""
    if ctx.forecasts is None or ctx.truth_forecast is None:
        raise InputError("the forecast reward needs the 48 h forecasts of the candidates and the "
                         "truth 48 h later; drop 'forecast' from rewards.names to score without them")
    return pairwise_sigmoid(_wrmse_norm(ctx.forecasts, ctx.truth_forecast, ctx.lat))


@register_reward("phys")
def phys_reward(ctx: RewardContext) -> np.ndarray:
    """``2 σ(−|D − D_GT| / D_GT)`` of the geostrophic imbalance at ``geo_level`` (physical units)."""

    xa = ctx.normalizer.denormalize(ctx.analyses.double().cpu().numpy())
    xt = ctx.normalizer.denormalize(ctx.truth.double().cpu().numpy())
    d = geo_imbalance(xa, ctx.lat, ctx.lon, ctx.geo_level, ctx.geo_band)
    d_gt = geo_imbalance(xt, ctx.lat, ctx.lon, ctx.geo_level, ctx.geo_band)
    return np.asarray(geo_reward(np.asarray(d), np.full_like(np.asarray(d), float(d_gt))),
                      dtype=np.float64)


def check_names(names: list[str] | tuple[str, ...], weights: Mapping[str, float] | None = None) -> None:
    """ConfigError naming an unknown reward (or a weight for a reward that is not computed)."""
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise ConfigError(f"unknown reward(s) {unknown} in rewards.names; known: {sorted(REWARDS)} "
                          "(register a new one with align_rl.alignment.rewards.register_reward)")
    if weights:
        extra = [k for k, w in weights.items() if w != 0 and k not in names]
        if extra:
            raise ConfigError(f"rewards.weights gives {extra} a weight but rewards.names does not "
                              f"compute them; add them to rewards.names")


def score_all(ctx: RewardContext, names: list[str] | tuple[str, ...]) -> dict[str, np.ndarray]:
    """Every named reward of the N candidates: ``{name: (N,) float64}``."""
    check_names(names)
    out = {}
    for n in names:
        r = np.asarray(REWARDS[n](ctx), dtype=np.float64).reshape(-1)
        if r.shape != (ctx.members,):
            raise InputError(f"reward {n!r} returned shape {r.shape}, expected ({ctx.members},)")
        if not np.all(np.isfinite(r)):
            raise InputError(f"reward {n!r} is not finite for some candidates")
        out[n] = r
    return out


NORMALIZATIONS = ("zscore", "rank", "none")


def normalise_component(r: np.ndarray, how: str = "zscore") -> np.ndarray:
    """One reward component of one background's N candidates (N,) on a common scale.

    ``zscore``: ``(r − mean) / std`` over the N candidates (all zero when the N values are equal);
    ``rank``: ranks scaled to [−1, 1] (ties share their mean rank); ``none``: unchanged.
    """
    r = np.asarray(r, dtype=np.float64)
    if how == "none":
        return r
    if how == "zscore":
        sd = r.std()
        return np.zeros_like(r) if not sd > 1e-15 * max(1.0, abs(r.mean())) else (r - r.mean()) / sd
    if how == "rank":
        from scipy.stats import rankdata

        n = len(r)
        return np.zeros_like(r) if n < 2 else 2.0 * (rankdata(r) - 1.0) / (n - 1) - 1.0
    raise ConfigError(f"rewards.normalize={how!r} is not one of {', '.join(NORMALIZATIONS)}")


def composite(scores: Mapping[str, np.ndarray], weights: Mapping[str, float],
              normalize: str = "zscore") -> np.ndarray:
    """``R = Σ_k w_k r̃_k`` of ONE background's candidates → (N,), with ``r̃_k`` each component
    normalised over the N candidates (:func:`normalise_component`; ``normalize="none"`` gives the
    raw weighted sum)."""
    used = {k: float(w) for k, w in weights.items() if float(w) != 0.0}
    if not used:
        raise ConfigError("rewards.weights must give at least one reward a positive weight")
    missing = [k for k in used if k not in scores]
    if missing:
        raise ConfigError(f"rewards.weights names {missing} but the candidates were scored only "
                          f"with {sorted(scores)}; rescore or set their weight to 0")
    total = None
    for k, w in used.items():
        v = w * normalise_component(scores[k], normalize)
        total = v if total is None else total + v
    return total
