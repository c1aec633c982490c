"""The pretraining tasks of :func:`align_rl.training.loop.train_loop` (docs/method.md §4–6).

Three recipes (:data:`TASKS`), all on normalised fields or standardised latents:

- ``forecaster``: one 6 h step from two frames ``(B, 69, H, W)``, MSE against the third;
- ``vae``: reconstruction MSE + KL (:func:`~align_rl.models.vae.vae_loss`), logged as
  ``loss/recon`` and ``loss/kl``;
- ``diffusion``: denoising score matching (:func:`~align_rl.models.dit.dsm_loss`) of latents
  ``(B, C, h, w)`` given the background's latents.

A recipe builds its network from the loop config (``model_cfg``, ``grid`` or ``latent_shape``),
its dataset from the arrays in ``config["data"]`` (``{"train": ObjectRef, "val": ObjectRef}``),
computes its loss and its validation metrics (``val/loss`` and the task's own, on a fixed subset
of the validation split). :class:`PretrainTask` adapts a recipe to :class:`~align_rl.training.loop.Task`;
the batch of step ``s`` on worker ``r`` is :func:`~align_rl.training.datasets.draw_indices`
``(seed, s, r)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from align_rl.models import forecaster as fc
from align_rl.models.dit import build_dit, dsm_loss
from align_rl.models.vae import build_vae, vae_loss
from align_rl.training.datasets import (
    FrameDataset,
    LatentPairDataset,
    SequenceDataset,
    draw_indices,
    fixed_subset,
)
from align_rl.training.loop import Task, Worker

VAL_SAMPLES = 64  # validation subset size (evenly spread over the split)


def _forecaster_model(config: dict) -> nn.Module:
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
    """``val/loss`` (MSE), ``val/rmse_6h`` and ``val/rmse_persistence`` (normalised units)."""
    idx = fixed_subset(len(ds), VAL_SAMPLES)
    se = sp = 0.0
    for chunk in np.array_split(idx, max(1, len(idx) // 16)):
        x0, x1, x2 = (t.to(device) for t in ds.batch(chunk))
        se += float(torch.sum((model(x0, x1) - x2) ** 2))
        sp += float(torch.sum((x1 - x2) ** 2))
    n = len(idx) * x2[0].numel()
    return {"val/loss": se / n, "val/rmse_6h": math.sqrt(se / n),
            "val/rmse_persistence": math.sqrt(sp / n)}


def _vae_model(config: dict) -> nn.Module:
    return build_vae(config["model_cfg"], tuple(config["grid"]))


def _vae_data(arrays: dict) -> FrameDataset:
    return FrameDataset(arrays["values"])


def _vae_loss(model, batch, gen, config) -> tuple[torch.Tensor, dict]:
    (x,) = batch
    recon, mean, logvar = model(x, generator=gen)
    loss, parts = vae_loss(recon, x, mean, logvar, float(config.get("kl_weight", 1e-6)))
    return loss, {f"loss/{k}": float(v) for k, v in parts.items()}


@torch.no_grad()
def _vae_val(model, ds: FrameDataset, device, config) -> dict[str, float]:
    """``val/loss`` = ``val/recon_mse`` of ``D(E(x))`` with the posterior mean."""
    idx = fixed_subset(len(ds), VAL_SAMPLES)
    se = 0.0
    for chunk in np.array_split(idx, max(1, len(idx) // 16)):
        (x,) = (t.to(device) for t in ds.batch(chunk))
        mean, _ = model.encode(x)
        se += float(torch.sum((model.decode(mean) - x) ** 2))
    mse = se / (len(idx) * x[0].numel())
    return {"val/loss": mse, "val/recon_mse": mse}


def _diffusion_model(config: dict) -> nn.Module:
    model = build_dit(config["model_cfg"], tuple(config["latent_shape"]))
    if config.get("skip_var") is not None:
        model.set_skip_var(config["skip_var"])
    return model


def _diffusion_data(arrays: dict) -> LatentPairDataset:
    return LatentPairDataset(arrays["z"], arrays["z_b"])


def _diffusion_loss(model, batch, gen, config) -> tuple[torch.Tensor, dict]:
    z, z_b = batch
    return dsm_loss(model, z, z_b, generator=gen), {}


@torch.no_grad()
def _diffusion_val(model, ds: LatentPairDataset, device, config) -> dict[str, float]:
    """``val/loss``: score matching, fixed seed, four draws of ``(t, ε)`` per sample."""
    idx = fixed_subset(len(ds), VAL_SAMPLES)
    gen = torch.Generator(device=device).manual_seed(1234)
    total, n = 0.0, 0
    for _ in range(4):  # four draws of (t, ε) per sample: a less noisy estimate
        for chunk in np.array_split(idx, max(1, len(idx) // 32)):
            z, z_b = (t.to(device) for t in ds.batch(chunk))
            total += float(dsm_loss(model, z, z_b, generator=gen)) * len(chunk)
            n += len(chunk)
    return {"val/loss": total / n}


@dataclass(frozen=True)
class Recipe:
    """One pretraining task: ``build(config)``, ``dataset(arrays)``,
    ``loss(model, batch, gen, config) -> (loss, metrics)``, ``validate(model, ds, device, config)``."""

    build: Callable[[dict], nn.Module]
    dataset: Callable[[dict], Any]
    loss: Callable[[nn.Module, tuple, torch.Generator, dict], tuple[torch.Tensor, dict]]
    validate: Callable[[nn.Module, Any, torch.device, dict], dict[str, float]]


TASKS: dict[str, Recipe] = {
    "forecaster": Recipe(_forecaster_model, _forecaster_data, _forecaster_loss, _forecaster_val),
    "vae": Recipe(_vae_model, _vae_data, _vae_loss, _vae_val),
    "diffusion": Recipe(_diffusion_model, _diffusion_data, _diffusion_loss, _diffusion_val),
}


def _get(ref):
    import ray

    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


class PretrainTask(Task):
    """A :class:`Recipe` as a loop task: the training split on every worker, the validation split
    on rank 0 only."""

    hint = "lower the lr"
    echo = True

    def __init__(self, config: dict, worker: Worker):
        self.name, self.config, self.device = config["task"], config, worker.device
        self.recipe = TASKS[self.name]
        self.seed = int(config["seed"])
        self.train_ds = self.recipe.dataset(_get(config["data"]["train"]))
        self.val_ds = self.recipe.dataset(_get(config["data"]["val"])) if worker.rank == 0 else None
        if int(config.get("patience") or 0) > 0:  # early stopping keeps the lowest validation loss
            self.best_key, self.best_mode = "val/loss", "min"

    def build(self, device: torch.device) -> nn.Module:
        return self.recipe.build(self.config)

    def batch(self, step: int, rank: int, size: int) -> tuple[torch.Tensor, ...]:
        return self.train_ds.batch(draw_indices(len(self.train_ds), size, self.seed, step, rank))

    def loss(self, model, batch, gen) -> tuple[torch.Tensor, dict]:
        return self.recipe.loss(model, batch, gen, self.config)

    def validate(self, model: nn.Module) -> dict[str, float]:
        return self.recipe.validate(model, self.val_ds, self.device, self.config)


def pretrain_task(config: dict, worker: Worker) -> PretrainTask:
    """The loop's ``make_task`` of the pretraining runs (``config["task"]`` names the recipe)."""
    return PretrainTask(config, worker)
