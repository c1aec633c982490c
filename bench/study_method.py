"""The method study on the default world: what makes analyses beat the background, and alignment
improve them. Tuning reads the ``val`` split; ``--split test`` reports on held-out test times.

``python bench/study_method.py analyses [--split val] [key=value ...]``
    reference analyses (every guidance method) with plain and anchored decoding: single-member and
    ensemble-mean MSE, ensemble-mean WRMSE of z500 and t850, CRPS and Geo-Score beside the
    background's.
``python bench/study_method.py align --name NAME [--split val] [key=value ...]``
    one alignment configuration: the pairs of the main job's store (built when absent with the
    given pairs/rewards settings), Diffusion-DPO per ``pairs.variants``, then the evaluation of the
    reference and the aligned models on the split; one row per model × method appended to
    ``<workdir>/study/<split>.jsonl``.
``python bench/study_method.py table [--split val]``
    the rows so far as a markdown table (``<workdir>/study/<split>.md``).

The pretrained models and the world come from the workdir's caches (``run.workdir``, default
``runs/default``), so a study reuses what the main job built.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import split_setup  # noqa: E402


def _rows(ev, tag: str) -> list[dict]:
    """One row per (model, method) of the main setting of run_evaluation's results ``ev``."""
    from align_rl.evaluation.results import change, rows, score

    ds = ev.ds
    out = []
    for row, mo, me in rows(ds, "main"):
        def sc(kind, stat, metric):
            return score(ds, mo, me, kind, metric, stat)

        r = {"tag": tag, "row": row,
             "mse": sc("analysis", "member", "mse"), "mse_ens": sc("analysis", "ensmean", "mse"),
             "z500_ens": sc("analysis", "ensmean", "wrmse_z500"), "t850_ens": sc("analysis", "ensmean", "wrmse_t850"),
             "geo": sc("analysis", "member", "geo_score"), "crps": sc("analysis", "ensemble", "crps"),
             "fc_mse": sc("forecast", "member", "mse")}
        if change(ds, mo, me, "analysis", "mse") is not None:
            r["d_mse"] = change(ds, mo, me, "analysis", "mse")
            r["d_mse_ens"] = change(ds, mo, me, "analysis", "mse", "ensmean")
            r["d_crps"] = change(ds, mo, me, "analysis", "crps", "ensemble")
            r["d_fc"] = change(ds, mo, me, "forecast", "mse")
            r["d_geo"] = change(ds, mo, me, "analysis", "geo_score")
        out.append(r)
    return out


def _append(ws, split: str, rows: list[dict]) -> None:
    d = Path(ws.root) / "study"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{split}.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def cmd_analyses(args) -> None:
    from align_rl.evaluation.runner import run_evaluation

    for dec in (args.decode or ["plain", "anchored"]):
        cfg, ecfg, ws, store, pre, data = split_setup(args.overrides + [f"sampler.decode={dec}"], args.split)
        t = time.perf_counter()
        s = run_evaluation(ecfg, ws, {"reference": pre.eps_model}, data=data,
                           out=Path(ws.root) / "study" / f"analyses-{dec}-{args.split}", progress=False)
        rows = _rows(s, f"decode={dec} {' '.join(args.overrides)}")
        _append(ws, args.split, rows)
        print(f"decode={dec} ({time.perf_counter() - t:.0f} s)")
        for r in rows:
            print(f"  {r['row']:22s} mse {r['mse']:.4f} ens {r['mse_ens']:.4f} z500 {r['z500_ens']:.1f} "
                  f"t850 {r['t850_ens']:.3f} geo {r['geo']:.1f} crps {r['crps'] or float('nan'):.4f}")


def cmd_align(args) -> None:
    from align_rl.io.checkpoints import load_model
    from align_rl.evaluation.runner import run_evaluation
    from align_rl.pipeline import run

    cfg, ecfg, ws, store, pre, data = split_setup(args.overrides, args.split)
    t0 = time.perf_counter()
    summary = run(cfg, progress=False, evaluate=False)  # the main job's pairs and DPO, cached
    models = {"reference": pre.eps_model}
    for v, r in summary["variants"].items():
        models[f"Align-{v}"], _ = load_model(r["checkpoint"], "diffusion", expect=cfg.diffusion)
        m = r["metrics"]
        print(f"DPO-{v}: step {r['step']} best {r.get('best')} loss {m.get('loss', float('nan')):.4f} "
              f"acc {m.get('rewards/accuracies', float('nan')):.2f} "
              f"Δw {m.get('model_minus_ref/chosen', float('nan')):+.5f} -> {r['checkpoint']}")
    t1 = time.perf_counter()
    s = run_evaluation(ecfg, ws, models, data=data,
                       out=Path(ws.root) / "study" / f"align-{args.name}-{args.split}", progress=False)
    rows = _rows(s, args.name)
    info = {"overrides": args.overrides, "timings": summary["timings"], "pairs": summary.get("pairs_total"),
            "variants": {v: {"best": r.get("best"), "step": r["step"]} for v, r in summary["variants"].items()},
            "eval_s": round(time.perf_counter() - t1, 1), "train_s": round(t1 - t0, 1)}
    for r in rows:
        r.update(info)
    _append(ws, args.split, rows)
    print(f"timings {summary['timings']} eval {info['eval_s']} s")
    for r in rows:
        d = r.get("d_mse")
        print(f"  {r['row']:22s} mse {r['mse']:.5f} ens {r['mse_ens']:.5f} geo {r['geo']:.1f} fc {r['fc_mse']:.5f}"
              + (f"  Δmse {d['pct']:+.2f}% [{d['ci'][0]:+.2f},{d['ci'][1]:+.2f}] Δens {r['d_mse_ens']['pct']:+.2f}%"
                 f" Δcrps {r['d_crps']['pct']:+.2f}% Δfc {r['d_fc']['pct']:+.2f}% Δgeo {r['d_geo']['pct']:+.2f}%"
                 if d else ""))


def cmd_table(args) -> None:
    from align_rl.config import load_config
    from align_rl.workspace import Workspace

    ws = Workspace.from_config(load_config(overrides=args.overrides))
    p = Path(ws.root) / "study" / f"{args.split}.jsonl"
    rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    lines = ["| run | model/method | MSE | ens-mean MSE | z500 | t850 | Geo | Δ MSE % [95 % CI] | Δ ens % | Δ CRPS % | Δ 48 h fc % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r.get("d_mse")
        dd = (f"{d['pct']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] | {r['d_mse_ens']['pct']:+.2f} | "
              f"{r['d_crps']['pct']:+.2f} | {r['d_fc']['pct']:+.2f}") if d else " | | | "
        lines.append(f"| {r['tag']} | {r['row']} | {r['mse']:.4f} | {r['mse_ens']:.4f} | {r['z500_ens']:.0f} | "
                     f"{r['t850_ens']:.2f} | {r['geo']:.1f} | {dd} |")
    out = p.with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["analyses", "align", "table"])
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--name", default="run")
    p.add_argument("--decode", action="append", choices=["plain", "anchored"],
                   help="analyses: a decoding (repeat; default both)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    {"analyses": cmd_analyses, "align": cmd_align, "table": cmd_table}[args.command](args)


if __name__ == "__main__":
    main()
