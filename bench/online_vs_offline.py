"""Online (asynchronous) against offline alignment at equal candidates and equal learner steps, with
seeds, on one split of the default world (docs/method.md §9.4; BENCHMARKS.md, "Online against
offline").

    python bench/online_vs_offline.py --split val run.workdir=runs/default [key=value ...]
    python bench/online_vs_offline.py --split test --arms async,offline-equal run.workdir=runs/default

Arms (``-M`` pairs, ``dpo.steps`` learner steps each, ``--seeds`` alignment seeds each):

- ``offline``: the default job's offline DPO (``pairs.backgrounds`` reference backgrounds);
- ``async``: ``dpo.mode=async``, warm-started from those backgrounds' pairs, its samplers drawing
  new backgrounds with the published policy for the whole run;
- ``offline-equal``: offline DPO on as many reference candidates as the async runs saw (their
  buffer's candidates, seed mean, warm start included): ``pairs.backgrounds`` raised to that count
  over ``pairs.candidates``, at most the preference split's usable times. The same budget of
  candidates and learner steps, drawn by the reference instead of the policy: the comparison the
  verdict reads.

Trains what is missing (cached by the main job's own keys), then evaluates every arm's seeds and the
reference in ONE evaluation of ``--times`` times of the split (the same observations and sampler
noise for every row; each arm's seed mean and seed rows, its Shrink baseline). Writes
``<workdir>/study/online-vs-offline-<split>/`` with the evaluation's own files and
``online_vs_offline.md`` / ``.json``: per arm and method, the % change against the reference
(ensemble-mean MSE with its 95 % circular-block interval, CRPS, 48 h forecast) and each arm's
verdict lines (:mod:`align_rl.evaluation.verdict`); the async arm against ``offline-equal`` (the
same tests, ``offline-equal`` in the reference's place, Holm over the six lines); and the loop's
measures of every async seed (overlap, learner wait, staleness, candidates/s, learner steps/s).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import split_setup  # noqa: E402

ARMS = ("offline", "async", "offline-equal")
NAMES = {"offline": "Align-offline", "async": "Align-async", "offline-equal": "Align-equal"}
LOOP_KEYS = ("loop/overlap", "loop/learner_wait", "loop/staleness_max", "loop/staleness_mean",
             "loop/candidates", "loop/candidates_per_s", "loop/steps_per_s", "loop/publish_share")


def _train(overrides: list[str], seeds: int) -> list[dict]:
    """The main job's pairs and DPO for ``overrides`` (cached when done): per seed
    ``{"checkpoint", "dir", "best"}``."""
    from align_rl.config import load_config
    from align_rl.pipeline import run

    cfg = load_config(overrides=[*overrides, "pairs.variants=[M]", f"dpo.seeds={seeds}"])
    s = run(cfg, progress=False, evaluate=False)
    return [{"checkpoint": e["checkpoint"], "dir": str(Path(e["checkpoint"]).parent), "best": e.get("best")}
            for e in s["variants"]["M"]["seeds"]]


def _buffer_counts(run_dir: str) -> dict:
    """Candidates and distinct backgrounds of an async run's buffer (warm start included)."""
    from align_rl.alignment.async_loop import BUFFER_STORE
    from align_rl.io.pair_store import PairStore

    st = PairStore.open(Path(run_dir) / BUFFER_STORE, mode="r")
    b = st.backgrounds()
    return {"candidates": int(st.num_candidates), "backgrounds": int(len(np.unique(b["bg_id"]))),
            "groups": int(st.num_backgrounds)}


def _loop(run_dir: str) -> dict:
    from align_rl.alignment.async_loop import METRICS_JSON

    m = json.loads((Path(run_dir) / METRICS_JSON).read_text())
    return {k: m.get(k) for k in LOOP_KEYS}


def _cell(line: dict, name: str) -> dict | None:
    return next((t for t in line["tests"] if t["name"] == name), None)


def _fmt_test(t: dict | None) -> str:
    if t is None or t["value"] is None or not math.isfinite(t["value"]):
        return "n/a"
    return f"{t['value']:+.2f} [{t['ci'][0]:+.2f}, {t['ci'][1]:+.2f}]"


def _verdicts(ds, rows: list[str], methods: list[str], reference: str) -> list[dict]:
    """The verdict lines of ``rows`` × methods × kinds against ``reference``, Holm over them all."""
    from align_rl.evaluation.verdict import decide, mse_line

    lines = [ln for r in rows for m in methods for k in ("analysis", "forecast")
             if (ln := mse_line(ds, r, m, k, reference=reference)) is not None]
    return decide(lines)


def _table(lines: list[dict], title: str) -> list[str]:
    out = [f"### {title}", "",
           "| model | method | kind | ens-mean MSE % [95 %] | CRPS % | seeds (ens-mean %) | spread/skill | Holm p | verdict |",
           "|---|---|---|---|---|---|---|---|---|"]
    for ln in lines:
        seeds = ", ".join(f"{p.get('ensmean/mse', float('nan')):+.2f}" for p in ln.get("seeds", []))
        ss = ln.get("spread_skill")
        sst = f"{ss['model']:.3f} ({ss['reference']:.3f})" if ss else "n/a"
        crps = _cell(ln, "CRPS vs reference")
        crps_txt = "n/a" if crps is None else f"{crps['value']:+.2f}"
        out.append(f"| {ln['model']} | {ln['method']} | {ln['kind']} | "
                   f"{_fmt_test(_cell(ln, 'ensemble-mean MSE vs reference'))} | {crps_txt} | {seeds} | {sst} | "
                   f"{ln['p_holm']:.4f} | {'gain' if ln['gain'] else 'no gain: ' + '; '.join(ln['why'])} |")
    return out + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", choices=["val", "test"], default="val")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--times", type=int, default=None, help="evaluation times (default: eval.times)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    bad = [x for x in arms if x not in ARMS]
    if bad:
        sys.exit(f"error: unknown arm(s) {bad}: choose from {', '.join(ARMS)}")
    ov = list(a.overrides) + ([f"eval.times={a.times}"] if a.times else []) + ["eval.blend_times=0"]

    from align_rl.evaluation.results import as_dataset
    from align_rl.evaluation.runner import run_evaluation
    from align_rl.io.checkpoints import load_model
    from align_rl.world.splits import SplitData

    cfg, ecfg, ws, store, pre, data = split_setup(ov, a.split)
    usable = len(SplitData(cfg, ws, store, pre, progress=False, split="pref").times)
    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {}
    info: dict = {"split": a.split, "seeds": a.seeds, "overrides": a.overrides, "usable_pref_times": usable,
                  "steps": int(cfg.dpo.steps), "arms": {}}
    need_async = "async" in arms or "offline-equal" in arms
    if "offline" in arms:
        runs["offline"] = _train(ov, a.seeds)
        info["arms"]["offline"] = {"backgrounds": int(cfg.pairs.backgrounds),
                                   "candidates": int(cfg.pairs.backgrounds) * int(cfg.pairs.candidates)}
    if need_async:
        runs["async"] = _train([*ov, "dpo.mode=async"], a.seeds)
        counts = [_buffer_counts(r["dir"]) for r in runs["async"]]
        loops = [_loop(r["dir"]) for r in runs["async"]]
        info["arms"]["async"] = {"per_seed": [{**c, **lp} for c, lp in zip(counts, loops)],
                                 "candidates": float(np.mean([c["candidates"] for c in counts]))}
    if "offline-equal" in arms:
        want = info["arms"]["async"]["candidates"] / int(cfg.pairs.candidates)
        n = int(min(usable, round(want)))
        runs["offline-equal"] = _train([*ov, f"pairs.backgrounds={n}"], a.seeds)
        info["arms"]["offline-equal"] = {"backgrounds": n, "candidates": n * int(cfg.pairs.candidates),
                                         "wanted_backgrounds": want}
    if "async" not in arms:
        runs.pop("async", None)
    info["train_s"] = round(time.perf_counter() - t0, 1)
    for k, rs in runs.items():
        info["arms"].setdefault(k, {})["runs"] = rs

    models = {"reference": pre.eps_model}
    for k, rs in runs.items():
        models[NAMES[k]] = [load_model(r["checkpoint"], "diffusion", expect=cfg.diffusion)[0] for r in rs]
    out = Path(ws.root) / "study" / f"online-vs-offline-{a.split}"
    t1 = time.perf_counter()
    ev = run_evaluation(ecfg, ws, models, data=data, out=out, progress=True)
    info["eval_s"] = round(time.perf_counter() - t1, 1)
    ds = as_dataset(ev)
    methods = list(ecfg.guidance.methods)
    vs_ref = _verdicts(ds, [NAMES[k] for k in runs], methods, "reference")
    head = NAMES["async"], NAMES["offline-equal"]
    vs_equal = _verdicts(ds, [head[0]], methods, head[1]) if all(k in runs for k in ("async", "offline-equal")) else []
    md = [f"# Online against offline on {a.split} ({a.seeds} seeds, {int(cfg.dpo.steps)} learner steps each)", "",
          "| arm | backgrounds | candidates (seed mean) |", "|---|---|---|"]
    for k in runs:
        arm = info["arms"][k]
        bgs = arm.get("backgrounds", "") if k != "async" else \
            f"{np.mean([p['backgrounds'] for p in arm['per_seed']]):.0f} distinct"
        md.append(f"| {NAMES[k]} | {bgs} | {arm['candidates']:.0f} |")
    md.append("")
    if "async" in info["arms"]:
        md += ["| async seed | overlap | learner wait | staleness max (mean) | candidates/s | learner steps/s | publish share |",
               "|---|---|---|---|---|---|---|"]
        for i, p in enumerate(info["arms"]["async"]["per_seed"]):
            md.append(f"| {i} | {p['loop/overlap']:.1%} | {p['loop/learner_wait']:.1%} | {p['loop/staleness_max']} "
                      f"({p['loop/staleness_mean']:.2f}) | {p['loop/candidates_per_s']:.2f} | "
                      f"{p['loop/steps_per_s']:.2f} | {p['loop/publish_share']:.2%} |")
        md.append("")
    md += _table(vs_ref, "Against the reference (Holm over every line of this table)")
    if vs_equal:
        md += _table(vs_equal, f"{head[0]} against {head[1]} (equal candidates and learner steps; "
                               f"{head[1]} in the reference's place)")
    md.append(f"Training (what was not cached) {info['train_s']:.0f} s, evaluation {info['eval_s']:.0f} s.")
    (out / "online_vs_offline.md").write_text("\n".join(md) + "\n")
    (out / "online_vs_offline.json").write_text(json.dumps(
        {**info, "vs_reference": vs_ref, "async_vs_equal": vs_equal}, indent=1, default=float))
    print("\n".join(md))


if __name__ == "__main__":
    main()
