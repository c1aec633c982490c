"""The scores of one batch of analyses or forecasts against the truth (docs/method.md §10), and the
forecast lead of the evaluation.

Fields are normalised tensors ``(T, 69, H, W)``, or ``(T, N, 69, H, W)`` with a member axis; every
score is returned per time ``(T,)`` (float64 numpy), to be averaged over times later.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from align_rl.devices import module_device
from align_rl.errors import ConfigError
from align_rl.evaluation.geostrophic import geo_score
from align_rl.evaluation.metrics import crps_ensemble, mae, mse, spread_skill, wrmse
from align_rl.io.normalization import Normalizer
from align_rl.io.schema import channel_index

TABLE_VARS: tuple[str, ...] = ("u10", "v500", "z500", "t850")
"""Channels whose physical WRMSE the paper's tables report."""
STEP_HOURS = 6
"""Hours of one forecaster step."""


def forecast_steps(hours: int) -> int:
    """Forecaster steps of a ``hours``-hour forecast (``rewards.forecast_hours``; 48 h = 8 × 6 h).
    A ConfigError unless ``hours`` is a positive multiple of :data:`STEP_HOURS`."""
    if isinstance(hours, bool) or int(hours) != hours or hours <= 0 or hours % STEP_HOURS:
        raise ConfigError(f"rewards.forecast_hours={hours!r} must be a positive multiple of "
                          f"{STEP_HOURS} (the forecaster's step), e.g. 48")
    return int(hours) // STEP_HOURS


def hours(h: int) -> np.timedelta64:
    """``h`` hours as a datetime64[ns]-compatible timedelta."""
    return np.timedelta64(int(h), "h").astype("timedelta64[ns]")


def deterministic_metrics(x_norm: torch.Tensor, truth_norm: torch.Tensor, normalizer: Normalizer,
                          lat: np.ndarray, lon: np.ndarray, geo: bool = True) -> dict[str, np.ndarray]:
    """Scores of fields ``x_norm`` (T, [N,] 69, H, W) against ``truth_norm`` (T, 69, H, W), both
    normalised. With a member axis the scores are averaged over members. Returns (T,) arrays:
    ``mse``, ``mae`` (normalised), ``wrmse_<var>`` (physical units), ``geo_score``."""
    has_members = x_norm.ndim == 5
    t = truth_norm.unsqueeze(1) if has_members else truth_norm
    x64, t64 = x_norm.double(), t.double()
    xp, tp = normalizer.denormalize(x64), normalizer.denormalize(t64)
    out = {"mse": mse(x64, t64), "mae": mae(x64, t64)}
    w = wrmse(xp, tp, lat)
    for v in TABLE_VARS:
        out[f"wrmse_{v}"] = w[..., channel_index(v)]
    if geo:
        out["geo_score"] = geo_score(xp, tp, lat, lon)
    res = {}
    for k, v in out.items():
        v = v.detach().cpu().numpy()
        res[k] = v.mean(axis=1) if has_members else v
    return res


def probabilistic_metrics(ens_norm: torch.Tensor, truth_norm: torch.Tensor, normalizer: Normalizer,
                          lat: np.ndarray) -> dict[str, np.ndarray]:
    """Fair CRPS (mean over the 69 normalised channels; z500 in physical units) and the
    spread/skill ratio (mean over channels; z500) of an ensemble (T, N, 69, H, W). (T,) arrays."""
    e64, t64 = ens_norm.double(), truth_norm.double()
    crps = crps_ensemble(e64, t64, lat)
    ss = spread_skill(e64, t64, lat)
    iz = channel_index("z500")
    std = float(normalizer.std[iz])
    return {
        "crps": crps.mean(dim=-1).cpu().numpy(),
        "crps_z500": (crps[..., iz] * std).cpu().numpy(),
        "spread_skill": ss.mean(dim=-1).cpu().numpy(),
        "spread_skill_z500": ss[..., iz].cpu().numpy(),
    }


def analysis_scores(xa: torch.Tensor, truth: torch.Tensor, normalizer: Normalizer, lat: np.ndarray,
                    lon: np.ndarray) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Every analysis score of an ensemble ``xa`` (T, N, 69, H, W) against ``truth`` (T, 69, H, W),
    both normalised: ``{("analysis", stat): {metric: (T,)}}``, stat ``member`` (each member's
    score, averaged), ``ensmean`` (the members' mean) or ``ensemble`` (CRPS, spread/skill)."""
    return {
        ("analysis", "member"): deterministic_metrics(xa, truth, normalizer, lat, lon),
        ("analysis", "ensmean"): deterministic_metrics(xa.mean(dim=1), truth, normalizer, lat, lon),
        ("analysis", "ensemble"): probabilistic_metrics(xa, truth, normalizer, lat),
    }


def member_inputs(x_prev: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forecaster's two input frames of every member, flattened: ``x_prev`` (T, 69, H, W)
    repeated over the members of ``x0`` (T, N, 69, H, W), or one per member (T, N, 69, H, W, e.g.
    :func:`align_rl.models.forecaster.first_frames`); both (T·N, 69, H, W), time-major."""
    T, N = x0.shape[:2]
    if x_prev.ndim == x0.ndim:
        return x_prev.reshape(T * N, *x0.shape[2:]), x0.reshape(T * N, *x0.shape[2:])
    return (x_prev.unsqueeze(1).expand_as(x0).reshape(T * N, *x0.shape[2:]),
            x0.reshape(T * N, *x0.shape[2:]))


def forecast_from(forecaster: Any, x_prev: torch.Tensor, x0: torch.Tensor, steps: int,
                  batch: int = 64) -> torch.Tensor:
    """The ``steps`` × 6 h forecast (normalised, the shape of ``x0``) from ``(x_prev (T, 69, H, W),
    x0 (T, [N,] 69, H, W))``: the forecaster's rollout, its last frame."""
    has_members = x0.ndim == 5
    prev, cur = member_inputs(x_prev, x0) if has_members else (x_prev, x0)
    out = []
    dev = module_device(forecaster)
    with torch.no_grad():
        for i in range(0, cur.shape[0], batch):
            r = forecaster.rollout(prev[i:i + batch].to(dev), cur[i:i + batch].to(dev), steps)
            out.append(r[:, -1].float().cpu())
    f = torch.cat(out)
    return f.reshape(x0.shape) if has_members else f


def score_batch(xa: torch.Tensor, truth: torch.Tensor, prev: torch.Tensor | None, truth_fc: torch.Tensor,
                forecaster: Any, steps: int, normalizer: Normalizer, lat: np.ndarray,
                lon: np.ndarray, forecasts: torch.Tensor | None = None
                ) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Every score of an analysis ensemble ``xa`` (T, N, 69, H, W) and of its forecasts:
    ``{(kind, stat): {metric: (T,)}}`` with kind ``analysis`` (against ``truth`` (T, 69, H, W))
    or ``forecast`` (``steps`` × 6 h from ``(prev, member)`` against ``truth_fc``), stat
    ``member`` (each member's score, averaged), ``ensmean`` (the members' mean) or ``ensemble``
    (CRPS, spread/skill). ``prev`` may be None when ``forecasts`` are given.
    ``forecasts``: the members' forecasts when already made elsewhere
    (e.g. on forecast actors), else made here."""
    out = analysis_scores(xa, truth, normalizer, lat, lon)
    fm = forecast_from(forecaster, prev, xa, steps) if forecasts is None else forecasts
    out[("forecast", "member")] = deterministic_metrics(fm, truth_fc, normalizer, lat, lon, geo=False)
    out[("forecast", "ensmean")] = deterministic_metrics(fm.mean(dim=1), truth_fc, normalizer, lat, lon,
                                                         geo=False)
    out[("forecast", "ensemble")] = probabilistic_metrics(fm, truth_fc, normalizer, lat)
    return out
