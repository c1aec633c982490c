"""Diffusion-DPO as a task of the training loop (docs/method.md §9; :mod:`align_rl.training.loop`).

The policy ε_θ (initialised from ``init_ckpt``, the pretrained reference by default) learns from
preference pairs ``(z^w, z^l, z_b)`` (standardised latents ``(B, C, h, w)``) against the frozen
reference ε_ref (``eval()``, ``requires_grad=False``, run under ``no_grad``) with the loss of
:func:`align_rl.alignment.dpo.dpo_loss` (``t ~ U(dpo.t_min, dpo.t_max)``, the winners' anchor
``dpo.anchor``). The pairs of step ``s`` on worker ``r`` are drawn from ``(seed, s, r)`` only.

Validation (rank 0, when the learner is given validation inputs and ``dpo.val_every`` > 0): the
policy's candidates against the reference's on ``data.val`` backgrounds
(:class:`~align_rl.alignment.validation.Validator`); the loop keeps the model of the best
``val/reward_gain`` (the starting policy scores 0 when it is the reference) in ``best.pt``. At each
checkpoint the policy is published as ``policy.pt``. Both are ``diffusion`` checkpoints that
:func:`align_rl.io.checkpoints.load_model` reads, ``extra`` holding ``dpo_step``, ``dpo_version``
and the reference's path. Validation runs on the CPU (the codec, and the forecaster opened there from its spec).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from align_rl.alignment.dpo import dpo_loss
from align_rl.alignment.validation import Validator
from align_rl.config import config_from_dict
from align_rl.io.checkpoints import load_model, save_model
from align_rl.io.pair_store import PairDataset, PairSet
from align_rl.models.loading import open_forecaster
from align_rl.training.loop import Task, Worker

POLICY_FILE = "policy.pt"
BEST_FILE = "best.pt"
GAIN = "val/reward_gain"


def bucket_means(m: dict[str, float]) -> dict[str, float]:
    """Replace the per-t-bucket sums and counts of :func:`align_rl.alignment.dpo.dpo_loss` by the winners'
    mean error-minus-reference per bucket (``model_minus_ref/chosen_t0.00-0.25`` …; absent when
    no pair of the batch fell in the bucket)."""
    out = {k: v for k, v in m.items() if not k.startswith("t_bucket/")}
    for i in range(4):
        n = m.get(f"t_bucket/count_{i}", 0.0)
        if n > 0:
            out[f"model_minus_ref/chosen_t{i / 4:.2f}-{(i + 1) / 4:.2f}"] = m[f"t_bucket/sum_chosen_{i}"] / n
    return out


def pair_dataset(conf: dict) -> PairDataset:
    """The learner's pairs: ``conf["store"]`` and the ``winner`` / ``loser`` / ``background`` rows."""
    n = len(conf["winner"])
    return PairDataset(conf["store"], PairSet(np.asarray(conf["winner"]), np.asarray(conf["loser"]),
                                              np.asarray(conf["background"]), np.zeros(n, np.int32),
                                              np.zeros((n, 16), np.uint8), "given"))


class DPOTask(Task):
    """The Diffusion-DPO learner's task (config built by :func:`align_rl.alignment.learner.run_dpo`:
    ``cfg``, ``store``, ``winner``, ``loser``, ``background``, ``reference_ckpt``, ``init_ckpt``,
    ``version``, ``diffusion_cfg``, ``validation``)."""

    name = "dpo"
    hint = "lower dpo.lr or dpo.beta"
    best_key = GAIN

    def __init__(self, conf: dict, worker: Worker):
        self.conf, self.device = conf, worker.device
        self.cfg = config_from_dict(conf["cfg"])
        d = self.cfg.dpo
        self.beta, self.anchor = float(d.beta), float(d.anchor)
        self.t_range = (float(d.t_min), float(d.t_max))
        self.seed, self.version = int(conf["seed"]), int(conf["version"])
        self.reference, _ = load_model(conf["reference_ckpt"], "diffusion", device=worker.device)
        self.reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.pairs = pair_dataset(conf)
        self.validator = None
        if int(conf.get("val_every") or 0) and conf.get("validation") and worker.rank == 0:
            self.validator = self._validator(conf["validation"])

    def _validator(self, v: dict):
        ref = self.reference
        if self.device.type != "cpu":
            ref, _ = load_model(self.conf["reference_ckpt"], "diffusion")
            ref.eval()
        # the forecaster arrives as its spec and is opened here (an ONNX session does not pickle)
        return Validator(v["codec"], open_forecaster(v["forecaster"], "cpu"), ref, v["normalizer"], v["lat"], v["lon"],
                         v["tasks"], self.cfg, v["weights"], int(self.cfg.dpo.val_members),
                         seed=int(self.cfg.run.seed))

    def build(self, device: torch.device) -> nn.Module:
        policy, _ = load_model(self.conf["init_ckpt"], "diffusion", device=device)
        policy.train()
        return policy

    def batch(self, step: int, rank: int, size: int) -> tuple[torch.Tensor, ...]:
        rng = np.random.default_rng([self.seed, step, rank])
        n = len(self.pairs)
        return tuple(self.pairs.batch(rng.choice(n, size, replace=n < size)))

    def loss(self, model, batch, gen) -> tuple[torch.Tensor, dict]:
        zw, zl, zb = batch
        return dpo_loss(model, self.reference, zw, zl, zb, self.beta, generator=gen,
                        t_range=self.t_range, anchor=self.anchor)

    def finalize(self, metrics: dict[str, float]) -> dict[str, float]:
        return bucket_means(metrics)

    def constants(self) -> dict[str, Any]:
        return {"version": self.version}

    def validate(self, model: nn.Module) -> dict[str, float]:
        if self.device.type != "cpu":
            model = copy.deepcopy(model).cpu()
        return self.validator.score(model)

    def initial_score(self, model: nn.Module) -> float:
        """0 for the reference itself (its candidates are the reference's draws), else scored."""
        if str(self.conf["init_ckpt"]) == str(self.conf["reference_ckpt"]):
            return 0.0
        return float(self.validate(model)[GAIN])

    def _save(self, path: Path, model: nn.Module, step: int, **extra) -> None:
        save_model(path, model, "diffusion", self.conf["diffusion_cfg"],
                   extra={"dpo_step": step, "dpo_version": self.version,
                          "reference": str(self.conf["reference_ckpt"]), **extra})

    def publish(self, out_dir: Path, model: nn.Module, step: int) -> None:
        self._save(out_dir / POLICY_FILE, model, step)

    def keep_best(self, out_dir: Path, model: nn.Module, step: int, best: dict) -> None:
        self._save(out_dir / BEST_FILE, model, step, best=best)


def dpo_task(conf: dict, worker: Worker) -> DPOTask:
    """The loop's ``make_task`` of the DPO learner."""
    return DPOTask(conf, worker)
