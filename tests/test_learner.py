"""The DPO learner on Ray Train: trains, checkpoints, resumes, survives a worker crash."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from align_rl.checkpoints import load_model
from align_rl.learner import read_state, run_dpo
from align_rl.pair_store import CandidateGroup, PairStore
from align_rl.pairs import background_pairs

from .tiny_align import tiny_config, tiny_models

pytestmark = pytest.mark.ray


def _setup(tmp_path, extra=None):
    from align_rl.checkpoints import save_model
    from align_rl.workspace import Workspace

    cfg = tiny_config(tmp_path, extra)
    ws = Workspace.from_config(cfg)
    codec, dit, _ = tiny_models(cfg)
    ref = save_model(ws.final_checkpoint("diffusion"), dit, "diffusion", cfg.diffusion)
    shape = codec.latent_shape
    st = PairStore.open(ws.pairs, shape, ["assim"])
    rng = np.random.default_rng(0)
    groups = []
    for b in range(4):
        zb = rng.normal(size=shape).astype(np.float32)
        lat = rng.normal(size=(6, *shape)).astype(np.float32)
        sc = {"assim": -np.abs(lat - zb).mean(axis=(1, 2, 3))}  # closer to z_b is better
        pl = background_pairs(sc, "M", {"assim": 1.0}, 4, rng, decile=0.34)
        groups.append(CandidateGroup(b, b, 0, "dps", zb, lat, sc, {"M": pl}))
    st.append(groups)
    return cfg, ws, ref, st


@pytest.mark.slow
def test_run_dpo_trains_checkpoints_and_resumes(tmp_path, ray_session):
    cfg, ws, ref, st = _setup(tmp_path, ["run.wandb_mode=offline"])
    res = run_dpo(cfg, ws, ws.pairs, ref, steps=4, progress=False)
    assert res.version == 1 and res.step == 4
    for k in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
              "model_minus_ref/chosen", "model_minus_ref/rejected", "grad_norm", "learning_rate"):
        assert k in res.metrics and np.isfinite(res.metrics[k])
    assert res.metrics["learning_rate"] == pytest.approx(cfg.dpo.lr)
    pol, meta = load_model(res.checkpoint, "diffusion")
    base, _ = load_model(ref, "diffusion")
    assert meta["extra"]["dpo_version"] == 1 and meta["extra"]["dpo_step"] == 4
    diff = sum(float((a - b).abs().sum()) for a, b in zip(pol.state_dict().values(), base.state_dict().values()))
    assert diff > 0
    lines = [json.loads(x) for x in (ws.dpo / "M" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert list((ws.dpo / "M" / "wandb").glob("**/offline-run-*")), "no offline wandb run"
    # a second call with more steps continues from step 4 and publishes version 2
    res2 = run_dpo(cfg, ws, (st, st.pair_set("M")), ref, steps=6, progress=False)
    assert res2.version == 2 and res2.step == 6
    assert [h["step"] for h in res2.history] == [1, 2, 3, 4, 5, 6]
    # nothing left to do: returns at once with the same result
    res3 = run_dpo(cfg, ws, ws.pairs, ref, steps=6, progress=False)
    assert res3.version == 2 and res3.step == 6


@pytest.mark.slow
def test_worker_crash_resumes_from_checkpoint(tmp_path, ray_session):
    cfg, ws, ref, st = _setup(tmp_path, ["dpo.max_failures=1"])
    marker = tmp_path / "crashed"
    res = run_dpo(cfg, ws, ws.pairs, ref, steps=4, progress=False,
                  crash={"at_step": 2, "marker": str(marker)})
    assert marker.exists() and res.step == 4 and res.version == 1
    assert [h["step"] for h in read_state(ws.dpo / "M")["history"]] == [1, 2, 3, 4]
    # the resumed run equals an uninterrupted one (batches and noise are drawn from the step)
    cfg2, ws2, ref2, _ = _setup(tmp_path / "b")
    res2 = run_dpo(cfg2, ws2, ws2.pairs, ref2, steps=4, progress=False)
    a, _ = load_model(res.checkpoint, "diffusion")
    b, _ = load_model(res2.checkpoint, "diffusion")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y)
