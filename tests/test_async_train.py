"""Asynchronous online DPO on the tiny world with the real actors and one Ray Train learner: the
learner trains from the live buffer within the bounds, validation keeps best.pt beside it, the
loop's measures are written, and a second call with more steps resumes (docs/method.md §9.4)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

if __package__:
    from .tiny_align import LAT, LON, tiny_world
else:  # run as a script by the driver-kill test
    from tests.tiny_align import LAT, LON, tiny_world

REPO = Path(__file__).resolve().parents[1]


def tiny_async_run(tmp_path: Path, steps: int, extra: list[str] | None = None):
    """run_async of pair mode M on the tiny world in ``tmp_path`` (real actors, one learner)."""
    from actors import install
    from actors.pool import CandidatePool

    from align_rl.alignment.async_loop import run_async
    from align_rl.alignment.candidates import background_order, make_tasks, valid_times
    from align_rl.alignment.validation import ranking_weights

    cfg, ws, models, truth, bg, ref = tiny_world(tmp_path, [
        "dpo.mode=async", f"dpo.steps={steps}", "dpo.sync_every=2", "dpo.staleness=1", "dpo.reuse=2",
        "dpo.checkpoint_every=2", "pairs.decile=0.34", *(extra or [])])
    fh = cfg.rewards.forecast_hours
    times = valid_times(truth.times, bg.times, "2004-01-01", "2004-12-31", fh)
    order = background_order(len(times), cfg.run.seed)
    tasks_for = lambda ids: make_tasks(ids, times, truth, bg, models.normalizer, fh)  # noqa: E731
    validation = None
    if int(cfg.dpo.val_every):
        validation = {"codec": models.codec, "forecaster": models.forecaster,
                      "normalizer": models.normalizer, "lat": LAT, "lon": LON,
                      "tasks": tasks_for([int(order[-1])]),
                      "weights": ranking_weights("M", cfg.rewards.weights)}
    return run_async(cfg, install(), lambda cc: CandidatePool(cc, models, LAT, LON),
                     models.codec.latent_shape, tasks_for, order[:-1],
                     ref, "M", ws.dpo / "M-async", progress=False, log=print, validation=validation)


@pytest.mark.slow
def test_killed_driver_rerun_resumes_without_training_a_step_twice(tmp_path):
    from align_rl.alignment.buffer import read_takes
    from align_rl.io.pair_store import PairStore

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", WANDB_MODE="offline", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO))
    out = tmp_path / "dpo" / "M-async"

    def launch(log):
        return subprocess.Popen([sys.executable, str(Path(__file__)), str(tmp_path), "10"], cwd=REPO,
                                env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    p = launch(tmp_path / "log1.txt")
    t0 = time.time()
    while time.time() - t0 < 600:  # kill after the first learner checkpoint
        assert p.poll() is None, (tmp_path / "log1.txt").read_text(errors="replace")[-3000:]
        if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip():
            break
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray it started
    p.wait()
    p = launch(tmp_path / "log2.txt")
    assert p.wait(timeout=900) == 0, (tmp_path / "log2.txt").read_text(errors="replace")[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 11))  # nothing trained twice
    assert [t["step"] for t in read_takes(out / "takes.jsonl")] == list(range(10))
    assert "loop/overlap" in lines[-1]  # the loop's measures came last
    store = PairStore.open(out / "buffer.zarr", mode="r")
    b = store.backgrounds()
    assert len(set(zip(b["bg_id"].tolist(), b["version"].tolist()))) == store.num_backgrounds


@pytest.mark.slow
def test_async_run_trains_from_the_live_buffer_and_resumes(tmp_path, ray_session):
    from align_rl.alignment.async_loop import METRICS_JSON
    from align_rl.alignment.buffer import read_takes
    from align_rl.io.pair_store import PairStore

    s, u = 1, 2
    val = ["dpo.val_every=2", "dpo.val_backgrounds=1", "dpo.val_members=2"]
    out = tmp_path / "dpo" / "M-async"
    store_path = out / "buffer.zarr"
    res = tiny_async_run(tmp_path, 6, val)
    assert res.step == 6 and res.version == 3 and res.checkpoint.name == "best.pt"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 7))
    m = json.loads((out / METRICS_JSON).read_text())
    assert lines[-1]["loop/overlap"] == m["loop/overlap"] and 0 < m["loop/overlap"] <= 1
    assert m["loop/steps"] == 6 and m["loop/publishes"] == 2 and m["loop/staleness_max"] <= s
    takes = read_takes(out / "takes.jsonl")
    assert [t["step"] for t in takes] == list(range(6))
    assert max(t["current"] - v for t in takes for v in t["versions"]) <= s
    assert min(t["current"] - v for t in takes for v in t["versions"]) >= 0  # never a newer version
    assert max(Counter(h for t in takes for h in t["pairs"]).values()) <= u
    vals = [json.loads(x) for x in (out / "validation.jsonl").read_text().splitlines()]
    assert {v["version"] for v in vals} >= {3}  # the final policy at least, off the learner's path
    store = PairStore.open(store_path, mode="r")
    assert len({tuple(x) for x in zip(store.backgrounds()["bg_id"], store.backgrounds()["version"])}) \
        == store.num_backgrounds  # no group committed twice

    res2 = tiny_async_run(tmp_path, 8, val)  # more steps: continues from the learner's state and the buffer
    assert res2.step == 8
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 9))
    assert [t["step"] for t in read_takes(out / "takes.jsonl")] == list(range(8))


if __name__ == "__main__":  # python tests/test_async_train.py <workdir> <steps>
    import actors
    from align_rl.training.harness import init_ray

    actors.install()
    init_ray(num_cpus=4)
    res = tiny_async_run(Path(sys.argv[1]), int(sys.argv[2]))
    print(f"done: step {res.step}, version {res.version}")
