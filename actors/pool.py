"""CandidatePool: sampler and reward actors fed with background tasks; commits to the pair store.

Work is split into calls of ``cfg.actors.batch_size`` backgrounds, keyed by background id, dealt
round-robin to the sampler actors; each call's candidates go to a reward actor (chained object
refs: the driver never waits between the two). A call that fails because its actor died (after
Ray's own ``max_task_retries`` on the restarted actor) is submitted again, to the next actor; a
sampler that answers with a stale version (it was restarted with the reference weights) gets the
current weights from the object store and the call again. Results are committed per call; the
store skips backgrounds already committed and pairs already stored (content hash), so redone work
adds no duplicate and a rerun resumes.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import ray

from align_rl.alignment.candidates import make_group
from align_rl.models.loading import spec_of

from .reward import make_rewarders
from .sampler import make_samplers

_RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
              ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError)


class CandidatePool:
    """``models``: anything with ``codec``, ``eps_model``, ``forecaster``, ``normalizer``
    (e.g. :class:`~align_rl.training.pretraining.PretrainedModels`); ``lat``/``lon`` of the grid.
    The forecaster goes to the reward actors as its specification
    (:func:`~align_rl.models.loading.spec_of`), each actor opens its own."""

    def __init__(self, cfg, models: Any, lat, lon, version: int = 0, samplers: int | None = None):
        self.cfg = cfg
        self.version = int(version)
        self._refs = (ray.put(models.codec), ray.put(models.eps_model), ray.put(spec_of(models.forecaster)))
        self._norm, self._lat, self._lon = models.normalizer, lat, lon
        self._n_samplers = samplers
        self._base_version = self.version
        self.samplers: list = []
        self.rewarders: list = []
        self.weights_ref = None
        self.resubmitted = 0
        self.ensure()

    def ensure(self) -> None:
        """Start the actors when they are not running (after :meth:`release`), with the current
        policy weights."""
        if self.samplers:
            return
        self.samplers = make_samplers(self.cfg, self._refs[0], self._refs[1], self._base_version,
                                      self._n_samplers)
        self.rewarders = make_rewarders(self.cfg, self._refs[2], self._norm, self._lat, self._lon)
        if self.weights_ref is not None:
            ray.get([s.set_weights.remote(self.weights_ref, self.version) for s in self.samplers])

    def release(self) -> None:
        """Stop the actors and free their resources (e.g. for the learner on a small machine);
        the next :meth:`build` starts them again."""
        self.shutdown()

    def set_weights(self, state_dict: dict, version: int) -> float:
        """Put the policy weights in the object store ONCE and load them in every sampler;
        returns the seconds it took."""
        t0 = time.perf_counter()
        self.weights_ref = ray.put({k: v.detach().cpu() for k, v in state_dict.items()})
        self.version = int(version)
        ray.get([s.set_weights.remote(self.weights_ref, self.version) for s in self.samplers])
        return time.perf_counter() - t0

    def _submit(self, chunk, k: int):
        s = self.samplers[k % len(self.samplers)]
        r = self.rewarders[k % len(self.rewarders)]
        d = s.draw.remote(chunk, self.version)
        return r.score.remote(chunk, d), d, s

    def build(self, tasks: Sequence, store, modes: Sequence[str], guidance: str | None = None,
              progress: bool = True, on_commit: Callable[[dict], None] | None = None,
              max_resubmits: int = 5) -> dict:
        """Draw, score, pair and commit the tasks not yet in ``store`` (for this version and
        guidance). Returns ``{"backgrounds", "candidates", "pairs", "skipped", "resubmitted",
        "seconds"}`` added by this call."""

        cfg = self.cfg
        guidance = guidance or cfg.pairs.guidance
        done = store.done_keys()
        todo = [t for t in tasks if (int(t.bg_id), self.version, guidance) not in done]
        if todo:
            self.ensure()
        bs = max(1, int(cfg.actors.batch_size))
        chunks = [todo[i:i + bs] for i in range(0, len(todo), bs)]
        pending: dict = {}
        for k, ch in enumerate(chunks):
            sref, dref, _ = self._submit(ch, k)
            pending[sref] = (ch, dref, k, 0)
        total = {"backgrounds": 0, "candidates": 0, "pairs": 0, "skipped": 0}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"pairs v{self.version}", unit="bg")
        t0 = time.perf_counter()
        weights = {k: float(v) for k, v in cfg.rewards.weights.items()}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                sref = ready[0]
                ch, dref, k, tries = pending.pop(sref)
                try:
                    scores = ray.get(sref)
                    drawn = None if isinstance(scores, dict) else ray.get(dref)
                except _RETRYABLE:
                    if tries >= max_resubmits:
                        raise
                    self.resubmitted += 1
                    s2, d2, _ = self._submit(ch, k + tries + 1)
                    pending[s2] = (ch, d2, k + tries + 1, tries + 1)
                    continue
                if isinstance(scores, dict):  # a restarted sampler holds old weights
                    sampler = self.samplers[k % len(self.samplers)]
                    if self.weights_ref is not None:
                        ray.get(sampler.set_weights.remote(self.weights_ref, self.version))
                    if tries >= max_resubmits:
                        raise RuntimeError(f"sampler stays at version {scores['stale']}, "
                                           f"expected {self.version}")
                    s2, d2, _ = self._submit(ch, k)
                    pending[s2] = (ch, d2, k, tries + 1)
                    continue
                groups = [make_group(t, d, sc, guidance, modes, cfg.pairs, weights, cfg.run.seed,
                                     cfg.rewards.normalize)
                          for t, d, sc in zip(ch, drawn, scores)]
                out = store.append(groups)
                for key in total:
                    total[key] += out[key]
                if bar is not None:
                    bar.update(len(ch))
                if on_commit is not None:
                    on_commit(out)
        finally:
            if bar is not None:
                bar.close()
        total["resubmitted"] = self.resubmitted
        total["seconds"] = time.perf_counter() - t0
        return total

    def shutdown(self) -> None:
        for a in self.samplers + self.rewarders:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.samplers, self.rewarders = [], []
