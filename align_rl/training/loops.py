"""Per-worker training loops run by Ray Train (``TorchTrainer(train_loop_per_worker=train_loop)``).

One loop, three tasks (:data:`TASKS`): ``forecaster`` (one 6 h step, MSE on normalised fields),
``vae`` (reconstruction MSE + KL, :func:`~align_rl.models.vae.vae_loss`) and ``diffusion``
(denoising score matching, :func:`~align_rl.models.dit.dsm_loss`). The loop is step-based:

- the batch of step ``s`` on worker ``r`` is drawn from ``(seed, s, r)`` only
  (:func:`~align_rl.training.datasets.draw_indices`) and so is its noise, so a run resumed from a
  checkpoint continues exactly where it stopped;
- the global batch ``batch_size`` is split over the DDP workers (``ceil(batch_size / workers)``
  each); gradients are averaged by DDP (gloo on CPU, nccl on GPU);
- every ``val_every`` steps rank 0 computes the validation metrics of its task; every
  ``checkpoint_every`` steps (and at the end) rank 0 writes ``state.pt`` (model, optimiser, step,
  history) and every worker calls ``ray.train.report`` (a barrier);
- on start, ``ray.train.get_checkpoint()`` restores the latest checkpoint (after a worker failure
  or when a run of the same name is started again);
- learning rate: linear warm-up over ``min(100, steps / 10)`` steps, then cosine decay to 10 %;
  gradient norm clipped at ``grad_clip``.

``config`` (built by :mod:`align_rl.pretrain`): ``task``, ``model_cfg`` (the config section),
``grid`` (H, W) or ``latent_shape`` (C, h, w), ``data`` (``{"train": ObjectRef, "val": ObjectRef}``
of the arrays the task's dataset needs), ``steps``, ``lr``, ``batch_size``, ``seed``,
``checkpoint_every``, ``val_every``, ``threads``, ``grad_clip``, optional ``kl_weight``, ``wandb``
(``{"mode", "project", "dir", "name", "group"}``) and, for the crash test only, ``crash``
(``{"at_step": k, "marker": path}``: rank 0 exits hard once, after the first checkpoint at or
beyond step ``k``, unless the marker file exists).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from align_rl.cpu import configure_worker

from align_rl.training.datasets import (
    FrameDataset,
    LatentPairDataset,
    SequenceDataset,
    draw_indices,
    fixed_subset,
)

STATE_FILE = "state.pt"
VAL_SAMPLES = 64  # validation subset size (evenly spread over the split)


# ----------------------------------------------------------------------------- tasks


def _forecaster_model(config: dict) -> nn.Module:
    from align_rl.models import forecaster as fc

    grid = config.get("grid")
    return fc.build_emulator(config["model_cfg"], tuple(grid) if grid is not None else None)


def _forecaster_data(arrays: dict) -> SequenceDataset:
    return SequenceDataset(arrays["values"], arrays["times"], n_frames=3)


def _forecaster_loss(model, batch, gen, config) -> tuple[torch.Tensor, dict]:
    x0, x1, x2 = batch
    loss = torch.mean((model(x0, x1) - x2) ** 2)
    return loss, {}


@torch.no_grad()
def _forecaster_val(model, ds: SequenceDataset, device, config) -> dict[str, float]:
    idx = fixed_subset(len(ds), VAL_SAMPLES)
    se = sp = 0.0
    for chunk in np.array_split(idx, max(1, len(idx) // 16)):
        x0, x1, x2 = (t.to(device) for t in ds.batch(chunk))
        se += float(torch.sum((model(x0, x1) - x2) ** 2))
        sp += float(torch.sum((x1 - x2) ** 2))
    n = len(idx) * x2[0].numel()
    return {"val_loss": se / n, "val_rmse_6h": math.sqrt(se / n),
            "val_rmse_persistence": math.sqrt(sp / n)}


def _vae_model(config: dict) -> nn.Module:
    from align_rl.models.vae import build_vae

    return build_vae(config["model_cfg"], tuple(config["grid"]))


def _vae_data(arrays: dict) -> FrameDataset:
    return FrameDataset(arrays["values"])


def _vae_loss(model, batch, gen, config) -> tuple[torch.Tensor, dict]:
    from align_rl.models.vae import vae_loss

    (x,) = batch
    recon, mean, logvar = model(x, generator=gen)
    loss, parts = vae_loss(recon, x, mean, logvar, float(config.get("kl_weight", 1e-6)))
    return loss, {k: float(v) for k, v in parts.items()}


@torch.no_grad()
def _vae_val(model, ds: FrameDataset, device, config) -> dict[str, float]:
    idx = fixed_subset(len(ds), VAL_SAMPLES)
    se = 0.0
    for chunk in np.array_split(idx, max(1, len(idx) // 16)):
        (x,) = (t.to(device) for t in ds.batch(chunk))
        mean, _ = model.encode(x)
        se += float(torch.sum((model.decode(mean) - x) ** 2))
    mse = se / (len(idx) * x[0].numel())
    return {"val_loss": mse, "val_recon_mse": mse}


def _diffusion_model(config: dict) -> nn.Module:
    from align_rl.models.dit import build_dit

    model = build_dit(config["model_cfg"], tuple(config["latent_shape"]))
    if config.get("skip_var") is not None:
        model.set_skip_var(config["skip_var"])
    return model


def _diffusion_data(arrays: dict) -> LatentPairDataset:
    return LatentPairDataset(arrays["z"], arrays["z_b"])


def _diffusion_loss(model, batch, gen, config) -> tuple[torch.Tensor, dict]:
    from align_rl.models.dit import dsm_loss

    z, z_b = batch
    return dsm_loss(model, z, z_b, generator=gen), {}


@torch.no_grad()
def _diffusion_val(model, ds: LatentPairDataset, device, config) -> dict[str, float]:
    from align_rl.models.dit import dsm_loss

    idx = fixed_subset(len(ds), VAL_SAMPLES)
    gen = torch.Generator(device=device).manual_seed(1234)
    total, n = 0.0, 0
    for _ in range(4):  # four draws of (t, ε) per sample: a less noisy estimate
        for chunk in np.array_split(idx, max(1, len(idx) // 32)):
            z, z_b = (t.to(device) for t in ds.batch(chunk))
            total += float(dsm_loss(model, z, z_b, generator=gen)) * len(chunk)
            n += len(chunk)
    return {"val_loss": total / n}


@dataclass(frozen=True)
class Task:
    build: Callable[[dict], nn.Module]
    dataset: Callable[[dict], Any]
    loss: Callable[[nn.Module, tuple, torch.Generator, dict], tuple[torch.Tensor, dict]]
    validate: Callable[[nn.Module, Any, torch.device, dict], dict[str, float]]


TASKS: dict[str, Task] = {
    "forecaster": Task(_forecaster_model, _forecaster_data, _forecaster_loss, _forecaster_val),
    "vae": Task(_vae_model, _vae_data, _vae_loss, _vae_val),
    "diffusion": Task(_diffusion_model, _diffusion_data, _diffusion_loss, _diffusion_val),
}


def build_model(task: str, config: dict) -> nn.Module:
    """The (untrained) network of ``task`` for a loop ``config`` (driver side, to load results)."""
    return TASKS[task].build(config)


# ----------------------------------------------------------------------------- schedule


def lr_at(step: int, steps: int, lr: float) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, cosine decay to 10 %."""
    warm = max(1, min(100, steps // 10))
    if step < warm:
        return lr * (step + 1) / warm
    frac = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def per_worker_batch(batch_size: int, world: int) -> int:
    """Samples per worker and step: the global batch split over the DDP workers (rounded up)."""
    return max(1, math.ceil(int(batch_size) / int(world)))


def step_generator(seed: int, step: int, rank: int, device="cpu") -> torch.Generator:
    """The random stream of one optimiser step on one worker (noise of the VAE posterior sample,
    ``t`` and ``ε`` of the score-matching loss)."""
    return torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(step) * 997 + int(rank))


# ----------------------------------------------------------------------------- helpers


def _get(ref):
    import ray

    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _load_state(ckpt) -> dict | None:
    if ckpt is None:
        return None
    from align_rl.io.checkpoints import load_state

    with ckpt.as_directory() as d:
        return load_state(Path(d) / STATE_FILE, fix="delete the run's Ray checkpoints to retrain")


def _wandb_run(config: dict, start: int):
    w = config.get("wandb") or {}
    if w.get("mode", "disabled") == "disabled":
        return None
    try:
        import wandb
    except ImportError:  # logging is optional; training is not
        return None
    Path(w["dir"]).mkdir(parents=True, exist_ok=True)
    return wandb.init(
        mode=w["mode"], project=w.get("project", "align_rl"), dir=w["dir"], name=w.get("name"),
        group=w.get("group"), id=w.get("id"), resume="allow",
        config={k: v for k, v in config.items() if k in ("task", "model_cfg", "steps", "lr",
                                                         "batch_size", "seed", "num_workers")},
        settings=wandb.Settings(silent=True, console="off"),
    )


class _Progress:
    """A progress bar on rank 0 (Ray's tqdm inside workers, plain tqdm elsewhere)."""

    def __init__(self, task: str, steps: int, start: int, enabled: bool):
        self.bar = None
        if not enabled:
            return
        try:
            from ray.experimental.tqdm_ray import tqdm
        except ImportError:  # pragma: no cover
            from tqdm import tqdm
        self.bar = tqdm(total=steps, desc=f"pretrain {task}", position=0)
        if start:
            self.bar.update(start)

    def update(self, n: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_description(f"loss {loss:.4f}")
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _wait_until_collected(timeout: float = 30.0) -> None:
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


# ----------------------------------------------------------------------------- the loop


def train_loop(config: dict) -> None:
    """Ray Train worker function; see the module docstring for ``config``."""
    import ray.train
    import ray.train.torch

    task = TASKS[config["task"]]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    configure_worker(config.get("threads", 1))
    seed, steps = int(config["seed"]), int(config["steps"])
    device = ray.train.torch.get_device()

    torch.manual_seed(seed)  # identical initial weights on every worker
    model = task.build(config)
    opt = torch.optim.AdamW(model.parameters(), lr=float(config["lr"]), weight_decay=0.0)
    state = _load_state(ray.train.get_checkpoint())
    start, history, starts = 0, [], []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start, history, starts = int(state["step"]), list(state["history"]), list(state["starts"])
    starts.append(start)
    model = ray.train.torch.prepare_model(model)

    train_ds = task.dataset(_get(config["data"]["train"]))
    val_ds = task.dataset(_get(config["data"]["val"])) if rank == 0 else None
    per_worker = per_worker_batch(int(config["batch_size"]), world)
    ckpt_every, val_every = int(config["checkpoint_every"]), int(config["val_every"])
    clip = float(config.get("grad_clip", 1.0))
    crash = config.get("crash")
    run = _wandb_run(config, start) if rank == 0 else None
    bar = _Progress(config["task"], steps, start, enabled=rank == 0 and config.get("progress", True))

    step, train_time, trained, loss_sum, loss_n, pending = start, 0.0, 0, 0.0, 0, 0
    try:
        if start >= steps:  # restored a finished run: report once so the result carries it
            ray.train.report({"step": start, "attempt": len(starts)})
        while step < steps:
            t0 = time.perf_counter()
            model.train()
            batch = tuple(t.to(device) for t in train_ds.batch(draw_indices(len(train_ds), per_worker, seed, step, rank)))
            gen = step_generator(seed, step, rank, device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, float(config["lr"]))
            loss, parts = task.loss(model, batch, gen, config)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{config['task']} loss is {float(loss)} at step {step}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            opt.step()
            step += 1
            train_time += time.perf_counter() - t0
            trained += 1
            loss_sum += float(loss.detach())
            loss_n += 1
            pending += 1
            if pending >= 10 or step == steps:
                bar.update(pending, loss_sum / loss_n)
                pending = 0

            do_val = step % val_every == 0 or step == steps
            do_ckpt = step % ckpt_every == 0 or step == steps
            if not (do_val or do_ckpt):
                continue
            metrics: dict[str, Any] = {
                "step": step, "loss": loss_sum / max(1, loss_n), "lr": opt.param_groups[0]["lr"],
                "grad_norm": gnorm, "samples_per_s": trained * per_worker * world / max(train_time, 1e-9),
                "attempt": len(starts), **{f"train_{k}": v for k, v in parts.items()},
            }
            loss_sum, loss_n = 0.0, 0
            if rank == 0 and do_val:
                _unwrap(model).eval()
                metrics.update(task.validate(_unwrap(model), val_ds, device, config))
            if rank == 0:
                history.append(dict(metrics))
                if do_val:
                    print(f"[{config['task']}] step {step}/{steps} loss {metrics['loss']:.4g} "
                          + " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("val_"))
                          + f" ({metrics['samples_per_s']:.1f} samples/s)", flush=True)
                if run is not None:
                    run.log(metrics, step=step)
            if do_ckpt:
                with tempfile.TemporaryDirectory() as tmp:
                    ckpt = None
                    if rank == 0:
                        from align_rl.io.checkpoints import save_state

                        save_state({"model": _unwrap(model).state_dict(), "optim": opt.state_dict(),
                                    "step": step, "history": history, "starts": starts,
                                    "task": config["task"]}, Path(tmp) / STATE_FILE)
                        ckpt = ray.train.Checkpoint.from_directory(tmp)
                    ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step_{step:07d}")
                if (crash and rank == 0 and step >= int(crash["at_step"])
                        and not Path(crash["marker"]).exists()):
                    _wait_until_collected()
                    Path(crash["marker"]).write_text(f"crashed after step {step}\n")
                    print(f"[{config['task']}] worker {rank} (pid {os.getpid()}) exits after step {step} (crash test)", flush=True)
                    os._exit(1)  # a hard worker death, as a lost node or OOM kill would be
            else:
                ray.train.report(metrics)
    finally:
        bar.close()
        if run is not None:
            run.finish()
