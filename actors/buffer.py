"""BufferActor: the one owner (and writer) of the asynchronous run's pair buffer.

Thin: the logic is :class:`align_rl.alignment.buffer.PairBuffer`. The sampler feed commits
through ``add``, the learner takes batches with ``take``; one actor serialises both, so the store
has a single writer. Takes no CPU (it moves latents, it does not compute).
"""

from __future__ import annotations

import ray

from align_rl.alignment.buffer import PairBuffer


class BufferActor:
    def __init__(self, *args, **kwargs):
        self.buf = PairBuffer(*args, **kwargs)

    def add(self, groups):
        return self.buf.add(groups)

    def take(self, step: int, rank: int, size: int, current: int):
        return self.buf.take(step, rank, size, current)

    def drawn(self):
        return self.buf.drawn()

    def stats(self):
        return self.buf.stats()

    def takes(self):
        return list(self.buf.takes)


def make_buffer(*args, **kwargs):
    """A buffer actor over :class:`PairBuffer` ``(*args, **kwargs)``."""
    return ray.remote(BufferActor).options(num_cpus=0, max_restarts=0).remote(*args, **kwargs)
