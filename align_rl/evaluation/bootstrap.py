"""Paired changes over correlated test times (docs/method.md §10): the block length from the
autocorrelation of the paired differences (Politis-White automatic choice,
:func:`arch.bootstrap.optimal_block_length`), circular-block bootstrap draws
(:class:`arch.bootstrap.CircularBlockBootstrap`, the same draw for model and base), the
effective sample size of the differences (Geyer's initial positive sequence over
:func:`statsmodels.tsa.stattools.acf`) and one-sided bootstrap p-values.

Inputs are paired ``(T,)`` arrays of per-time scores in time order along one trajectory.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Callable

import numpy as np

N_BOOT = 2000
"""Bootstrap draws of every change."""


def block_length(diff: np.ndarray) -> int:
    """Circular-block length for the paired differences ``diff`` (T,): the Politis-White (2004,
    corrected by Patton, Politis and White 2009) automatic choice from their autocorrelation,
    rounded up, between 1 and ``T // 2``. 1 for fewer than 8 times or constant differences."""
    d = np.asarray(diff, np.float64)
    T = len(d)
    if T < 8 or not np.isfinite(d).all() or np.ptp(d) == 0:
        return 1
    from arch.bootstrap import optimal_block_length

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = float(optimal_block_length(d)["circular"].iloc[0])
    if not np.isfinite(b):
        return 1
    return int(min(max(1, int(np.ceil(b))), max(1, T // 2)))


def effective_sample_size(x: np.ndarray) -> float:
    """Effective number of independent times of a series ``x`` (T,): ``T / τ`` with the
    integrated autocorrelation time ``τ = −1 + 2 Σ_k (ρ_2k + ρ_2k+1)``, summed while the pair
    sums stay positive (Geyer 1992, initial positive sequence). For an AR(1) series of lag-1
    correlation ρ: ``T (1 − ρ) / (1 + ρ)``. Capped at ``T``; ``T`` for a constant series."""
    x = np.asarray(x, np.float64)
    T = len(x)
    if T < 3 or np.ptp(x) == 0:
        return float(T)
    from statsmodels.tsa.stattools import acf

    rho = acf(x, nlags=T - 1, fft=True)
    tau = -1.0
    for k in range(0, T - 1, 2):
        pair = rho[k] + rho[k + 1]
        if pair <= 0:
            break
        tau += 2.0 * pair
    return float(min(T, T / max(tau, 1e-12)))


@lru_cache(maxsize=64)
def _draws(T: int, block: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, T)`` time indices of circular-block bootstrap draws (cached: every cell of one
    evaluation with the same ``T`` and block shares them)."""
    from arch.bootstrap import CircularBlockBootstrap

    bs = CircularBlockBootstrap(int(block), np.arange(T), seed=int(seed))
    out = np.empty((n_boot, T), dtype=np.int64)
    for i in range(n_boot):
        out[i] = np.asarray(bs.update_indices()).reshape(-1)[:T]
    out.setflags(write=False)
    return out


def pct_change(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``100 (a / b − 1)``: the % change of mean ``a`` against mean ``b``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return 100.0 * (np.asarray(a) / np.asarray(b) - 1.0)


def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a − b``: the change of mean ``a`` against mean ``b`` in the scores' units."""
    return np.asarray(a) - np.asarray(b)


def closer_to_one(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|a − 1| − |b − 1|``: how much further from 1 mean ``a`` is than mean ``b`` (a ratio
    such as spread/skill; negative = closer to 1)."""
    return np.abs(np.asarray(a) - 1.0) - np.abs(np.asarray(b) - 1.0)


def paired_stat(model: np.ndarray, base: np.ndarray, stat: Callable = pct_change, n_boot: int = N_BOOT,
                seed: int = 0, block: int | None = None) -> dict:
    """``stat(mean(model), mean(base))`` of paired per-time scores (T,) and its bootstrap.

    Times where either value is not finite are left out (counted in ``n_nan``). The block
    (default :func:`block_length` of the differences ``model − base``) sets circular-block
    draws of times, the same for both series. Returns ``{"value", "ci": [lo, hi]`` (95 %
    percentile interval), ``"p_lo"`` (one-sided bootstrap p-value that the statistic is
    below 0: ``(1 + #{draws ≥ 0}) / (1 + n_boot)``), ``"p_hi"`` (that it is above 0),
    ``"n"`` (times used), ``"n_nan"``, ``"block"``, ``"ess"`` (:func:`effective_sample_size`
    of the differences)}``."""
    model, base = np.asarray(model, np.float64), np.asarray(base, np.float64)
    if model.shape != base.shape or model.ndim != 1:
        raise ValueError(f"paired scores must be two (T,) arrays of one shape, got {model.shape} and {base.shape}")
    ok = np.isfinite(model) & np.isfinite(base)
    model, base = model[ok], base[ok]
    T = len(model)
    nan = float("nan")
    out = {"value": nan, "ci": [nan, nan], "p_lo": nan, "p_hi": nan, "n": T,
           "n_nan": int((~ok).sum()), "block": 1, "ess": float(T)}
    if T == 0:
        return out
    out["value"] = float(stat(model.mean(), base.mean()))
    if T < 2 or not np.isfinite(out["value"]):
        return out
    d = model - base
    L = int(block) if block else block_length(d)
    out["block"], out["ess"] = L, effective_sample_size(d)
    idx = _draws(T, L, int(n_boot), int(seed))
    boot = stat(model[idx].mean(axis=1), base[idx].mean(axis=1))
    boot = boot[np.isfinite(boot)]
    if len(boot) == 0:
        return out
    out["ci"] = [float(v) for v in np.percentile(boot, [2.5, 97.5])]
    out["p_lo"] = float((1 + np.sum(boot >= 0)) / (1 + len(boot)))
    out["p_hi"] = float((1 + np.sum(boot <= 0)) / (1 + len(boot)))
    return out


def paired_change(model: np.ndarray, base: np.ndarray, n_boot: int = N_BOOT, seed: int = 0,
                  block: int | None = None) -> dict:
    """% change of the time mean of ``model`` against ``base`` (:func:`paired_stat` with
    :func:`pct_change`), as ``{"pct", "ci", "p_lo", "p_hi", "n", "n_nan", "block", "ess"}``."""
    out = paired_stat(model, base, pct_change, n_boot, seed, block)
    out["pct"] = out.pop("value")
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm (1979) step-down adjusted p-values of one family, in the input order; NaN (a test
    that could not be made) counts as 1. Reject the hypotheses whose adjusted p ≤ α."""
    p = np.array([1.0 if not np.isfinite(v) else float(v) for v in pvalues])
    m = len(p)
    order = np.argsort(p, kind="stable")
    adj = np.empty(m)
    run = 0.0
    for rank, i in enumerate(order):
        run = max(run, min(1.0, (m - rank) * p[i]))
        adj[i] = run
    return adj.tolist()
