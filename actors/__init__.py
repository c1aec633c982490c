"""Thin Ray actors over align_rl: samplers, rewarders and forecasters, and the pool that feeds them.

:func:`install` hands them to the library (:mod:`align_rl.remote`), which never imports this
package: the commands call it before any stage runs.
"""

from __future__ import annotations

from align_rl import remote

from .analysis import analyse_batch
from .forecast import run_forecasts
from .pool import CandidatePool
from .stream import StreamActors


def install() -> remote.Workers:
    """Supply this package's actors to align_rl in this process; returns them (to pass on to other
    Ray processes that run library stages, e.g. Tune trials)."""
    workers = remote.Workers(candidate_pool=CandidatePool, forecast=run_forecasts,
                             analyse=analyse_batch, stream=StreamActors())
    remote.provide(workers)
    return workers
