"""Scoring an analysis (or forecast) store against a truth store, WeatherBench2 style
(docs/method.md §7, §10): ``score_stores`` (what ``python -m align_rl.score`` calls; what is scored,
the regions and the two RMSE conventions are described in :mod:`align_rl.score`), ``csv_rows`` and
``write_results``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from align_rl.io import era5
from align_rl.errors import InputError
from align_rl.evaluation.geostrophic import geo_score
from align_rl.io.grid import cell_area_weights
from align_rl.io.normalization import Normalizer
from align_rl.io.schema import CHANNEL_INFO, CHANNELS, N_CHANNELS, channel_index

REGIONS: dict[str, tuple[float, float] | str] = {
    "global": (-90.0, 90.0),
    "tropics": (-20.0, 20.0),
    "extratropics": "extratropics",
    "nh-extratropics": (20.0, 90.0),
    "sh-extratropics": (-90.0, -20.0),
}
DEFAULT_REGIONS = ("global", "tropics", "extratropics")
RMSE_CHOICES = ("both", "per-time", "wb2")
REGRID_CHOICES = ("none", "truth-to-analysis", "analysis-to-truth")
CONVENTIONS = {
    "weights": "cell area from the latitude coordinate: row edges midway between rows, the outer "
               "edges at the poles (rows on a pole are half cells), as WeatherBench2; "
               "cos(lat)/mean(cos(lat)) on a cell-centred grid",
    "wrmse": "mean over time steps of sqrt(area-weighted spatial mean of the squared error): the "
             "per-time-step convention of the paper's annual scores",
    "wrmse_wb2": "sqrt(mean over time steps of the area-weighted spatial mean of the squared "
                 "error): WeatherBench2's headline RMSE",
    "units": "wrmse in each variable's physical units (see 'units')",
    "mse_mae": "over the scored channels in normalised units, unweighted, per time step then "
               "averaged (the paper's Table 1); only with normalisation statistics",
    "geo_score": "100 · 2σ(−|D − D_gt| / max(D_gt, 1e-3)) of the 500 hPa geostrophic imbalance, "
                 "per time step then averaged",
}


def region_rows(name: str, lat: np.ndarray) -> np.ndarray:
    """Boolean row mask of a region (see the module doc) for latitudes ``lat`` (degrees)."""
    lat = np.asarray(lat, dtype=np.float64)
    spec = REGIONS.get(name)
    if spec == "extratropics":
        mask = np.abs(lat) >= 20.0
    elif spec is not None:
        lo, hi = spec
        mask = (lat >= lo - 1e-9) & (lat <= hi + 1e-9)
    elif name.startswith("band:"):
        try:
            _, lo_s, hi_s = name.split(":")
            lo, hi = float(lo_s), float(hi_s)
        except ValueError:
            raise InputError(f"region {name!r} must be band:LO:HI in degrees, e.g. band:30:60") from None
        if not -90 <= lo < hi <= 90:
            raise InputError(f"region {name!r}: need -90 <= LO < HI <= 90")
        mask = (lat >= lo - 1e-9) & (lat <= hi + 1e-9)
    else:
        raise InputError(f"unknown region {name!r}; regions are {', '.join(REGIONS)} or band:LO:HI")
    if not mask.any():
        raise InputError(f"region {name!r} holds no grid row of this grid")
    return mask


def _select_channels(shared: list[str], variables: Sequence[str] | None) -> list[str]:
    if not variables:
        return shared
    want: list[str] = []
    var_names = {c.var for c in CHANNEL_INFO}
    for v in variables:
        if v in var_names:  # a variable: its levels that both stores hold
            names = [c.name for c in CHANNEL_INFO if c.var == v and c.name in shared]
            if not names:
                raise InputError(f"no level of {v!r} is in both stores (they share {', '.join(shared)})")
        elif v in CHANNELS:
            if v not in shared:
                raise InputError(f"{v} is not in both stores (they share {', '.join(shared)})")
            names = [v]
        else:
            raise InputError(f"unknown channel or variable {v!r}; e.g. z500, t850, u10 or z")
        want += [n for n in names if n not in want]
    return [c for c in shared if c in want]


def _normalizer(normalization: str | Path | None, truth_attrs: dict) -> tuple[Normalizer | None, str | None]:
    if normalization is not None:
        return era5.load_normalizer(normalization), str(normalization)
    if "normalization" in truth_attrs:
        try:
            return Normalizer.from_dict(truth_attrs["normalization"]), "truth store"
        except Exception as exc:  # noqa: BLE001 - malformed statistics: say so
            raise InputError(f"the truth store's normalisation statistics are malformed ({exc}); "
                             "pass --normalization FILE") from None
    return None, None


@dataclass
class _Setup:
    """What the two stores share and how it is scored: the common times and channels, the
    scoring grid (``grid``; ``ga``/``gt`` the stores' grids), the statistics and the regions'
    normalised row weights (``weights[r]``: (H,), summing with the longitudes to 1)."""

    analysis: str | Path
    truth: str | Path
    ia: dict
    it: dict
    times: np.ndarray
    chans: list[str]
    ga: Any
    gt: Any
    grid: Any
    regrid: str
    norm: Normalizer | None
    norm_src: str | None
    masks: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]
    do_geo: bool


@dataclass
class _Sums:
    """Running sums over time steps: per region the (C,) sums of the per-step weighted MSE and
    of its square root; the normalised MSE/MAE and the Geo-Score."""

    mse: dict[str, np.ndarray]
    rmse: dict[str, np.ndarray]
    scalars: dict[str, float] = field(default_factory=lambda: {"mse": 0.0, "mae": 0.0, "geo_score": 0.0})


GEO_CHANNELS = ("z500", "u500", "v500")


def score_stores(
    analysis: str | Path,
    truth: str | Path,
    normalization: str | Path | None = None,
    chunk: int = 16,
    progress: bool = True,
    regions: Sequence[str] = DEFAULT_REGIONS,
    rmse: str = "both",
    variables: Sequence[str] | None = None,
    regrid: str = "none",
    check_units: bool = True,
) -> dict[str, Any]:
    """The scores of ``analysis`` against ``truth`` (see the module doc) as a JSON-able dict;
    ``check_units``: refuse values implausible in SI units (:mod:`align_rl.io.plausibility`)."""
    if rmse not in RMSE_CHOICES:
        raise InputError(f"rmse={rmse!r} is not one of {', '.join(RMSE_CHOICES)}")
    if regrid not in REGRID_CHOICES:
        raise InputError(f"regrid={regrid!r} is not one of {', '.join(REGRID_CHOICES)}")
    su = _setup(analysis, truth, normalization, regions, variables, regrid)
    sums = _Sums({r: np.zeros(len(su.chans)) for r in su.masks}, {r: np.zeros(len(su.chans)) for r in su.masks})
    steps = range(0, len(su.times), max(1, int(chunk)))
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="score", unit="chunk", file=sys.stderr, leave=False)
    for s in steps:
        _add_chunk(su, su.times[s:s + chunk], check_units, sums)
    return _result(su, sums, rmse)


def _setup(analysis: str | Path, truth: str | Path, normalization: str | Path | None,
           regions: Sequence[str], variables: Sequence[str] | None, regrid: str) -> _Setup:
    """The common times, channels and grid of the stores (InputError when they share none)."""
    ia, it = era5.store_info(analysis), era5.store_info(truth)
    shared_t = np.intersect1d(ia["times"], it["times"])
    if len(shared_t) == 0:
        raise InputError(
            f"{analysis} and {truth} share no time steps (analysis holds "
            f"{_span(ia['times'])}, truth {_span(it['times'])}); score an analysis of the truth's period"
        )
    shared = [c for c in CHANNELS if c in ia["channels"] and c in it["channels"]]
    if not shared:
        raise InputError(
            f"{analysis} and {truth} share no channel (analysis: {', '.join(ia['channels']) or 'none'}; "
            f"truth: {', '.join(it['channels']) or 'none'}); both need a variable by its "
            "WeatherBench2 long name at a common level"
        )
    chans = _select_channels(shared, variables)
    ga, gt = ia["grid"], it["grid"]
    grid = _scoring_grid(ga, gt, regrid)
    norm, norm_src = _normalizer(normalization, it["attrs"])
    masks = {r: region_rows(r, grid.lat) for r in dict.fromkeys(regions)}
    w_all = cell_area_weights(grid.lat)
    weights = {r: np.where(m, w_all, 0.0) / (w_all[m].sum() * grid.nlon) for r, m in masks.items()}
    return _Setup(analysis, truth, ia, it, shared_t, chans, ga, gt, grid, regrid, norm, norm_src,
                  masks, weights, all(c in chans for c in GEO_CHANNELS))


def _scoring_grid(ga: Any, gt: Any, regrid: str) -> Any:
    """The grid the scores are computed on (the analysis's unless ``analysis-to-truth``)."""
    if ga != gt and regrid == "none":
        raise InputError(
            f"the analysis grid {ga} differs from the truth grid {gt}; pass --regrid "
            "truth-to-analysis (WeatherBench2's way: the truth on the forecast's grid) or "
            "analysis-to-truth to regrid one conservatively"
        )
    grid = gt if regrid == "analysis-to-truth" else ga
    src = ga if regrid == "analysis-to-truth" else gt
    if ga != gt and grid.poles and not src.poles and grid.dlat <= src.dlat / 2 + 1e-9:
        raise InputError(
            f"conservative regridding from the grid {src} onto the finer grid {grid} is not "
            "offered (its pole rows would stay empty); use --regrid "
            f"{'truth-to-analysis' if regrid == 'analysis-to-truth' else 'analysis-to-truth'}"
        )
    return grid


def _add_chunk(su: _Setup, times: np.ndarray, check_units: bool, sums: _Sums) -> None:
    """Read ``times`` of both stores (physical, (T, C, H, W)), regrid, and add their scores."""
    xa = era5.open_fields(su.analysis, su.chans, times=times).values.astype(np.float64)
    xt = era5.open_fields(su.truth, su.chans, times=times).values.astype(np.float64)
    if check_units:
        from align_rl.io.plausibility import check_units as _check_units

        _check_units(xa, f"store {su.analysis}", su.chans)
        _check_units(xt, f"store {su.truth}", su.chans)
    if su.ga != su.gt:
        from align_rl.io.regrid import regrid as _regrid

        if su.regrid == "analysis-to-truth":
            xa = _regrid(xa, su.ga, su.gt, "conservative")
        else:
            xt = _regrid(xt, su.gt, su.ga, "conservative")
    row_mse = ((xa - xt) ** 2).sum(axis=-1)  # (T, C, H)
    for r, w in su.weights.items():
        m = row_mse @ w  # (T, C): weighted spatial mean
        sums.mse[r] += m.sum(axis=0)
        sums.rmse[r] += np.sqrt(m).sum(axis=0)
    if su.norm is not None:
        cidx = np.array([channel_index(c) for c in su.chans])
        mu, sd = su.norm.mean[cidx][:, None, None], su.norm.std[cidx][:, None, None]
        d = (xa - mu) / sd - (xt - mu) / sd
        sums.scalars["mse"] += float((d ** 2).mean(axis=(1, 2, 3)).sum())
        sums.scalars["mae"] += float(np.abs(d).mean(axis=(1, 2, 3)).sum())
    if su.do_geo:
        full_a = np.zeros((len(times), N_CHANNELS) + xa.shape[-2:])
        full_t = np.zeros_like(full_a)
        for c in GEO_CHANNELS:
            full_a[:, channel_index(c)] = xa[:, su.chans.index(c)]
            full_t[:, channel_index(c)] = xt[:, su.chans.index(c)]
        sums.scalars["geo_score"] += float(np.sum(geo_score(full_a, full_t, su.grid.lat, su.grid.lon)))


def _result(su: _Setup, sums: _Sums, rmse: str) -> dict[str, Any]:
    """The JSON-able result of :func:`score_stores` from the sums over its ``n`` times."""
    n, chans, lat, (ga, gt) = len(su.times), su.chans, su.grid.lat, (su.ga, su.gt)
    ia, it, regrid = su.ia, su.it, su.regrid

    def per_channel(arr: np.ndarray) -> dict[str, float]:
        return {c: float(v) for c, v in zip(chans, arr)}

    out: dict[str, Any] = {
        "analysis": str(su.analysis),
        "truth": str(su.truth),
        "n_times": int(n),
        "first_time": np.datetime_as_string(su.times[0], unit="s"),
        "last_time": np.datetime_as_string(su.times[-1], unit="s"),
        "grid": str(su.grid),
        "regridded": None if ga == gt else f"{regrid} (conservative, xarray-regrid): {ga} → {gt}"
        if regrid == "analysis-to-truth" else f"{regrid} (conservative, xarray-regrid): {gt} → {ga}",
        "channels": chans,
        "not_scored": {"analysis_only": [c for c in ia["channels"] if c not in it["channels"]],
                       "truth_only": [c for c in it["channels"] if c not in ia["channels"]]},
        "units": {c: CHANNEL_INFO[channel_index(c)].units for c in chans},
        "rmse": rmse,
        "conventions": {k: v for k, v in CONVENTIONS.items()
                        if not ((k == "wrmse" and rmse == "wb2") or (k == "wrmse_wb2" and rmse == "per-time"))},
    }
    region_out: dict[str, Any] = {}
    for r, rows in su.masks.items():
        entry: dict[str, Any] = {"lat_range": [float(lat[rows].min()), float(lat[rows].max())],
                                 "rows": int(rows.sum())}
        if rmse in ("both", "per-time"):
            entry["wrmse"] = per_channel(sums.rmse[r] / n)
        if rmse in ("both", "wb2"):
            entry["wrmse_wb2"] = per_channel(np.sqrt(sums.mse[r] / n))
        region_out[r] = entry
    if "global" in region_out:
        for k in ("wrmse", "wrmse_wb2"):
            if k in region_out["global"]:
                out[k] = region_out["global"][k]
    out["regions"] = region_out
    if su.norm is not None:
        out["mse"] = sums.scalars["mse"] / n
        out["mae"] = sums.scalars["mae"] / n
        out["normalization"] = su.norm_src
    else:
        out["normalization"] = None
        out["conventions"].pop("mse_mae")
    if su.do_geo:
        out["geo_score"] = sums.scalars["geo_score"] / n
    else:
        out["conventions"].pop("geo_score")
    return out


def _span(t: np.ndarray) -> str:
    if len(t) == 0:
        return "no times"
    return f"{np.datetime_as_string(t[0], unit='h')} … {np.datetime_as_string(t[-1], unit='h')}"


def csv_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (region, metric, channel) of a :func:`score_stores` result; scalar scores
    (mse, mae, geo_score) with region ``global`` and an empty channel."""
    rows = []
    for region, entry in result["regions"].items():
        for metric in ("wrmse", "wrmse_wb2"):
            for ch, v in entry.get(metric, {}).items():
                rows.append({"region": region, "metric": metric, "channel": ch, "value": v,
                             "units": result["units"][ch]})
    for metric in ("mse", "mae", "geo_score"):
        if metric in result:
            rows.append({"region": "global", "metric": metric, "channel": "", "value": result[metric],
                         "units": "normalised" if metric != "geo_score" else "score (0-100)"})
    return rows


def _csv_text(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["region", "metric", "channel", "value", "units"])
    w.writeheader()
    for row in csv_rows(result):
        w.writerow({**row, "value": repr(float(row["value"]))})
    return buf.getvalue()


def _write_texts_atomic(items: list[tuple[Path, str]]) -> None:
    """Write every ``(path, text)`` to a temporary file first, then rename them all."""
    tmps = []
    try:
        for path, text in items:
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            tmps.append(tmp)
            tmp.write_text(text)
        for (path, _), tmp in zip(items, tmps):
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` via a temporary file and a rename."""
    path = Path(path)
    _write_texts_atomic([(path, json.dumps(obj, indent=2) + "\n")])
    return path


def write_results(result: dict[str, Any], out: str | Path | None, csv_path: str | Path | None = None) -> list[Path]:
    """Write the JSON to ``out`` and the CSV to ``csv_path`` (default: ``out`` with ``.csv``)."""
    items: list[tuple[Path, str]] = []
    if out:
        items.append((Path(out), json.dumps(result, indent=2) + "\n"))
        if csv_path is None:
            csv_path = Path(out).with_suffix(".csv")
    if csv_path:
        items.append((Path(csv_path), _csv_text(result)))
    _write_texts_atomic(items)
    return [p for p, _ in items]


