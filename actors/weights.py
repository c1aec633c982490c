"""WeightStore: the small actor that holds the published policy versions (object refs).

The learner puts each version's state dict (CPU tensors) in the object store itself and hands the
reference over here (``publish(version, step, [ref])``, the list keeps Ray from resolving it); the
samplers' feed asks ``latest()`` before each task. The newest ``keep`` versions stay referenced
(older ones are released to the object store's eviction). docs/method.md §9.4.
"""

from __future__ import annotations

import ray


class WeightStore:
    def __init__(self, keep: int = 4):
        self.keep = max(1, int(keep))
        self.refs: dict[int, tuple[int, list]] = {}  # version -> (step, [ref])

    def publish(self, version: int, step: int, ref: list) -> int:
        """Hold ``ref`` (``[ObjectRef]``) as policy ``version`` (a later call for the same version
        replaces it); returns the newest version held."""
        self.refs[int(version)] = (int(step), list(ref))
        for v in sorted(self.refs)[:-self.keep]:
            del self.refs[v]
        return max(self.refs)

    def latest(self) -> tuple[int, int, list] | None:
        """``(version, step, [ref])`` of the newest version, None before the first publication."""
        if not self.refs:
            return None
        v = max(self.refs)
        return (v, *self.refs[v])

    def versions(self) -> list[int]:
        return sorted(self.refs)


def make_weight_store(keep: int = 4):
    """A weight store taking no CPU (it only holds references)."""
    return ray.remote(WeightStore).options(num_cpus=0, max_restarts=0).remote(keep)
