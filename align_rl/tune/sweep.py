"""The sweep's public names in one place (re-exported from :mod:`align_rl.tune.spec`,
:mod:`~align_rl.tune.trial`, :mod:`~align_rl.tune.inputs`, :mod:`~align_rl.tune.run` and
:mod:`~align_rl.tune.results`). The command and the sweep file's schema: :mod:`align_rl.sweep`.
"""

from __future__ import annotations

from align_rl.tune.inputs import prepare_shared, validation_data
from align_rl.tune.results import (
    SweepResult, TrialRow, collect_results, fmt, log_wandb, results_columns, write_report,
    write_results,
)
from align_rl.tune.run import check_trials, run_sweep, sweep_dir, trial_phases, trial_resources
from align_rl.tune.spec import (
    DIMENSION_KINDS, SPEC_RANGES, SWEEP_KEYS, Asha, Dimension, Resources, Simplex, SweepSpec,
    Validation, build_base_config, check_spec_against_config, load_spec, parse_spec, simplex_grid,
    split_overrides, steps_per_stage,
)
from align_rl.tune.trial import (
    VALIDATION_METRICS, change_intervals, dpo_trial, eval_metrics, eval_per_time, seed_trial_store,
    trial_config, trial_points, validation_config, with_changes,
)

__all__ = [
    "DIMENSION_KINDS", "SPEC_RANGES", "SWEEP_KEYS", "VALIDATION_METRICS", "Asha", "Dimension",
    "Resources", "Simplex", "SweepResult", "SweepSpec", "TrialRow", "Validation",
    "build_base_config", "change_intervals", "check_spec_against_config", "check_trials",
    "collect_results", "dpo_trial", "eval_metrics", "eval_per_time", "fmt", "load_spec",
    "log_wandb", "parse_spec", "prepare_shared", "results_columns", "run_sweep", "seed_trial_store",
    "simplex_grid", "split_overrides", "steps_per_stage", "sweep_dir", "trial_config",
    "trial_phases", "trial_points", "trial_resources", "validation_config", "validation_data",
    "with_changes", "write_report", "write_results",
]
