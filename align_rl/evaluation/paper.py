"""The comparisons with the Align-DA paper: the report's acceptance checks (:func:`paper_checks`)
and its "Alignment against the paper" section (:func:`alignment_section`): the aligned models'
changes beside the paper's numbers, with the Holm-corrected verdict of
:mod:`align_rl.evaluation.verdict`. Both select from the results Dataset
(:mod:`align_rl.evaluation.results`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xarray as xr

from align_rl.diffusion.guidance import label as method_label
from align_rl.evaluation.results import BACKGROUND, as_dataset, row_changes, score


PAPER = {  # Align-DA, ERA5, 1 % observations: % change of MSE against the unaligned model
    "analysis": {"obsfree": -5.44, "repaint": -4.12, "dps": -2.65},
    "forecast": {"obsfree": -6.12, "repaint": -5.12, "dps": -2.74},
    "geo_score_P": (93.85, 95.00),
}




def paper_checks(ds: xr.Dataset, baseline: str) -> list[dict]:
    """The issue's acceptance checks on the main setting, with the numbers (passed or not):
    the DPS ensemble-mean analysis beats the background, and the single-member MSE orders
    DPS ≤ Repaint ≤ ObsFree. ``ds``: the summarised results (:mod:`align_rl.evaluation.results`)."""
    out = []
    methods = [str(m) for m in ds["method"].values]
    bg = score(ds, BACKGROUND, methods[0], "analysis", "mse", "ensmean") if methods else None
    dps = score(ds, baseline, "dps", "analysis", "mse", "ensmean")
    if bg is not None and dps is not None:
        out.append({"check": "DPS ensemble-mean analysis MSE < background MSE",
                    "passed": bool(dps < bg), "values": {"dps_ensmean": dps, "background": bg}})
    single = {m: score(ds, baseline, m, "analysis", "mse") for m in ("dps", "repaint", "obsfree")}
    if all(v is not None for v in single.values()):
        ok = single["dps"] <= single["repaint"] <= single["obsfree"]
        out.append({"check": "single-member MSE: DPS <= Repaint <= ObsFree", "passed": bool(ok),
                    "values": single})
    return out


def alignment_section(results, variants: list[str], methods: list[str], info: dict,
                      with_lines: bool = False):
    """Markdown: % change of analysis and 48 h forecast MSE (single member, ensemble mean) and CRPS of
    each aligned model ``Align-<variant>`` against the reference (its seed mean when it has several
    seeds; 95 % circular-block bootstrap intervals over test times), beside the paper's numbers,
    then the verdict of :mod:`align_rl.evaluation.verdict` (Holm-corrected over the lines of this
    section). ``results``: an :class:`~align_rl.evaluation.results.Evaluation` or its Dataset.
    ``with_lines``: also return the verdict lines, ``(text, lines)``."""
    from align_rl.evaluation.sections import main_lines, verdict_section

    ds = as_dataset(results)
    lines = ["", "## Alignment against the paper (Align-DA)", "",
             f"Pairs: {info.get('pairs', {})}; DPO: {info.get('dpo', {})}.",
             "Relative change against the reference, on held-out test times never used for pairs or "
             "for choosing settings; brackets: 95 % circular-block bootstrap interval over the times "
             "(one trajectory: neighbouring times are not independent). A model with several seeds "
             "shows the change of its seed mean.", "",
             "| model | seeds | analysis MSE % (95 % CI) | paper | ens-mean MSE % | CRPS % | 48 h forecast MSE % (95 % CI) | paper |",
             "|---|---|---|---|---|---|---|---|"]

    def fmt(c):
        if c is None or c.get("pct") is None or not np.isfinite(c["pct"]):
            return "n/a"
        lo, hi = c.get("ci", [float("nan")] * 2)
        nan = f" ({c['n_nan']} NaN)" if c.get("n_nan") else ""
        return f"{c['pct']:+.2f} [{lo:+.2f}, {hi:+.2f}]{nan}"

    rows = []
    for v in variants:
        model = f"Align-{v}"
        n_seeds = 1
        if "n_seeds" in ds.coords and model in list(ds["model"].values):
            n_seeds = int(ds["n_seeds"].sel({"model": model}))
        for m in methods:
            ch = row_changes(ds, model, m)
            if ch is None:
                continue
            if model not in rows:
                rows.append(model)
            a, f = ch["analysis"]["member"]["mse"], ch["forecast"]["member"]["mse"]
            pa = PAPER["analysis"].get(m) if v == "M" else None
            pf = PAPER["forecast"].get(m) if v == "M" else None
            lines.append(f"| Align-{method_label(m)}-{v} | {n_seeds} | {fmt(a)} | "
                         f"{'' if pa is None else f'{pa:+.2f}'} | {fmt(ch['analysis']['ensmean']['mse'])} | "
                         f"{fmt(ch['analysis'].get('ensemble', {}).get('crps'))} | {fmt(f)} | "
                         f"{'' if pf is None else f'{pf:+.2f}'} |")
    if "P" in variants:
        lines += ["", "Geo-Score (single analysis, 100 = the truth's geostrophic balance):", "",
                  "| method | reference | Align-P | change (95 % CI of the % change) | paper (DPS) |",
                  "|---|---|---|---|---|"]
        for m in methods:
            r0 = score(ds, "reference", m, "analysis", "geo_score")
            r1 = score(ds, "Align-P", m, "analysis", "geo_score")
            ch = row_changes(ds, "Align-P", m)
            if r0 is None or r1 is None or ch is None:
                continue
            g = ch["analysis"]["member"]["geo_score"]
            lines.append(f"| {method_label(m)} | {r0:.2f} | {r1:.2f} | {r1 - r0:+.2f} ({fmt(g)} %) | "
                         f"{PAPER['geo_score_P'][0]} → {PAPER['geo_score_P'][1]} |")
    verdict = main_lines(ds, rows=rows, methods=methods)
    lines += [""] + verdict_section(verdict, title="### Verdict",
                                    family="every line of this section: each aligned model × method × kind, "
                                           "and the Geo-Score lines of Align-P")
    lines.append("The paper's numbers are for ERA5 at 1.40625° with FengWu backgrounds; this run "
                 "uses the configured world, models and sizes, so magnitudes are not expected to match.")
    text = "\n".join(lines) + "\n"
    return (text, verdict) if with_lines else text


def append_report(path: Path, text: str) -> None:
    body = path.read_text() if path.exists() else "# Evaluation\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(body.rstrip("\n") + "\n" + text)
    os.replace(tmp, path)

