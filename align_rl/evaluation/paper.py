"""The report's "Alignment against the paper" section: the aligned models' changes beside the
Align-DA paper's numbers, with the verdict of :func:`align_rl.evaluation.verdict.gain_verdict`."""

from __future__ import annotations

from pathlib import Path

import numpy as np


PAPER = {  # Align-DA, ERA5, 1 % observations: % change of MSE against the unaligned model
    "analysis": {"obsfree": -5.44, "repaint": -4.12, "dps": -2.65},
    "forecast": {"obsfree": -6.12, "repaint": -5.12, "dps": -2.74},
    "geo_score_P": (93.85, 95.00),
}


METHOD_LABEL = {"obsfree": "ObsFree", "repaint": "Repaint", "dps": "DPS"}


def _change(summary: dict, row: str, table: str, metric: str = "mse", stat: str = "member"):
    try:
        return summary["changes"]["main"][row][table][stat][metric]
    except KeyError:
        return None


def _score(summary: dict, row: str, table: str, metric: str, stat: str = "member"):
    try:
        return summary["scores"]["main"][row][table][stat][metric]
    except KeyError:
        return None


def _row_changes(summary: dict, row: str) -> dict | None:
    return summary.get("changes", {}).get("main", {}).get(row)


def alignment_section(summary: dict, variants: list[str], methods: list[str], info: dict) -> str:
    """Markdown: % change of analysis and 48 h forecast MSE of each aligned model against the
    reference (95 % moving-block bootstrap interval over test times), the ensemble-mean MSE and
    CRPS beside them, the paper's numbers, and the verdict of
    :func:`align_rl.evaluation.verdict.gain_verdict` (a gain needs the single-member MSE lower with its
    interval below 0, and neither the ensemble-mean MSE nor the CRPS higher, and no NaN)."""
    from align_rl.evaluation.verdict import gain_verdict

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
            row = f"Align-{v}/{m}"
            ch = _row_changes(summary, row)
            if ch is None:
                continue
            a, f = ch["analysis"]["member"]["mse"], ch["forecast"]["member"]["mse"]
            pa = PAPER["analysis"].get(m) if v == "M" else None
            pf = PAPER["forecast"].get(m) if v == "M" else None
            va, vf = gain_verdict(ch, "analysis"), gain_verdict(ch, "forecast")
            label = f"Align-{METHOD_LABEL[m]}-{v}"
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
            r0 = _score(summary, f"reference/{m}", "analysis", "geo_score")
            r1 = _score(summary, f"Align-P/{m}", "analysis", "geo_score")
            ch = _row_changes(summary, f"Align-P/{m}")
            if r0 is None or r1 is None or ch is None:
                continue
            g = ch["analysis"]["member"]["geo_score"]
            raised = bool(np.isfinite(g["pct"]) and g["ci"][0] > 0)
            lines.append(f"| {METHOD_LABEL[m]} | {r0:.2f} | {r1:.2f} | {r1 - r0:+.2f} ({fmt(g)} %) | "
                         f"{'yes' if raised else 'no'} | {PAPER['geo_score_P'][0]} → {PAPER['geo_score_P'][1]} |")
            verdicts.append((f"Align-{METHOD_LABEL[m]}-P", "Geo-Score", r1 - r0, None,
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


def _append_report(path: Path, text: str) -> None:
    import os

    body = path.read_text() if path.exists() else "# Evaluation\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(body.rstrip("\n") + "\n" + text)
    os.replace(tmp, path)

