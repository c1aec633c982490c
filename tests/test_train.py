"""The main job on a tiny configuration: end to end, killed and rerun (resume); online rounds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .tiny_align import LAT, LON, OVERRIDES, TRAIN_OVERRIDES, tiny_world, write_tiny_world

REPO = Path(__file__).resolve().parents[1]


def _launch(args, log):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "align_rl.train", *args], cwd=REPO, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _kill_when(proc, cond, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {what}")
        got = cond()
        if got is not None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
            proc.wait()
            return got
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_main_job_end_to_end_and_resume_after_kills(tmp_path):
    world = write_tiny_world(tmp_path / "world.zarr")
    run = tmp_path / "run"
    args = OVERRIDES + TRAIN_OVERRIDES + [f"data.path={world}", f"run.workdir={run}",
                                          "dpo.steps=30", "dpo.checkpoint_every=2"]
    commit = run / "pairs.zarr" / "COMMIT"

    def pairs_done():
        if commit.exists():
            c = json.loads(commit.read_text())
            return c if c["backgrounds"] == 4 else None
        return None

    c1 = _kill_when(_launch(args, tmp_path / "log1.txt"), pairs_done, 900, "the pairs commit")

    def dpo_midway():
        for st in (run / "dpo").glob("M-*/metrics.jsonl"):
            steps = [json.loads(x)["step"] for x in st.read_text().splitlines()]
            if steps and steps[-1] < 30:
                return steps[-1]
        return None

    k = _kill_when(_launch(args, tmp_path / "log2.txt"), dpo_midway, 600, "a DPO checkpoint")
    assert 2 <= k < 30
    log2 = (tmp_path / "log2.txt").read_text(errors="replace")
    assert "pairs: 0 new" in log2  # the second launch reused the committed pairs

    p = _launch(args, tmp_path / "log3.txt")
    assert p.wait(timeout=900) == 0, (tmp_path / "log3.txt").read_text(errors="replace")[-3000:]
    assert json.loads(commit.read_text()) == c1  # no pair was drawn again
    (dpo,) = list((run / "dpo").glob("M-*"))
    steps = [json.loads(x)["step"] for x in (dpo / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))  # resumed from step k, nothing trained twice
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["variants"]["M"]["version"] == 1 and summary["variants"]["M"]["step"] == 30
    report = (run / "eval" / "report.md").read_text()
    assert "Alignment against the paper" in report
    assert "Align-ObsFree-M" in report and "Align-DPS-M" in report


@pytest.mark.slow
def test_online_rounds_sync_weights_and_drop_stale_pairs(tmp_path, ray_session):
    from actors.pool import CandidatePool

    from align_rl.alignment.candidates import background_order, make_tasks, valid_times
    from align_rl.alignment.online import run_online
    from align_rl.io.pair_store import PairStore

    cfg, ws, models, truth, bg, ref = tiny_world(tmp_path, [
        "dpo.mode=online", "dpo.steps=4", "dpo.sync_every=2", "dpo.staleness=0",
        "dpo.online_backgrounds=2", "pairs.backgrounds=2", "pairs.decile=0.34"])
    fh = cfg.rewards.forecast_hours
    times = valid_times(truth.times, bg.times, "2004-01-01", "2004-12-31", fh)
    order = background_order(len(times), cfg.run.seed)
    tasks_for = lambda ids: make_tasks(ids, times, truth, bg, models.normalizer, fh)  # noqa: E731
    store = PairStore.open(ws.pairs, models.codec.latent_shape, cfg.rewards.names)
    pool = CandidatePool(cfg, models, LAT, LON)
    try:
        res = run_online(cfg, ws, pool, store, tasks_for, order, ref, "M", ws.dpo / "online",
                         progress=False, log=lambda m: None)
    finally:
        pool.shutdown()
    assert res.version == 2 and res.step == 4
    b = store.backgrounds()
    assert sorted(set(b["version"].tolist())) == [0, 1]
    assert len(set(b["bg_id"][b["version"] == 1]) & set(b["bg_id"][b["version"] == 0])) == 0  # new backgrounds
    assert np.all(store.pair_set("M").version >= 1)  # staleness 0: version-0 pairs left
    rec = json.loads((ws.dpo / "online" / "online.json").read_text())
    assert [r["round"] for r in rec] == [0, 1] and rec[1]["sync_s"] > 0
    assert rec[1]["version"] == 1 and rec[1]["result_version"] == 2


def test_bad_config_fails_fast_with_exit_2(tmp_path, capsys):
    from align_rl.train import main

    for args, msg in ((["rewards.names=[assim,nope]", "pairs.variants=[M]"], "unknown reward"),
                      (["rewards.names=[assim]", "rewards.weights={assim: 1}", "pairs.variants=[M,P]"],
                       "add phys"),
                      (["pairs.variants=[X]"], "pairs.variants")):
        with pytest.raises(SystemExit) as e:
            main(args + [f"run.workdir={tmp_path}"])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "world.zarr").exists()  # nothing expensive started


def test_pair_store_of_other_inputs_is_set_aside_and_reused(tmp_path):
    from align_rl.pipeline import open_pair_store
    from align_rl.workspace import Workspace

    from .test_pair_store import SHAPE, group
    from .tiny_align import tiny_config

    ref = tmp_path / "ref.pt"
    ref.write_bytes(b"reference weights")
    cfg_a = tiny_config(tmp_path, ["rewards.names=[assim, phys]", "rewards.weights={assim: 1, phys: 1}"])
    ws = Workspace.from_config(cfg_a)
    st = open_pair_store(cfg_a, ws, SHAPE, ref, log=lambda m: None)
    st.append([group(0), group(1)])
    n = st.num_pairs
    cfg_b = tiny_config(tmp_path, ["rewards.names=[assim, phys]", "rewards.weights={assim: 1, phys: 1}",
                                   "sampler.steps=5"])
    st_b = open_pair_store(cfg_b, ws, SHAPE, ref, log=lambda m: None)
    assert st_b.path == ws.pairs and st_b.num_pairs == 0  # fresh store for the new inputs
    assert len(list(tmp_path.glob("pairs-*.zarr"))) == 1  # the old one kept aside
    st_a = open_pair_store(cfg_a, ws, SHAPE, ref, log=lambda m: None)
    assert st_a.num_pairs == n  # switching back reuses the first store
    assert len(list(tmp_path.glob("pairs-*.zarr"))) == 1
