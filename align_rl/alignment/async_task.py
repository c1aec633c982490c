"""The learner of asynchronous online DPO (docs/method.md §9.4): one continuous Ray Train run of
:func:`align_rl.training.loop.train_loop` whose batches come from the live pair buffer.

:class:`StreamClient` is the learner's side of the stream (also used by test learners):

- **versions**: the policy after ``v · k`` optimiser steps is version ``v`` (``k`` =
  ``dpo.sync_every``; the reference is version 0); at step ``s`` the learner is at version
  ``⌊s / k⌋`` and asks the buffer for pairs no more than ``dpo.staleness`` versions behind it;
- **publishing**: before the batch of step ``s = v · k`` (``v`` ≥ 1), rank 0 puts the policy's
  state dict (CPU tensors) in the object store and hands the reference to the weight-store actor
  (one ``ray.put`` and one actor call it does not wait for); a learner attempt that starts at a
  step of version ≥ 1 (after a worker failure) publishes its weights first, since the objects of
  the failed worker are gone;
- **waiting**: a step with no batch polls the buffer every ``poll_s`` seconds; the time is logged;
- **timeline**: ``start``, ``take`` (with its wait), ``publish`` and ``end`` events
  (:mod:`align_rl.alignment.loop_metrics`), appended to ``out_dir/timeline-learner.jsonl`` at
  checkpoints.

:class:`AsyncDPOTask` is the Diffusion-DPO task (:class:`~align_rl.alignment.dpo_task.DPOTask`'s
loss, reference and checkpoints) over such a client. Validation is not in the loop (a validator
actor scores published versions). With ``dpo.refresh_reference`` = r > 0 the frozen reference
becomes the policy at every version that is a multiple of r (iterative DPO), saved as
``out_dir/reference-v<r·j>.pt`` so a resumed learner takes the same reference.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from align_rl.alignment.dpo_task import DPOTask
from align_rl.config import config_from_dict
from align_rl.io.checkpoints import load_model
from align_rl.training.loop import Worker

TIMELINE_FILE = "timeline-learner.jsonl"


def version_at(step: int, k: int) -> int:
    """The learner's policy version at optimiser step ``step`` (steps done): ``⌊step / k⌋``."""
    return int(step) // int(k)


def reference_version(version: int, r: int) -> int:
    """The policy version serving as reference at learner ``version`` when it is refreshed every
    ``r`` versions (``r`` = 0: never, the pretrained reference, version 0)."""
    return 0 if int(r) <= 0 else (int(version) // int(r)) * int(r)


class StreamClient:
    """Batches from the buffer actor ``buffer`` and publications to the weight-store actor
    ``weights`` (module docstring); ``k``: steps per version."""

    def __init__(self, buffer: Any, weights: Any, k: int, poll_s: float = 0.02):
        self.buffer, self.weights, self.k, self.poll_s = buffer, weights, int(k), float(poll_s)
        self.events: list[dict] = [{"kind": "start", "t0": time.time(), "t1": time.time()}]
        self.flushed = 0
        self.published = -1
        self.wait_s = self.publish_s = 0.0  # since the last log line
        self.staleness: list[int] = []  # of the pairs since the last log line
        self.total_wait = 0.0
        self.t_start = time.time()

    def publish(self, step: int, model: nn.Module) -> float:
        """Put the weights of version ``step // k`` in the object store for the samplers; seconds."""
        import ray

        t0 = time.time()
        v = version_at(step, self.k)
        sd = {n: t.detach().cpu() for n, t in model.state_dict().items()}
        ref = ray.put(sd)
        self.weights.publish.remote(v, int(step), [ref])  # not waited for
        t1 = time.time()
        self.published = v
        self.publish_s += t1 - t0
        self.events.append({"kind": "publish", "t0": t0, "t1": t1, "version": v, "step": int(step)})
        return t1 - t0

    def take(self, step: int, rank: int, size: int) -> dict:
        """The batch of ``step`` (waits while the buffer has no ``size`` fresh pairs)."""
        import ray

        t0 = time.time()
        cur = version_at(step, self.k)
        waited, t_miss = 0.0, None
        while True:
            out = ray.get(self.buffer.take.remote(int(step), int(rank), int(size), cur))
            if out is not None:
                break
            t_miss = t_miss or time.time()
            time.sleep(self.poll_s)
        t1 = time.time()
        if t_miss is not None:
            waited = t1 - t_miss
        self.wait_s += waited
        self.total_wait += waited
        self.staleness += [cur - int(v) for v in out["versions"]]
        self.events.append({"kind": "take", "t0": t0, "t1": t1, "wait": waited, "step": int(step),
                            "steps": 1, "version": cur})
        return out

    def end(self) -> None:
        self.events.append({"kind": "end", "t0": time.time(), "t1": time.time()})

    def window(self) -> dict[str, float]:
        """Metrics since the last call: ``async/wait_s``, ``async/publish_s``,
        ``async/staleness_mean``, ``async/staleness_max``, and ``async/wait_frac`` of the attempt."""
        st = self.staleness
        m = {"async/wait_s": self.wait_s, "async/publish_s": self.publish_s,
             "async/staleness_mean": sum(st) / len(st) if st else 0.0,
             "async/staleness_max": float(max(st)) if st else 0.0,
             "async/wait_frac": self.total_wait / max(time.time() - self.t_start, 1e-9)}
        self.wait_s = self.publish_s = 0.0
        self.staleness = []
        return m

    def flush(self, path: Path) -> None:
        """Append the events not yet written to ``path`` (JSON lines)."""
        with open(path, "a") as f:
            for e in self.events[self.flushed:]:
                f.write(json.dumps(e) + "\n")
        self.flushed = len(self.events)


class AsyncDPOTask(DPOTask):
    """The DPO task on the live buffer (config built by
    :func:`align_rl.alignment.async_loop.learner_config`: ``cfg``, ``reference_ckpt``,
    ``init_ckpt``, ``diffusion_cfg``, ``buffer``, ``weights``, ``k``, ``refresh_reference``)."""

    best_key = None  # validation runs beside the learner, on published versions

    def __init__(self, conf: dict, worker: Worker):  # noqa: D107 - no pair set: the buffer feeds it
        self.conf, self.device, self.rank = conf, worker.device, worker.rank
        self.cfg = config_from_dict(conf["cfg"])
        d = self.cfg.dpo
        self.beta, self.anchor = float(d.beta), float(d.anchor)
        self.t_range = (float(d.t_min), float(d.t_max))
        self.seed, self.k = int(conf["seed"]), int(conf["k"])
        self.r = int(conf.get("refresh_reference") or 0)
        self.version = 0
        self.reference, _ = load_model(conf["reference_ckpt"], "diffusion", device=worker.device)
        self.reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.ref_version = 0
        self.validator = None
        self.out_dir = Path(conf["out_dir"])
        self.stream = StreamClient(conf["buffer"], conf["weights"], self.k)
        self.model: nn.Module | None = None

    def build(self, device: torch.device) -> nn.Module:
        self.model = super().build(device)  # the same module the loop trains (DDP shares it)
        return self.model

    def _refresh_reference(self, version: int) -> None:
        want = reference_version(version, self.r)
        if want == self.ref_version:
            return
        path = self.out_dir / f"reference-v{want}.pt"
        if path.exists():  # a resumed learner: the reference it had then
            sd = torch.load(path, map_location=self.device, weights_only=True)
        else:
            sd = {n: t.detach().clone() for n, t in self.model.state_dict().items()}
            if self.rank == 0:
                tmp = path.with_suffix(".tmp")
                torch.save({n: t.cpu() for n, t in sd.items()}, tmp)
                tmp.replace(path)
        self.reference.load_state_dict(sd)
        self.ref_version = want

    def batch(self, step: int, rank: int, size: int) -> tuple[torch.Tensor, ...]:
        v = version_at(step, self.k)  # the version the learner is at when it draws the batch
        self.version = version_at(step + 1, self.k)  # that of the policy after this step
        if self.r:
            self._refresh_reference(v)
        if rank == 0 and v > 0 and self.stream.published < v:  # at k-step boundaries, and at the
            self.stream.publish(step, self.model)  # start of an attempt (a restarted worker's refs are gone)
        out = self.stream.take(step, rank, size)
        return tuple(torch.tensor(out[k]) for k in ("z_w", "z_l", "z_b"))  # own copies: writable

    def finalize(self, metrics: dict[str, float]) -> dict[str, float]:
        return {**super().finalize(metrics), **self.stream.window(), "ref_version": self.ref_version}

    def constants(self) -> dict[str, Any]:
        return {"version": self.version}

    def publish(self, out_dir: Path, model: nn.Module, step: int) -> None:
        """At a checkpoint: ``policy.pt`` and the timeline so far (rank 0)."""
        super().publish(out_dir, model, step)
        if step >= int(self.conf["steps"]):
            self.stream.end()
        self.stream.flush(out_dir / TIMELINE_FILE)


def async_dpo_task(conf: dict, worker: Worker) -> AsyncDPOTask:
    """The loop's ``make_task`` of the asynchronous learner."""
    return AsyncDPOTask(conf, worker)
