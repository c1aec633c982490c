"""The evaluation that reproduces the paper's tables (docs/method.md §10).

``python -m align_rl.evaluate [--config FILE] [--models NAME=CHECKPOINT ...] [key=value ...]``

Every model given (name → score network ``ε_θ``; the pretrained reference, aligned models later)
× every guidance method of ``guidance.methods`` analyses the same ``eval.times`` held-out times of
the test split (backgrounds: 48 h forecasts from :mod:`align_rl.world.backgrounds`) from the same
observations (one seed per observation setting) and the same sampler noise (one generator seed per
setting and method), so model comparisons are paired. Per analysis time (then averaged, docs/method.md §10):

- Table 1, analysis: MSE and MAE over the 69 normalised channels, WRMSE in physical units of
  u10, v500, z500, t850, Geo-Score; for one member (the mean over members of each member's score,
  i.e. the expected score of a single analysis, as the paper's) and for the ensemble mean;
- Table 2, 48 h forecasts started from the analyses (the forecaster's 8 × 6 h rollout from
  ``(x_b(t−6h) + x_a − x_b(t), x_a)``, with ``x_b(t−6h)`` the 48 h background valid 6 h before,
  shifted by the analysis increment, never the truth:
  docs/method.md §7.3) against the truth 48 h later;
- probabilistic scores: fair CRPS and spread/skill ratio;
- a background row (the 48 h forecast used as ``x_b``), and its forecast;
- ablations when ``eval.ablations`` lists ``density`` (Table 3) or ``error`` (Table 4): the
  paper's observation tables, ``--models Align-M=best.pt eval.ablations=[density,error]``;
- % change against ``eval.baseline`` with a 95 % paired circular-block bootstrap interval over
  times (block from the autocorrelation, effective sample size beside it);
- the verdict of docs/method.md §10: spread/skill, the single-member MSE change split into its
  ensemble-mean and spread parts, the trivial baselines ``Shrink-<V>`` / ``Blend-P`` (and, with
  ``eval.blend_times`` > 0, ``Blend-val`` and each ``-M`` row's ``Blend-val-<row>``), the
  across-seed spread, Holm-corrected verdict lines. Several seeds of one model:
  ``--models Align-M@seed0=a.pt Align-M@seed1=b.pt …`` (rows per seed and their mean ``Align-M``).

Writes into ``eval.out`` (default ``<workdir>/eval``), atomically (a temporary folder renamed into
place): ``report.md``, ``metrics.json``, ``metrics.csv``, ``metrics.nc`` (the scores and changes
as an ``xarray.Dataset``, :mod:`align_rl.evaluation.results`), ``maps/*.png`` (z500 error reduction
``|x_a^ref − x_GT| − |x_a^model − x_GT|`` averaged over ``eval.map_samples`` analyses) and
``analyses/<model>-<method>.zarr`` (ensemble means, physical units, WeatherBench2 layout; score them
with ``python -m align_rl.score --analysis … --truth <world store>``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import actors
from align_rl import logs
from align_rl.cli import check_eval_models, check_model_specs, parse_args, preflight, split_model_specs
from align_rl.config import load_config
from align_rl.errors import cli_errors
from align_rl.evaluation import runner
from align_rl.workspace import Workspace


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m align_rl.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config file (sections as in align_rl.config)")
    p.add_argument("--models", nargs="*", default=[], metavar="NAME=CHECKPOINT",
                   help="aligned score networks to compare with the reference (align_rl.io.checkpoints files)")
    p.add_argument("--out", help="output folder (default: eval.out or <workdir>/eval)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    specs, more = split_model_specs(args.models)  # `--models A=x.pt run.workdir=W`
    names = list(dict.fromkeys(["reference"] + [s.partition("=")[0].strip() for s in specs]))
    evaluated = [f"eval.models={json.dumps(names)}"] if specs else []  # eval.baseline may name one
    cfg = load_config(args.config, evaluated + list(args.overrides) + more)
    check_model_specs(specs)  # before the world, the models and the backgrounds are built
    check_eval_models(cfg, names)
    preflight(cfg, outputs=("eval",), eval_out=args.out)
    actors.install()
    logs.setup(cfg.run.workdir)
    ws = Workspace.from_config(cfg)
    data, models = runner.data_and_models(cfg, ws, specs)
    with logs.stage("evaluation"):
        ev = runner.run_evaluation(cfg, ws, models, data=data, out=args.out)
    out = Path(args.out or cfg.eval.out or ws.eval)
    print(f"evaluation of {', '.join(models)} × {', '.join(cfg.guidance.methods)} on "
          f"{ev.ds.sizes['time']} times: {out / 'report.md'}")
    for c in ev.meta["checks"]:
        print(f"  [{'ok' if c['passed'] else 'NO'}] {c['check']}: {c['values']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
