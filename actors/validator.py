"""ValidatorActor: scores published policy versions beside the learner and keeps ``best.pt``.

Thin: the logic is :class:`align_rl.alignment.async_validation.PublishedValidation`.
"""

from __future__ import annotations

import ray

from align_rl.alignment.async_validation import PublishedValidation
from align_rl.cpu import configure_worker


class ValidatorActor:
    def __init__(self, validation: dict, cfg: dict, reference_ckpt: str, out_dir: str, threads: int = 1):
        configure_worker(threads)
        self.v = PublishedValidation(validation, cfg, reference_ckpt, out_dir)

    def score(self, version: int, step: int, state_dict: dict) -> dict:
        return self.v.score(version, step, state_dict)


def make_validator(validation: dict, cfg, reference_ckpt, out_dir, num_cpus: float = 1.0):
    threads = max(1, int(num_cpus))
    return ray.remote(ValidatorActor).options(num_cpus=float(num_cpus), max_restarts=1).remote(
        validation, cfg.to_dict(), str(reference_ckpt), str(out_dir), threads)
