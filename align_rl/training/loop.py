"""The one Ray Train training loop (``TorchTrainer(train_loop_per_worker=train_loop)``).

A task (:class:`Task`: the pretraining tasks of :mod:`align_rl.training.tasks`, the Diffusion-DPO
task of :mod:`align_rl.alignment.dpo_task`) supplies its model(s), its batches and its loss; the
loop owns everything else:

- **steps**: the batch and the noise of step ``s`` on worker ``r`` are drawn from ``(seed, s, r)``
  only (:func:`step_generator`), so a resumed run continues exactly where it stopped; the global
  batch ``batch_size`` is split over the DDP workers (:func:`per_worker_batch`), whose gradients
  DDP averages (gloo on CPU, nccl on GPU);
- **optimiser**: AdamW (no weight decay), learning rate from :func:`lr_at` (linear warm-up, then
  cosine decay to 10 % or constant), gradient norm clipped at ``grad_clip``;
- **devices**: models and batches on ``ray.train.torch.get_device()``; states saved as CPU tensors;
- **metrics** (TRL's names where they exist): the task's per-step metrics and ``loss`` averaged
  over the steps since the last log line and over the workers; ``grad_norm`` and
  ``learning_rate`` of the last step; ``step``, ``samples_per_s`` (global, this attempt),
  ``step_time_s``, ``attempt``, the task's constants (e.g. ``version``) and, at validations, the
  task's ``val/...`` metrics and ``val/best_step``. Logged on rank 0 to the state's ``history``,
  to wandb (``wandb.mode``, offline by default) and, with an ``out_dir``, to
  ``out_dir/metrics.jsonl`` (one JSON line per logged step, written at checkpoints);
- **validation** (rank 0) every ``val_every`` steps and at the end; a task with a ``best_key``
  keeps the best validated model (:meth:`Task.keep_best`, and in the state as ``best_model``);
  with ``patience`` > 0 the run **stops early** once ``patience`` validations in a row have not
  improved on the best (all workers stop at the same step; the state records ``stopped``);
- **checkpoints** every ``checkpoint_every`` steps and at the end: rank 0 writes ``state.pt``
  (:func:`align_rl.io.checkpoints.save_state`) into a Ray checkpoint and, with an ``out_dir``,
  publishes the model (:meth:`Task.publish`) and then ``out_dir/state.pt`` (the commit point);
  every worker reports (``ray.train.report``);
- **resume**: the Ray checkpoint (after a worker failure, or a run of the same name started again)
  or, with ``resume``, ``out_dir/state.pt``, whichever is later;
- **fault injection** (tests): ``crash = {"at_step": k, "marker": path}``: rank 0 exits hard once,
  after the first checkpoint at or beyond step ``k``, unless the marker file exists.

``config`` keys: ``make_task`` (``(config, Worker) -> Task``), ``steps``, ``seed``, ``lr``,
``warmup`` (steps; None: ``min(100, steps / 10)``), ``decay`` (``cosine`` | ``constant``),
``batch_size``, ``grad_clip``, ``checkpoint_every``, ``val_every`` (0: never), ``patience``
(validations without improvement before stopping; 0: never stop early), ``log_every``
(0: at validations and checkpoints only), ``threads``, ``precision`` (:func:`autocast`), ``out_dir``, ``resume``, ``wandb``
(``{"mode", "project", "dir", "name", "group", "id", "config"}``), ``progress``, ``crash``,
``plugins`` (the ``run.plugins`` modules, imported on each worker before the task is built).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from align_rl import plugins
from align_rl.cpu import configure_worker, native_bf16
from align_rl.io.checkpoints import load_state, save_state

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
BEST_STEP = "val/best_step"


@dataclass(frozen=True)
class Worker:
    """One Ray Train worker: ``rank``, ``world`` size and torch ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class Task:
    """What a task supplies to :func:`train_loop` (override ``build``, ``batch``, ``loss``)."""

    name = "task"
    hint = "lower the learning rate"  # how to fix a non-finite loss
    echo = False  # print one console line per validation
    best_key: str | None = None  # a validation metric to keep the best model by
    best_mode = "max"  # "max": higher best_key is better; "min": lower is better

    def build(self, device: torch.device) -> nn.Module:
        """The trainable network (any frozen model the loss needs stays inside the task)."""
        raise NotImplementedError

    def batch(self, step: int, rank: int, size: int) -> tuple[torch.Tensor, ...]:
        """The ``size`` samples of worker ``rank`` at ``step`` (CPU tensors; a function of these)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: tuple, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """``(scalar loss, {name: float})`` of one batch; ``gen``: the step's random stream."""
        raise NotImplementedError

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics (rank 0, ``model`` unwrapped and in eval mode)."""
        return {}

    def finalize(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics after the reduction over steps and workers (e.g. ratios of reduced sums)."""
        return metrics

    def constants(self) -> dict[str, Any]:
        """Logged with every line and stored in the state (e.g. the policy version)."""
        return {}

    def initial_score(self, model: nn.Module) -> float:
        """``best_key`` of the model before training (rank 0)."""
        return float(self.validate(model)[self.best_key])

    def publish(self, out_dir: Path, model: nn.Module, step: int) -> None:
        """Write the model for its users at a checkpoint (rank 0, before ``state.pt``)."""

    def keep_best(self, out_dir: Path, model: nn.Module, step: int, best: dict) -> None:
        """Write the best validated model so far (rank 0)."""


# ----------------------------------------------------------------------------- schedule


def lr_at(step: int, steps: int, lr: float, warmup: int | None = None, decay: str = "cosine") -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up over ``warmup`` steps
    (None: ``min(100, steps / 10)``, at least 1), then ``cosine`` decay to 10 % at ``steps`` or
    ``constant``."""
    warm = max(1, min(100, steps // 10)) if warmup is None else int(warmup)
    if decay == "constant":
        return lr * min(1.0, (step + 1) / warm) if warm > 0 else lr
    if step < warm:
        return lr * (step + 1) / warm
    frac = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """``fp32`` or ``bf16`` for a training section's ``precision`` on ``device``: ``auto`` is bf16
    where the hardware does bf16 arithmetic (a CUDA GPU that supports it; a CPU with AVX512-BF16
    or AMX, :func:`align_rl.cpu.native_bf16`), else fp32; None is fp32."""
    p = "fp32" if precision is None else str(precision)
    if p not in PRECISIONS:
        raise ValueError(f"precision {p!r} is not one of {', '.join(PRECISIONS)}")
    if p != "auto":
        return p
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and native_bf16() else "fp32"


def autocast(device: torch.device, precision: str | None):
    """The forward pass's precision (:func:`resolve_precision`): ``fp32`` runs as is; ``bf16``
    runs the matrix products under ``torch.autocast(device.type, torch.bfloat16)`` (weights,
    optimiser state and the losses' reductions stay float32). On this project's 2-core CPU it
    made a training step of the forecaster 1.5x and of the score model 1.4x faster, and the
    VAE's no faster (``bench/bench_precision.py``, BENCHMARKS.md)."""
    if resolve_precision(precision, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def per_worker_batch(batch_size: int, world: int) -> int:
    """Samples per worker and step: the global batch split over the DDP workers (rounded up)."""
    return max(1, math.ceil(int(batch_size) / int(world)))


def step_generator(seed: int, step: int, rank: int, device="cpu") -> torch.Generator:
    """The random stream of one optimiser step on one worker (the noise of a loss: the VAE
    posterior sample, ``t`` and ``ε`` of score matching and of Diffusion-DPO)."""
    return torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(step) * 997 + int(rank))


# ----------------------------------------------------------------------------- helpers


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper."""
    return model.module if hasattr(model, "module") else model


def to_cpu(obj: Any) -> Any:
    """``obj`` (tensors in dicts / lists) with every tensor detached on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def read_state(directory: str | Path, fix: str | None = None) -> dict | None:
    """``directory/state.pt`` (verified, ``weights_only``) or None when there is none."""
    p = Path(directory) / STATE_FILE
    if not p.exists():
        return None
    return load_state(p, fix=fix or f"delete {directory} to restart")


def resume_state(ckpt: Any, config: dict) -> dict | None:
    """The state to resume from: the Ray checkpoint ``ckpt`` or, with ``config["resume"]``,
    ``out_dir/state.pt`` (the commit point), whichever holds the later step."""
    state = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = read_state(d, fix="delete the run's Ray checkpoints to retrain")
    if config.get("resume") and config.get("out_dir"):
        mine = read_state(config["out_dir"])
        if mine is not None and (state is None or int(mine["step"]) > int(state["step"])):
            state = mine
    return state


def reduce_mean(metrics: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """The mean of each metric over the ``world`` workers (an all-reduce; identity for one)."""
    if world <= 1:
        return dict(metrics)
    keys = sorted(metrics)
    v = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(v)
    return {k: float(x) / world for k, x in zip(keys, v.cpu())}


def wandb_run(w: dict | None):
    """A wandb run of ``w`` (``mode`` disabled or wandb missing: None)."""
    w = w or {}
    if w.get("mode", "disabled") == "disabled":
        return None
    try:
        import wandb
    except ImportError:  # logging is optional; training is not
        return None
    Path(w["dir"]).mkdir(parents=True, exist_ok=True)
    return wandb.init(mode=w["mode"], project=w.get("project", "align_rl"), dir=w["dir"],
                      name=w.get("name"), group=w.get("group"), id=w.get("id"), resume="allow",
                      config=w.get("config"), settings=wandb.Settings(silent=True, console="off"))


class Progress:
    """A progress bar on rank 0 (Ray's tqdm inside workers, plain tqdm elsewhere)."""

    def __init__(self, label: str, steps: int, start: int, enabled: bool):
        self.bar = None
        if not enabled:
            return
        try:
            from ray.experimental.tqdm_ray import tqdm
        except ImportError:  # pragma: no cover
            from tqdm import tqdm
        self.label = label
        self.bar = tqdm(total=steps, desc=label, position=0)
        if start:
            self.bar.update(start)

    def update(self, n: int, loss: float) -> None:
        if self.bar is not None and n:
            self.bar.set_description(f"{self.label} loss {loss:.4f}")
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def wait_until_collected(timeout: float = 30.0) -> None:
    """Crash test only: wait until the controller has taken this worker's last report (Ray Train
    queues a report in the worker and collects it by polling; a worker that dies before the poll
    loses that report and its checkpoint, as a real crash at that instant would)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        q = get_train_context().get_result_queue()
        t0 = time.monotonic()
        while not q.empty() and time.monotonic() - t0 < timeout:
            time.sleep(0.05)
        time.sleep(1.0)
    except Exception:  # another Ray Train version: give the controller time to poll
        time.sleep(5.0)


class Window:
    """Sums of the per-step metrics since the last log line, and the attempt's timing."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.time = 0.0  # seconds of optimiser steps in this window
        self.total_time, self.total_steps = 0.0, 0  # this attempt

    def add(self, metrics: dict[str, float], seconds: float) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1
        self.time += seconds
        self.total_time += seconds
        self.total_steps += 1

    def take(self) -> tuple[dict[str, float], float]:
        """``(mean of each metric, mean step time)``; starts a new window."""
        n = max(1, self.n)
        out, dt = {k: v / n for k, v in self.sums.items()}, self.time / n
        self.sums, self.n, self.time = {}, 0, 0.0
        return out, dt


# ----------------------------------------------------------------------------- the loop


class Loop:
    """One worker's run of a task (see the module docstring); :meth:`run` trains to ``steps``."""

    def __init__(self, config: dict, worker: Worker, ckpt: Any = None):
        self.config, self.w = config, worker
        self.steps, self.seed = int(config["steps"]), int(config["seed"])
        self.out_dir = Path(config["out_dir"]) if config.get("out_dir") else None
        torch.manual_seed(self.seed)  # identical initial weights on every worker
        self.task: Task = config["make_task"](config, worker)
        model = self.task.build(worker.device).to(worker.device)
        self.opt = torch.optim.AdamW(model.parameters(), lr=float(config["lr"]), weight_decay=0.0)
        state = resume_state(ckpt, config)
        self.start, self.history, self.starts, self.best = 0, [], [], {}
        self.best_model: dict | None = None
        self.stopped = False
        if state is not None:
            model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optim"])
            self.start, self.history = int(state["step"]), list(state["history"])
            self.starts, self.best = list(state.get("starts") or []), dict(state.get("best") or {})
            self.best_model, self.stopped = state.get("best_model"), bool(state.get("stopped"))
        self.starts.append(self.start)
        self.model = model
        self.step, self.written = self.start, len(self.history)
        self.val_every = int(config.get("val_every") or 0)
        self.patience = int(config.get("patience") or 0)
        self.per_worker = per_worker_batch(int(config["batch_size"]), worker.world)
        self.precision = resolve_precision(config.get("precision"), worker.device)  # once, not per step
        self.window = Window()

    @property
    def raw(self) -> nn.Module:
        return unwrap(self.model)

    def prepare(self, wrap) -> None:
        """Wrap the model for DDP (``ray.train.torch.prepare_model``), then, on rank 0 of a task
        that keeps its best model, score the starting model when no best is known yet."""
        self.model = wrap(self.model)
        if self.task.best_key and self.val_every and self.w.rank == 0 and not self.best:
            self.raw.eval()
            self.best = {"step": self.start, self.task.best_key: self.task.initial_score(self.raw)}
            self.raw.train()
            self._keep_best()

    def _better(self, value: float) -> bool:
        old = float(self.best[self.task.best_key])
        return value < old if self.task.best_mode == "min" else value > old

    def _keep_best(self) -> None:
        if self.patience:  # early stopping hands the best model on through the state
            self.best_model = {k: v.detach().to("cpu", copy=True) for k, v in self.raw.state_dict().items()}
        if self.out_dir is not None:  # a task keeps its best model in out_dir only
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.task.keep_best(self.out_dir, self.raw, int(self.best["step"]), self.best)

    def train_step(self) -> None:
        """One optimiser step: batch, loss, backward, clipping, update; adds to the window."""
        t0 = time.perf_counter()
        c, w, step = self.config, self.w, self.step
        self.model.train()
        batch = tuple(t.to(w.device) for t in self.task.batch(step, w.rank, self.per_worker))
        gen = step_generator(self.seed, step, w.rank, w.device)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, self.steps, float(c["lr"]), c.get("warmup"), c.get("decay", "cosine"))
        with autocast(w.device, self.precision):
            loss, parts = self.task.loss(self.model, batch, gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.task.name} loss is {float(loss)} at step {step}; {self.task.hint}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                              float(c.get("grad_clip", 1.0))))
        self.opt.step()
        self.step += 1
        self.window.add({**parts, "loss": float(loss.detach())}, time.perf_counter() - t0)

    def metrics(self) -> dict[str, Any]:
        """The log line of this step: the window's means reduced over the workers, then the
        loop's own values and the task's constants."""
        means, dt = self.window.take()
        m = self.task.finalize(reduce_mean(means, self.w.world, self.w.device))
        win = self.window
        m.update(grad_norm=self.grad_norm, learning_rate=float(self.opt.param_groups[0]["lr"]),
                 step=self.step, step_time_s=dt, attempt=len(self.starts),
                 samples_per_s=win.total_steps * self.per_worker * self.w.world / max(win.total_time, 1e-9))
        m.update(self.task.constants())
        return m

    def validate(self, m: dict[str, Any]) -> None:
        """Rank 0: the task's validation metrics into ``m``; keep the best model."""
        self.raw.eval()
        vm = self.task.validate(self.raw)
        self.raw.train()
        m.update(vm)
        key = self.task.best_key
        if key:
            if self._better(float(vm[key])):
                self.best = {"step": self.step, key: vm[key]}
                self._keep_best()
            m[BEST_STEP] = float(self.best["step"])

    def out_of_patience(self) -> bool:
        """Rank 0: ``patience`` validations since the best one (never without a ``best_key``)."""
        if not (self.patience and self.val_every and self.task.best_key and self.best):
            return False
        return self.step - int(self.best["step"]) >= self.patience * self.val_every

    def state(self) -> dict[str, Any]:
        """The training state (CPU tensors) that a resumed run starts from."""
        return {"model": to_cpu(self.raw.state_dict()), "optim": to_cpu(self.opt.state_dict()),
                "step": self.step, "target": self.steps, "history": self.history,
                "starts": self.starts, "best": self.best, "task": self.task.name,
                "best_model": self.best_model, "stopped": self.stopped, **self.task.constants()}

    def commit(self, directory: Path) -> None:
        """Rank 0 at a checkpoint: ``state.pt`` into ``directory`` (the Ray checkpoint) and, with
        an ``out_dir``, the published model, ``out_dir/state.pt`` and the new metrics lines."""
        st = self.state()
        save_state(st, directory / STATE_FILE)
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.task.publish(self.out_dir, self.raw, self.step)
        save_state(st, self.out_dir / STATE_FILE)  # after the model: the commit point
        with open(self.out_dir / METRICS_FILE, "a") as f:
            for h in self.history[self.written:]:
                f.write(json.dumps(h) + "\n")
        self.written = len(self.history)

    def echo(self, m: dict[str, Any]) -> None:
        print(f"[{self.task.name}] step {self.step}/{self.steps} loss {m['loss']:.4g} "
              + " ".join(f"{k} {v:.4g}" for k, v in m.items() if k.startswith("val/"))
              + f" ({m['samples_per_s']:.1f} samples/s)", flush=True)


def agree(flag: bool, w: Worker) -> bool:
    """Rank 0's ``flag`` on every worker (a broadcast over the process group when there are
    several workers)."""
    if w.world <= 1:
        return bool(flag)
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=w.device)
    dist.broadcast(t, src=0)
    return bool(t.item() > 0.5)


def _crash_now(crash: dict | None, rank: int, step: int) -> bool:
    return bool(crash) and rank == 0 and step >= int(crash["at_step"]) and not Path(crash["marker"]).exists()


def train_loop(config: dict) -> None:
    """Ray Train worker function; see the module docstring for ``config``."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    configure_worker(config.get("threads", 1))
    plugins.load(config.get("plugins") or ())  # run.plugins, before the task is built
    w = Worker(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    loop = Loop(config, w, ray.train.get_checkpoint())
    loop.prepare(ray.train.torch.prepare_model)
    run = wandb_run(config.get("wandb")) if w.rank == 0 else None
    bar = Progress(config.get("label") or loop.task.name, loop.steps, loop.start,
                   enabled=w.rank == 0 and config.get("progress", True))
    log_every, ckpt_every = int(config.get("log_every") or 0), max(1, int(config["checkpoint_every"]))
    pending = 0
    try:
        if loop.start >= loop.steps or loop.stopped:  # restored a finished run: report once
            ray.train.report({"step": loop.start, "attempt": len(loop.starts)})
        while loop.step < loop.steps and not loop.stopped:
            loop.train_step()
            step, last = loop.step, loop.step == loop.steps
            pending += 1
            if pending >= 10 or last:
                bar.update(pending, loop.window.sums["loss"] / loop.window.n)
                pending = 0
            do_val = bool(loop.val_every) and (step % loop.val_every == 0 or last)
            do_ckpt = step % ckpt_every == 0 or last
            if not (do_val or do_ckpt or (log_every and step % log_every == 0)):
                continue
            m = loop.metrics()
            if w.rank == 0 and do_val:
                loop.validate(m)
            if do_val and loop.patience and not last and agree(w.rank == 0 and loop.out_of_patience(), w):
                loop.stopped = do_ckpt = True  # every worker stops here, with a checkpoint
                m["stopped_early"] = 1.0
            if w.rank == 0:
                loop.history.append(dict(m))
                if do_val and loop.task.echo:
                    loop.echo(m)
                if loop.stopped:
                    print(f"[{loop.task.name}] stopped early at step {step}: no better validation "
                          f"than step {int(loop.best['step'])} in {loop.patience} validations", flush=True)
                if run is not None:
                    run.log(m, step=step)
            if do_ckpt:
                with tempfile.TemporaryDirectory() as tmp:
                    ckpt = None
                    if w.rank == 0:
                        loop.commit(Path(tmp))
                        ckpt = ray.train.Checkpoint.from_directory(tmp)
                    ray.train.report(m, checkpoint=ckpt, checkpoint_dir_name=f"step_{step:07d}")
                if _crash_now(config.get("crash"), w.rank, step):
                    wait_until_collected()
                    Path(config["crash"]["marker"]).write_text(f"crashed after step {step}\n")
                    print(f"[{loop.task.name}] worker {w.rank} (pid {os.getpid()}) exits after step "
                          f"{step} (crash test)", flush=True)
                    os._exit(1)  # a hard worker death, as a lost node or OOM kill would be
            elif do_val:
                ray.train.report(m)
            if loop.stopped:
                break
    finally:
        bar.close()
        if run is not None:
            run.finish()
