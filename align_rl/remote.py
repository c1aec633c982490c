"""The Ray actors that the library's stages run remote work on, supplied from outside.

The dependency runs one way: the thin actors of the top-level ``actors`` package import align_rl,
align_rl never imports ``actors``. The stages that need actors look them up here:

- ``candidate_pool(cfg, models, lat, lon)``: sampler and reward actors that draw, score and pair
  candidates (``actors.pool.CandidatePool``: ``build``, ``set_weights``, ``release``,
  ``shutdown``), made by :mod:`align_rl.pipeline` and :mod:`align_rl.tune.trial` (and handed to
  :func:`align_rl.alignment.online.run_online`);
- ``forecast(cfg, forecaster, batches, n_steps, on_result)``: forecast actors (each opens the
  forecaster from its spec, :func:`align_rl.models.loading.spec_of`) that run ``n_steps`` 6 h steps from each ``(prev, curr)`` batch of normalised
  ``(B, 69, H, W)`` frames, calling ``on_result(i, last_state)`` as batch ``i`` arrives
  (``actors.forecast.run_forecasts``), used by :mod:`align_rl.world.backgrounds`;
- ``analyse(cfg, codec, eps_model, x_b, obs, method, sampler_cfg, guidance_cfg, generator,
  members)``: :func:`align_rl.diffusion.analysis.analyse` in an analysis actor on a GPU share
  (``actors.analysis.analyse_batch``), used by :mod:`align_rl.evaluation.runner` when
  :func:`align_rl.devices.sampling_place` says ``actor``;
- ``stream``: the weight-store, pair-buffer and validator actors of asynchronous online DPO
  (``actors.stream.StreamActors``), used by :func:`align_rl.alignment.async_loop.run_async`.

Whoever composes a job supplies them once per process with :func:`provide` (``actors.install()``
does; the commands call it first). A Ray process that runs library code needing them (a Tune trial)
gets the same :class:`Workers` passed along and provides it there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Workers:
    """The actor factories of the module docstring (plain picklable callables)."""

    candidate_pool: Callable[..., Any]
    forecast: Callable[..., Any]
    analyse: Callable[..., Any]
    stream: Any = None


_current: Workers | None = None


def provide(workers: Workers) -> None:
    """Use ``workers`` for the remote work of this process."""
    global _current
    _current = workers


def provided() -> Workers | None:
    """The workers supplied to this process, or None."""
    return _current


def workers() -> Workers:
    """The workers supplied to this process; a ``RuntimeError`` naming the fix when none were."""
    if _current is None:
        raise RuntimeError("no Ray actors were supplied to align_rl in this process: call "
                          "actors.install() first (the commands python -m align_rl.<command> do)")
    return _current
