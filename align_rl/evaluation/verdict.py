"""What counts as an alignment gain (docs/method.md §10): verdict lines that a narrower ensemble
cannot pass, each an intersection of one-sided bootstrap tests over correlated test times
(:mod:`align_rl.evaluation.bootstrap`), Holm-corrected over the family of lines shown together.

An MSE line (aligned model, method, kind = analysis | forecast) is a gain when

1. the ensemble-mean MSE and the CRPS are lower than the reference's, **and** the single-member
   MSE and the CRPS are lower than those of the *shrink* baseline (the reference members pulled
   towards their mean until their spread equals the model's, :mod:`align_rl.evaluation.baselines`):
   the line's p-value is the largest of these four one-sided p-values (intersection-union test),
   and its Holm-adjusted p-value is at most :data:`ALPHA` (one-sided 2.5 % = a 95 % two-sided
   interval below 0);
2. the spread/skill is no further from 1 than the reference's: the 95 % interval of
   ``|SS_model − 1| − |SS_ref − 1|`` reaches 0 or below;
3. with several seeds (the row is their mean): every seed's ensemble-mean MSE and CRPS point
   changes are below 0;
4. no analysis diverged (no NaN time).

A Geo-Score line (an ``-P`` model, analyses) is a gain when the Geo-Score is higher than the
reference's and than the *towards the background* baseline's (the reference blended with x_b to the
model's MSE), Holm-adjusted p ≤ :data:`ALPHA`, every seed's change above 0, no NaN.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from align_rl.evaluation.bootstrap import (N_BOOT, closer_to_one, holm, paired_change, paired_stat,
                                           pct_change)

__all__ = ["ALPHA", "paired_change", "holm", "mse_line", "geo_line", "decide"]

ALPHA = 0.025
"""One-sided family level of the Holm correction (= a two-sided 95 % interval below 0)."""


def cell_series(ds: xr.Dataset, setting: str, model: str, method: str, kind: str, stat: str,
            metric: str) -> np.ndarray | None:
    """Per-time scores (T,) of one cell, or None when it was not scored (or is not in ``ds``)."""
    sel = {"setting": setting, "model": model, "method": method, "kind": kind, "stat": stat, "metric": metric}
    try:
        if not bool(ds["scored"].sel(sel)):
            return None
        return np.asarray(ds["score"].sel(sel).values, np.float64)
    except KeyError:
        return None


def seed_rows(ds: xr.Dataset, model: str) -> list[str]:
    """The per-seed rows whose mean is the row ``model`` (empty for a single seed)."""
    if "seed_of" not in ds.coords:
        return []
    return [str(m) for m, g in zip(ds["model"].values, ds["seed_of"].values) if str(g) == model]


def trivial_row(ds: xr.Dataset, model: str, kind: str) -> str | None:
    """The trivial baseline built for ``model`` (``shrink`` or ``blend``), or None."""
    if "trivial_for" not in ds.coords:
        return None
    for m, f, k in zip(ds["model"].values, ds["trivial_for"].values, ds["trivial_kind"].values):
        if str(f) == model and str(k) == kind:
            return str(m)
    return None


def _test(name: str, c: dict, side: str) -> dict:
    return {"name": name, "value": c.get("pct", c.get("value")), "ci": c["ci"], "p": c[f"p_{side}"],
            "n_nan": c["n_nan"], "n": c["n"], "ess": c["ess"], "block": c["block"]}


def mse_line(ds: xr.Dataset, model: str, method: str, kind: str, reference: str = "reference",
             setting: str = "main", seed: int = 0) -> dict | None:
    """One MSE verdict line (module doc) before the Holm correction, or None when the model or the
    reference was not scored there. Returns ``{"model", "method", "kind", "setting", "p"
    (intersection-union p-value), "tests": [...], "spread_skill": {...}, "seeds": [...],
    "conditions": {name: bool}, "why": [...]}``."""
    args = (setting, method, kind)

    def s(m, stat, metric):
        return cell_series(ds, setting, m, method, kind, stat, metric)

    mm, rm = s(model, "ensmean", "mse"), s(reference, "ensmean", "mse")
    if mm is None or rm is None:
        return None
    tests = [_test("ensemble-mean MSE vs reference", paired_change(mm, rm, seed=seed), "lo")]
    mc, rc = s(model, "ensemble", "crps"), s(reference, "ensemble", "crps")
    if mc is not None and rc is not None:
        tests.append(_test("CRPS vs reference", paired_change(mc, rc, seed=seed), "lo"))
    shrink = trivial_row(ds, model, "shrink")
    if shrink is not None:
        for stat, metric, label in (("member", "mse", "single-member MSE vs shrink"),
                                    ("ensemble", "crps", "CRPS vs shrink")):
            a, b = s(model, stat, metric), s(shrink, stat, metric)
            if a is not None and b is not None:
                tests.append(_test(label, paired_change(a, b, seed=seed), "lo"))
    line = {"model": model, "method": method, "kind": kind, "setting": setting, "what": "MSE",
            "tests": tests, "p": max(t["p"] if np.isfinite(t["p"]) else 1.0 for t in tests),
            "why": []}
    cond = {"tests": True}
    sm, sr = s(model, "ensemble", "spread_skill"), s(reference, "ensemble", "spread_skill")
    if sm is not None and sr is not None:
        c = paired_stat(sm, sr, closer_to_one, seed=seed)
        line["spread_skill"] = {"model": float(np.nanmean(sm)), "reference": float(np.nanmean(sr)),
                                "further": c["value"], "ci": c["ci"]}
        cond["spread/skill no further from 1"] = bool(np.isfinite(c["ci"][0]) and c["ci"][0] <= 0)
    line["seeds"] = _seed_points(ds, model, reference, setting, method, kind,
                                 (("ensmean", "mse"), ("ensemble", "crps")), seed)
    if line["seeds"]:
        cond["every seed lower"] = all(all(np.isfinite(v) and v < 0 for v in p.values()) for p in line["seeds"])
    nan = max(int(t["n_nan"]) for t in tests)
    cond["no NaN"] = nan == 0
    line["conditions"] = cond
    if not cond["no NaN"]:
        line["why"].append(f"{nan} time(s) with NaN analyses")
    if "spread/skill no further from 1" in cond and not cond["spread/skill no further from 1"]:
        ss = line["spread_skill"]
        line["why"].append(f"spread/skill {ss['model']:.2f} further from 1 than the reference's "
                           f"{ss['reference']:.2f} (interval of the excess [{ss['ci'][0]:+.3f}, {ss['ci'][1]:+.3f}])")
    if "every seed lower" in cond and not cond["every seed lower"]:
        line["why"].append("not every seed lowers the ensemble-mean MSE and the CRPS")
    return line


def geo_line(ds: xr.Dataset, model: str, method: str, reference: str = "reference", setting: str = "main",
             seed: int = 0) -> dict | None:
    """One Geo-Score verdict line (module doc) before the Holm correction, or None."""
    def s(m):
        return cell_series(ds, setting, m, method, "analysis", "member", "geo_score")

    gm, gr = s(model), s(reference)
    if gm is None or gr is None:
        return None
    tests = [_test("Geo-Score vs reference", paired_change(gm, gr, seed=seed), "hi")]
    blend = trivial_row(ds, model, "blend")
    if blend is not None and s(blend) is not None:
        tests.append(_test("Geo-Score vs towards-the-background", paired_change(gm, s(blend), seed=seed), "hi"))
    line = {"model": model, "method": method, "kind": "analysis", "setting": setting, "what": "Geo-Score",
            "tests": tests, "p": max(t["p"] if np.isfinite(t["p"]) else 1.0 for t in tests), "why": [],
            "gain_points": float(np.nanmean(gm) - np.nanmean(gr))}
    cond = {"tests": True}
    line["seeds"] = _seed_points(ds, model, reference, setting, method, "analysis", (("member", "geo_score"),),
                                 seed)
    if line["seeds"]:
        cond["every seed higher"] = all(all(np.isfinite(v) and v > 0 for v in p.values()) for p in line["seeds"])
        if not cond["every seed higher"]:
            line["why"].append("not every seed raises the Geo-Score")
    nan = max(int(t["n_nan"]) for t in tests)
    cond["no NaN"] = nan == 0
    if nan:
        line["why"].append(f"{nan} time(s) with NaN analyses")
    line["conditions"] = cond
    return line


def _seed_points(ds, model, reference, setting, method, kind, cells, seed) -> list[dict]:
    """Per seed row of ``model``: ``{"<stat>/<metric>": % change of the time mean against the
    reference}`` (point estimates)."""
    out = []
    for row in seed_rows(ds, model):
        pts = {}
        for stat, metric in cells:
            a = cell_series(ds, setting, row, method, kind, stat, metric)
            b = cell_series(ds, setting, reference, method, kind, stat, metric)
            if a is not None and b is not None:
                ok = np.isfinite(a) & np.isfinite(b)
                pts[f"{stat}/{metric}"] = float(pct_change(a[ok].mean(), b[ok].mean())) if ok.any() else float("nan")
        out.append(pts)
    return out


def decide(lines: list[dict], alpha: float = ALPHA) -> list[dict]:
    """The Holm correction over the family ``lines`` (adds ``p_holm``), and each line's verdict:
    ``gain`` (bool) and ``why`` (the reasons it is not a gain, or what it passed)."""
    adj = holm([ln["p"] for ln in lines])
    for ln, p in zip(lines, adj):
        ln["p_holm"] = p
        ln["conditions"]["tests"] = bool(p <= alpha)
        if p > alpha:
            worst = max(ln["tests"], key=lambda t: t["p"] if np.isfinite(t["p"]) else 1.0)
            ln["why"].insert(0, f"{worst['name']} {_fmt(worst)} not significant after Holm over "
                                f"{len(lines)} lines (p = {p:.3f} > {alpha})")
        ln["gain"] = all(ln["conditions"].values())
        if ln["gain"]:
            ln["why"] = [f"all tests pass after Holm over {len(lines)} lines (p = {p:.3f})"]
    return lines


def _fmt(t: dict) -> str:
    v, (lo, hi) = t["value"], t["ci"]
    if v is None or not np.isfinite(v):
        return "n/a"
    return f"{v:+.2f} % [{lo:+.2f}, {hi:+.2f}]"


__all__ += ["N_BOOT", "cell_series", "seed_rows", "trivial_row"]
