"""The report's evidence sections (docs/method.md §10), in markdown, from the results Dataset
(:mod:`align_rl.evaluation.results`): the verdict lines with their Holm correction, the
spread/skill of every row, the decomposition of the single-member MSE change into its
ensemble-mean and spread parts, the trivial baselines, the across-seed spread, and the
observation tables (density, error) with the same verdict."""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from align_rl.diffusion.guidance import label as method_label, needs_obs
from align_rl.evaluation.bootstrap import closer_to_one, difference, paired_stat
from align_rl.evaluation.results import BACKGROUND, change
from align_rl.evaluation.seeds import BLEND_VAL_ALIGNED, across_seeds
from align_rl.evaluation.verdict import (ALPHA, blend_val_row, cell_series, decide, geo_line, mse_line,
                                         seed_rows)



def _coord(ds: xr.Dataset, name: str, default):
    return [default] * ds.sizes["model"] if name not in ds.coords else list(ds[name].values)


def verdict_rows(ds: xr.Dataset) -> list[str]:
    """The rows that get a verdict: every model but the baseline and the background, one row per
    model (a several-seed model's mean row, not its seed rows), no trivial baseline."""
    base = str(ds.attrs.get("baseline", "reference"))
    out = []
    for m, g, t in zip(ds["model"].values, _coord(ds, "seed_of", ""), _coord(ds, "trivial_for", "")):
        if str(m) not in (base, BACKGROUND) and not str(g) and not str(t):
            out.append(str(m))
    return out


def trivial_rows(ds: xr.Dataset) -> list[str]:
    return [str(m) for m, t in zip(ds["model"].values, _coord(ds, "trivial_for", "")) if str(t)]


def _methods(ds: xr.Dataset) -> list[str]:
    return [str(m) for m in ds["method"].values]


def main_lines(ds: xr.Dataset, rows: list[str] | None = None, methods: list[str] | None = None) -> list[dict]:
    """The verdict lines of the main setting, Holm-corrected as one family: every verdict row ×
    method × kind (MSE lines), and a Geo-Score line for every row with a *towards the background*
    baseline (``-P``)."""
    base = str(ds.attrs.get("baseline", "reference"))
    seed = int(ds.attrs.get("seed", 0))
    lines = []
    for row in rows if rows is not None else verdict_rows(ds):
        for meth in methods if methods is not None else _methods(ds):
            for kind in ("analysis", "forecast"):
                ln = mse_line(ds, row, meth, kind, base, "main", seed)
                if ln is not None:
                    lines.append(ln)
            if _has_blend(ds, row):
                ln = geo_line(ds, row, meth, base, "main", seed)
                if ln is not None:
                    lines.append(ln)
    return decide(lines)


def _has_blend(ds: xr.Dataset, row: str) -> bool:
    return any(str(f) == row and str(k) == "blend"
               for f, k in zip(_coord(ds, "trivial_for", ""), _coord(ds, "trivial_kind", "")))


def ablation_lines(ds: xr.Dataset, ablation: str) -> list[dict]:
    """The analysis MSE verdict lines of every setting of one ablation (``density`` | ``error``) ×
    verdict row × method, Holm-corrected as one family (the table's)."""
    base = str(ds.attrs.get("baseline", "reference"))
    seed = int(ds.attrs.get("seed", 0))
    sets = [str(s) for s, a in zip(ds["setting"].values, ds["ablation"].values) if str(a) == ablation]
    lines = []
    for s in sets:
        for row in verdict_rows(ds):
            for meth in _methods(ds):
                ln = mse_line(ds, row, meth, "analysis", base, s, seed)
                if ln is not None:
                    lines.append(ln)
    return decide(lines)


# ----------------------------------------------------------------------------- formatting
def _num(v, f="+.2f") -> str:
    return "–" if v is None or not math.isfinite(v) else format(v, f)


def _ci(c: dict, f="+.2f") -> str:
    lo, hi = c["ci"]
    return f"{_num(c.get('pct', c.get('value')), f)} [{_num(lo, f)}, {_num(hi, f)}]"


def _label(row: str, meth: str) -> str:
    return f"{row}-{method_label(meth)}"


def verdict_section(lines: list[dict], title: str = "## Verdict", family: str = "") -> list[str]:
    """The verdict lines: each test (change % [95 % CI], effective sample size, block), the Holm
    p-value, spread/skill, the across-seed points and the verdict."""
    L = [title, "",
         "A gain (docs/method.md §10) needs: the ensemble-mean MSE and the CRPS lower than the "
         "reference's, and the single-member MSE and the CRPS lower than the *shrink* baseline's "
         "(the reference narrowed to the model's spread), and, where the *Blend-val* row exists, the "
         "ensemble-mean MSE lower than that of the reference blended towards the background with the "
         "weight fitted on validation times; each a one-sided circular-block bootstrap "
         f"test; the line's p-value is the largest of them and must be ≤ {ALPHA} after the Holm "
         "correction over the family; the spread/skill no further from 1 than the reference's (the "
         "interval of the excess |SS − 1| reaches 0); with several seeds every seed's ensemble-mean "
         "MSE and CRPS change below 0; no NaN. A Geo-Score gain: higher than the reference's and than "
         "the *towards the background* baseline's at equal MSE, Holm-corrected, every seed higher.",
         ""]
    if family:
        L += [f"Holm family: {family} ({len(lines)} lines).", ""]
    if not lines:
        return L + ["- no aligned model was evaluated.", ""]
    L += ["| line | tests: change % [95 % CI] (ESS, block) | p | p (Holm) | spread/skill (ref) | seeds: % change | gain? |",
          "|---|---|---|---|---|---|---|"]
    for ln in lines:
        tests = "; ".join(f"{t['name']} {_ci(t)} ({_num(t.get('ess'), '.0f')}, {t.get('block', '–')})"
                          for t in ln["tests"])
        ss = ln.get("spread_skill")
        sst = f"{ss['model']:.2f} ({ss['reference']:.2f})" if ss else "–"
        short = {"ensmean/mse": "ens", "ensemble/crps": "CRPS", "member/geo_score": "Geo"}
        seeds = ("; ".join(f"s{k}: " + ", ".join(f"{short.get(n, n)} {_num(v)}" for n, v in p.items())
                           for k, p in enumerate(ln["seeds"])) if ln["seeds"] else "1 seed")
        what = ln["kind"] if ln["what"] == "MSE" else "Geo-Score"
        setting = "" if ln["setting"] == "main" else f" {ln['setting']}"
        L.append(f"| {_label(ln['model'], ln['method'])} {what}{setting} | {tests} | {ln['p']:.4f} | "
                 f"{ln['p_holm']:.4f} | {sst} | {seeds} | {'**yes**' if ln['gain'] else 'no'} |")
    L.append("")
    for ln in lines:
        what = f"{ln['kind']} MSE" if ln["what"] == "MSE" else "Geo-Score"
        setting = "" if ln["setting"] == "main" else f" ({ln['setting']})"
        L.append(f"- {_label(ln['model'], ln['method'])} {what}{setting}: "
                 f"{'a gain' if ln['gain'] else 'NOT a gain'} — {'; '.join(ln['why'])}.")
    return L + [""]


def spread_skill_section(ds: xr.Dataset, setting: str = "main") -> list[str]:
    """Spread/skill (mean over channels) of every row, method and kind of ``setting``, its % change
    against the reference and the excess distance to 1, ``|SS − 1| − |SS_ref − 1|``, with 95 %
    intervals."""
    base = str(ds.attrs.get("baseline", "reference"))
    seed = int(ds.attrs.get("seed", 0))

    L = ["## Spread/skill", "",
         "Spread/skill ratio (1 = a reliable ensemble), its % change against the reference and how much "
         "further from 1 it is than the reference's (negative = closer), with 95 % intervals.", "",
         "| row | kind | spread/skill | % change vs reference | excess \\|SS − 1\\| |", "|---|---|---|---|---|"]
    rows = [base] + verdict_rows(ds) + trivial_rows(ds)
    for meth in _methods(ds):
        for row in rows:
            for kind in ("analysis", "forecast"):
                a = cell_series(ds, setting, row, meth, kind, "ensemble", "spread_skill")
                b = cell_series(ds, setting, base, meth, kind, "ensemble", "spread_skill")
                if a is None or b is None:
                    continue
                if row == base:
                    L.append(f"| {_label(row, meth)} | {kind} | {np.nanmean(a):.3f} | | |")
                    continue
                pct = paired_stat(a, b, seed=seed)
                ex = paired_stat(a, b, closer_to_one, seed=seed)
                L.append(f"| {_label(row, meth)} | {kind} | {np.nanmean(a):.3f} | {_ci(pct)} | {_ci(ex, '+.3f')} |")
    return L + [""]


def mse_decomposition(ds: xr.Dataset, row: str, method: str, kind: str, setting: str = "main") -> dict | None:
    """The single-member MSE change of ``row`` against the reference split into the ensemble-mean
    MSE part and the spread part (single-member MSE = ensemble-mean MSE + mean_n |x_n − m|², per
    time): ``{"member", "ensmean", "spread"}`` each an absolute change (normalised MSE units) as
    :func:`~align_rl.evaluation.bootstrap.paired_stat` returns it (95 % interval), ``"share"`` (the
    spread part's share of the single-member change), ``"spread_reference"`` and ``"spread_row"``
    (time means of the spread term); None when either row lacks those scores."""
    base = str(ds.attrs.get("baseline", "reference"))
    seed = int(ds.attrs.get("seed", 0))
    parts = {}
    for who in (row, base):
        m = cell_series(ds, setting, who, method, kind, "member", "mse")
        e = cell_series(ds, setting, who, method, kind, "ensmean", "mse")
        parts[who] = None if m is None or e is None else (m, e, m - e)
    if parts[row] is None or parts[base] is None:
        return None
    (m1, e1, s1), (m0, e0, s0) = parts[row], parts[base]
    dm = paired_stat(m1, m0, difference, seed=seed)
    dsp = paired_stat(s1, s0, difference, seed=seed)
    return {"member": dm, "ensmean": paired_stat(e1, e0, difference, seed=seed), "spread": dsp,
            "share": dsp["value"] / dm["value"] if dm["value"] else float("nan"),
            "spread_reference": float(np.nanmean(s0)), "spread_row": float(np.nanmean(s1))}


def decomposition_section(ds: xr.Dataset, setting: str = "main") -> list[str]:
    """The single-member MSE change against the reference of every row of ``setting`` split into
    the ensemble-mean MSE part and the spread part (:func:`mse_decomposition`), absolute
    (normalised MSE units) with 95 % intervals."""
    L = ["## Decomposition of the single-member MSE change", "",
         "Single-member MSE = ensemble-mean MSE + spread term (mean over members of |x_n − mean|²). "
         "A narrower ensemble lowers the single-member MSE through the spread term alone; the "
         "ensemble-mean part is the better analysis. Changes against the reference, normalised MSE units, "
         "95 % intervals.", "",
         "| row | kind | Δ single-member MSE | Δ ensemble-mean part | Δ spread part | spread part share | spread term (ref → row) |",
         "|---|---|---|---|---|---|---|"]
    for meth in _methods(ds):
        for row in verdict_rows(ds) + trivial_rows(ds):
            for kind in ("analysis", "forecast"):
                d = mse_decomposition(ds, row, meth, kind, setting)
                if d is None:
                    continue
                L.append(f"| {_label(row, meth)} | {kind} | {_ci(d['member'], '+.5f')} | "
                         f"{_ci(d['ensmean'], '+.5f')} | {_ci(d['spread'], '+.5f')} | {_num(100 * d['share'], '.0f')} % | "
                         f"{d['spread_reference']:.5f} → {d['spread_row']:.5f} |")
    return L + [""]


def baselines_section(ds: xr.Dataset, blend_weights: dict | None = None,
                      blend_val: dict | None = None) -> list[str]:
    """The trivial baselines against the reference and the aligned rows against them;
    ``blend_val``: the validation-fitted weights (``metrics.json``'s ``blend_val``) of the
    *Blend-val* table (:func:`blend_val_section`)."""
    if not trivial_rows(ds):
        return []

    seed = int(ds.attrs.get("seed", 0))
    base = str(ds.attrs.get("baseline", "reference"))
    L = ["## Trivial baselines", "",
         "*Shrink-V*: the reference members pulled towards their ensemble mean until their spread term "
         "equals Align-V's, per time (same ensemble mean as the reference). *Blend-P*: the reference "
         "members blended with the background, x + w (x_b − x), one w per row such that their mean "
         "single-member MSE equals Align-P's (Geo-Scores at equal cost). Both from the stored reference "
         "members, no extra sampling. % change of the aligned row against its baseline, 95 % intervals.", "",
         "| aligned row | baseline | kind | single-member MSE % | CRPS % | spread/skill (row, baseline, reference) | Geo-Score (row, baseline, reference) |",
         "|---|---|---|---|---|---|---|"]
    for meth in _methods(ds):
        for t, f, k in zip(ds["model"].values, _coord(ds, "trivial_for", ""), _coord(ds, "trivial_kind", "")):
            t, f = str(t), str(f)
            if not f or str(k) in ("blend-val", BLEND_VAL_ALIGNED):
                continue
            for kind in ("analysis", "forecast"):
                def s(who, stat, metric):
                    return cell_series(ds, "main", who, meth, kind, stat, metric)
                cells = []
                for stat, metric in (("member", "mse"), ("ensemble", "crps")):
                    a, b = s(f, stat, metric), s(t, stat, metric)
                    cells.append("–" if a is None or b is None else _ci(paired_stat(a, b, seed=seed)))
                trip = []
                for stat, metric in (("ensemble", "spread_skill"), ("member", "geo_score")):
                    vals = [s(w, stat, metric) for w in (f, t, base)]
                    trip.append("–" if any(v is None for v in vals) else
                                ", ".join(f"{np.nanmean(v):.3f}" if metric == "spread_skill" else f"{np.nanmean(v):.2f}"
                                          for v in vals))
                if s(t, "member", "mse") is None:
                    continue
                L.append(f"| {_label(f, meth)} | {t} | {kind} | {cells[0]} | {cells[1]} | {trip[0]} | {trip[1]} |")
    if blend_weights:
        L += ["", "Blend weights w: " + ", ".join(f"{k} {v:.3f}" for k, v in blend_weights.items()) + "."]
    return L + [""] + blend_val_section(ds, blend_val)


def blend_val_section(ds: xr.Dataset, blend_val: dict | None = None) -> list[str]:
    """The *Blend-val* baseline of the main setting: per method the weight fitted on validation
    times, the row's ensemble-mean MSE, and the ensemble-mean MSE % change of the reference and of
    every verdict row against it (analyses and forecasts, 95 % intervals)."""
    bv = blend_val_row(ds)
    if bv is None:
        return []
    seed = int(ds.attrs.get("seed", 0))
    base = str(ds.attrs.get("baseline", "reference"))
    fits = {(v.get("setting"), v.get("method")): v for v in (blend_val or {}).values()
            if v.get("row", base) == base}
    any_fit = next(iter(fits.values()), None)
    where = (f"{any_fit['val_times']} validation times ({any_fit['first']} … {any_fit['last']})"
             if any_fit else "the validation times")
    rows = [base] + verdict_rows(ds)
    L = [f"### Towards the background, w from val ({bv})", "",
         f"The reference members blended towards the background, x_n + w (x_b − x_n), with one w per "
         f"method fitted on {where} analysed by the reference as the test times are (same sampler, guidance, "
         "members): the least-squares weight of the ensemble mean m, w = clip(Σ ⟨m − y, m − x_b⟩ / "
         "Σ |m − x_b|², 0, 1), sums over times, channels and grid (normalised). Unlike an oracle blend "
         "fitted on the test times, it is a baseline a user could run. Every MSE verdict line needs its "
         "ensemble-mean MSE below this row's. Ensemble-mean MSE % change against it, 95 % intervals.", "",
         "| method | w (val) | kind | Blend-val ens-mean MSE | " + " | ".join(rows) + " |",
         "|---|---|---|---|" + "---|" * len(rows)]
    for meth in _methods(ds):
        fit = fits.get(("main", meth))
        w = "–" if fit is None else _num(fit["w"], ".3f")
        for kind in ("analysis", "forecast"):
            b = cell_series(ds, "main", bv, meth, kind, "ensmean", "mse")
            if b is None:
                continue
            cells = []
            for row in rows:
                a = cell_series(ds, "main", row, meth, kind, "ensmean", "mse")
                cells.append("–" if a is None else _ci(paired_stat(a, b, seed=seed)))
            L.append(f"| {method_label(meth)} | {w} | {kind} | {np.nanmean(b):.5f} | " + " | ".join(cells) + " |")
    other = [f"{v['setting']} {method_label(v['method'])} {_num(v['w'], '.3f')}" for v in fits.values()
             if v.get("setting") != "main"]
    if other:
        L += ["", "Blend-val weights of the observation settings (fitted on validation observations of that "
                  "setting): " + ", ".join(other) + "."]
    return L + [""] + both_blended_section(ds, blend_val)


def both_blended_section(ds: xr.Dataset, blend_val: dict | None = None) -> list[str]:
    """The *Both blended* table of the main setting: per aligned ``-M`` row (its seed-mean row for
    several seeds), method and kind, the reference's and the aligned model's validation-fitted w
    (``metrics.json``'s ``blend_val``; one per seed), the ensemble-mean MSE of ``Blend-val`` and of
    ``Blend-val-<row>``, and the % changes of ``Blend-val-<row>`` against ``Blend-val``
    (ensemble-mean MSE, CRPS; 95 % intervals). Reported, not part of the verdict."""
    bv = blend_val_row(ds)
    pairs = [(str(t), str(f)) for t, f, k in zip(ds["model"].values, _coord(ds, "trivial_for", ""),
                                                 _coord(ds, "trivial_kind", ""))
             if str(k) == BLEND_VAL_ALIGNED and str(f) in verdict_rows(ds)]
    if bv is None or not pairs:
        return []
    seed = int(ds.attrs.get("seed", 0))
    base = str(ds.attrs.get("baseline", "reference"))
    fits = list((blend_val or {}).values())

    def w_of(rows: list[str], meth: str) -> str:
        ws = [v["w"] for r in rows for v in fits
              if v.get("row", base) == r and v.get("setting") == "main" and v.get("method") == meth]
        return ", ".join(_num(w, ".3f") for w in ws) or "–"

    L = ["#### Both blended", "",
         "Like with like: each aligned -M model's own members blended towards the background, "
         "x_n + w_a (x_b − x_n), with its own w_a fitted as the reference's w (same validation times, "
         "observations and sampler noise, its own analyses; one per seed), against the blended reference "
         f"({bv}). Does alignment add something beyond a move towards the background? Reported, not part "
         "of the verdict (which asks the aligned model itself to beat Blend-val). % change against "
         f"{bv}, 95 % intervals.", "",
         f"| row | w {base} | w aligned | kind | {bv} ens-mean MSE | both blended ens-mean MSE | "
         "ens-mean MSE % | CRPS % |", "|---|---|---|---|---|---|---|---|"]
    for meth in _methods(ds):
        w_ref = w_of([base], meth)
        for row, aligned in pairs:
            w_al = w_of(seed_rows(ds, aligned) or [aligned], meth)
            for kind in ("analysis", "forecast"):
                def s(who, stat, metric):
                    return cell_series(ds, "main", who, meth, kind, stat, metric)
                a, b = s(row, "ensmean", "mse"), s(bv, "ensmean", "mse")
                if a is None or b is None:
                    continue
                ca, cb = s(row, "ensemble", "crps"), s(bv, "ensemble", "crps")
                crps = "–" if ca is None or cb is None else _ci(paired_stat(ca, cb, seed=seed))
                L.append(f"| {_label(row, meth)} | {w_ref} | {w_al} | {kind} | {np.nanmean(b):.5f} | "
                         f"{np.nanmean(a):.5f} | {_ci(paired_stat(a, b, seed=seed))} | {crps} |")
    return L + [""]


def seeds_section(ds: xr.Dataset) -> list[str]:
    """Per several-seed model, method and kind: the seeds' % changes against the reference (mean,
    std, min, max) beside the seed mean's change and interval."""
    groups = sorted({str(g) for g in _coord(ds, "seed_of", "") if str(g)})
    if not groups:
        rows = verdict_rows(ds)
        return ["## Seeds", "", f"Every aligned row rests on one seed ({', '.join(rows) or 'none'}); "
                "no across-seed spread to show.", ""]

    L = ["## Seeds", "",
         "Aligned models trained with several seeds (DPO initialisation, batch order, pair draw): each "
         "seed is evaluated on the same times, observations and sampler noise; the model's row is the "
         "per-time mean over its seeds. % changes against the reference.", "",
         "| model | kind | metric | seeds | per seed | mean ± std [min, max] | seed mean [95 % CI] |",
         "|---|---|---|---|---|---|---|"]
    for meth in _methods(ds):
        for g in groups:
            for kind in ("analysis", "forecast"):
                for stat, metric, name in (("ensmean", "mse", "ens-mean MSE"), ("ensemble", "crps", "CRPS"),
                                           ("member", "mse", "single-member MSE"),
                                           ("ensemble", "spread_skill", "spread/skill")):
                    a = across_seeds(ds, g, meth, kind, stat, metric)
                    c = change(ds, g, meth, kind, metric, stat)
                    if a is None or c is None:
                        continue
                    per = ", ".join(_num(v) for v in a["seeds"])
                    L.append(f"| {_label(g, meth)} | {kind} | {name} | {a['n']} | {per} | {a['mean']:+.2f} ± "
                             f"{a['std']:.2f} [{a['min']:+.2f}, {a['max']:+.2f}] | {_ci(c)} |")
    return L + [""]


def observation_tables(ds: xr.Dataset) -> list[str]:
    """The paper's Tables 3/4 as changes: analysis MSE change (single member and ensemble mean) of
    every aligned row against the reference over observation density and observation error, per
    guidance method, with the verdict (one Holm family per table). ObsFree uses no observations:
    its row is the main setting's."""
    L: list[str] = []
    base = str(ds.attrs.get("baseline", "reference"))

    for ablation, title in (("density", "Table 3 — Align vs reference over observation density"),
                            ("error", "Table 4 — Align vs reference over observation error")):
        sets = [(str(s), float(d), float(e)) for s, a, d, e in
                zip(ds["setting"].values, ds["ablation"].values, ds["density"].values, ds["sigma_o"].values)
                if str(a) == ablation]
        if not sets:
            continue
        lines = ablation_lines(ds, ablation)
        by = {(ln["setting"], ln["model"], ln["method"]): ln for ln in lines}
        L += [f"## {title}", "",
              f"Analysis MSE % change against {base} (single member; ensemble mean) with 95 % intervals, "
              f"and the verdict of §10 (Holm family: the {len(lines)} lines of this table). "
              "ObsFree ignores the observations (its value is the main setting's, no verdict here).", ""]
        head = "density" if ablation == "density" else "σ_o"
        for row in verdict_rows(ds):
            L += [f"### {row}", "", f"| {head} | " + " | ".join(method_label(m) for m in _methods(ds)) + " |",
                  "|---|" + "---|" * len(_methods(ds))]
            for s, d, e in sets:
                cells = []
                for meth in _methods(ds):
                    where = s if needs_obs(meth) else "main"
                    cm = change(ds, row, meth, "analysis", "mse", "member", where)
                    ce = change(ds, row, meth, "analysis", "mse", "ensmean", where)
                    if cm is None:
                        cells.append("–")
                        continue
                    ln = by.get((s, row, meth))
                    v = "" if ln is None else (" **gain**" if ln["gain"] else " no gain")
                    cells.append(f"{_ci(cm)}; {_ci(ce) if ce else '–'}{v}")
                L.append(f"| {d:g} | " + " | ".join(cells) + " |" if ablation == "density"
                         else f"| {e:g} | " + " | ".join(cells) + " |")
            L.append("")
        L += verdict_section(lines, title=f"### Verdict lines of {title.split(' — ')[0]}",
                             family=f"every aligned row × observing method × {ablation} setting, analyses")
    return L
