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
      dpo.momentum: {uniform: [0.0, 1.0]}          # (any numeric key)
      rewards.weights: {simplex: {keys: [assim, forecast, phys], step: 0.25}}
    metric: val_mse                # one of VALIDATION_METRICS (reported after every stage)
    mode: min                      # min | max
    scheduler: asha                # asha | fifo; or a mapping {type: asha, grace_period: 1, ...}
    asha: {grace_period: 1, reduction_factor: 2}   # ASHA parameters (max_t defaults to stages)
    num_samples: 1                 # repeats of the grid (random dimensions drawn anew each time)
    stages: 3                      # DPO stages per trial, each followed by a validation and a report
    steps_per_stage: 20            # default: ceil(dpo.steps / stages)
    validation: {times: 4, members: 4, method: obsfree}   # a short evaluation on the val split
    resources_per_trial: {cpu: 1, gpu: 0}   # the trial driver; the learner asks for its own workers
    max_concurrent_trials: 1

Overrides on the command line whose first part is a section of the align_rl config
(``dpo.steps=10``) go to ``base``; the others change the sweep file (``num_samples=2``,
``asha.grace_period=2``, ``search.dpo.beta={grid: [500, 1000]}``). Every key is checked before
anything runs: a bad file raises :class:`~align_rl.errors.ConfigError` naming the key.

What a trial does (:func:`dpo_trial`, :mod:`align_rl.tune.trial`): build its config (base + its
point of the search space), reselect the preference pairs of its reward weights and pair mode from
the SHARED pair store's stored per-candidate scores (no new sampling, no forecast rollouts), then
``stages`` times: ``steps_per_stage`` more DPO steps (the optimiser state carries over, so the
trial equals one run of ``stages × steps_per_stage`` steps), a short validation evaluation on
``validation.times`` times of the VAL split with one guidance method, and ``tune.report`` of the
metrics, so ASHA can stop weak trials early. Online trials (``dpo.mode=online``) run the online
loop instead, which draws fresh candidates by design.

Before the trials the driver (:mod:`align_rl.tune.inputs`) makes sure that the shared inputs exist (dataset, pretrained
models, backgrounds, the reference's scored candidates in the pair store: each reused from its
cache) and evaluates the reference once on the same validation times, observations and sampler
seeds, so that every trial also reports its paired % change against the reference.

Outputs in ``<run.workdir>/sweeps/<name>/``: ``results.csv`` and ``results.md`` (one row per trial:
its parameters, stages done, whether ASHA stopped it, its last metrics), ``best_config.yaml`` (the
full align_rl config of the best trial, ``dpo.steps`` = the steps it trained; usable as
``python -m align_rl.train --config …``), ``best.json``, ``reference_val.json``, ``spec.yaml``, the
trials' folders (``trials/<trial id>/dpo``, ``…/val/stage_<k>``) and Tune's own records (``tune/``).
The table and the best configuration are also logged to wandb (``run.wandb_mode``, offline by
default).

The package: :mod:`~align_rl.tune.spec` (the typed sweep file, loaded as the job configs are),
:mod:`~align_rl.tune.trial` (one trial), :mod:`~align_rl.tune.inputs` (the shared inputs),
:mod:`~align_rl.tune.run` (Ray Tune) and :mod:`~align_rl.tune.results` (tables, best config,
wandb). This module gathers their public names.
"""

from __future__ import annotations

from align_rl.tune.inputs import prepare_shared, validation_data
from align_rl.tune.results import (
    SweepResult, TrialRow, collect_results, fmt, log_wandb, results_columns, write_results,
)
from align_rl.tune.run import local_cpus, run_sweep, sweep_dir, trial_resources
from align_rl.tune.spec import (
    DIMENSION_KINDS, SPEC_RANGES, SWEEP_KEYS, Asha, Dimension, Resources, Simplex, SweepSpec,
    Validation, build_base_config, check_spec_against_config, load_spec, parse_spec, simplex_grid,
    split_overrides, steps_per_stage,
)
from align_rl.tune.trial import (
    VALIDATION_METRICS, dpo_trial, eval_metrics, seed_trial_store, trial_config, validation_config,
    with_changes,
)

__all__ = [
    "DIMENSION_KINDS", "SPEC_RANGES", "SWEEP_KEYS", "VALIDATION_METRICS", "Asha", "Dimension",
    "Resources", "Simplex", "SweepResult", "SweepSpec", "TrialRow", "Validation",
    "build_base_config", "check_spec_against_config", "collect_results", "dpo_trial",
    "eval_metrics", "fmt", "load_spec", "local_cpus", "log_wandb", "parse_spec", "prepare_shared",
    "results_columns", "run_sweep", "seed_trial_store", "simplex_grid", "split_overrides",
    "steps_per_stage", "sweep_dir", "trial_config", "trial_resources", "validation_config",
    "validation_data", "with_changes", "write_results",
]
