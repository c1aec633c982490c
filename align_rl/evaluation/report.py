"""The evaluation's files: ``report.md``, ``metrics.json``, ``metrics.csv``, ``metrics.nc`` (the
results Dataset of :mod:`align_rl.evaluation.results`), maps (PNG), analyses (zarr).

Everything is written into a temporary folder beside the output folder and renamed into place at
the end, so a crash never leaves a half-written report.
"""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from align_rl.evaluation import sections
from align_rl.diffusion.guidance import label as method_label, needs_obs
from align_rl.evaluation.results import (BACKGROUND, Evaluation, cell_change, cell_score, changes_doc,
                                         scores_doc, select_row, was_scored, write_netcdf)
from align_rl.io.states import States
from align_rl.io.store import write_states
from align_rl.owned import staged

METRIC_LABELS: dict[str, str] = {
    "mse": "MSE",
    "mae": "MAE",
    "wrmse_u10": "WRMSE u10 (m/s)",
    "wrmse_v500": "WRMSE v500 (m/s)",
    "wrmse_z500": "WRMSE z500 (m²/s²)",
    "wrmse_t850": "WRMSE t850 (K)",
    "geo_score": "Geo-Score",
    "crps": "CRPS (norm.)",
    "crps_z500": "CRPS z500 (m²/s²)",
    "spread_skill": "spread/skill",
    "spread_skill_z500": "spread/skill z500",
}
TABLE_METRICS = ["mse", "mae", "wrmse_u10", "wrmse_v500", "wrmse_z500", "wrmse_t850"]


def _nanmean(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """Mean over ``axis`` ignoring NaNs (all-NaN -> NaN, silently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _fmt(v: float | None, metric: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if metric.startswith("wrmse_z500") or metric == "crps_z500":
        return f"{v:.2f}"
    if metric == "geo_score":
        return f"{v:.2f}"
    return f"{v:.4f}"


def _pct(ch: dict | None) -> str:
    if not ch or ch.get("pct") is None or not math.isfinite(ch["pct"]):
        return ""
    lo, hi = ch["ci"]
    ci = f" [{lo:+.1f}, {hi:+.1f}]" if lo is not None and math.isfinite(lo) else ""
    return f" ({ch['pct']:+.2f} %{ci})"


def _label(row: str, baseline: str) -> str:
    if row == "background":
        return "Background"
    model, meth = row.split("/", 1)
    m = method_label(meth)
    return m if model == baseline else f"{model}-{m}"


def table_md(ds: xr.Dataset, setting: str, table: str, stat: str, metrics: list[str],
             baseline: str, models: list[str], methods: list[str], background: bool = True) -> str:
    """A markdown table: rows background + (method × model), columns ``metrics``; aligned rows carry
    their % change against the baseline and its 95 % bootstrap interval. ``ds``: the results."""
    head = "| | " + " | ".join(METRIC_LABELS.get(m, m) for m in metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 1)]
    cells = ([("background", BACKGROUND, methods[0])] if background and methods else [])
    cells += [(f"{mo}/{me}", mo, me) for me in methods for mo in models]
    for row, mo, me in cells:
        if not was_scored(ds, mo, me, table, stat, setting):
            continue
        r = select_row(ds, mo, me, setting)
        texts = [_fmt(cell_score(r, table, m, stat), m) + _pct(cell_change(r, table, m, stat))
                 for m in metrics]
        lines.append(f"| {_label(row, baseline)} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def _intro(doc: dict) -> list[str]:
    s = doc
    main = next(x for x in s["settings"] if x["name"] == "main")
    return [
        "# Align-DA evaluation",
        "",
        f"{s['n_times']} held-out analysis times ({s['times'][0]} … {s['times'][-1]}), grid {s['grid']}, "
        f"{s['members']} members per analysis, sampler K = {s['sampler']['steps']}, "
        f"C = {s['sampler']['corrections']}, τ = {s['sampler']['tau']}; observations: density "
        f"{main['density']:g} (observed fraction {main['observed_fraction']:.4f}), σ_o = {main['sigma_o']:g}; "
        f"DPS ζ = {s['guidance']['dps_zeta']}, likelihood {s['guidance']['dps_likelihood']}. "
        f"Models: {', '.join(s['models'])}; % changes against **{s['baseline']}** (same observations and "
        "sampler noise), with 95 % paired circular-block bootstrap intervals over times (block length "
        "from the autocorrelation of the paired differences, Politis-White; "
        f"{_ess_text(s)}). Every score is computed "
        "per analysis time, then averaged. MSE/MAE over the 69 normalised channels; WRMSE in "
        "physical units. *Single member*: each member's score averaged over members (the expected "
        "score of one analysis, as in the paper); *ensemble mean*: the score of the members' mean.",
        "",
    ]


def _ess_text(doc: dict) -> str:
    """The range of block lengths and effective sample sizes of the main setting's changes."""
    ess, blk = [], []
    for tabs in doc.get("changes", {}).get("main", {}).values():
        for stats in tabs.values():
            for mets in stats.values():
                for c in mets.values():
                    if c.get("ess") is not None:
                        ess.append(c["ess"])
                    if c.get("block") is not None:
                        blk.append(c["block"])
    if not ess:
        return "no change computed"
    return (f"blocks {min(blk)}–{max(blk)} times, effective sample size of the paired differences "
            f"{min(ess):.0f}–{max(ess):.0f} of {doc['n_times']} times (per change in the verdict and metrics.csv)")


def _main_tables(ds: xr.Dataset, doc: dict) -> list[str]:
    """Tables 1, 1b, 2, 2b and the probabilistic scores of the main setting."""
    args = (doc["baseline"], doc["models"], doc["methods"])
    lead = f"{int(ds.attrs['forecast_hours'])} h"
    prob = ["crps", "crps_z500", "spread_skill", "spread_skill_z500"]
    return [
        "## Table 1 — analysis accuracy (single member)",
        "",
        table_md(ds, "main", "analysis", "member", TABLE_METRICS + ["geo_score"], *args),
        "",
        "## Table 1b — analysis accuracy (ensemble mean)",
        "",
        table_md(ds, "main", "analysis", "ensmean", TABLE_METRICS + ["geo_score"], *args),
        "",
        f"## Table 2 — {lead} forecasts from the analyses (single member)",
        "",
        f"Forecast start: {doc['forecast_start']}.",
        "",
        table_md(ds, "main", "forecast", "member", TABLE_METRICS, *args),
        "",
        f"## Table 2b — {lead} forecasts (ensemble mean of the member forecasts)",
        "",
        table_md(ds, "main", "forecast", "ensmean", TABLE_METRICS, *args),
        "",
        "## Probabilistic scores (not in the paper)",
        "",
        f"Fair CRPS and spread/skill ratio (1 = reliable) of the analysis ensembles and of their {lead} forecasts.",
        "",
        table_md(ds, "main", "analysis", "ensemble", prob, *args, background=False),
        "",
        table_md(ds, "main", "forecast", "ensemble", prob, *args, background=False),
        "",
    ]


def _ablation_tables(ds: xr.Dataset, doc: dict) -> list[str]:
    """Tables 3 (observation density) and 4 (observation error), single member."""
    L: list[str] = []
    abl = [x for x in doc["settings"] if x["ablation"] != "main"]
    methods = [m for m in doc["methods"] if needs_obs(m)]
    for kind, title in (("density", "Scores per observation density"), ("error", "Scores per observation error")):
        sets = [x for x in abl if x["ablation"] == kind]
        if not sets:
            continue
        L += [f"## {title} (single member)", ""]
        for x in sets:
            L += [f"### {x['name']} (density {x['density']:g}, σ_o = {x['sigma_o']:g})", "",
                  table_md(ds, x["name"], "analysis", "member", TABLE_METRICS, doc["baseline"], doc["models"],
                           methods, background=False), ""]
    return L


def _checks_and_failures(doc: dict) -> list[str]:
    L = ["## Checks", ""]
    if not doc["checks"]:
        L.append("(the checks need the reference with DPS, Repaint and ObsFree)")
    for c in doc["checks"]:
        vals = ", ".join(f"{k} {_fmt(v)}" for k, v in c["values"].items())
        L.append(f"- {'✅' if c['passed'] else '❌'} {c['check']}: {vals}")
        if not c["passed"]:
            L.append("  - not reproduced on this run; see the numbers above (small ensembles, few "
                     "times and a briefly trained prior make these orderings noisy)")
    if doc.get("failures"):
        L += ["", "## Failures", "", "Analyses that diverged (NaN) are scored as missing:", ""]
        L += [f"- {f['setting']} {f['row']} times {f['times'][0]}–{f['times'][1]}: {f['error']}"
              for f in doc["failures"]]
    return L


def write_report_md(path: Path, ds: xr.Dataset, doc: dict, files: list[str], lines: list[dict] | None = None) -> None:
    """``report.md``: the tables from the results ``ds``, the run's facts from ``doc`` (the
    ``metrics.json`` document), the list of ``files``; ``lines``: the main verdict lines
    (:func:`align_rl.evaluation.sections.main_lines`, computed when None)."""
    lines = sections.main_lines(ds) if lines is None else lines
    evidence = (sections.verdict_section(lines, family="every verdict line of the main setting: each aligned "
                                                        "row × method × kind (analysis, forecast), and the "
                                                        "Geo-Score lines of -P rows")
                + sections.spread_skill_section(ds) + sections.decomposition_section(ds)
                + sections.baselines_section(ds, doc.get("blend_weights"), doc.get("blend_val")) + sections.seeds_section(ds))
    L = (_intro(doc) + evidence + _main_tables(ds, doc) + sections.observation_tables(ds)
         + _ablation_tables(ds, doc) + _checks_and_failures(doc))
    L += ["", "## Files", ""] + [f"- `{f}`" for f in files]
    L += ["", f"Evaluation time: {doc.get('seconds', 0):.0f} s.", ""]
    path.write_text("\n".join(L))


def write_csv(path: Path, ds: xr.Dataset) -> None:
    """``metrics.csv``: one row per (setting, kind, row, stat, metric) with the time mean and the
    change against the baseline (empty when not compared)."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["setting", "table", "row", "model", "method", "stat", "metric", "value",
                    "pct_vs_baseline", "ci_lo", "ci_hi", "p_lower", "p_higher", "ess", "block"])
        for setting in (str(x) for x in ds["setting"].values):
            chs = changes_doc(ds, setting)
            for row, tabs in scores_doc(ds, setting).items():
                model, meth = (row.split("/", 1) + [""])[:2] if "/" in row else (row, "")
                for tab, stats in tabs.items():
                    for st, mets in stats.items():
                        for m, v in mets.items():
                            c = chs.get(row, {}).get(tab, {}).get(st, {}).get(m)
                            extra = ([c.get(k, "") for k in ("p_lo", "p_hi", "ess", "block")] if c
                                     else ["", "", "", ""])
                            pct, lo, hi = (c["pct"], c["ci"][0], c["ci"][1]) if c else ("", "", "")
                            w.writerow([setting, tab, row, model, meth, st, m, v, pct, lo, hi, *extra])


def plot_maps(path: Path, maps: dict[str, np.ndarray], lat: np.ndarray, lon: np.ndarray,
              baseline: str, models: list[str], methods: list[str]) -> list[str]:
    """The paper's Figure 2: z500 error reduction averaged over the map samples. First row:
    ``|x_b − x_GT| − |x_a^baseline − x_GT|`` (what the analysis gains on the background); then one
    row per other model: ``|x_a^baseline − x_GT| − |x_a^model − x_GT|``. Warm = the second is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, list[np.ndarray | None]]] = []
    bg = _nanmean(maps["background"], axis=0)
    rows.append((f"background → {baseline}", [
        bg - _nanmean(maps[f"{baseline}/{m}"], axis=0) if f"{baseline}/{m}" in maps else None
        for m in methods]))
    for mo in models:
        if mo == baseline or not any(f"{mo}/{m}" in maps for m in methods):
            continue  # the baseline, and rows without maps (seed means, trivial baselines)
        rows.append((f"{baseline} → {mo}", [
            _nanmean(maps[f"{baseline}/{m}"], axis=0) - _nanmean(maps[f"{mo}/{m}"], axis=0)
            if f"{mo}/{m}" in maps and f"{baseline}/{m}" in maps else None for m in methods]))
    vals = [np.nanmax(np.abs(p)) for _, ps in rows for p in ps if p is not None and np.isfinite(p).any()]
    vmax = float(max(vals)) if vals and max(vals) > 0 else 1.0
    fig, axes = plt.subplots(len(rows), len(methods), figsize=(4.2 * len(methods), 2.4 * len(rows) + 0.6),
                             squeeze=False, constrained_layout=True)
    im = None
    for r, (title, panels) in enumerate(rows):
        for c, p in enumerate(panels):
            ax = axes[r][c]
            if p is None:
                ax.axis("off")
                continue
            im = ax.pcolormesh(lon, lat, p, cmap="RdBu_r", vmin=-vmax, vmax=vmax, shading="auto")
            ax.set_title(f"{method_label(methods[c])}: {title}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="z500 error reduction (m²/s²)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


def write_outputs(out_dir: Path, ev: Evaluation, maps: dict[str, np.ndarray],
                  ens_means: dict[tuple[str, str], np.ndarray], data: Any) -> Path:
    """Write every file of the evaluation into ``out_dir`` atomically (see module doc); records
    them in ``ev.meta["files"]``. ``maps``: z500 errors for :func:`plot_maps`; ``ens_means``:
    physical ensemble means (T, 69, H, W) per (model, method)."""
    out_dir = Path(out_dir)
    # a new folder replaces the old one atomically; an existing folder not made by align_rl is
    # refused (align_rl.owned)
    with staged(out_dir, "eval") as tmp:
        tmp.mkdir()
        files = ["report.md", "metrics.json", "metrics.csv", "metrics.nc"]
        (tmp / "maps").mkdir()
        plot_maps(tmp / "maps" / "z500_error_reduction.png", maps, data.truth.lat, data.truth.lon,
                  ev.baseline, ev.models, ev.methods)
        files.append("maps/z500_error_reduction.png")
        stores = _write_analyses(tmp, ens_means, ev.times, data)
        files += list(stores.values())
        ev.meta["files"] = {"analyses": stores, "maps": ["maps/z500_error_reduction.png"]}
        if data.truth_store is not None:
            ev.meta["files"]["truth"] = str(data.truth_store)
        lines = sections.main_lines(ev.ds)
        ev.meta["verdict"] = compact_lines(lines)
        doc = ev.document(per_time=("main",))
        (tmp / "metrics.json").write_text(json.dumps(doc, indent=1) + "\n")
        write_csv(tmp / "metrics.csv", ev.ds)
        write_netcdf(ev.ds, tmp / "metrics.nc")
        write_report_md(tmp / "report.md", ev.ds, doc, files, lines)
    return out_dir


def compact_lines(lines: list[dict]) -> list[dict]:
    """The verdict lines as ``metrics.json`` keeps them."""
    keys = ("model", "method", "kind", "setting", "what", "gain", "p", "p_holm", "why", "tests", "seeds",
            "spread_skill")
    return [{k: ln[k] for k in keys if k in ln} for ln in lines]


def _write_analyses(tmp: Path, ens_means: dict[tuple[str, str], np.ndarray], times: np.ndarray,
                    data: Any) -> dict[str, str]:
    """``analyses/<model>-<method>.zarr`` (WeatherBench2 layout, physical units); returns
    ``{"<model>/<method>": relative path}``."""
    (tmp / "analyses").mkdir()
    stores = {}
    for (mo, me), values in ens_means.items():
        name = f"analyses/{safe_name(mo)}-{me}.zarr"
        st = States(values.astype(np.float32), times, data.truth.lat, data.truth.lon,
                    attrs={"title": f"Align-DA analyses (ensemble mean) of {mo} with {me}",
                           "model": mo, "guidance": me,
                           "normalization": data.normalizer.to_dict()})
        write_states(tmp / name, st)
        stores[f"{mo}/{me}"] = name
    return stores
