"""Asynchronous online DPO on the tiny world with the real actors and one Ray Train learner: the
learner trains from the live buffer within the bounds, validation keeps best.pt beside it, the
loop's measures are written, and a second call with more steps resumes (docs/method.md §9.4)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from .tiny_align import LAT, LON, tiny_world


@pytest.mark.slow
def test_async_run_trains_from_the_live_buffer_and_resumes(tmp_path, ray_session):
    from actors import install
    from actors.pool import CandidatePool

    from align_rl.alignment.async_loop import METRICS_JSON, run_async
    from align_rl.alignment.buffer import read_takes
    from align_rl.alignment.candidates import background_order, make_tasks, valid_times
    from align_rl.alignment.validation import ranking_weights
    from align_rl.config import config_from_dict
    from align_rl.io.pair_store import PairStore

    s, u, k = 1, 2, 2
    cfg, ws, models, truth, bg, ref = tiny_world(tmp_path, [
        "dpo.mode=async", "dpo.steps=6", f"dpo.sync_every={k}", f"dpo.staleness={s}", f"dpo.reuse={u}",
        "dpo.checkpoint_every=2", "dpo.val_every=2", "dpo.val_backgrounds=1", "dpo.val_members=2",
        "pairs.decile=0.34"])
    fh = cfg.rewards.forecast_hours
    times = valid_times(truth.times, bg.times, "2004-01-01", "2004-12-31", fh)
    order = background_order(len(times), cfg.run.seed)
    tasks_for = lambda ids: make_tasks(ids, times, truth, bg, models.normalizer, fh)  # noqa: E731
    validation = {"codec": models.codec, "forecaster": models.forecaster, "normalizer": models.normalizer,
                  "lat": LAT, "lon": LON, "tasks": tasks_for([int(order[-1])]),
                  "weights": ranking_weights("M", cfg.rewards.weights)}
    out = ws.dpo / "M-async"
    store_path = ws.root / "pairs-async-M.zarr"

    def run(c):
        return run_async(c, install(), lambda cc: CandidatePool(cc, models, LAT, LON), store_path,
                         models.codec.latent_shape, tasks_for, order[:-1], ref, "M", out,
                         progress=False, log=print, validation=validation)

    res = run(cfg)
    assert res.step == 6 and res.version == 3 and res.checkpoint.name == "best.pt"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 7))
    m = json.loads((out / METRICS_JSON).read_text())
    assert lines[-1]["loop/overlap"] == m["loop/overlap"] and 0 < m["loop/overlap"] <= 1
    assert m["loop/steps"] == 6 and m["loop/publishes"] == 2 and m["loop/staleness_max"] <= s
    takes = read_takes(out / "takes.jsonl")
    assert [t["step"] for t in takes] == list(range(6))
    assert max(t["current"] - v for t in takes for v in t["versions"]) <= s
    assert max(Counter(h for t in takes for h in t["pairs"]).values()) <= u
    vals = [json.loads(x) for x in (out / "validation.jsonl").read_text().splitlines()]
    assert {v["version"] for v in vals} >= {3}  # the final policy at least, off the learner's path
    store = PairStore.open(store_path, mode="r")
    assert len({tuple(x) for x in zip(store.backgrounds()["bg_id"], store.backgrounds()["version"])}) \
        == store.num_backgrounds  # no group committed twice

    c2 = config_from_dict(cfg.to_dict())
    c2.dpo.steps = 8
    res2 = run(c2)  # a rerun with more steps continues from the learner's state and the buffer
    assert res2.step == 8
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 9))
    assert [t["step"] for t in read_takes(out / "takes.jsonl")] == list(range(8))
