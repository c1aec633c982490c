"""Paired changes of an aligned model against the reference, and the verdict of a gain
(docs/method.md §10): moving-block bootstrap intervals over the analysis times of one trajectory."""

from __future__ import annotations

import numpy as np


def block_length(n: int) -> int:
    """Moving-block length for ``n`` consecutive analysis times of one trajectory: ``⌈n^(1/3)⌉``
    (the usual rate for the variance of a mean), at least 1."""
    return max(1, int(np.ceil(n ** (1.0 / 3.0)))) if n > 0 else 1


def paired_change(model: np.ndarray, base: np.ndarray, n_boot: int = 2000, seed: int = 0,
                  block: int | None = None) -> dict:
    """% change of the time-mean of ``model`` against ``base`` (paired (T,) arrays, times in
    order along one trajectory) and its 95 % interval by a moving-block bootstrap: blocks of
    ``block`` consecutive times (default :func:`block_length`) drawn with replacement, the same
    draw for both, so neighbouring, correlated times are not counted as independent.

    Times where either value is not finite (an analysis that diverged) are left out of the change
    and counted in ``n_nan``; ``n`` is the number of times used."""
    model, base = np.asarray(model, np.float64), np.asarray(base, np.float64)
    ok = np.isfinite(model) & np.isfinite(base)
    n_nan = int((~ok).sum())
    model, base = model[ok], base[ok]
    T = len(model)
    L = int(block or block_length(T))
    out = {"pct": float("nan"), "ci": [float("nan"), float("nan")], "n": T, "n_nan": n_nan, "block": L}
    if T == 0 or base.mean() == 0:
        return out
    out["pct"] = float(100.0 * (model.mean() / base.mean() - 1.0))
    if T < 2:
        return out
    L = min(L, T)
    rng = np.random.default_rng(seed)
    nb = int(np.ceil(T / L))
    starts = rng.integers(0, T - L + 1, size=(n_boot, nb))
    idx = (starts[:, :, None] + np.arange(L)[None, None, :]).reshape(n_boot, -1)[:, :T]
    ratios = 100.0 * (model[idx].mean(axis=1) / base[idx].mean(axis=1) - 1.0)
    out["ci"] = [float(v) for v in np.percentile(ratios, [2.5, 97.5])]
    return out


def gain_verdict(changes: dict, table: str = "analysis") -> dict:
    """Whether an aligned model's change counts as a gain (``docs/method.md`` §10): the
    single-member MSE falls with its 95 % interval below 0, **and** neither the ensemble-mean MSE
    nor the CRPS rises (point estimates ≤ 0), **and** no analysis diverged. ``changes``:
    ``{table: {stat: {metric: paired_change}}}`` of one row. Returns ``{"gain": bool, "why": str}``."""
    t = changes.get(table, {})
    single = t.get("member", {}).get("mse")
    ens = t.get("ensmean", {}).get("mse")
    crps = t.get("ensemble", {}).get("crps")
    if single is None or not np.isfinite(single["pct"]):
        return {"gain": False, "why": "no single-member MSE"}
    nan = max(int(c.get("n_nan", 0)) for c in (single, ens, crps) if c)
    if nan:
        return {"gain": False, "why": f"{nan} time(s) with NaN analyses"}
    if not (single["pct"] < 0 and single["ci"][1] < 0):
        return {"gain": False, "why": f"single-member MSE {single['pct']:+.2f} % "
                                      f"[{single['ci'][0]:+.2f}, {single['ci'][1]:+.2f}] not below 0"}
    for name, c in (("ensemble-mean MSE", ens), ("CRPS", crps)):
        if c is not None and np.isfinite(c["pct"]) and c["pct"] > 0:
            return {"gain": False, "why": f"{name} rose {c['pct']:+.2f} %"}
    return {"gain": True, "why": "single-member MSE lower (CI below 0), ensemble-mean MSE and CRPS not higher"}

