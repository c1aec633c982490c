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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from align_rl.config import Config
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


@dataclass
class SweepResult:
    rows: list[TrialRow]
    best: TrialRow | None
    best_config: Config | None
    seconds: float = 0.0
    prepare_seconds: float = 0.0


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
                             _error_text(r.error)))
    rows.sort(key=lambda t: t.trial_id)
    sign = 1.0 if spec.mode == "min" else -1.0
    scored = [t for t in rows if t.status != "error" and spec.metric in t.metrics]
    finished = [t for t in scored if t.status == "completed"] or scored
    best = min(finished, key=lambda t: sign * t.metrics[spec.metric]) if finished else None
    best_cfg = None
    if best is not None:
        best_cfg = trial_config(cfg, best.params)
        steps = int(best.metrics.get("dpo_steps", 0)) or steps_per_stage(spec, cfg) * best.stages
        best_cfg.dpo.steps = steps
    return SweepResult(rows, best, best_cfg)


def write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def results_columns(result: SweepResult, spec: SweepSpec) -> tuple[list[str], list[list[str]]]:
    metric_cols = [spec.metric] + [k for k in VALIDATION_METRICS if k != spec.metric
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
    """``results.csv``, ``results.md``, ``best_config.yaml``, ``best.json`` (each atomically)."""
    header, body = results_columns(result, spec)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(body)
    write_atomic(out / "results.csv", buf.getvalue())
    lines = [f"# Sweep `{spec.name}`", ""]
    if spec.question:
        lines += [f"**Question.** {spec.question}", ""]
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
