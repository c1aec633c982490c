"""Ray Tune sweeps over β, learning rate, reward weights and the offline/online switch.

``python -m align_rl.sweep tune_configs/NAME.yaml [--config FILE] [key=value ...]``

A sweep file (YAML) holds::

    name: beta_lr                  # the sweep's folder: <run.workdir>/sweeps/<name>/
    question: ...                  # what the sweep answers (free text, copied into the results)
    base: {dpo: {steps: 60}}       # overrides of the align_rl config for every trial
                                   # (nested sections or dotted keys; `preset: paper` allowed)
    search:                        # dotted align_rl config key -> one search dimension
      dpo.beta: {grid: [1000, 8000]}
      dpo.lr: {loguniform: [1.0e-6, 1.0e-4]}
      pairs.mode: {choice: [M, P]}
      dpo.anchor: {uniform: [0.0, 10.0]}           # (any numeric key)
      rewards.weights: {simplex: {keys: [assim, forecast, phys], step: 0.25}}
    metric: val_mse                # one of VALIDATION_METRICS (reported after every stage)
    mode: min                      # min | max
    objectives: {val_mse: min, val_fc_mse: min, val_geo_score: max}   # several: a Pareto front
                                   # (metric then defaults to the first; scheduler must be fifo)
    scheduler: asha                # asha | fifo; or a mapping {type: asha, grace_period: 1, ...}
    asha: {grace_period: 1, reduction_factor: 2}   # ASHA parameters (max_t defaults to stages)
    num_samples: 1                 # repeats of the grid (random dimensions drawn anew each time)
    stages: 3                      # DPO stages per trial, each followed by a validation and a report
    steps_per_stage: 20            # default: ceil(dpo.steps / stages)
    validation: {times: 4, members: 4, method: obsfree}   # a short evaluation on the val split
    resources_per_trial: {cpu: 0, gpu: 0}   # the trial driver; the learner asks for its own workers
    max_concurrent_trials: 1       # unset / 0: as many as the Ray cluster holds at once

Overrides on the command line whose first part is a section of the align_rl config
(``dpo.steps=10``) go to ``base``; the others change the sweep file (``num_samples=2``,
``asha.grace_period=2``, ``search.dpo.beta={grid: [500, 1000]}``). Every key is checked before
anything runs: a bad file raises :class:`~align_rl.errors.ConfigError` naming the key.

What a trial does (:func:`align_rl.tune.trial.dpo_trial`): build its config (base + its point of
the search space), reselect the preference pairs of its reward weights and pair mode from the SHARED
pair store's stored per-candidate scores (:meth:`align_rl.io.pair_store.PairStore.reselect`; no new
sampling, no forecast rollouts), then ``stages`` times: :func:`align_rl.alignment.learner.run_dpo`
for ``steps_per_stage`` more steps (the same ``out_dir``, so the optimiser state carries over and
the trial equals one run of ``stages × steps_per_stage`` steps), a short validation evaluation
(:func:`align_rl.evaluation.runner.run_evaluation` on ``validation.times`` times of the VAL split
with one guidance method), and ``tune.report`` of the metrics, so ASHA can stop weak trials early.
Online trials (``dpo.mode=online``) run the online loop instead, which draws fresh candidates by
design.

Before anything runs the driver checks every trial's whole resource request against the connected
Ray cluster (:func:`align_rl.tune.run.check_trials`: the trial's own reservation, its learner's
``dpo.num_workers × (dpo.cpus_per_worker, dpo.gpus_per_worker)``, its validation's actors, an
online trial's sampler and reward actors) and refuses, naming the keys, a trial that could never
start (Ray would wait for it forever).

Before the trials the driver makes sure that the shared inputs exist (dataset, pretrained
models, backgrounds, the reference's scored candidates in the pair store: each reused from its
cache) and evaluates the reference once on the same validation times, observations and sampler
seeds, so that every trial also reports its paired % change against the reference.

Several objectives: the answer is their Pareto front over the completed trials (no other trial
at least as good on every objective and better on one), in ``report.md`` with each objective's %
change against the reference and its 95 % interval over the validation times, and ``front.png``.
The chosen trial (``best_config.yaml``) is the best on ``metric`` among the front's trials that
beat the reference on every objective (else the whole front's). ASHA is refused with several
objectives: it stops trials on one metric and would drop trials of the front. Grids (the reward
simplex) run every point; ``loguniform`` / ``uniform`` dimensions are drawn at random by Tune's
default searcher (no multi-objective searcher is used) and the front is taken over what ran.

Outputs in ``<run.workdir>/sweeps/<name>/``: ``report.md`` and ``front.png`` (the answer, above),
``curves.csv`` and ``curves.png`` (every stage of every trial), ``results.csv`` and ``results.md`` (one row per trial:
its parameters, stages done, whether ASHA stopped it, its last metrics), ``best_config.yaml`` (the
full align_rl config of the best trial, ``dpo.steps`` = the steps it trained; usable as
``python -m align_rl.train --config …``), ``best.json``, ``reference_val.json``, ``spec.yaml``, the
trials' folders (``trials/<trial id>/dpo``, ``…/val/stage_<k>``) and Tune's own records (``tune/``).
The table and the best configuration are also logged to wandb (``run.wandb_mode``, offline by
default).
"""

from __future__ import annotations

import argparse
import sys

import actors
from align_rl import logs
from align_rl.cli import parse_args, preflight
from align_rl.errors import cli_errors
from align_rl.tune import results, run, spec as sweep_spec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m align_rl.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("spec", help="sweep file, e.g. tune_configs/smoke.yaml")
    p.add_argument("--config", help="align_rl config file for every trial (before the sweep's base)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("overrides", nargs="*", help="key=value: config keys (dpo.steps=10) or sweep keys "
                                                "(num_samples=2, asha.grace_period=2)")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    cfg_items, spec_ov = sweep_spec.split_overrides(args.overrides)
    spec = sweep_spec.load_spec(args.spec, spec_ov)
    cfg = sweep_spec.build_base_config(spec, args.config, cfg_items)
    preflight(cfg, outputs=("pairs",))
    actors.install()
    logs.setup(cfg.run.workdir)
    result = run.run_sweep(spec, cfg, progress=not args.quiet)
    out = run.sweep_dir(cfg, spec)
    print(f"sweep {spec.name}: {len(result.rows)} trials in {result.seconds / 60:.1f} min; "
          f"results in {out / 'results.md'}")
    if result.best is None:
        print(f"error: no trial reported the metric; see {out / 'report.md'}", file=sys.stderr)
        return 1
    if len(spec.goals()) > 1:
        print(f"Pareto front: {len(result.front)} trials; report: {out / 'report.md'}")
    print(f"best: {result.best.trial_id} {spec.metric}={result.best.metrics[spec.metric]:.5g} "
          f"{results.fmt(result.best.params)} -> {out / 'best_config.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
