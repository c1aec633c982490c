"""The evaluation's results as one :class:`xarray.Dataset` (docs/method.md §10).

Dimensions: ``setting`` (observation settings: ``main`` and the ablations; coordinates
``density``, ``sigma_o``, ``ablation``, ``observed_fraction``), ``model`` (``background`` first,
then the models evaluated), ``method`` (guidance), ``kind`` (``analysis`` | ``forecast``),
``stat`` (``member``: each member's score averaged over members; ``ensmean``: the score of the
members' mean; ``ensemble``: CRPS and spread/skill), ``metric`` (coordinate ``units``) and
``time`` (the analysis times). Variables:

- ``score`` (setting, model, method, kind, stat, metric, time): the per-time scores, float64;
- ``scored`` (setting, model, method, kind, stat, metric): whether that score was computed (a
  metric of that kind and stat, a row run in that setting: no ``obsfree`` rows in the ablations,
  no ``ensemble`` stat of the background). The background does not depend on the method: its
  values repeat along ``method``;
- ``time_mean``: the mean over the finite times (NaN where nothing was scored or every time
  diverged);
- the paired change against the baseline model (:func:`align_rl.evaluation.verdict.paired_change`):
  ``pct``, ``ci_lo``, ``ci_hi`` (95 % circular-block bootstrap interval, %), ``p_lo`` / ``p_hi``
  (one-sided bootstrap p-values that the change is below / above 0), ``n`` (times used),
  ``n_nan`` (times left out), ``block`` (block length from the autocorrelation of the paired
  differences), ``ess`` (their effective sample size), where ``compared`` (every scored row of a
  model other than the baseline whose baseline row was scored too).

Coordinates of ``model`` (:mod:`align_rl.evaluation.seeds`, absent in results of older versions):
``seed_of`` (for one seed's row of an aligned model run with several seeds, the row of their
mean, else ``""``), ``seed`` (that seed's index, else −1), ``n_seeds`` (the seeds a row rests on:
several for the mean row, else 1), ``trivial_for`` / ``trivial_kind`` (for a trivial baseline,
:mod:`align_rl.evaluation.baselines`: the aligned row it is built for and ``shrink`` | ``blend``, or
the baseline and ``blend-val`` for the row ``Blend-val``, or the aligned row and
``blend-val-aligned`` for a row ``Blend-val-<row>``; else ``""``).

Attributes: ``baseline``, ``members``, ``grid``, ``forecast_hours``, ``seed``.
Select with ``.sel`` and a dict (``method`` is also the name of ``.sel``'s own keyword), e.g.
``ds.time_mean.sel({"setting": "main", "model": "reference", "method": "dps", "kind": "analysis",
"stat": "member", "metric": "mse"})``; the helpers below return ``None`` for what was not scored.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from align_rl.errors import InputError
from align_rl.evaluation.bootstrap import paired_change

BACKGROUND = "background"
KINDS: tuple[str, ...] = ("analysis", "forecast")
STATS: tuple[str, ...] = ("member", "ensmean", "ensemble")
CELL_DIMS: tuple[str, ...] = ("setting", "model", "method", "kind", "stat", "metric")
CHANGE_VARS: tuple[str, ...] = ("pct", "ci_lo", "ci_hi", "p_lo", "p_hi", "n", "n_nan", "block", "ess")
UNITS: dict[str, str] = {
    "mse": "normalised", "mae": "normalised", "wrmse_u10": "m/s", "wrmse_v500": "m/s",
    "wrmse_z500": "m2/s2", "wrmse_t850": "K", "geo_score": "score (0-100)", "crps": "normalised",
    "crps_z500": "m2/s2", "spread_skill": "ratio", "spread_skill_z500": "ratio",
}
NETCDF_ENGINE = "scipy"  # NetCDF3 64-bit offset: no netCDF4/h5netcdf dependency


@dataclass
class ScoreTable:
    """Per-time scores collected batch by batch: ``add`` appends the ``(B,)`` scores of the next
    batch of times to a cell; :meth:`to_dataset` lays them out on the dimensions above."""

    cells: dict = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)  # in the order first seen

    def add(self, setting: str, model: str, method: str, kind: str, stat: str,
            metrics: dict[str, np.ndarray]) -> None:
        """Append the scores ``{metric: (B,)}`` of the next batch of times to one cell."""
        if kind not in KINDS or stat not in STATS:
            raise InputError(f"score kind {kind!r} / stat {stat!r} is not one of {KINDS} / {STATS}")
        cell = self.cells.setdefault((setting, model, method, kind, stat), {})
        for k, v in metrics.items():
            if k not in self.metrics:
                self.metrics.append(k)
            cell.setdefault(k, []).append(np.asarray(v, dtype=np.float64).reshape(-1))

    def series(self, setting: str, model: str, method: str, kind: str, stat: str) -> dict[str, np.ndarray]:
        """``{metric: (T,)}`` collected so far in one cell (empty when none)."""
        cell = self.cells.get((setting, model, method, kind, stat), {})
        return {m: np.concatenate(parts) for m, parts in cell.items()}

    def add_mean(self, setting: str, target: str, sources: list[str], method: str) -> None:
        """The per-time mean over the rows ``sources`` (one per seed) of every cell they share in
        ``(setting, method)``, added as the row ``target`` (a time NaN in any seed stays NaN)."""
        keys = {(k, st) for (s, mo, me, k, st) in self.cells if s == setting and me == method and mo in sources}
        for kind, stat in sorted(keys):
            per = [self.series(setting, mo, method, kind, stat) for mo in sources]
            common = [m for m in per[0] if all(m in p for p in per)]
            self.add(setting, target, method, kind, stat, {m: np.mean([p[m] for p in per], axis=0) for m in common})

    def to_dataset(self, settings: list[dict], models: list[str], methods: list[str],
                   times: np.ndarray, attrs: dict | None = None) -> xr.Dataset:
        """The ``score`` and ``scored`` variables. ``settings``: ``[{"name", "density",
        "sigma_o", "ablation", "observed_fraction"}]``; ``models`` without the background."""
        names = [s["name"] for s in settings]
        model_names = [BACKGROUND, *models]
        shape = (len(names), len(model_names), len(methods), len(KINDS), len(STATS), len(self.metrics))
        score = np.full(shape + (len(times),), np.nan)
        scored = np.zeros(shape, dtype=bool)
        for (s, mo, me, k, st), cell in self.cells.items():
            idx = (names.index(s), model_names.index(mo), methods.index(me), KINDS.index(k), STATS.index(st))
            for m, parts in cell.items():
                v = np.concatenate(parts)
                if len(v) != len(times):
                    raise InputError(f"{len(v)} scores of {s} {mo}/{me} {k} {st} {m} for {len(times)} times")
                score[idx + (self.metrics.index(m),)] = v
                scored[idx + (self.metrics.index(m),)] = True
        coords = {
            "setting": names, "model": model_names, "method": list(methods), "kind": list(KINDS),
            "stat": list(STATS), "metric": list(self.metrics),
            "time": np.asarray(times, dtype="datetime64[ns]"),
            "units": ("metric", [UNITS.get(m, "") for m in self.metrics]),
        }
        for key in ("density", "sigma_o", "ablation", "observed_fraction"):
            coords[key] = ("setting", [s[key] for s in settings])
        return xr.Dataset(
            {"score": (CELL_DIMS + ("time",), score, {"long_name": "score per analysis time"}),
             "scored": (CELL_DIMS, scored, {"long_name": "the score was computed"})},
            coords=coords, attrs=dict(attrs or {}))


# ----------------------------------------------------------------------------- summaries
def summarise(ds: xr.Dataset, baseline: str, seed: int = 0) -> xr.Dataset:
    """``ds`` with the time means and the paired changes against ``baseline`` (see module doc);
    ``seed``: the bootstrap's generator seed."""
    values = ds["score"].values
    scored = ds["scored"].values
    mean = np.full(scored.shape, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # every time NaN (diverged): the mean is NaN
        for idx in zip(*np.nonzero(scored)):
            mean[idx] = float(np.nanmean(values[idx]))
    out = ds.assign(time_mean=(CELL_DIMS, mean, {"long_name": "mean over the finite times"}))
    out = out.assign(**_changes(ds, baseline, seed))
    out.attrs["baseline"] = baseline
    out.attrs["seed"] = int(seed)
    return out


def _changes(ds: xr.Dataset, baseline: str, seed: int) -> dict[str, tuple]:
    models = list(ds["model"].values)
    values, scored = ds["score"].values, ds["scored"].values
    shape = scored.shape
    out = {k: np.full(shape, np.nan) for k in ("pct", "ci_lo", "ci_hi", "p_lo", "p_hi", "ess")}
    out.update({k: np.zeros(shape, dtype=np.int32) for k in ("n", "n_nan", "block")})
    compared = np.zeros(shape, dtype=bool)
    if baseline in models:
        b = models.index(baseline)
        for idx in zip(*np.nonzero(scored)):
            if models[idx[1]] in (baseline, BACKGROUND):
                continue
            base_idx = (idx[0], b) + tuple(idx[2:])
            if not scored[base_idx]:
                continue
            c = paired_change(values[idx], values[base_idx], seed=seed)
            out["pct"][idx], (out["ci_lo"][idx], out["ci_hi"][idx]) = c["pct"], c["ci"]
            for k in ("p_lo", "p_hi", "ess", "n", "n_nan", "block"):
                out[k][idx] = c[k]
            compared[idx] = True
    about = {"pct": f"% change of the time mean against {baseline}",
             "ci_lo": "95 % circular-block bootstrap interval of pct, lower end",
             "ci_hi": "95 % circular-block bootstrap interval of pct, upper end",
             "p_lo": "one-sided bootstrap p-value that pct is below 0",
             "p_hi": "one-sided bootstrap p-value that pct is above 0",
             "n": "times used", "n_nan": "times left out (not finite)",
             "block": "bootstrap block length (Politis-White, from the paired differences)",
             "ess": "effective sample size of the paired differences"}
    res: dict[str, tuple] = {k: (CELL_DIMS, v, {"long_name": about[k]}) for k, v in out.items()}
    res["compared"] = (CELL_DIMS, compared, {"long_name": f"changed against {baseline}"})
    return res


# ----------------------------------------------------------------------------- selection
def select_row(ds: xr.Dataset, model: str, method: str, setting: str = "main") -> xr.Dataset | None:
    """One row's variables (dims kind, stat, metric[, time]), or None when it was not run."""
    try:
        r = ds.sel({"setting": setting, "model": model, "method": method})
    except KeyError:  # a label that is not in the dataset (another model, method …)
        return None
    return r if bool(r["scored"].any()) else None


def _pos(r: xr.Dataset, kind: str, stat: str, metric: str) -> tuple[int, int, int] | None:
    try:
        return tuple(r.indexes[d].get_loc(v) for d, v in (("kind", kind), ("stat", stat), ("metric", metric)))
    except KeyError:
        return None


def cell_score(r: xr.Dataset | None, kind: str, metric: str, stat: str = "member") -> float | None:
    """The time mean of one score of a :func:`select_row`, or None when it was not scored."""
    i = None if r is None else _pos(r, kind, stat, metric)
    return float(r["time_mean"].values[i]) if i is not None and r["scored"].values[i] else None


def cell_change(r: xr.Dataset | None, kind: str, metric: str, stat: str = "member") -> dict | None:
    """One paired change of a :func:`select_row` as :func:`~align_rl.evaluation.verdict.paired_change`
    returns it (``{"pct", "ci": [lo, hi], "n", "n_nan", "block"}``), or None when not compared."""
    i = None if r is None else _pos(r, kind, stat, metric)
    return _change_at(r, i) if i is not None and r["compared"].values[i] else None


def _change_at(r: xr.Dataset, i: tuple[int, int, int]) -> dict:
    """One change; results of older versions without ``p_lo``/``p_hi``/``ess`` read as NaN."""
    v = {k: (r[k].values[i] if k in r else np.nan) for k in CHANGE_VARS}
    return {"pct": float(v["pct"]), "ci": [float(v["ci_lo"]), float(v["ci_hi"])], "p_lo": float(v["p_lo"]),
            "p_hi": float(v["p_hi"]), "n": int(v["n"]), "n_nan": int(v["n_nan"]), "block": int(v["block"]),
            "ess": float(v["ess"])}


def was_scored(ds: xr.Dataset, model: str, method: str, kind: str | None = None,
               stat: str | None = None, setting: str = "main") -> bool:
    """Whether any score of a row (of that kind and stat, when given) was computed."""
    sel = {"setting": setting, "model": model, "method": method}
    sel.update({k: v for k, v in (("kind", kind), ("stat", stat)) if v is not None})
    try:
        return bool(ds["scored"].sel(sel).any())
    except KeyError:
        return False


def score(ds: xr.Dataset, model: str, method: str, kind: str, metric: str, stat: str = "member",
          setting: str = "main") -> float | None:
    """The time mean of one score, or None when it was not scored."""
    return cell_score(select_row(ds, model, method, setting), kind, metric, stat)


def change(ds: xr.Dataset, model: str, method: str, kind: str, metric: str, stat: str = "member",
           setting: str = "main") -> dict | None:
    """One paired change (see :func:`cell_change`), or None when not compared."""
    return cell_change(select_row(ds, model, method, setting), kind, metric, stat)


def _tree(r: xr.Dataset | None, var: str, value) -> dict | None:
    """``{kind: {stat: {metric: value(r, kind, stat, metric)}}}`` over the cells where ``var``
    holds, in dataset order; None when there is none."""
    if r is None:
        return None
    kinds, stats, metrics = (list(r[d].values) for d in ("kind", "stat", "metric"))
    out: dict = {}
    for k, s, m in zip(*np.nonzero(r[var].values)):
        out.setdefault(str(kinds[k]), {}).setdefault(str(stats[s]), {})[str(metrics[m])] = value(r, (k, s, m))
    return out or None


def row_scores(ds: xr.Dataset, model: str, method: str, setting: str = "main") -> dict | None:
    """``{kind: {stat: {metric: time mean}}}`` of one row, or None when the row was not run."""
    return _tree(select_row(ds, model, method, setting), "scored",
                 lambda r, i: float(r["time_mean"].values[i]))


def row_changes(ds: xr.Dataset, model: str, method: str, setting: str = "main") -> dict | None:
    """``{kind: {stat: {metric: change}}}`` of one row, or None when not compared."""
    return _tree(select_row(ds, model, method, setting), "compared", _change_at)


def rows(ds: xr.Dataset, setting: str) -> list[tuple[str, str, str]]:
    """``(row, model, method)`` of the rows run in ``setting``: the background (``row`` =
    ``background``, its first method) first, then ``<model>/<method>`` by method, then model."""
    ran = ds["scored"].sel({"setting": setting}).any(("kind", "stat", "metric"))
    ran = ran.transpose("model", "method").values
    models, methods = [str(m) for m in ds["model"].values], [str(m) for m in ds["method"].values]
    out = []
    if BACKGROUND in models and methods and ran[models.index(BACKGROUND), 0]:
        out.append((BACKGROUND, BACKGROUND, methods[0]))
    for j, me in enumerate(methods):
        for i, mo in enumerate(models):
            if mo != BACKGROUND and ran[i, j]:
                out.append((f"{mo}/{me}", mo, me))
    return out


def split_row(row: str) -> tuple[str, str]:
    """``"<model>/<method>"`` → ``(model, method)``."""
    if "/" not in row:
        raise InputError(f"row {row!r} is not <model>/<method>, e.g. reference/dps")
    model, method = row.rsplit("/", 1)
    return model, method


def as_dataset(results: Any) -> xr.Dataset:
    """The Dataset of an :class:`Evaluation` (or a Dataset itself)."""
    ds = getattr(results, "ds", results)
    if not isinstance(ds, xr.Dataset) or "time_mean" not in ds:
        raise InputError(f"expected evaluation results (an Evaluation or its summarised Dataset), "
                         f"got {type(results).__name__}")
    return ds


# ----------------------------------------------------------------------------- documents
def scores_doc(ds: xr.Dataset, setting: str) -> dict:
    """``{row: {kind: {stat: {metric: time mean}}}}`` of a setting (``metrics.json``'s ``scores``)."""
    return {row: row_scores(ds, mo, me, setting) for row, mo, me in rows(ds, setting)}


def changes_doc(ds: xr.Dataset, setting: str) -> dict:
    """``{row: {kind: {stat: {metric: change}}}}`` of a setting's compared rows."""
    out = {}
    for row, mo, me in rows(ds, setting):
        ch = row_changes(ds, mo, me, setting) if mo != BACKGROUND else None
        if ch is not None:
            out[row] = ch
    return out


def per_time_doc(ds: xr.Dataset, setting: str) -> dict:
    """``{row: {kind: {stat: {metric: (T,) array}}}}`` of a setting."""
    return {name: _tree(select_row(ds, mo, me, setting), "scored", lambda r, i: r["score"].values[i])
            for name, mo, me in rows(ds, setting)}


def settings_doc(ds: xr.Dataset) -> list[dict]:
    """The observation settings: ``[{"name", "density", "sigma_o", "ablation", "observed_fraction"}]``."""
    out = []
    for i, name in enumerate(ds["setting"].values):
        out.append({"name": str(name), "density": float(ds["density"].values[i]),
                    "sigma_o": float(ds["sigma_o"].values[i]), "ablation": str(ds["ablation"].values[i]),
                    "observed_fraction": float(ds["observed_fraction"].values[i])})
    return out


@dataclass
class Evaluation:
    """What :func:`align_rl.evaluation.runner.run_evaluation` returns: ``ds`` (the summarised
    Dataset, module doc) and ``meta`` (``sampler``, ``guidance``, ``forecast_start``,
    ``failures``, ``checks``, ``seconds``, ``files``, ``blend_weights``, ``blend_val``: per
    ``"<setting> <method>"`` the validation-fitted weight ``w``, the number of validation times and
    the first and last)."""

    ds: xr.Dataset
    meta: dict = field(default_factory=dict)

    @property
    def baseline(self) -> str:
        return str(self.ds.attrs["baseline"])

    @property
    def models(self) -> list[str]:
        return [str(m) for m in self.ds["model"].values if m != BACKGROUND]

    @property
    def methods(self) -> list[str]:
        return [str(m) for m in self.ds["method"].values]

    @property
    def times(self) -> np.ndarray:
        return self.ds["time"].values

    def document(self, per_time: tuple[str, ...] = ()) -> dict:
        """The ``metrics.json`` document (JSON-safe: NaN → None); ``per_time``: the settings whose
        per-time scores it holds."""
        ds = self.ds
        settings = [str(s) for s in ds["setting"].values]
        doc = {
            "scores": {s: scores_doc(ds, s) for s in settings},
            "changes": {s: changes_doc(ds, s) for s in settings},
            "times": [np.datetime_as_string(t, unit="h") for t in self.times],
            "n_times": int(ds.sizes["time"]),
            "members": int(ds.attrs["members"]),
            "models": self.models,
            "methods": self.methods,
            "baseline": self.baseline,
            "settings": settings_doc(ds),
            "sampler": self.meta.get("sampler"),
            "guidance": self.meta.get("guidance"),
            "grid": str(ds.attrs["grid"]),
            **{k: self.meta[k] for k in ("forecast_start", "failures", "checks", "seconds", "files",
                                         "verdict", "blend_weights", "blend_val") if k in self.meta},
        }
        if per_time:
            doc["per_time"] = {s: per_time_doc(ds, s) for s in per_time}
        return clean(doc)


def clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy -> python."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_netcdf(ds: xr.Dataset, path: str | Path) -> Path:
    """Write the results as NetCDF3 (scipy engine; strings and booleans are encoded by xarray)."""
    path = Path(path)
    ds.to_netcdf(path, engine=NETCDF_ENGINE, format="NETCDF3_64BIT")
    return path


def open_results(path: str | Path) -> xr.Dataset:
    """Read results written by :func:`write_netcdf` back into memory."""
    return xr.load_dataset(path, engine=NETCDF_ENGINE)
