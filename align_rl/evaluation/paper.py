"""The comparisons with the Align-DA paper: the report's acceptance checks (:func:`paper_checks`)
and its "Alignment against the paper" section (:func:`alignment_section`): the aligned models'
changes beside the paper's numbers, with the verdict of
:func:`align_rl.evaluation.verdict.gain_verdict`. Both select from the results Dataset
(:mod:`align_rl.evaluation.results`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xarray as xr

from align_rl.diffusion.guidance import label as method_label
from align_rl.evaluation.results import BACKGROUND, as_dataset, row_changes, score
from align_rl.evaluation.verdict import gain_verdict


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


def alignment_section(results, variants: list[str], methods: list[str], info: dict) -> str:
    """Markdown: % change of analysis and 48 h forecast MSE of each aligned model against the
    reference (95 % moving-block bootstrap interval over test times), the ensemble-mean MSE and
    CRPS beside them, the paper's numbers, and the verdict of
    :func:`align_rl.evaluation.verdict.gain_verdict` (a gain needs the single-member MSE lower with its
    interval below 0, and neither the ensemble-mean MSE nor the CRPS higher, and no NaN).
    ``results``: an :class:`~align_rl.evaluation.results.Evaluation` or its Dataset."""
    ds = as_dataset(results)
    lines = ["", "## Alignment against the paper (Align-DA)", "",
             f"Pairs: {info.get('pairs', {})}; DPO: {info.get('dpo', {})}.",
             "Relative change against the reference, on held-out test times never used for pairs or "
             "for choosing settings; brackets: 95 % moving-block bootstrap interval over the times "
             "(one trajectory: neighbouring times are not independent).", "",
             "| model | analysis MSE % (95 % CI) | paper | ens-mean MSE % | CRPS % | 48 h forecast MSE % (95 % CI) | paper | gain? |",
             "|---|---|---|---|---|---|---|---|"]
    verdicts = []

    def fmt(c):
        if c is None or c.get("pct") is None or not np.isfinite(c["pct"]):
            return "n/a"
        lo, hi = c.get("ci", [float("nan")] * 2)
        nan = f" ({c['n_nan']} NaN)" if c.get("n_nan") else ""
        return f"{c['pct']:+.2f} [{lo:+.2f}, {hi:+.2f}]{nan}"

    def pct(c):
        return "n/a" if c is None or not np.isfinite(c.get("pct", float("nan"))) else f"{c['pct']:+.2f}"

    for v in variants:
        for m in methods:
            ch = row_changes(ds, f"Align-{v}", m)
            if ch is None:
                continue
            a, f = ch["analysis"]["member"]["mse"], ch["forecast"]["member"]["mse"]
            pa = PAPER["analysis"].get(m) if v == "M" else None
            pf = PAPER["forecast"].get(m) if v == "M" else None
            va, vf = gain_verdict(ch, "analysis"), gain_verdict(ch, "forecast")
            label = f"Align-{method_label(m)}-{v}"
            verdicts.append((label, "analysis", a["pct"], pa, va))
            verdicts.append((label, "48 h forecast", f["pct"], pf, vf))
            lines.append(f"| {label} | {fmt(a)} | {'' if pa is None else f'{pa:+.2f}'} | "
                         f"{pct(ch['analysis']['ensmean']['mse'])} | "
                         f"{pct(ch['analysis'].get('ensemble', {}).get('crps'))} | {fmt(f)} | "
                         f"{'' if pf is None else f'{pf:+.2f}'} | "
                         f"{'yes' if va['gain'] else 'no'} / {'yes' if vf['gain'] else 'no'} |")
    if "P" in variants:
        lines += ["", "Geo-Score (single analysis, 100 = the truth's geostrophic balance):", "",
                  "| method | reference | Align-P | change (95 % CI of the % change) | raised? | paper (DPS) |",
                  "|---|---|---|---|---|---|"]
        for m in methods:
            r0 = score(ds, "reference", m, "analysis", "geo_score")
            r1 = score(ds, "Align-P", m, "analysis", "geo_score")
            ch = row_changes(ds, "Align-P", m)
            if r0 is None or r1 is None or ch is None:
                continue
            g = ch["analysis"]["member"]["geo_score"]
            raised = bool(np.isfinite(g["pct"]) and g["ci"][0] > 0)
            lines.append(f"| {method_label(m)} | {r0:.2f} | {r1:.2f} | {r1 - r0:+.2f} ({fmt(g)} %) | "
                         f"{'yes' if raised else 'no'} | {PAPER['geo_score_P'][0]} → {PAPER['geo_score_P'][1]} |")
            verdicts.append((f"Align-{method_label(m)}-P", "Geo-Score", r1 - r0, None,
                             {"gain": raised, "why": f"% change {fmt(g)}"}))
    lines += ["", "Verdict (a gain: single-member MSE lower with its interval below 0, ensemble-mean "
              "MSE and CRPS not higher, no NaN; the Geo-Score: raised with its interval above 0):", ""]
    for name, what, val, paper, vd in verdicts:
        if what == "Geo-Score":
            lines.append(f"- {name}: Geo-Score {val:+.2f} (paper +1.15): "
                         f"{'raised' if vd['gain'] else 'NOT raised'} ({vd['why']}).")
        else:
            ref = f" (paper {paper:+.2f} %)" if paper is not None else ""
            lines.append(f"- {name}, {what} MSE {val:+.2f} %{ref}: "
                         f"{'a gain' if vd['gain'] else 'NOT a gain'} — {vd['why']}.")
    if not verdicts:
        lines.append("- no aligned model was evaluated.")
    lines.append("")
    lines.append("The paper's numbers are for ERA5 at 1.40625° with FengWu backgrounds; this run "
                 "uses the configured world, models and sizes, so magnitudes are not expected to match.")
    return "\n".join(lines) + "\n"


def append_report(path: Path, text: str) -> None:
    body = path.read_text() if path.exists() else "# Evaluation\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(body.rstrip("\n") + "\n" + text)
    os.replace(tmp, path)

