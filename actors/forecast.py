"""ForecastActor: opens a forecaster from its spec and runs n-step rollouts on batches of normalised
fields.

Thin: the science is the forecaster's ``rollout`` (:mod:`align_rl.models.forecaster`). Declared by
:func:`make_forecasters` with ``max_restarts`` / ``max_task_retries`` and CPU / GPU resources from
``cfg.actors``. The forecaster arrives as a :class:`~align_rl.models.loading.ForecasterSpec` (an
object ref put once) and each actor opens its own on its device (an ONNX model its own session,
with the CUDA execution provider on a GPU share); a model on its own grid (FengWu's 721 × 1440
ONNX) comes back as a :class:`~align_rl.models.forecaster.RegriddedForecaster`, so each rollout
maps the model grid → its grid → the model grid. :func:`forecast_batches` deals the batches of a
job over the actors and submits a batch again when its actor died beyond Ray's own retries.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import ray
import torch

from align_rl import plugins
from align_rl.cpu import configure_worker
from align_rl.devices import actor_device, cpu_numpy, from_numpy, module_device
from align_rl.models.loading import ForecasterSpec, spec_of

from .sampler import actor_options

_RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
              ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError)


class ForecastActor:
    """``forecaster``: its :class:`~align_rl.models.loading.ForecasterSpec` (usually an object ref
    resolved by Ray), opened here on ``device`` (``run.device`` as this actor resolves it) after
    the ``run.plugins`` modules ``plugin_modules`` are imported (a kind they register)."""

    def __init__(self, forecaster: ForecasterSpec, threads: int = 1, device: str = "cpu",
                 plugin_modules: Sequence[str] = ()):
        configure_worker(threads)
        plugins.load(plugin_modules)
        self.device = actor_device(device)
        self.forecaster = forecaster.open(self.device)
        self.calls = 0

    @torch.no_grad()
    def rollout(self, batch_prev: np.ndarray, batch_curr: np.ndarray, n_steps: int,
                last_only: bool = False) -> np.ndarray:
        """``n_steps`` 6 h steps from normalised ``(B, 69, H, W)`` frames at ``t − 6h`` and ``t``
        -> ``(B, n_steps, 69, H, W)`` float32 (``(B, 69, H, W)``, the last state, if ``last_only``)."""
        xp = from_numpy(np.asarray(batch_prev, dtype=np.float32), self.device)
        xc = from_numpy(np.asarray(batch_curr, dtype=np.float32), self.device)
        out = self.forecaster.rollout(xp, xc, int(n_steps))
        self.calls += 1
        if last_only:
            out = out[:, -1]
        return cpu_numpy(out)

    def info(self) -> dict:
        return {"pid": os.getpid(), "calls": self.calls, "device": str(self.device),
                "model_device": str(module_device(self.forecaster))}


def make_forecasters(cfg, forecaster_ref: Any, n: int | None = None) -> list:
    """``n`` (default ``cfg.actors.forecasters``) forecast actors sharing one forecaster spec
    (``forecaster_ref``: an object ref of its :class:`~align_rl.models.loading.ForecasterSpec`,
    or the spec). Each actor resolves ``run.device`` itself
    (:func:`align_rl.devices.actor_device`): CUDA when Ray gave it a GPU share."""
    cls = ray.remote(ForecastActor).options(**actor_options(cfg))
    threads = max(1, int(cfg.actors.cpus_per_actor))
    return [cls.remote(forecaster_ref, threads, cfg.run.device, list(cfg.run.plugins))
            for _ in range(int(n or cfg.actors.forecasters))]


def forecast_batches(
    actors: Sequence,
    batches: Sequence[tuple[np.ndarray, np.ndarray]],
    n_steps: int,
    last_only: bool = True,
    on_result: Callable[[int, np.ndarray], None] | None = None,
    max_resubmits: int = 3,
) -> list[np.ndarray]:
    """Run ``rollout(prev, curr, n_steps)`` for every batch on the actors, at most two calls in
    flight per actor; results in the order of ``batches``. ``on_result(i, out)`` is called as
    each batch arrives (progress, incremental writes). A batch whose actor died beyond Ray's
    retries is submitted again to the next actor (up to ``max_resubmits`` times)."""
    if not actors:
        raise ValueError("forecast_batches needs at least one actor")
    results: list[np.ndarray | None] = [None] * len(batches)
    todo = list(range(len(batches)))[::-1]
    pending: dict = {}
    tries = [0] * len(batches)
    k = 0

    def submit(i: int) -> None:
        nonlocal k
        a = actors[k % len(actors)]
        k += 1
        prev, curr = batches[i]
        pending[a.rollout.remote(prev, curr, n_steps, last_only)] = i

    for _ in range(min(len(todo), 2 * len(actors))):
        submit(todo.pop())
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        try:
            out = ray.get(ready[0])
        except _RETRYABLE:
            tries[i] += 1
            if tries[i] > max_resubmits:
                raise
            submit(i)
            continue
        results[i] = out
        if on_result is not None:
            on_result(i, out)
        if todo:
            submit(todo.pop())
    return results  # type: ignore[return-value]


def run_forecasts(cfg, forecaster: Any, batches: Sequence[tuple[np.ndarray, np.ndarray]], n_steps: int,
                  on_result: Callable[[int, np.ndarray], None] | None = None) -> None:
    """One job on ``cfg.actors.forecasters`` fresh forecast actors, stopped at the end: the last
    state after ``n_steps`` 6 h steps from each ``(prev, curr)`` batch of normalised
    ``(B, 69, H, W)`` frames, handed to ``on_result(i, state)`` as batch ``i`` arrives (the
    :data:`align_rl.remote.Workers.forecast` of :func:`actors.install`). ``forecaster``: a
    forecaster or its spec; the actors get the spec (:func:`~align_rl.models.loading.spec_of`)."""
    actors = make_forecasters(cfg, ray.put(spec_of(forecaster)))
    try:
        forecast_batches(actors, batches, n_steps, last_only=True, on_result=on_result)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
