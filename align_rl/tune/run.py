"""Running a sweep with Ray Tune: the shared inputs, the scheduler, each trial's resources, the
Tuner, then the results (:mod:`align_rl.tune.results`).

Outputs in ``<run.workdir>/sweeps/<name>/`` (:func:`sweep_dir`): ``spec.yaml``, the results,
``reference_val.json``, the trials' folders (``trials/<trial id>/dpo``, ``…/val/stage_<k>``) and
Tune's own records (``tune/``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import yaml

from align_rl import remote
from align_rl.config import Config
from align_rl.devices import actor_gpus
from align_rl.errors import ConfigError
from align_rl.logs import stage
from align_rl.training.harness import init_ray
from align_rl.training.resources import (
    Need, check_fits, cluster_capacity, evaluation_needs, growing_cluster, learner_need, learner_uses_gpu,
    pool_need,
)
from align_rl.tune.inputs import prepare_shared
from align_rl.tune.results import (
    SweepResult, collect_results, fmt, log_wandb, write_atomic, write_results,
)
from align_rl.tune.spec import SweepSpec
from align_rl.tune.trial import ONLINE_MODES, dpo_trial, trial_config, trial_points, validation_config

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
    """What Tune reserves for a trial: its driver (``resources_per_trial``; nothing asked:
    :data:`PLACEHOLDER_MEMORY`) and, for an online
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
    bundles = [{k: v for k, v in b.items() if v} for b in bundles]
    if not bundles[0]:  # Tune places a trial by its first bundle, which must hold something
        bundles[0] = {"memory": PLACEHOLDER_MEMORY}
    return PlacementGroupFactory(bundles)


PLACEHOLDER_MEMORY = float(1 << 20)
"""Bytes a trial's driver reserves when ``resources_per_trial`` asks for nothing (no CPU, no GPU,
no memory): Ray Tune needs a non-empty bundle to place the trial, and 1 MiB of memory holds no
CPU that the trial's learner needs."""


def trial_phases(spec: SweepSpec, cfg: Config, use_gpu: bool) -> list[tuple[str, list[Need]]]:
    """What one trial holds at once (:class:`~align_rl.training.resources.Need`), in its two
    alternating phases: the trial's own reservation (``resources_per_trial``; an online trial's
    sampler and reward actors reserved in its placement group, :func:`trial_resources`) and the
    validation's analysis actor (kept between stages, when it samples in an actor) throughout,
    plus the learner's workers while it trains, or the validation's forecast actors while it
    validates. (The driver's own validation sampling runs in the trial's reservation.)"""
    r = spec.resources_per_trial
    held = [Need("the trial's driver", ({"CPU": float(r.cpu), "GPU": float(r.gpu)},),
                 ("resources_per_trial.cpu",) + (("resources_per_trial.gpu",) if r.gpu else ()))]
    if cfg.dpo.mode in ONLINE_MODES:
        held.append(pool_need(cfg))
    ev = evaluation_needs(validation_config(cfg, asdict(spec.validation)))
    return [("training", held + ev[:1] + [learner_need(cfg, use_gpu)]), ("validating", held + ev)]


def check_trials(spec: SweepSpec, cfg: Config, capacity=None) -> int | None:
    """Refuse (:class:`~align_rl.errors.ConfigError`) a sweep whose trials can never start on the
    connected Ray cluster (each trial's whole request, :func:`trial_phases`, every listed point of
    the search space), or whose ``max_concurrent_trials`` trials cannot run at once. Returns the
    number of trials to run at once: ``max_concurrent_trials``, or when unset as many as the
    cluster holds (Tune would start them all, and their learners would wait for each other)."""
    given = capacity
    total, nodes = capacity if capacity is not None else cluster_capacity()
    base = cfg.to_dict()
    peak = {"CPU": 0.0, "GPU": 0.0}
    for point in trial_points(spec):
        tcfg = trial_config(base, point)
        use_gpu = learner_uses_gpu(tcfg, total.get("GPU", 0.0))
        where = f"a trial of sweep {spec.name}" + (f" ({fmt(point)})" if len(spec.search) else "")
        for phase, parts in trial_phases(spec, tcfg, use_gpu):
            check_fits(parts, f"{where}, {phase},", capacity=given,
                       fix="resources_per_trial.cpu: 0 (the default) lets the trial's driver, "
                           "which validates only while its learner waits, reserve nothing")
            for k in peak:
                peak[k] = max(peak[k], sum(p.total()[k] for p in parts))
    fit = min(int(total[k] // peak[k] + 1e-9) for k in peak if peak[k] > 0)
    asked = spec.max_concurrent_trials
    if asked is not None and asked > fit and (given is not None or not growing_cluster()):
        raise ConfigError(
            f"{spec.source}: max_concurrent_trials={asked} trials at once need "
            f"{asked * peak['CPU']:g} CPU and {asked * peak['GPU']:g} GPU (one: {peak['CPU']:g} CPU, "
            f"{peak['GPU']:g} GPU) but the Ray cluster has {total['CPU']:g} CPU and {total['GPU']:g} "
            f"GPU; set max_concurrent_trials: {fit} (or 0: as many as fit)")
    return asked if asked is not None else max(1, fit)


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _tuner(spec: SweepSpec, cfg: Config, trainable: Callable[[dict, dict], None], ctx: dict,
           out: Path, progress: bool, concurrent: int | None):
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
                                    max_concurrent_trials=concurrent,
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
    t0 = time.time()
    init_ray()
    concurrent = check_trials(spec, cfg)  # before anything is written
    if concurrent != spec.max_concurrent_trials:
        LOG.info("max_concurrent_trials unset: %d trial(s) at once fit the Ray cluster", concurrent)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "spec.yaml", yaml.safe_dump(spec.to_dict(), sort_keys=False))
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
        grid = _tuner(spec, cfg, trainable, ctx, out, progress, concurrent).fit()
    result = collect_results(grid, spec, cfg)
    result.seconds = time.time() - t0
    result.prepare_seconds = prep_s
    result.reference = dict(ctx.get("reference_metrics") or {})
    write_results(result, spec, cfg, out)
    log_wandb(result, spec, cfg, out)
    return result
