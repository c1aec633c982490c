"""Running a sweep with Ray Tune: the shared inputs, the scheduler, each trial's resources, the
Tuner, then the results (:mod:`align_rl.tune.results`).

Outputs in ``<run.workdir>/sweeps/<name>/`` (:func:`sweep_dir`): ``spec.yaml``, the results,
``reference_val.json``, the trials' folders (``trials/<trial id>/dpo``, ``…/val/stage_<k>``) and
Tune's own records (``tune/``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from align_rl import remote
from align_rl.config import Config
from align_rl.devices import actor_gpus
from align_rl.logs import stage
from align_rl.training.harness import init_ray
from align_rl.tune.inputs import prepare_shared
from align_rl.tune.results import SweepResult, collect_results, log_wandb, write_atomic, write_results
from align_rl.tune.spec import SweepSpec
from align_rl.tune.trial import ONLINE_MODES, dpo_trial, trial_config

LOG = logging.getLogger("align_rl.sweep")


def sweep_dir(cfg: Config, spec: SweepSpec) -> Path:
    """``<run.workdir>/sweeps/<name>``."""
    return Path(cfg.run.workdir).expanduser().resolve() / "sweeps" / spec.name


def _tune_scheduler(spec: SweepSpec):
    if spec.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    a = {"grace_period": 1, "reduction_factor": 2, **spec.asha.given()}
    return ASHAScheduler(time_attr="training_iteration", max_t=int(a.pop("max_t", spec.stages)), **a)


def trial_resources(spec: SweepSpec, base: dict, params: dict):
    """What Tune reserves for a trial: its driver (``resources_per_trial``) and, for an online
    trial, one bundle per sampler / reward actor (``actors.*``), which Tune schedules inside the
    trial's placement group. The learner's workers are not in it (Ray Train V2 places them)."""
    from ray.tune import PlacementGroupFactory

    r = spec.resources_per_trial
    bundles = [{"CPU": float(r.cpu), "GPU": float(r.gpu)}]
    if r.memory:
        bundles[0]["memory"] = float(r.memory)
    cfg = trial_config(base, params)
    if cfg.dpo.mode in ONLINE_MODES:
        a = cfg.actors
        bundles += [{"CPU": float(a.cpus_per_actor), "GPU": actor_gpus(cfg)}] * (a.samplers + a.rewarders)
    return PlacementGroupFactory([{k: v for k, v in b.items() if v} or {"CPU": 0.0} for b in bundles])


def local_cpus(spec: SweepSpec, cfg: Config) -> int:
    """CPUs of a local Ray instance (when no cluster is given) that hold one trial at a time:
    its reservation plus the learner's workers (logical CPUs; a laptop may have fewer cores)."""
    modes = set(spec.search.get("dpo.mode").values or [] if "dpo.mode" in spec.search else [])
    online = cfg.dpo.mode in ONLINE_MODES or bool(modes & set(ONLINE_MODES))
    need = float(spec.resources_per_trial.cpu)
    need += cfg.dpo.num_workers * float(cfg.actors.cpus_per_actor)
    if online:
        need += (cfg.actors.samplers + cfg.actors.rewarders) * float(cfg.actors.cpus_per_actor)
    return max(os.cpu_count() or 1, math.ceil(need))


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _tuner(spec: SweepSpec, cfg: Config, trainable: Callable[[dict, dict], None], ctx: dict,
           out: Path, progress: bool):
    from ray import tune

    def entry(config: dict, ctx: dict) -> None:  # Tune passes the sampled point as `config`
        if ctx.get("workers") is not None:  # the Ray actors, in the trial's process
            remote.provide(ctx["workers"])
        trainable(dict(config), ctx)

    base_d = cfg.to_dict()
    fn = tune.with_resources(tune.with_parameters(entry, ctx=ctx),
                             lambda config: trial_resources(spec, base_d, config))
    return tune.Tuner(
        fn,
        param_space={k: d.domain() for k, d in spec.search.items()},
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=_tune_scheduler(spec),
                                    num_samples=spec.num_samples,
                                    max_concurrent_trials=spec.max_concurrent_trials,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=1 if progress else 0,
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )


def run_sweep(spec: SweepSpec, cfg: Config, trainable: Callable[[dict, dict], None] | None = None,
              ctx: dict[str, Any] | None = None, progress: bool = True) -> SweepResult:
    """Run the sweep; write the results table and the best config. ``trainable(params, ctx)``
    replaces :func:`~align_rl.tune.trial.dpo_trial` (and the shared preparation) when given, with
    ``ctx`` as its context."""
    out = sweep_dir(cfg, spec)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "spec.yaml", yaml.safe_dump(spec.to_dict(), sort_keys=False))
    t0 = time.time()
    init_ray(num_cpus=local_cpus(spec, cfg))
    if trainable is None:
        trainable = dpo_trial
        with stage("shared inputs of the trials", LOG):
            ctx = prepare_shared(cfg, spec, out, progress)
    ctx = dict(ctx or {})
    ctx.setdefault("stages", spec.stages)
    ctx.setdefault("sweep_dir", str(out))
    ctx.setdefault("workers", remote.provided())
    prep_s = time.time() - t0
    with stage(f"trials of sweep {spec.name}", LOG):
        grid = _tuner(spec, cfg, trainable, ctx, out, progress).fit()
    result = collect_results(grid, spec, cfg)
    result.seconds = time.time() - t0
    result.prepare_seconds = prep_s
    write_results(result, spec, cfg, out)
    log_wandb(result, spec, cfg, out)
    return result
