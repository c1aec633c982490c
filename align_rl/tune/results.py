"""The sweep's results: one row per trial, the best trial and its configuration.

Outputs in ``<run.workdir>/sweeps/<name>/`` (each written atomically): ``results.csv`` and
``results.md`` (one row per trial: its parameters, stages done, whether ASHA stopped it, its last
metrics), ``best_config.yaml`` (the full align_rl config of the best trial, ``dpo.steps`` = the
steps it trained; usable as ``python -m align_rl.train --config …``) and ``best.json``; the table
and the best configuration are also logged to wandb (``run.wandb_mode``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align_rl.config import Config
from align_rl.tune.pareto import change_cell, choose, front_of, improves, plot_curves, plot_front
from align_rl.tune.spec import SweepSpec, steps_per_stage
from align_rl.tune.trial import VALIDATION_METRICS, trial_config


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    status: str  # completed | stopped early | error
    stages: int
    metrics: dict[str, float]
    error: str = ""
    history: list[dict[str, float]] = field(default_factory=list)  # one report per stage


@dataclass
class SweepResult:
    rows: list[TrialRow]
    best: TrialRow | None
    best_config: Config | None
    seconds: float = 0.0
    prepare_seconds: float = 0.0
    front: list[TrialRow] = field(default_factory=list)  # the Pareto front of the objectives
    reference: dict[str, float] = field(default_factory=dict)  # the reference's validation metrics



def _title(title: str, spec) -> list[str]:
    """A sweep document's first lines: its title and the sweep's question."""
    return [f"# {title}", ""] + ([f"**Question.** {spec.question}", ""] if spec.question else [])

def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return " ".join(f"{k}={fmt(x)}" for k, x in v.items())
    return str(v)


def _error_text(err: BaseException | None) -> str:
    """One line naming a trial's error: the original exception of a Ray task error."""
    if err is None:
        return ""
    cause = getattr(err, "cause", None) or err
    lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    return f"{type(cause).__name__}: {text}"[:300]


def _history(r) -> list[dict[str, float]]:
    """Every report of a trial (Tune's ``metrics_dataframe``), numeric columns only."""
    df = getattr(r, "metrics_dataframe", None)
    if df is None or len(df) == 0:
        return []
    keep = [c for c in df.columns if c in VALIDATION_METRICS or c in ("dpo_steps", "stage", "stage_seconds")]
    return [{k: float(v) for k, v in rec.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            for rec in df[keep].to_dict("records")]


def collect_results(grid, spec: SweepSpec, cfg: Config) -> SweepResult:
    rows = []
    for r in grid:
        m = {k: float(v) for k, v in (r.metrics or {}).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
        it = int(m.get("training_iteration", 0))
        if r.error is not None:
            status = "error"
        elif it < spec.stages:
            status = "stopped early"
        else:
            status = "completed"
        tid = (r.metrics or {}).get("trial_id") or Path(r.path).name
        params = {k: r.config[k] for k in spec.search if k in (r.config or {})}
        rows.append(TrialRow(str(tid), params, status, it,
                             {k: v for k, v in m.items() if k in VALIDATION_METRICS or k in
                              ("dpo_steps", "pairs", "stage_seconds", "policy_version")},
                             _error_text(r.error), _history(r)))
    rows.sort(key=lambda t: t.trial_id)
    sign = 1.0 if spec.mode == "min" else -1.0
    goals = spec.goals()
    front = front_of(rows, goals)
    if len(goals) > 1:  # the front's chosen trial (better than the reference on every objective)
        best = choose(front, goals, spec.metric, spec.mode)
    else:
        scored = [t for t in rows if t.status != "error" and spec.metric in t.metrics]
        finished = [t for t in scored if t.status == "completed"] or scored
        best = min(finished, key=lambda t: sign * t.metrics[spec.metric]) if finished else None
    best_cfg = None
    if best is not None:
        best_cfg = trial_config(cfg, best.params)
        steps = int(best.metrics.get("dpo_steps", 0)) or steps_per_stage(spec, cfg) * best.stages
        best_cfg.dpo.steps = steps
    return SweepResult(rows, best, best_cfg, front=front)


def write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def results_columns(result: SweepResult, spec: SweepSpec,
                    intervals: bool = False) -> tuple[list[str], list[list[str]]]:
    """The results table: the primary metric and the objectives first, then every other reported
    metric (``intervals``: with the ``*_change_lo`` / ``*_change_hi`` columns)."""
    first = list(dict.fromkeys([spec.metric, *spec.goals()]))
    metric_cols = first + [k for k in VALIDATION_METRICS if k not in first
                           and (intervals or not k.endswith(("_change_lo", "_change_hi")))
                           and any(k in t.metrics for t in result.rows)]
    extra = [k for k in ("dpo_steps", "pairs") if any(k in t.metrics for t in result.rows)]
    header = ["trial", *spec.search, "status", "stages", *metric_cols, *extra, "best"]
    body = []
    for t in result.rows:
        row = [t.trial_id] + [fmt(t.params.get(k, "")) for k in spec.search] + [t.status, str(t.stages)]
        row += [fmt(t.metrics[k]) if k in t.metrics else "" for k in metric_cols + extra]
        row.append("*" if result.best is t else "")
        body.append(row)
    return header, body


def write_results(result: SweepResult, spec: SweepSpec, cfg: Config, out: Path) -> None:
    """``results.csv``, ``results.md``, ``report.md`` and ``front.png`` (:func:`write_report`),
    ``best_config.yaml``, ``best.json`` (each atomically)."""
    header, body = results_columns(result, spec, intervals=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(body)
    write_atomic(out / "results.csv", buf.getvalue())
    header, body = results_columns(result, spec)
    lines = _title(f"Sweep `{spec.name}`", spec)
    lines += [f"Metric: `{spec.metric}` ({spec.mode}); scheduler: {spec.scheduler}; "
              f"{len(result.rows)} trials, {spec.stages} stages of "
              f"{steps_per_stage(spec, cfg)} DPO steps; validation: {spec.validation.times} val "
              f"times, {spec.validation.members} members, {spec.validation.method}. "
              f"Wall time {result.seconds / 60:.1f} min (shared inputs {result.prepare_seconds / 60:.1f} min).",
              "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    errors = [t for t in result.rows if t.error]
    if errors:
        lines += ["", "Errors:"] + [f"- {t.trial_id}: {t.error}" for t in errors]
    if result.best is not None:
        lines += ["", f"Best: trial {result.best.trial_id} with `{spec.metric}` = "
                  f"{result.best.metrics[spec.metric]:.5g}; parameters "
                  f"{fmt(result.best.params)}; configuration in `best_config.yaml` "
                  "(`python -m align_rl.train --config best_config.yaml`)."]
    else:
        lines += ["", "No trial reported the metric; see the errors above and `tune/`."]
    write_atomic(out / "results.md", "\n".join(lines) + "\n")
    write_curves(result, spec, out)
    write_report(result, spec, cfg, out)
    if result.best_config is not None:
        head = (f"# Best configuration of sweep {spec.name} ({spec.metric} {spec.mode}: "
                f"{result.best.metrics[spec.metric]:.6g}, trial {result.best.trial_id})\n"
                f"# parameters: {fmt(result.best.params)}\n"
                f"# use: python -m align_rl.train --config {out / 'best_config.yaml'}\n")
        d = result.best_config.to_dict()
        write_atomic(out / "best_config.yaml", head + yaml.safe_dump(d, sort_keys=False))
        write_atomic(out / "best.json", json.dumps(
            {"trial": result.best.trial_id, "params": result.best.params, "metrics": result.best.metrics,
             "metric": spec.metric, "mode": spec.mode}, indent=1, default=str))


def log_wandb(result: SweepResult, spec: SweepSpec, cfg: Config, out: Path) -> None:
    """The results table and the best configuration as one wandb run (``run.wandb_mode``)."""
    if cfg.run.wandb_mode == "disabled":
        return
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    header, body = results_columns(result, spec)
    run = wandb.init(project=cfg.run.wandb_project, name=f"sweep-{spec.name}", mode=cfg.run.wandb_mode,
                     dir=str(out), config={"sweep": spec.to_dict()}, reinit=True,
                     settings=wandb.Settings(silent=True, console="off"))
    try:
        run.log({"results": wandb.Table(columns=header, data=body)})
        if result.best is not None:
            run.summary.update({"best_trial": result.best.trial_id, "best_params": result.best.params,
                                f"best_{spec.metric}": result.best.metrics[spec.metric],
                                "best_config": result.best_config.to_dict()})
    finally:
        run.finish()


def write_curves(result: SweepResult, spec: SweepSpec, out: Path) -> None:
    """``curves.csv`` (one row per trial and stage: its parameters, DPO steps and metrics) and
    ``curves.png`` (each trial's validation analysis-MSE change against its DPO steps): the
    learning curves behind the last values of ``results.csv`` (e.g. an early peak)."""
    recs = [(t, h) for t in result.rows for h in t.history]
    if not recs:
        return
    cols = ["dpo_steps", "stage"] + [k for k in VALIDATION_METRICS if any(k in h for _, h in recs)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", *spec.search, *cols])
    for t, h in recs:
        w.writerow([t.trial_id, *(fmt(t.params.get(k, "")) for k in spec.search),
                    *(f"{h[c]:.6g}" if c in h else "" for c in cols)])
    write_atomic(out / "curves.csv", buf.getvalue())
    plot_curves(result.rows, out / "curves.png", label=lambda t: f"{t.trial_id} {fmt(t.params)}")


def _weights_label(t: TrialRow) -> str:
    w = t.params.get("rewards.weights")
    if isinstance(w, dict):
        return "/".join(f"{float(v):g}" for v in w.values())
    return fmt(t.params)


def write_report(result: SweepResult, spec: SweepSpec, cfg: Config, out: Path) -> None:
    """``report.md``: the sweep's answer without Tune's folders: the question, the objectives,
    the Pareto front (each objective's % change against the reference with its 95 % interval over
    the validation times, whether the trial beats the reference on every objective), the chosen
    trial and how to train with it, the cost; and ``front.png`` (:func:`~align_rl.tune.pareto.plot_front`)."""
    goals = spec.goals()
    front = result.front
    keys = next((list(t.params["rewards.weights"]) for t in result.rows
                 if isinstance(t.params.get("rewards.weights"), dict)), None)
    png = plot_front(result.rows, front, out / "front.png", result.reference, label=_weights_label,
                     title=f"sweep {spec.name}" + (f"; labels: weights {'/'.join(keys)}" if keys else ""))
    done = sum(t.status == "completed" for t in result.rows)
    lines = _title(f"Sweep `{spec.name}`: report", spec)
    lines += [f"Objectives: {', '.join(f'`{k}` ({m})' for k, m in goals.items())}. "
              f"{len(result.rows)} trials ({done} completed), {spec.stages} stages of "
              f"{steps_per_stage(spec, cfg)} DPO steps; validation on {spec.validation.times} VAL "
              f"times × {spec.validation.members} members ({spec.validation.method}). Cost: "
              f"{result.seconds / 60:.1f} min wall (shared inputs {result.prepare_seconds / 60:.1f} min).",
              "", "Changes are % against the reference (the pretrained model) on the same validation "
              "times, observations and sampler seeds; [95 % moving-block bootstrap interval over the "
              "times]. Negative = lower.", "",
              f"## Pareto front ({len(front)} of {done} completed trials)", ""]
    if front:
        head = ["trial", *spec.search, *goals, "beats reference on all", "chosen"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for t in sorted(front, key=lambda r: SIGN_OF[spec.mode] * r.metrics[spec.metric]):
            lines.append("| " + " | ".join(
                [t.trial_id, *(fmt(t.params.get(k, "")) for k in spec.search),
                 *(change_cell(t.metrics, k) for k in goals), "yes" if improves(t, goals) else "no",
                 "*" if t is result.best else ""]) + " |")
    else:
        lines.append("No completed trial reported every objective; see `results.md` and `tune/`.")
    if png is not None:
        lines += ["", "![front](front.png)", "",
                  "`front.png`: analysis-MSE change against 48 h forecast-MSE change of every "
                  "completed trial, coloured by Geo-Score; the front ringed, the reference at the origin."]
    lines += [""]
    if result.best is not None:
        why = ("better than the reference on every objective, then the best "
               if improves(result.best, goals) else "no front trial beats the reference on every "
               "objective; the best ") if len(goals) > 1 else "the best "
        lines += [f"**Chosen.** Trial {result.best.trial_id} ({fmt(result.best.params)}): {why}"
                  f"`{spec.metric}` ({spec.mode}) = {result.best.metrics[spec.metric]:.5g}. "
                  f"Train with it: `python -m align_rl.train --config {out / 'best_config.yaml'}`."]
    lines += ["", "Every trial: `results.md` / `results.csv`; every stage of every trial (learning "
              "curves): `curves.csv` / `curves.png`."]
    write_atomic(out / "report.md", "\n".join(lines) + "\n")


SIGN_OF = {"min": 1.0, "max": -1.0}
