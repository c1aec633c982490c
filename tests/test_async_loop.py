"""The asynchronous loop with a slow fake sampler and a fast fake learner (docs/method.md §9.4):
both sides busy at once, the staleness and reuse bounds hold in the consumed pairs, a killed
sampler loses and duplicates nothing."""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import torch

from align_rl.alignment.async_feed import SamplerFeed, pick_backgrounds
from align_rl.alignment.async_loop import plan_sides
from align_rl.alignment.async_task import StreamClient, reference_version, version_at
from align_rl.alignment.candidates import BackgroundTask, Drawn
from align_rl.alignment.loop_metrics import loop_metrics
from align_rl.config import load_config
from align_rl.io.pair_store import PairStore

SHAPE = (1, 2, 2)
N = 8  # candidates per background: decile 0.25 -> 2 winners x 2 losers = 4 pairs


class FakeSampler:
    """Draws N random latents per background after ``delay`` seconds (slow); refuses other
    versions than the one it holds, as the real sampler does."""

    def __init__(self, delay: float):
        self.delay, self.version = delay, 0

    def set_weights(self, state_dict, version):
        assert isinstance(state_dict, dict)  # the object store resolved the reference
        self.version = int(version)
        return self.version

    def draw(self, tasks, version):
        if int(version) != self.version:
            return {"stale": self.version}
        time.sleep(self.delay)
        out = []
        for t in tasks:
            rng = np.random.default_rng([t.bg_id, version])
            out.append(Drawn(t.bg_id, int(version), rng.normal(size=SHAPE).astype(np.float32),
                             rng.normal(size=(N, *SHAPE)).astype(np.float32), np.zeros((N, 1), np.float32)))
        return out


class FakeRewarder:
    def score(self, tasks, drawn):
        if isinstance(drawn, dict):
            return drawn
        return [{"assim": np.random.default_rng([d.bg_id, d.version, 1]).normal(size=N),
                 "phys": np.random.default_rng([d.bg_id, d.version, 2]).normal(size=N)} for d in drawn]


def tasks_for(ids):
    z = np.zeros((1,), np.float32)
    return [BackgroundTask(int(i), int(i) * 21600 * 10**9, z, z) for i in ids]


def fake_learner(client: StreamClient, steps: int, size: int, k: int, step_s: float) -> None:
    """A fast learner: publishes a tiny model every k steps, takes a batch per step."""
    model = torch.nn.Linear(2, 2)
    for step in range(steps):
        if step > 0 and step % k == 0:
            with torch.no_grad():
                model.weight.add_(1.0)
            client.publish(step, model)
        client.take(step, 0, size)
        time.sleep(step_s)
    client.end()


def _setup(ray, tmp_path, samplers: int, delay: float, s: int, u: int, restarts: int = 0):
    from actors.buffer import make_buffer
    from actors.weights import make_weight_store

    cfg = load_config(overrides=["pairs.decile=0.25", "pairs.pairs_per_background=4", "actors.batch_size=1",
                                 f"run.workdir={tmp_path}", "rewards.names=[assim, phys]",
                                 "rewards.weights={assim: 1, phys: 1}"])
    wstore = make_weight_store()
    ray.get(wstore.publish.remote(0, 0, [ray.put({"w": torch.zeros(1)})]))
    buf = make_buffer(str(tmp_path / "buf.zarr"), SHAPE, ["assim", "phys"], "M", s, u, str(tmp_path / "out"))
    opts = {"num_cpus": 0, "max_restarts": restarts, "max_task_retries": restarts}
    sam = [ray.remote(FakeSampler).options(**opts).remote(delay) for _ in range(samplers)]
    rew = [ray.remote(FakeRewarder).options(num_cpus=0).remote()]
    ray.get([buf.stats.remote(), *[a.__ray_ready__.remote() for a in sam + rew]])  # all started
    feed = SamplerFeed(cfg, sam, rew, buf, wstore, tasks_for, list(range(40)), ["M"], tmp_path / "out",
                       log=lambda m: None)
    return cfg, wstore, buf, sam, feed


def test_slow_sampler_fast_learner_overlap_and_bounds(ray_session, tmp_path):
    ray = ray_session
    (tmp_path / "out").mkdir()
    s, u, k = 1, 2, 2
    cfg, wstore, buf, sam, feed = _setup(ray, tmp_path, samplers=2, delay=0.15, s=s, u=u)
    client = StreamClient(buf, wstore, k, poll_s=0.01)
    feed.start()
    try:
        fake_learner(client, steps=16, size=3, k=k, step_s=0.005)
    finally:
        feed.stop()
    takes = ray.get(buf.takes.remote())
    assert [t["step"] for t in takes] == list(range(16))
    # the staleness bound: no consumed pair more than s versions behind the learner
    lags = [t["current"] - v for t in takes for v in t["versions"]]
    assert max(lags) <= s and min(lags) >= 0
    assert {t["current"] for t in takes} == {version_at(st, k) for st in range(16)}
    # the reuse bound
    uses = Counter(h for t in takes for h in t["pairs"])
    assert max(uses.values()) <= u
    # both sides busy at once: sampler intervals intersect the learner's span
    m = loop_metrics(client.events, feed.records, takes)
    assert m["loop/overlap"] > 0.5
    assert 0 < m["loop/learner_wait"] < 1  # a fast learner waits for slow samplers
    assert m["loop/publishes"] == 7 and m["loop/staleness_max"] <= s
    # samplers picked up published weights: later tasks drew with versions > 0
    assert max(r["version"] for r in feed.records) >= 1
    ray.get(wstore.latest.remote())
    for a in [buf, wstore, *sam]:
        ray.kill(a)


def test_killed_sampler_loses_and_duplicates_nothing(ray_session, tmp_path):
    ray = ray_session
    (tmp_path / "out").mkdir()
    cfg, wstore, buf, sam, feed = _setup(ray, tmp_path, samplers=2, delay=0.3, s=10, u=1, restarts=2)
    feed.start()
    time.sleep(1.0)
    ray.kill(sam[0], no_restart=False)  # Ray restarts it (with version 0), its task comes back
    ray.get(wstore.publish.remote(1, 2, [ray.put({"w": torch.ones(1)})]))
    t0 = time.time()  # until both samplers have committed work of version 1 (the killed one restarted)
    while {r["slot"] for r in feed.records if r["version"] == 1} != {0, 1} and time.time() - t0 < 120:
        time.sleep(0.2)
    feed.stop()
    assert feed.error is None
    ray.kill(buf)
    store = PairStore.open(tmp_path / "buf.zarr", mode="r")
    b = store.backgrounds()
    ids = b["bg_id"].tolist()
    assert len(ids) == len(set(ids))  # nothing drawn twice
    # nothing lost: the committed backgrounds are the order's first ones, apart from the tasks
    # still in flight when the feed stopped (at most one per sampler)
    top = max(ids)
    assert len(set(range(top + 1)) - set(ids)) <= len(sam) - 1
    hashes = [bytes(h) for h in store.pair_set("M").hash]
    assert len(hashes) == len(set(hashes)) == 4 * len(ids)
    assert {r["slot"] for r in feed.records if r["version"] == 1} == {0, 1}


def test_backgrounds_least_drawn_first_never_twice_per_version():
    order = [3, 1, 2, 0]
    assert pick_backgrounds(order, {}, set(), 2) == [3, 1]
    assert pick_backgrounds(order, {3: 1, 1: 1}, set(), 3) == [2, 0, 3]  # the pass goes on
    assert pick_backgrounds(order, {3: 2, 1: 1, 2: 1, 0: 1}, {1, 2}, 3) == [0, 3]  # 1, 2 drawn at v
    assert pick_backgrounds(order, {}, {0, 1, 2, 3}, 2) == []  # wait for a new version


def test_reference_refresh_versions():
    assert [reference_version(v, 0) for v in range(5)] == [0] * 5
    assert [reference_version(v, 2) for v in range(6)] == [0, 0, 2, 2, 4, 4]


def test_sides_separate_when_the_cluster_holds_both(tmp_path):
    cfg = load_config(overrides=[f"run.workdir={tmp_path}", "dpo.num_workers=1", "dpo.cpus_per_worker=2",
                                 "actors.samplers=2", "actors.rewarders=1", "actors.cpus_per_actor=1"])
    big = plan_sides({"CPU": 8.0}, cfg, use_gpu=False, validator=True)  # 2 + 3 x 1 + 1 = 6 <= 8
    assert big["separate"] and big["actor_cpus"] == 1.0 and big["need_cpu"] == 6.0
    small = plan_sides({"CPU": 2.0}, cfg, use_gpu=False, validator=False)
    assert not small["separate"] and small["actor_cpus"] == 0.0
    gpu = plan_sides({"CPU": 64.0, "GPU": 1.0, "sampler": 10.0, "learner": 10.0}, cfg, use_gpu=True,
                     validator=False)
    assert gpu["separate"] and gpu["groups"]


def test_cluster_configs_have_a_sampler_and_a_learner_group(tmp_path):
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    launcher = yaml.safe_load((repo / "cluster" / "a100.yaml").read_text())
    res = {}
    for t in launcher["available_node_types"].values():
        for k, v in t["resources"].items():
            res[k] = res.get(k, 0) + v * int(t.get("max_workers", 1))
    assert res["sampler"] > 0 and res["learner"] > 0
    job = [d for d in yaml.safe_load_all((repo / "cluster" / "rayjob.yaml").read_text()) if d and d.get("kind") == "RayJob"][0]
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    for name in ("sampler", "learner"):
        custom = json.loads(json.loads(groups[name]["rayStartParams"]["resources"]))
        assert custom == {name: 1000}
    cfg = load_config(overrides=[f"run.workdir={tmp_path}"])
    assert plan_sides(res, cfg, use_gpu=True, validator=True)["groups"]


def test_tune_config_compares_offline_sync_and_async(tmp_path):
    from pathlib import Path

    from align_rl.tune.spec import load_spec
    from align_rl.tune.trial import trial_config

    spec = load_spec(Path(__file__).resolve().parents[1] / "tune_configs" / "offline_sync_async.yaml")
    assert spec.search["dpo.mode"].values == ["offline", "sync", "async"]
    base = load_config(overrides=[f"run.workdir={tmp_path}"])
    assert [trial_config(base.to_dict(), {"dpo.mode": m}).dpo.mode for m in ("offline", "sync", "async")] \
        == ["offline", "sync", "async"]
