"""Asynchronous online Diffusion-DPO (``dpo.mode=async``, docs/method.md §9.4): samplers that never
stop, a learner that waits only for fresh pairs.

One run, four sides at once:

- **samplers** (:class:`~align_rl.alignment.async_feed.SamplerFeed`, a driver thread over the
  candidate pool's persistent sampler and reward actors): draw candidates for new preference
  backgrounds with the newest published weights, for the whole run;
- **buffer** (a buffer actor over :class:`~align_rl.alignment.buffer.PairBuffer`): the run's own
  pair store ``out_dir/buffer.zarr`` (one lineage of policy versions per run: another seed or
  setting never reads it) with each pair's policy version, the staleness bound ``dpo.staleness``,
  the reuse limit ``dpo.reuse``, warm-started from the offline store's version-0 groups of the
  first ``pairs.backgrounds`` backgrounds of ``order`` (those the offline run uses) when one is
  given (``dpo.warm_start``);
- **learner** (:class:`~align_rl.alignment.async_task.AsyncDPOTask`): ONE Ray Train run of
  ``dpo.steps`` steps reading its batches from the buffer, publishing its weights every
  ``dpo.sync_every`` steps to the weight-store actor (object refs) without waiting;
- **validation** (a validator actor, when ``dpo.val_every`` > 0 and validation inputs are given):
  scores published versions (about every ``dpo.val_every`` steps, the newest when it is free, and
  the final policy) and keeps ``best.pt``, the result.

Resources (:func:`plan_sides`): when the cluster holds the learner's workers and every actor at once
the two sides get their own CPUs / GPUs (and, when the nodes advertise the custom resources
``sampler`` / ``learner`` as the ``cluster/`` configs' worker groups do, their own nodes); on a
smaller machine the actors ask for no CPU and share the cores with the learner.

Faults: a killed sampler is restarted by Ray and its task submitted again (nothing lost; the store
dedups). A killed driver leaves the store, the consumption log and the learner's ``state.pt`` on
disk: the same call resumes (the learner from its last checkpoint, the buffer's use counts from
the log with the takes of undone steps removed).

At the end the loop's own measures (:func:`~align_rl.alignment.loop_metrics.loop_metrics`: overlap,
learner wait, staleness histogram, publish time and share, throughput) go to
``out_dir/async_metrics.json``, a last line of ``out_dir/metrics.jsonl`` and wandb.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from align_rl.alignment.async_feed import SAMPLER_TIMELINE, SamplerFeed
from align_rl.alignment.async_task import TIMELINE_FILE, async_dpo_task, version_at
from align_rl.alignment.async_validation import VALIDATION_FILE, read_records
from align_rl.alignment.buffer import warm_groups
from align_rl.alignment.candidates import first_backgrounds
from align_rl.alignment.dpo_task import BEST_FILE, GAIN, POLICY_FILE
from align_rl.alignment.learner import DPOResult, _diffusion_section, _wandb
from align_rl.alignment.loop_metrics import loop_metrics
from align_rl.alignment.pairs import alignment_seed
from align_rl.config import Config
from align_rl.devices import resolve_use_gpu
from align_rl.errors import ConfigError, InputError
from align_rl.io.checkpoints import read_checkpoint
from align_rl.training.harness import fit_loop, init_ray, worker_scaling
from align_rl.training.loop import METRICS_FILE, read_state, wandb_run

METRICS_JSON = "async_metrics.json"
BUFFER_STORE = "buffer.zarr"  # the run's pair buffer, in its own folder


def plan_sides(resources: dict, cfg: Config, use_gpu: bool, validator: bool) -> dict:
    """How the samplers and the learner are placed on a cluster of ``resources``
    (``ray.cluster_resources()``): ``separate`` (the learner's ``dpo.num_workers`` ×
    ``dpo.cpus_per_worker`` CPUs (and one GPU each with ``use_gpu``) fit beside every actor's
    ``actors.cpus_per_actor`` / ``gpus_per_actor``), ``actor_cpus`` (per actor: the config's when
    separate, else 0: they share the cores), ``groups`` (the nodes advertise ``sampler`` and
    ``learner`` resources)."""
    a, d = cfg.actors, cfg.dpo
    n_actors = int(a.samplers) + int(a.rewarders) + (1 if validator else 0)
    need_cpu = int(d.num_workers) * float(d.cpus_per_worker) + n_actors * float(a.cpus_per_actor)
    need_gpu = (int(d.num_workers) if use_gpu else 0) + n_actors * float(a.gpus_per_actor)
    separate = (float(resources.get("CPU", 0)) >= need_cpu
                and float(resources.get("GPU", 0)) + 1e-9 >= need_gpu)
    return {"separate": separate, "actor_cpus": float(a.cpus_per_actor) if separate else 0.0,
            "groups": "sampler" in resources and "learner" in resources,
            "need_cpu": need_cpu, "need_gpu": need_gpu}


def learner_config(cfg: Config, reference_ckpt: Path, init_ckpt: Path, out_dir: Path, buffer: Any,
                   weights: Any, mode: str, progress: bool, crash: dict | None = None) -> dict:
    """The :func:`align_rl.training.loop.train_loop` config of the asynchronous learner."""
    d = cfg.dpo
    return {
        "make_task": async_dpo_task, "label": f"DPO-{mode} async", "cfg": cfg.to_dict(),
        "reference_ckpt": str(reference_ckpt), "init_ckpt": str(init_ckpt),
        "diffusion_cfg": _diffusion_section(reference_ckpt), "version": 0,
        "steps": int(d.steps), "seed": alignment_seed(cfg.run.seed, d.seed), "lr": float(d.lr), "warmup": int(d.warmup_steps),
        "decay": "constant", "batch_size": int(d.batch_size), "grad_clip": float(d.grad_clip),
        "checkpoint_every": max(1, int(d.checkpoint_every)), "val_every": 0, "log_every": 1,
        "threads": max(1, int(d.cpus_per_worker)), "out_dir": str(out_dir), "resume": True,
        "progress": progress, "crash": crash, "validation": None,
        "buffer": buffer, "weights": weights, "k": int(d.sync_every),
        "refresh_reference": int(d.refresh_reference),
        "wandb": _wandb(cfg, out_dir, f"{mode}-async", 0),
    }


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for x in path.read_text().splitlines():
        try:
            out.append(json.loads(x))
        except json.JSONDecodeError:
            break
    return out


class Validations(threading.Thread):
    """Driver thread: hands the newest published version to the validator actor about every
    ``every`` versions, one at a time, never blocking the learner."""

    def __init__(self, validator: Any, weights: Any, every: int):
        super().__init__(name="validations", daemon=True)
        self.validator, self.weights, self.every = validator, weights, max(1, int(every))
        self._halt = threading.Event()
        self.done: set[int] = set()
        self.error: BaseException | None = None

    def run(self) -> None:
        import ray

        try:
            while not self._halt.is_set():
                latest = ray.get(self.weights.latest.remote())
                v, step, (ref,) = latest
                if v > 0 and v % self.every == 0 and v not in self.done:
                    ray.get(self.validator.score.remote(v, step, ref))
                    self.done.add(v)
                else:
                    self._halt.wait(0.2)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _start_weights(out_dir: Path, reference_ckpt: Path, k: int) -> tuple[int, int, dict]:
    """``(version, step, state dict)`` the samplers start from: the learner's last ``policy.pt``
    (a resumed run) or the reference (version 0)."""
    pol = out_dir / POLICY_FILE
    if pol.exists() and read_state(out_dir) is not None:
        ck = read_checkpoint(pol)
        step = int(ck.get("extra", {}).get("dpo_step", 0))
        return version_at(step, k), step, ck["state_dict"]
    return 0, 0, torch.load(reference_ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _result(out_dir: Path, state: dict, validated: bool) -> DPOResult:
    recs = read_records(out_dir) if validated else []
    from align_rl.alignment.async_validation import best_record

    best = best_record(recs) if recs else {}
    ck = out_dir / (BEST_FILE if validated and (out_dir / BEST_FILE).exists() else POLICY_FILE)
    m = dict(state["history"][-1]) if state["history"] else {}
    return DPOResult(ck, m, int(state["version"]), int(state["step"]), list(state["history"]),
                     {"step": best["step"], GAIN: best[GAIN]} if best else {})


def measure(out_dir: Path, takes: Sequence[dict], extra: dict | None = None) -> dict:
    """The loop's measures from the timelines in ``out_dir`` and the consumption log ``takes``;
    written to ``async_metrics.json``."""
    m = loop_metrics(_read_jsonl(out_dir / TIMELINE_FILE), _read_jsonl(out_dir / SAMPLER_TIMELINE), takes)
    m.update(extra or {})
    (out_dir / METRICS_JSON).write_text(json.dumps(m, indent=1))
    return m


def _report(cfg: Config, out_dir: Path, mode: str, m: dict, step: int) -> None:
    """The loop's measures as the last line of ``metrics.jsonl`` and into the learner's wandb run."""
    flat = {k: v for k, v in m.items() if not isinstance(v, dict)}
    with open(out_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps({"step": step, **flat}) + "\n")
    run = wandb_run(_wandb(cfg, out_dir, f"{mode}-async", 0))
    if run is not None:
        try:
            import wandb

            hist = {int(k): v for k, v in (m.get("loop/staleness") or {}).items()}
            if hist:  # pairs per versions behind, one bin per lag
                import numpy as np

                counts = np.array([hist.get(i, 0) for i in range(max(hist) + 1)], float)
                flat["loop/staleness_hist"] = wandb.Histogram(
                    np_histogram=(counts, np.arange(len(counts) + 1, dtype=float)))
            run.log(flat, step=step)
            run.summary.update({k: v for k, v in flat.items() if k != "loop/staleness_hist"})
        finally:
            run.finish()


def run_async(cfg: Config, workers: Any, make_pool: Callable[[Config], Any],
              latent_shape: Sequence[int], tasks_for: Callable[[list[int]], list], order: Sequence[int],
              reference_ckpt: Path, mode: str, out_dir: Path, progress: bool = True,
              log: Callable[[str], None] = print, validation: dict | None = None,
              warm_store: Any = None, meta: dict | None = None, crash: dict | None = None) -> DPOResult:
    """Asynchronous online DPO of pair ``mode`` (module docstring). ``workers``: the
    :class:`align_rl.remote.Workers` (its ``stream`` actors); ``make_pool(cfg)``: a candidate pool
    (``ensure``, ``samplers``, ``rewarders``, ``shutdown``) for the given config; ``tasks_for(ids)``:
    background tasks; ``order``: the seeded background order; ``warm_store``: the offline pair
    store (warm start). The buffer is ``out_dir/buffer.zarr``. Returns the learner's result
    (``best.pt`` when validated)."""
    import ray

    if workers is None or getattr(workers, "stream", None) is None:
        raise RuntimeError("dpo.mode=async needs the stream actors: call actors.install() first")
    d = cfg.dpo
    if int(d.sync_every) < 1:
        raise ConfigError(f"dpo.sync_every={d.sync_every} must be >= 1")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    reference_ckpt = Path(reference_ckpt).resolve()
    validated = validation is not None and int(d.val_every) > 0
    state = read_state(out_dir)
    if state is not None and int(state["step"]) >= int(d.steps):
        return _result(out_dir, state, validated)
    init_ray()
    use_gpu = resolve_use_gpu(cfg.run.device, bool(d.use_gpu), "dpo.use_gpu")
    plan = plan_sides(ray.cluster_resources(), cfg, use_gpu, validated)
    acfg = copy.deepcopy(cfg)
    acfg.actors.cpus_per_actor = plan["actor_cpus"]
    log(f"async DPO-{mode}: samplers and learner on {'separate' if plan['separate'] else 'shared'} "
        f"resources{' (sampler / learner node groups)' if plan['groups'] else ''}")
    st = workers.stream
    wstore = st.weight_store()
    seed = alignment_seed(cfg.run.seed, d.seed)
    buffer = st.buffer(str(out_dir / BUFFER_STORE), tuple(latent_shape), list(cfg.rewards.names), mode,
                       int(d.staleness), int(d.reuse), str(out_dir), seed, meta)
    if warm_store is not None and bool(d.warm_start) and warm_store.num_pairs:
        first = first_backgrounds(order, cfg.pairs.backgrounds)
        added = ray.get(buffer.add.remote(warm_groups(warm_store, mode, cfg.rewards.weights, cfg.pairs,
                                                      seed, cfg.rewards.normalize, first)))
        log(f"async DPO-{mode}: warm start, {added['pairs']} pairs of the offline store added")
    v0, step0, sd = _start_weights(out_dir, reference_ckpt, int(d.sync_every))
    ray.get(wstore.publish.remote(v0, step0, [ray.put(sd)]))
    pool = make_pool(acfg)
    pool.ensure()
    feed = SamplerFeed(acfg, pool.samplers, pool.rewarders, buffer, wstore, tasks_for, order, [mode],
                       out_dir, log)
    vals = None
    if validated:
        validator = st.validator(validation, cfg, reference_ckpt, out_dir, plan["actor_cpus"])
        vals = Validations(validator, wstore, max(1, round(int(d.val_every) / int(d.sync_every))))
    scaling = worker_scaling(int(d.num_workers), d.cpus_per_worker, use_gpu)
    if plan["groups"]:  # the learner group of cluster/
        from ray.train import ScalingConfig

        scaling = ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                resources_per_worker={**scaling.resources_per_worker, "learner": 1.0})
    conf = learner_config(cfg, reference_ckpt, reference_ckpt, out_dir, buffer, wstore, mode, progress, crash)
    t0 = time.time()
    feed.start()
    if vals is not None:
        vals.start()
    try:
        fit_loop(conf, scaling, out_dir / "ray", f"dpo-{mode}-async", int(d.max_failures))
    except Exception as exc:
        raise RuntimeError(f"asynchronous DPO failed: {exc}; the learner's state and the buffer are "
                           f"in {out_dir} (rerunning the same command resumes)") from exc
    finally:
        feed.stop()
        if vals is not None:
            vals.stop()
        pool.shutdown()
    for th in (feed, vals):
        if th is not None and th.error is not None:
            raise RuntimeError(f"asynchronous DPO: the {th.name} thread failed: {th.error}") from th.error
    state = read_state(out_dir)
    if state is None:
        raise InputError(f"asynchronous DPO left no learner state in {out_dir}")
    if validated:  # the final policy too, once the learner is done
        ck = read_checkpoint(out_dir / POLICY_FILE)
        ray.get(validator.score.remote(version_at(int(state["step"]), int(d.sync_every)),
                                       int(state["step"]), ck["state_dict"]))
    stats = ray.get(buffer.stats.remote())
    m = measure(out_dir, ray.get(buffer.takes.remote()),
                {"loop/run_s": time.time() - t0, "loop/resubmitted": feed.resubmitted,
                 "loop/pairs_in_buffer": stats["pairs"], "loop/max_uses": stats["max_uses"],
                 "loop/separate_resources": plan["separate"]})
    _report(cfg, out_dir, mode, m, int(state["step"]))
    log(f"async DPO-{mode}: overlap {m['loop/overlap']:.0%} of learner time, learner wait "
        f"{m['loop/learner_wait']:.0%}, staleness max {m['loop/staleness_max']} "
        f"(mean {m['loop/staleness_mean']:.2f}), {m['loop/candidates_per_s']:.2f} candidates/s, "
        f"{m['loop/steps_per_s']:.2f} steps/s, publish {m['loop/publish_s'] * 1e3:.1f} ms "
        f"({m['loop/publish_share']:.1%})")
    for a in (buffer, wstore) + ((validator,) if validated else ()):
        ray.kill(a)
    return _result(out_dir, state, validated)


__all__ = ["BUFFER_STORE", "METRICS_JSON", "VALIDATION_FILE", "learner_config", "measure", "plan_sides", "run_async"]
