"""The candidates curve of issue 21 as one picture: the validation changes of the sweeps
``scaling_candidates_<N>`` (``tune_configs/scaling_candidates.yaml``) against N.

    python bench/plot_candidates_curve.py --workdir runs/default [--out docs/img/scaling_candidates.png]

Reads ``<workdir>/sweeps/scaling_candidates_<N>/results.csv`` for every N present; plots the %
change against the reference of the analysis MSE, the 48 h forecast MSE and the Geo-Score, each
with its 95 % interval, decile 0.25 as a line and any other decile as a lone marker.
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRICS = (("val_mse", "analysis MSE"), ("val_fc_mse", "48 h forecast MSE"), ("val_geo_score", "Geo-Score"))


def read(workdir: Path) -> list[dict]:
    rows = []
    for d in sorted((workdir / "sweeps").glob("scaling_candidates_*")):
        m = re.fullmatch(r"scaling_candidates_(\d+)", d.name)
        if not m or not (d / "results.csv").exists():
            continue
        for r in csv.DictReader(open(d / "results.csv")):
            if r["status"] == "completed":
                rows.append({"n": int(m.group(1)), "decile": float(r["pairs.decile"]), **r})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/default")
    ap.add_argument("--out", default="docs/img/scaling_candidates.png")
    a = ap.parse_args()
    rows = read(Path(a.workdir))
    if not rows:
        raise SystemExit(f"no scaling_candidates_<N> sweep with results under {a.workdir}/sweeps")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for k, (key, label) in enumerate(METRICS):
        for dec in sorted({r["decile"] for r in rows}):
            sel = sorted((r for r in rows if r["decile"] == dec), key=lambda r: r["n"])
            x = [r["n"] * (1 + 0.03 * (k - 1)) for r in sel]
            y = [float(r[f"{key}_change_pct"]) for r in sel]
            lo = [y_ - float(r[f"{key}_change_lo"]) for y_, r in zip(y, sel)]
            hi = [float(r[f"{key}_change_hi"]) - y_ for y_, r in zip(y, sel)]
            main_line = dec == 0.25
            ax.errorbar(x, y, yerr=[lo, hi], marker="o" if main_line else "s", capsize=3,
                        color=f"C{k}", linestyle="-" if main_line else "none", mfc=None if main_line else "white",
                        label=f"{label}" + ("" if main_line else f" (decile {dec:g})"))
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["n"] for r in rows}), [str(n) for n in sorted({r["n"] for r in rows})])
    ax.set_xlabel("candidates per preference background")
    ax.set_ylabel("% change against the reference (val)")
    ax.set_title("Align-M gain against candidates per background (decile 0.25)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
