"""SamplerActor: holds the VAE codec and a copy of the policy (with its version), draws candidates.

Thin: the science is :func:`align_rl.alignment.candidates.draw_candidates`. Declared by
:func:`make_samplers` with ``max_restarts`` / ``max_task_retries`` and resources from
``cfg.actors``; a restarted actor comes back with the constructor's weights (version of the
reference), so :meth:`SamplerActor.draw` refuses a call for another version (it returns
``{"stale": version held}``) and the pool sends the current weights again. The networks live on
the actor's device (``run.device``, :func:`align_rl.devices.actor_device`: its GPU share when
``actors.gpus_per_actor`` > 0); candidates leave as float32 CPU numpy arrays.
"""

from __future__ import annotations

import os
from typing import Any

import ray

from align_rl.alignment.candidates import draw_candidates
from align_rl.config import config_from_dict
from align_rl.cpu import configure_worker
from align_rl.devices import actor_device, actor_gpus, compile_module, place


class SamplerActor:
    def __init__(self, codec: Any, eps_model: Any, version: int, cfg: dict, threads: int = 1):
        configure_worker(threads)
        self.cfg = config_from_dict(cfg)
        self.device = actor_device(self.cfg.run.device)
        self.codec = place(codec, self.device)
        self.eps_model = place(eps_model, self.device)
        if self.cfg.sampler.compile:
            compile_module(self.eps_model)
        self.version = int(version)

    def set_weights(self, state_dict: dict, version: int) -> int:
        """Load policy weights of ``version`` (the state dict arrives from the object store)."""
        self.eps_model.load_state_dict(state_dict)
        self.eps_model.eval()
        self.version = int(version)
        return self.version

    def draw(self, tasks: list, version: int, method: str | None = None, members: int | None = None):
        """Candidates (``list[Drawn]``) of the tasks by policy ``version``, or ``{"stale": held}``."""

        if int(version) != self.version:
            return {"stale": self.version}
        c = self.cfg
        return draw_candidates(self.codec, self.eps_model, tasks, self.version,
                               method or c.pairs.guidance, c.sampler, c.guidance, c.obs,
                               int(members or c.pairs.candidates), int(c.run.seed))

    def info(self) -> dict:
        return {"pid": os.getpid(), "version": self.version, "device": str(self.device),
                "model_device": str(next(self.eps_model.parameters()).device)}


def actor_options(cfg, gpu: bool = True) -> dict:
    """Ray options of an actor from ``cfg.actors``: CPUs, fractional GPUs (none with
    ``run.device=cpu``, :func:`align_rl.devices.actor_gpus`), restarts, task retries; one unit of
    the custom resource ``sampler`` when the cluster's nodes advertise it (its sampler group)."""
    a = cfg.actors
    opts = {"num_cpus": float(a.cpus_per_actor), "max_restarts": int(a.max_restarts),
            "max_task_retries": int(a.max_task_retries)}
    gpus = actor_gpus(cfg) if gpu else 0.0
    if gpus > 0:
        opts["num_gpus"] = gpus
    if ray.is_initialized() and "sampler" in ray.cluster_resources():
        opts["resources"] = {"sampler": 1.0}  # the sampler node group of cluster/ (docs/method.md §9.4)
    return opts


def make_samplers(cfg, codec_ref, eps_ref, version: int = 0, n: int | None = None) -> list:
    """``n`` (default ``cfg.actors.samplers``) sampler actors; ``codec_ref``/``eps_ref`` are object
    refs of the modules (put once, shared)."""
    cls = ray.remote(SamplerActor).options(**actor_options(cfg))
    threads = max(1, int(cfg.actors.cpus_per_actor))
    return [cls.remote(codec_ref, eps_ref, version, cfg.to_dict(), threads)
            for _ in range(int(n or cfg.actors.samplers))]
