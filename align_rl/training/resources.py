"""Will a job's Ray resource requests ever be granted? Checked before anything starts.

Ray waits for resources it cannot give (a learner worker asking 2 CPUs of a 1-CPU node waits
forever; Ray Train retries its worker group every ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``), so a
request larger than the cluster shows as a job that hangs. The main job, the online loop and every
sweep trial describe what they hold at once as :class:`Need` s, one per part (the learner's
workers, the actors, a trial's own reservation); :func:`check_fits` compares their sum with the
connected Ray cluster and raises :class:`~align_rl.errors.ConfigError` naming the keys that set the
request and how to make it fit (on a cluster reached through ``RAY_ADDRESS``, which an autoscaler
may grow, it warns instead, :func:`growing_cluster`).

A bundle is ``{"CPU": n, "GPU": g}`` (what one worker or actor asks Ray for); each bundle must fit
on one node, and the sum of every part held at once must fit in the cluster.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from align_rl.errors import ConfigError

RESOURCES = ("CPU", "GPU")


@dataclass(frozen=True)
class Need:
    """One part of a job: ``bundles`` (each on one node) and the config ``keys`` that set them."""

    what: str
    bundles: tuple[dict[str, float], ...]
    keys: tuple[str, ...]

    def total(self) -> dict[str, float]:
        return {r: sum(float(b.get(r, 0.0)) for b in self.bundles) for r in RESOURCES}

    def describe(self) -> str:
        t = self.total()
        gpu = f" + {t['GPU']:g} GPU" if t["GPU"] else ""
        return f"{self.what}: {t['CPU']:g} CPU{gpu} ({', '.join(self.keys)})"


def learner_uses_gpu(cfg: Any, cluster_gpus: float) -> bool:
    """Whether the learner's workers ask for GPUs on a cluster with ``cluster_gpus`` GPUs, by
    the rule of :func:`align_rl.devices.resolve_use_gpu` (``run.device=cuda`` or
    ``dpo.use_gpu``: yes, so that a cluster without GPUs is refused; ``auto``: when it has some)."""
    device = str(cfg.run.device)
    if device == "cpu":
        return False
    return device == "cuda" or bool(cfg.dpo.use_gpu) or cluster_gpus > 0


def learner_need(cfg: Any, use_gpu: bool) -> Need:
    """The DPO learner: ``dpo.num_workers`` workers × (``dpo.cpus_per_worker`` CPUs and, when
    ``use_gpu``, ``dpo.gpus_per_worker`` GPUs; :func:`align_rl.training.harness.worker_scaling`)."""
    d = cfg.dpo
    b = {"CPU": float(d.cpus_per_worker), "GPU": float(d.gpus_per_worker) if use_gpu else 0.0}
    keys = ("dpo.num_workers", "dpo.cpus_per_worker") + (("dpo.gpus_per_worker",) if use_gpu else ())
    return Need("DPO learner", (b,) * int(d.num_workers), keys)


def actors_need(cfg: Any, n: int, what: str, count_key: str) -> Need:
    """``n`` actors of ``actors.cpus_per_actor`` CPUs and :func:`align_rl.devices.actor_gpus` GPUs."""
    from align_rl.devices import actor_gpus

    g = actor_gpus(cfg)
    b = {"CPU": float(cfg.actors.cpus_per_actor), "GPU": g}
    keys = (count_key, "actors.cpus_per_actor") + (("actors.gpus_per_actor",) if g else ())
    return Need(what, (b,) * int(n), keys)


def pool_need(cfg: Any) -> Need:
    """The candidate pool: ``actors.samplers`` sampler and ``actors.rewarders`` reward actors."""
    a = cfg.actors
    return actors_need(cfg, int(a.samplers) + int(a.rewarders), "sampler and reward actors",
                       "actors.samplers + actors.rewarders")


def evaluation_needs(cfg: Any) -> list[Need]:
    """The evaluation's actors (none when it samples in the driver, :func:`align_rl.devices.sampling_place`):
    one analysis actor (kept between evaluations) and ``actors.forecasters`` forecast actors."""
    from align_rl.devices import sampling_place

    if sampling_place(cfg) == "driver":
        return []
    return [actors_need(cfg, 1, "analysis actor", "eval.sampling"),
            actors_need(cfg, int(cfg.actors.forecasters), "forecast actors", "actors.forecasters")]


def cluster_capacity() -> tuple[dict[str, float], list[dict[str, float]]]:
    """``(total, per alive node)`` CPUs and GPUs of the connected Ray cluster."""
    import ray

    nodes = [{r: float(n.get("Resources", {}).get(r, 0.0)) for r in RESOURCES}
             for n in ray.nodes() if n.get("Alive")]
    total = {r: sum(n[r] for n in nodes) for r in RESOURCES}
    return total, nodes


def check_fits(parts: Sequence[Need], what: str, fix: str = "",
               capacity: tuple[dict[str, float], list[dict[str, float]]] | None = None) -> None:
    """Raise :class:`ConfigError` when the ``parts`` held at once by ``what`` (e.g. "a sweep
    trial") exceed the cluster (``capacity``: ``(total, nodes)``, default the connected Ray
    cluster's) or one of their bundles fits on no node. ``fix``: extra advice for the message."""
    if capacity is None:
        import ray

        if not ray.is_initialized():  # nothing to compare with (the caller starts Ray later)
            return
    total, nodes = capacity if capacity is not None else cluster_capacity()
    parts = [p for p in parts if p.bundles]
    need = {r: sum(p.total()[r] for p in parts) for r in RESOURCES}
    problems = [f"{need[r]:g} {r} but the Ray cluster has {total.get(r, 0.0):g}"
                for r in RESOURCES if need[r] > total.get(r, 0.0) + 1e-9]
    for p in parts:
        for b in p.bundles:
            if not any(all(b.get(r, 0.0) <= n.get(r, 0.0) + 1e-9 for r in RESOURCES) for n in nodes):
                problems.append(f"{p.what} asks {b} per worker and no node has that much")
                break
    if not problems:
        return
    keys = sorted({k for p in parts if any(p.total().values()) for k in p.keys})
    msg = (f"{what} can never start: it asks {'; '.join(problems)}. It holds at once: "
           f"{'; '.join(p.describe() for p in parts)}. Lower {', '.join(keys)}, "
           f"or connect to a larger cluster (RAY_ADDRESS){'; ' + fix if fix else ''}.")
    if capacity is None and growing_cluster():
        print(f"align_rl: warning: on the cluster as it is now, {msg} (an autoscaling cluster may "
              "still add the nodes; if it cannot, the job waits)", file=sys.stderr, flush=True)
        return
    raise ConfigError(msg)


def growing_cluster() -> bool:
    """Whether the connected Ray cluster may grow: a cluster reached through ``RAY_ADDRESS`` (the
    cluster launcher's or KubeRay's autoscaler may add nodes), not the fixed local instance that
    :func:`align_rl.training.harness.init_ray` starts. There a request larger than the cluster
    as it is now is reported, not refused."""
    return bool(os.environ.get("RAY_ADDRESS"))


def job_phases(cfg: Any, use_gpu: bool, release_pool: bool = True) -> list[tuple[str, list[Need]]]:
    """What the main job (and its online loop) holds at once, phase by phase: the candidate pool,
    the learner (beside the pool when the online loop keeps it, ``release_pool=False``), the
    evaluation's actors."""
    pool, learner = pool_need(cfg), learner_need(cfg, use_gpu)
    phases = [("the candidate pool", [pool]),
              ("DPO", [learner] if release_pool else [pool, learner])]
    ev = evaluation_needs(cfg)
    if ev:
        phases.append(("the evaluation", ev))
    return phases


def check_job(cfg: Any, release_pool: bool = True, capacity=None) -> None:
    """:func:`check_fits` for every phase of the main job (:func:`job_phases`); Ray must be
    connected (the learner's GPUs follow the cluster, :func:`align_rl.devices.resolve_use_gpu`)."""
    from align_rl.devices import resolve_use_gpu

    use_gpu = resolve_use_gpu(cfg.run.device, bool(cfg.dpo.use_gpu), "dpo.use_gpu")
    for name, parts in job_phases(cfg, use_gpu, release_pool):
        check_fits(parts, f"{name} of the job", capacity=capacity)


def check_online(cfg: Any, release_pool: bool = True, capacity=None) -> None:
    """:func:`check_fits` for the online loop's phases (the candidate pool; the learner, beside
    the pool when ``release_pool`` is False)."""
    from align_rl.devices import resolve_use_gpu

    use_gpu = resolve_use_gpu(cfg.run.device, bool(cfg.dpo.use_gpu), "dpo.use_gpu")
    for name, parts in job_phases(cfg, use_gpu, release_pool)[:2]:
        check_fits(parts, f"{name} of the online loop", capacity=capacity)
