"""The sampler side of asynchronous online DPO (docs/method.md §9.4): a driver thread that keeps
the persistent sampler and reward actors busy for the whole run.

Each sampler slot has one task in flight: a chunk of ``actors.batch_size`` new preference
backgrounds, drawn by the newest published policy (asked from the weight-store actor before each
task: ``latest() -> (version, step, [ref])``; a sampler whose version differs first gets
``set_weights(ref, version)``, queued before the draw on the same actor), scored by a reward
actor (chained refs), paired on the driver (:func:`~align_rl.alignment.candidates.make_group`) and
committed through the buffer actor (``add``).

Backgrounds follow the seeded order (:func:`~align_rl.alignment.candidates.background_order`),
the least drawn first (:func:`pick_backgrounds`: pass after pass, counting what a rerun or the warm
start committed), never one already drawn by the same policy version; when every background has
been drawn by the newest version the free samplers wait for the next one. A task lost with its actor (a killed sampler: Ray restarts it with the reference weights)
or answered with stale weights is submitted again with the same chunk (and the newest weights: the
failed task committed nothing), so nothing is lost, and the store's dedup (group key, pair hash)
keeps anything committed twice once.

Each finished task is a timeline record ``{"t0", "t1", "slot", "version", "candidates", "pairs"}``
(wall-clock seconds), appended to ``timeline-samplers.jsonl``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from align_rl.alignment.candidates import make_group
from align_rl.alignment.pairs import alignment_seed

SAMPLER_TIMELINE = "timeline-samplers.jsonl"


def _retryable() -> tuple:
    import ray

    return (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
            ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError)


def pick_backgrounds(order: Sequence[int], counts: dict[int, int], taken: set[int], n: int) -> list[int]:
    """Up to ``n`` background ids for the next task: those drawn fewest times so far (``counts``,
    committed or in flight), the seeded ``order`` breaking ties, leaving out ``taken`` (those
    already drawn by the current policy version: the same key would add nothing)."""
    free = [int(b) for b in order if int(b) not in taken]
    free.sort(key=lambda b: counts.get(b, 0))  # stable: the order within equal counts
    return free[:n]


class SamplerFeed(threading.Thread):
    """Keeps ``samplers`` (actor handles with ``set_weights``, ``draw``) and ``rewarders``
    (``score``) busy until :meth:`stop`; see the module docstring. ``tasks_for(ids)`` builds the
    background tasks; ``modes``: the pair modes to build; ``out_dir``: where the timeline goes."""

    def __init__(self, cfg: Any, samplers: list, rewarders: list, buffer: Any, weights: Any,
                 tasks_for: Callable[[list[int]], list], order: Sequence[int], modes: Sequence[str],
                 out_dir: Path, log: Callable[[str], None] = print, max_resubmits: int = 5):
        super().__init__(name="sampler-feed", daemon=True)
        self.cfg, self.samplers, self.rewarders = cfg, list(samplers), list(rewarders)
        self.buffer, self.weights, self.tasks_for = buffer, weights, tasks_for
        self.order, self.modes, self.log = list(order), list(modes), log
        self.path = Path(out_dir) / SAMPLER_TIMELINE
        self.max_resubmits = int(max_resubmits)
        self._halt = threading.Event()
        self.records: list[dict] = []
        self.resubmitted = 0
        self.drawn: set[tuple[int, int]] = set()  # (bg_id, version) committed or in flight
        self.error: BaseException | None = None

    def stop(self, timeout: float = 60.0) -> None:
        self._halt.set()
        self.join(timeout)

    def _submit(self, slot: int, chunk: list, version: int, wref: Any, held: dict) -> dict:
        s = self.samplers[slot]
        if held.get(slot) != version:
            s.set_weights.remote(wref, version)  # runs before the draw (actor order)
            held[slot] = version
        d = s.draw.remote(chunk, version)
        r = self.rewarders[slot % len(self.rewarders)].score.remote(chunk, d)
        return {"slot": slot, "chunk": chunk, "version": version, "wref": wref, "dref": d,
                "t0": time.time(), "tries": 0, "sref": r}

    def run(self) -> None:
        import ray

        try:
            self._run(ray)
        except BaseException as exc:  # reported by the driver
            self.error = exc

    def _run(self, ray) -> None:
        cfg = self.cfg
        bs = max(1, int(cfg.actors.batch_size))
        keys = ray.get(self.buffer.drawn.remote())  # (bg_id, version) committed
        counts: dict[int, int] = {}
        for b, _ in keys:
            counts[b] = counts.get(b, 0) + 1
        self.drawn = {(int(b), int(v)) for b, v in keys}
        weights = {k: float(v) for k, v in cfg.rewards.weights.items()}
        held: dict[int, int] = {}
        inflight: dict = {}
        free = list(range(len(self.samplers)))
        while not self._halt.is_set():
            while free:
                version, _, (wref,) = ray.get(self.weights.latest.remote())
                ids = pick_backgrounds(self.order, counts, {b for b, v in self.drawn if v == version}, bs)
                if not ids:  # all drawn by this version: wait for the next one
                    break
                for b in ids:
                    counts[b] = counts.get(b, 0) + 1
                    self.drawn.add((b, version))
                job = self._submit(free.pop(0), self.tasks_for(ids), version, wref, held)
                inflight[job["sref"]] = job
            if not inflight:
                self._halt.wait(0.1)
                continue
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.1)
            if not ready:
                continue
            job = inflight.pop(ready[0])
            try:
                scores = ray.get(job["sref"])
                drawn = None if isinstance(scores, dict) else ray.get(job["dref"])
            except _retryable():
                held.pop(job["slot"], None)  # restarted: holds the reference weights
                self._again(job, inflight, held, "its actor failed")
                continue
            if isinstance(scores, dict):  # a restarted sampler answered with other weights
                held.pop(job["slot"], None)
                self._again(job, inflight, held, f"stale weights (v{scores['stale']})")
                continue
            groups = [make_group(t, d, sc, cfg.pairs.guidance, self.modes, cfg.pairs, weights,
                                 alignment_seed(cfg.run.seed, cfg.dpo.seed), cfg.rewards.normalize)
                      for t, d, sc in zip(job["chunk"], drawn, scores)]
            out = ray.get(self.buffer.add.remote(groups))
            rec = {"t0": job["t0"], "t1": time.time(), "slot": job["slot"], "version": job["version"],
                   "backgrounds": len(groups), "candidates": sum(len(d.latents) for d in drawn),
                   "pairs": int(out["pairs"]), "skipped": int(out["skipped"])}
            self.records.append(rec)
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            free.append(job["slot"])

    def _again(self, job: dict, inflight: dict, held: dict, why: str) -> None:
        if job["tries"] >= self.max_resubmits:
            raise RuntimeError(f"a sampler task failed {job['tries'] + 1} times ({why})")
        self.resubmitted += 1
        self.log(f"sampler task of backgrounds {[t.bg_id for t in job['chunk']]} again: {why}")
        import ray

        self._halt.wait(0.2 * (job["tries"] + 1))  # e.g. a restarted learner republishes its weights
        version, _, (wref,) = ray.get(self.weights.latest.remote())  # the failed one committed nothing
        for t in job["chunk"]:
            self.drawn.add((int(t.bg_id), version))
        new = self._submit(job["slot"], job["chunk"], version, wref, held)
        new["tries"], new["t0"] = job["tries"] + 1, job["t0"]
        inflight[new["sref"]] = new
