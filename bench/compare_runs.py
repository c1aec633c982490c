"""Two evaluations of the same test times side by side: does a change of the default job keep
its quality? (issue 19: the default job made faster at the same quality.)

    python bench/compare_runs.py BEFORE/eval AFTER/eval [--model reference] [--out FILE.md]

For the ``--model`` row (default: the reference) of each guidance method, the paired % change
of AFTER against BEFORE over the common analysis times, with its 95 % circular-block bootstrap
interval (:func:`align_rl.evaluation.bootstrap.paired_change`), of the ensemble-mean MSE
(normalised), its ratio to the background's (the two runs' backgrounds differ when their
forecasters do; the background's own MSE is the first row), the ensemble-mean WRMSE of z500 and t850 and the
single-member Geo-Score, then the same for the 48 h forecasts' ensemble-mean MSE. Both runs must
score the same times with the same observations (the main job's defaults do: the observations
and sampler seeds follow ``run.seed``). Writes a markdown table (stdout, and ``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from align_rl.evaluation.bootstrap import paired_change  # noqa: E402
from align_rl.evaluation.results import open_results  # noqa: E402

ROWS = (("analysis", "member", "background:mse", "the background's MSE (the forecaster's 48 h forecast)"),
        ("analysis", "ensmean", "mse", "ens-mean MSE"),
        ("analysis", "ensmean", "mse/background", "ens-mean MSE / background's"),
        ("analysis", "ensmean", "wrmse_z500", "ens-mean WRMSE z500 (m²/s²)"),
        ("analysis", "ensmean", "wrmse_t850", "ens-mean WRMSE t850 (K)"),
        ("analysis", "member", "geo_score", "Geo-Score (single member)"),
        ("forecast", "ensmean", "mse", "48 h forecast ens-mean MSE"))


def series(ds, model: str, method: str, kind: str, stat: str, metric: str) -> np.ndarray:
    """Per-time scores (T,) of one cell; ``mse/background`` divides by the background's MSE."""
    if metric.startswith("background:"):
        return series(ds, "background", method, kind, stat, metric.split(":", 1)[1])
    if metric == "mse/background":
        return series(ds, model, method, kind, stat, "mse") / series(ds, "background", method, kind, "member", "mse")
    cell = {"setting": "main", "model": model, "method": method, "kind": kind, "stat": stat, "metric": metric}
    return ds["score"].sel(cell).values.astype(np.float64)  # a dict: `method` is also .sel's keyword


def compare(before: Path, after: Path, model: str = "reference") -> str:
    a, b = open_results(before / "metrics.nc"), open_results(after / "metrics.nc")
    times = np.intersect1d(a["time"].values, b["time"].values)
    if len(times) < 8:
        raise SystemExit(f"the two evaluations share {len(times)} analysis times; they must score the same times")
    a, b = a.sel(time=times), b.sel(time=times)
    lines = [f"{model}: AFTER ({after}) against BEFORE ({before}), {len(times)} common test times; "
             "% change [95 % circular-block interval].", "",
             "| method | quantity | before | after | change % | interval covers 0 |", "|---|---|---|---|---|---|"]
    for method in [str(m) for m in a["method"].values]:
        for kind, stat, metric, label in ROWS:
            x, y = series(a, model, method, kind, stat, metric), series(b, model, method, kind, stat, metric)
            c = paired_change(y, x)
            lo, hi = c["ci"]
            lines.append(f"| {method} | {label} | {np.nanmean(x):.4g} | {np.nanmean(y):.4g} | "
                         f"{c['pct']:+.2f} [{lo:+.2f}, {hi:+.2f}] | {'yes' if lo <= 0 <= hi else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--model", default="reference")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    text = compare(a.before, a.after, a.model)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
