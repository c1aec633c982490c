"""Sampler / reward actors: candidates are deterministic per background; a killed sampler actor
is replaced and the run ends with the same unique pairs as an undisturbed one."""

from __future__ import annotations

import numpy as np
import pytest

from align_rl.alignment.candidates import background_order, make_tasks, valid_times
from align_rl.io.pair_store import PairStore

from .tiny_align import LAT, LON, tiny_world

pytestmark = pytest.mark.ray


def _tasks(cfg, truth, bg, models, n):
    times = valid_times(truth.times, bg.times, "2004-01-01", "2004-12-31", cfg.rewards.forecast_hours)
    ids = background_order(len(times), cfg.run.seed)[:n]
    return make_tasks(ids, times, truth, bg, models.normalizer, cfg.rewards.forecast_hours)


def test_kill_sampler_same_unique_pairs(tmp_path, ray_session):
    import ray

    from actors.pool import CandidatePool

    cfg, ws, models, truth, bg, _ = tiny_world(tmp_path, ["actors.samplers=2", "actors.max_task_retries=1"])
    tasks = _tasks(cfg, truth, bg, models, 6)
    assert len(tasks) == 6
    shape = models.codec.latent_shape

    ref_store = PairStore.open(tmp_path / "ref.zarr", shape, cfg.rewards.names)
    pool = CandidatePool(cfg, models, LAT, LON)
    out_ref = pool.build(tasks, ref_store, ["M", "P"], progress=False)
    assert out_ref["backgrounds"] == 6 and out_ref["pairs"] > 0

    store = PairStore.open(tmp_path / "killed.zarr", shape, cfg.rewards.names)
    pid_before = ray.get(pool.samplers[0].info.remote())["pid"]
    killed = []

    def kill_once(_out):
        if not killed:
            ray.kill(pool.samplers[0], no_restart=False)
            killed.append(True)

    out = pool.build(tasks, store, ["M", "P"], progress=False, on_commit=kill_once)
    assert killed
    pid_after = ray.get(pool.samplers[0].info.remote())["pid"]
    assert pid_after != pid_before  # the actor was replaced
    assert out["backgrounds"] == 6
    assert store.num_pairs == ref_store.num_pairs
    for mode in ("M", "P"):
        a, b = store.pair_set(mode), ref_store.pair_set(mode)
        assert sorted(map(bytes, a.hash)) == sorted(map(bytes, b.hash))
    # scores are kept per candidate and pairs respect them
    sc = store.scores()
    ps = store.pair_set("P")
    assert np.all(sc["phys"][ps.winner] > sc["phys"][ps.loser])
    # reselecting with the same weights from the stored scores gives back the stored pairs
    for mode in ("M", "P"):
        re = store.reselect(cfg.rewards.weights, mode, cfg.pairs.pairs_per_background, cfg.run.seed,
                            cfg.pairs.top_k_phys, cfg.pairs.decile)
        assert sorted(map(bytes, re.hash)) == sorted(map(bytes, store.pair_set(mode).hash))
    # a rerun finds everything done
    again = pool.build(tasks, store, ["M", "P"], progress=False)
    pool.shutdown()
    assert again["backgrounds"] == 0 and store.num_pairs == ref_store.num_pairs


def test_weight_sync_and_stale_restart(tmp_path, ray_session):
    import ray

    from actors.pool import CandidatePool

    cfg, ws, models, truth, bg, _ = tiny_world(tmp_path, ["actors.samplers=1", "actors.rewarders=1"])
    tasks = _tasks(cfg, truth, bg, models, 2)
    pool = CandidatePool(cfg, models, LAT, LON)
    sd = {k: v + 0.01 for k, v in models.eps_model.state_dict().items()}
    secs = pool.set_weights(sd, 3)
    assert secs > 0 and ray.get(pool.samplers[0].info.remote())["version"] == 3
    # a restarted sampler comes back with version 0 and is re-synced by the pool
    ray.kill(pool.samplers[0], no_restart=False)
    store = PairStore.open(tmp_path / "s.zarr", models.codec.latent_shape, cfg.rewards.names)
    out = pool.build(tasks, store, ["M"], progress=False)
    assert out["backgrounds"] == 2
    assert set(store.backgrounds()["version"].tolist()) == {3}
    assert ray.get(pool.samplers[0].info.remote())["version"] == 3
    pool.shutdown()
