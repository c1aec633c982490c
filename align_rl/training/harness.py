"""The shared Ray Train runner: :func:`fit_loop` runs :func:`align_rl.training.loop.train_loop`
under a ``TorchTrainer`` (Ray Train V2) for the pretraining tasks (:func:`run_training`) and the
DPO learner (:func:`align_rl.alignment.learner.run_dpo`):

- ``ScalingConfig(num_workers, use_gpu, resources_per_worker)``: ``cpus_per_worker`` CPUs and, when
  ``use_gpu`` (:func:`align_rl.devices.resolve_use_gpu` of ``run.device``), one GPU per
  worker;
- DDP over gloo on CPU, nccl on GPU (``TorchConfig(backend=...)``);
- ``RunConfig(name=run_name, storage_path=...)`` with ``FailureConfig(max_failures)``: a worker that
  dies restarts the worker group, which resumes from the latest reported checkpoint; a new
  ``fit()`` with the same name and storage path resumes too (Ray Train V2 restores its checkpoint
  manager from storage), so callers put a hash of everything that defines the run in the name;
- ``CheckpointConfig(num_to_keep=2)``.

A pretraining result is read back on the driver as a :class:`TrainResult` (the final weights as a
state dict, the metrics history, the step at which each attempt started).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray._private import ray_constants

from align_rl import logs
from align_rl.config import PretrainConfig
from align_rl.io.checkpoints import load_state
from align_rl.training.loop import STATE_FILE, train_loop
from align_rl.training.tasks import pretrain_task


@dataclass
class TrainResult:
    """What a pretraining run left: ``state_dict`` of the final network (CPU tensors), ``metrics``
    (the last reported metrics that hold validation values), ``history`` (every report of rank 0),
    ``starts`` (the step each attempt started from: ``[0]`` for an uninterrupted run,
    ``[0, k]`` after one failure recovered from the checkpoint of step ``k``), ``checkpoint``
    (directory of the last Ray checkpoint), ``wall_s`` (seconds of ``fit()``)."""

    task: str
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    checkpoint: str = ""
    wall_s: float = 0.0

    @property
    def samples_per_s(self) -> float:
        """Training throughput of the last attempt (global samples per second, steps only)."""
        vals = [h["samples_per_s"] for h in self.history if "samples_per_s" in h]
        return float(vals[-1]) if vals else float("nan")


LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Environment under which Ray takes the loopback address as the node's address (as it does on a
laptop OS), so that the GCS, the raylet, the workers and the agents listen on 127.0.0.1 only."""


def ensure_auth_token() -> Path | None:
    """The token file a local Ray instance authenticates with: ``RAY_AUTH_TOKEN_PATH`` or Ray's
    default ``~/.ray/auth_token``, created (Ray's generator, 256 random bits) readable by the user
    only when it does not exist yet. None when the token is given in ``RAY_AUTH_TOKEN``."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if not path.exists():
        from ray._private.authentication.authentication_token_generator import (
            generate_new_authentication_token,
        )

        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(generate_new_authentication_token())
    return path


WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
"""Defaults (unless set) for Ray's processes: Ray Train workers print as plain processes (with
Ray Train's print patch a worker's output, its progress-bar states included, reaches the driver
twice)."""


DASHBOARD_ENV = "ALIGN_RL_RAY_DASHBOARD"
"""Set to 1 to start Ray's dashboard with the local instance (on 127.0.0.1 only; off by default)."""


def init_ray(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Connect to Ray: the cluster in ``RAY_ADDRESS`` if set, else a small local instance. The one
    way every command starts Ray: an implicit start (``ray.put``, ``ray.get`` or ``.remote()``
    before any ``ray.init``) comes here too (:func:`route_auto_init`).

    The local instance listens on the loopback interface only (every gRPC server, the dashboard
    agent and the runtime-env agent; no dashboard unless ``ALIGN_RL_RAY_DASHBOARD=1``, then on
    127.0.0.1) and keeps Ray's token authentication on: Ray
    generates the token once into ``~/.ray/auth_token`` (mode 0600) unless ``RAY_AUTH_TOKEN`` or
    ``RAY_AUTH_TOKEN_PATH`` name one, and every client of the instance sends it. An explicit
    ``RAY_AUTH_MODE=disabled`` is respected with a warning. No-op when Ray is already up.

    With a log file (:func:`align_rl.logs.setup`), Ray's log records and the workers' output go to
    it and stay off the console (:func:`align_rl.logs.route_ray`), except the workers' progress
    bars and Ray's errors.
    """
    if ray.is_initialized():
        return
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    logs.route_ray()  # Ray's records while it starts
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver)
        logs.route_ray()
        return
    os.environ.update(LOOPBACK_ENV)  # for the processes Ray starts (raylet, GCS, agents, workers)
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        print("align_rl: RAY_AUTH_MODE=disabled: the local Ray instance accepts any local user; "
              "unset it to keep token authentication on", file=sys.stderr)
    else:
        ensure_auth_token()
    was = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    try:
        # the driver read its copy of the variable when ray was imported: loopback as node address
        if was is not None:
            ray_constants.ENABLE_RAY_CLUSTER = False
        dashboard = os.environ.get(DASHBOARD_ENV, "") == "1"
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=dashboard,
                 dashboard_host="127.0.0.1", log_to_driver=log_to_driver)
    finally:
        if was is not None:
            ray_constants.ENABLE_RAY_CLUSTER = was
    logs.route_ray()


def route_auto_init() -> None:
    """Make Ray's implicit start (the first ``ray.put``, ``ray.get`` or ``.remote()`` in a process
    that never called ``ray.init``) go through :func:`init_ray`, instead of Ray's default
    ``ray.init()`` (every interface, a dashboard). Run when this module is imported, so by every
    command that can start Ray."""
    from ray._private import auto_init_hook

    if getattr(auto_init_hook.auto_init_ray, "_align_rl", False):
        return

    def auto_init_ray() -> None:
        if auto_init_hook.enable_auto_connect and not ray.is_initialized():
            with auto_init_hook.auto_init_lock:
                if not ray.is_initialized():
                    init_ray()

    auto_init_ray._align_rl = True  # type: ignore[attr-defined]
    import importlib

    for name in ("ray._private.auto_init_hook", "ray._private.client_mode_hook",
                 "ray.util.placement_group"):  # every module that calls it by its own name
        mod = importlib.import_module(name)
        if hasattr(mod, "auto_init_ray"):
            mod.auto_init_ray = auto_init_ray


route_auto_init()


def _train_env_defaults() -> None:
    """Ray Train settings (environment variables the driver passes on to the controller and the
    workers), unless the user set them: a worker group may take up to 5 minutes to start on a busy
    machine (default 60 s); the controller polls the workers every 0.5 s (default 2 s), so a short
    run does not idle; on a single-node Ray the node-preemption watcher actor is not started."""
    import ray

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    try:
        single = len([n for n in ray.nodes() if n.get("Alive")]) <= 1
    except Exception:  # pragma: no cover - not connected
        single = False
    if single:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def auto_workers(pre: PretrainConfig, cap: int = 2) -> int:
    """``pretrain.num_workers=0``: one worker per ``cpus_per_worker`` CPUs of the connected Ray
    cluster, between 1 and ``cap`` (1 when Ray is not initialised).

    The cluster's CPUs, not the CPUs free at this moment: actors of the previous stage may still
    be releasing theirs, and a worker count read then would change the data-parallel batches,
    and so the trained model, from one run of the same config to the next."""
    import ray

    if not ray.is_initialized():
        return 1
    total = float(ray.cluster_resources().get("CPU", 1.0))
    return int(max(1, min(cap, total // max(1, int(pre.cpus_per_worker)))))


def worker_scaling(num_workers: int, cpus_per_worker: float, use_gpu: bool, gpus_per_worker: float = 1.0):
    """``ScalingConfig`` of ``num_workers`` workers with ``cpus_per_worker`` CPUs and, when
    ``use_gpu``, ``gpus_per_worker`` GPUs each (a fraction shares a GPU)."""
    from ray.train import ScalingConfig

    res: dict[str, float] = {"CPU": float(cpus_per_worker)}
    if use_gpu:
        res["GPU"] = float(gpus_per_worker)
    return ScalingConfig(num_workers=int(num_workers), use_gpu=bool(use_gpu), resources_per_worker=res)


def scaling_config(pre: PretrainConfig, num_workers: int | None = None):
    """``ScalingConfig`` of ``cfg.pretrain`` (``num_workers`` overrides the config)."""
    n = int(num_workers if num_workers is not None else pre.num_workers)
    if n <= 0:
        n = auto_workers(pre)
    return worker_scaling(n, pre.cpus_per_worker, pre.use_gpu)


SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints


def repair_run_storage(storage_path: str | Path, run_name: str) -> Path | None:
    """Move aside a Ray Train checkpoint-manager snapshot that is not valid JSON.

    Ray Train writes ``<storage>/<run>/checkpoint_manager_snapshot.json`` in place; a driver killed
    while it writes (``ray job stop``, a lost head) leaves it empty or cut, and a rerun under the
    same run name then fails before training starts. DPO then resumes from its own state file
    (``out_dir/state.pt``); a pretraining stage, which resumes through Ray's snapshot only, starts
    again from its first step (stages already finished are reused). Returns where the broken file
    went, or None.
    """
    import json

    p = Path(storage_path) / run_name / SNAPSHOT_FILE
    if not p.is_file():
        return None
    try:
        json.loads(p.read_text())
        return None
    except (ValueError, UnicodeDecodeError):
        aside = p.with_name(f"{p.name}.broken-{int(time.time())}")
        os.replace(p, aside)
        print(f"[align_rl] {p} was cut short by an interrupted run; moved aside to {aside.name}",
              flush=True)
        return aside


def fit_loop(config: dict[str, Any], scaling, storage_path: str | Path, run_name: str,
             max_failures: int, log_level: str = "WARNING"):
    """Run :func:`~align_rl.training.loop.train_loop` with ``config`` under a ``TorchTrainer``
    (``scaling``: its ``ScalingConfig``; the Ray run ``run_name`` below ``storage_path``) and
    return ``(Ray Train result, seconds of fit())``. A failure beyond ``max_failures`` raises."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    _train_env_defaults()
    storage_path = Path(storage_path).expanduser().resolve()
    storage_path.mkdir(parents=True, exist_ok=True)
    repair_run_storage(storage_path, run_name)  # a snapshot cut by a killed driver
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=int(max_failures)),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level=log_level),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    return result, time.perf_counter() - t0


WANDB_KEYS = ("task", "model_cfg", "steps", "lr", "batch_size", "seed", "num_workers", "precision")


def run_training(
    task: str,
    loop_config: dict[str, Any],
    pre: PretrainConfig,
    storage_path: str | Path,
    run_name: str,
    num_workers: int | None = None,
    log_level: str = "WARNING",
) -> TrainResult:
    """Run the pretraining ``task`` (:data:`align_rl.training.tasks.TASKS`) under a
    ``TorchTrainer`` and return its result.

    ``loop_config``: the task's config (``model_cfg``, ``grid`` or ``latent_shape``, ``data``,
    ``steps``, ``lr``, ``batch_size``, ``seed``, optional ``kl_weight``, ``skip_var``, ``wandb``,
    ``progress``, ``crash``; see :mod:`align_rl.training.loop` and :mod:`align_rl.training.tasks`)
    without the keys this function fills in (``task``, ``threads``, ``checkpoint_every``,
    ``val_every``, ``num_workers``). ``pre.use_gpu``: one GPU per worker (the caller resolves
    ``run.device``). ``storage_path``: folder of the Ray run; ``run_name``: its name below it.
    Raises ``RuntimeError`` naming the task when training fails more than ``max_failures`` times.
    """
    storage_path = Path(storage_path).expanduser().resolve()
    sc = scaling_config(pre, num_workers)
    config = dict(loop_config)
    config.update(task=task, make_task=pretrain_task, threads=max(1, int(pre.cpus_per_worker)),
                  checkpoint_every=int(pre.checkpoint_every),
                  val_every=int(loop_config.get("val_every") or pre.val_every),
                  num_workers=sc.num_workers, log_every=0, label=f"pretrain {task}")
    w = dict(config.get("wandb") or {})
    w.setdefault("config", {k: v for k, v in config.items() if k in WANDB_KEYS})
    config["wandb"] = w
    try:
        result, wall = fit_loop(config, sc, storage_path, run_name, pre.max_failures, log_level)
    except Exception as exc:  # TrainingFailedError and friends: name the task and the way out
        raise RuntimeError(
            f"pretraining {task} failed after {pre.max_failures} recoveries: {exc}; its checkpoints "
            f"are in {storage_path / run_name} (a rerun resumes from the latest)"
        ) from exc
    if result.checkpoint is None:
        raise RuntimeError(f"pretraining {task} reported no checkpoint; see {storage_path / run_name}")
    with result.checkpoint.as_directory() as d:
        state = load_state(Path(d) / STATE_FILE, fix=f"delete {storage_path / run_name} to retrain")
    history = list(state["history"])
    with_val = [h for h in history if "val/loss" in h]
    metrics = dict(with_val[-1] if with_val else (history[-1] if history else {}))
    model = state["model"]
    if state.get("best_model") is not None:  # early stopping: the best validated model
        model, best_step = state["best_model"], int(state["best"]["step"])
        at_best = [h for h in with_val if int(h.get("step", -1)) == best_step]
        metrics = dict(at_best[-1] if at_best else metrics)
        metrics.update(best_step=best_step, last_step=int(state["step"]),
                       stopped_early=bool(state.get("stopped")))
    return TrainResult(task=task, state_dict=model, metrics=metrics, history=history,
                       starts=list(state["starts"]), checkpoint=str(result.checkpoint.path),
                       wall_s=wall)
