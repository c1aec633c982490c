"""``bench/online_vs_offline.py`` on the tiny world: the three arms train with their seeds, the
offline arm at equal candidates gets the async runs' count, each async seed keeps its own buffer
within the staleness bound, and the report holds the verdict tables (docs/method.md §9.4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .tiny_align import OVERRIDES, TRAIN_OVERRIDES, write_tiny_world

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_online_against_offline_at_equal_candidates(tmp_path):
    world = write_tiny_world(tmp_path / "world.zarr")
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    args = [sys.executable, str(REPO / "bench" / "online_vs_offline.py"), "--split", "val", "--seeds", "2",
            *OVERRIDES, *TRAIN_OVERRIDES, f"data.path={world}", f"run.workdir={run}",
            "dpo.steps=4", "dpo.sync_every=2", "dpo.staleness=1", "dpo.reuse=2", "guidance.methods=[obsfree]"]
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    out = run / "study" / "online-vs-offline-val"
    info = json.loads((out / "online_vs_offline.json").read_text())
    arms = info["arms"]
    assert set(arms) == {"offline", "async", "offline-equal"}
    assert arms["offline"]["candidates"] == 4 * 6  # pairs.backgrounds × pairs.candidates
    dirs = [r["dir"] for r in arms["async"]["runs"]]
    assert len(set(dirs)) == 2 and all((Path(d) / "buffer.zarr").exists() for d in dirs)
    for s in arms["async"]["per_seed"]:
        assert s["loop/staleness_max"] <= 1 and s["candidates"] >= 4 * 6  # the warm start at least
    want = arms["async"]["candidates"] / 6
    assert arms["offline-equal"]["backgrounds"] == min(info["usable_pref_times"], round(want))
    assert len({r["checkpoint"] for a in arms.values() for r in a["runs"]}) >= 4
    models = {ln["model"] for ln in info["vs_reference"]}
    assert models == {"Align-offline", "Align-async", "Align-equal"}
    assert {ln["model"] for ln in info["async_vs_equal"]} == {"Align-async"}
    assert all(len(ln["seeds"]) == 2 for ln in info["vs_reference"])
    md = (out / "online_vs_offline.md").read_text()
    assert "Align-async against Align-equal" in md and "| async seed | overlap |" in md
