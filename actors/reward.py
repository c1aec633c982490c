"""RewardActor: opens the forecaster (48 h rollouts) from its spec and holds the normaliser, scores
candidates.

Thin: the science is :func:`align_rl.alignment.candidates.score_candidates` (rewards of
:mod:`align_rl.alignment.rewards`). Declared with ``max_restarts`` / ``max_task_retries`` and resources from
``cfg.actors``. The forecaster arrives as a :class:`~align_rl.models.loading.ForecasterSpec` and
is opened here on the actor's device (``run.device``: its GPU share when ``actors.gpus_per_actor``
> 0; an ONNX model gets its own session, with the CUDA execution provider on a GPU); the 48 h forecasts run there and only their last state comes back
to the CPU, where the rewards are computed; scores leave as numpy arrays.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import ray

from align_rl.alignment.candidates import score_candidates
from align_rl.config import config_from_dict
from align_rl.cpu import configure_worker
from align_rl.devices import actor_device, module_device
from align_rl.models.loading import ForecasterSpec

from .sampler import actor_options


class RewardActor:
    def __init__(self, forecaster: ForecasterSpec, normalizer: Any, lat, lon, cfg: dict, threads: int = 1):
        configure_worker(threads)
        self.cfg = config_from_dict(cfg)
        self.device = actor_device(self.cfg.run.device)
        self.forecaster = forecaster.open(self.device)
        self.normalizer = normalizer
        self.lat, self.lon = np.asarray(lat), np.asarray(lon)

    def score(self, tasks: list, drawn):
        """``[{reward: (N,)}]`` per task, or ``drawn`` unchanged when it is a stale-weights marker."""

        if isinstance(drawn, dict):
            return drawn
        return score_candidates(self.forecaster, self.normalizer, self.lat, self.lon, tasks, drawn,
                                self.cfg.rewards)

    def info(self) -> dict:
        return {"pid": os.getpid(), "device": str(self.device),
                "model_device": str(module_device(self.forecaster))}


def make_rewarders(cfg, forecaster_ref, normalizer, lat, lon, n: int | None = None) -> list:
    """``n`` (default ``cfg.actors.rewarders``) reward actors; ``forecaster_ref``: an object ref of
    the forecaster's :class:`~align_rl.models.loading.ForecasterSpec` (put once, shared)."""
    cls = ray.remote(RewardActor).options(**actor_options(cfg))
    threads = max(1, int(cfg.actors.cpus_per_actor))
    return [cls.remote(forecaster_ref, normalizer, lat, lon, cfg.to_dict(), threads)
            for _ in range(int(n or cfg.actors.rewarders))]
