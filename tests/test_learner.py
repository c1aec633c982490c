"""The DPO learner on Ray Train: trains, checkpoints, resumes, survives a worker crash."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from align_rl.io.checkpoints import load_model
from align_rl.alignment.learner import read_state, run_dpo
from align_rl.io.pair_store import CandidateGroup, PairStore
from align_rl.alignment.pairs import background_pairs

from .tiny_align import tiny_config, tiny_models

pytestmark = pytest.mark.ray


def _setup(tmp_path, extra=None):
    from align_rl.io.checkpoints import save_model
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


def _val_context(cfg, n_bg: int = 2):
    """Validation inputs on tiny smooth states: backgrounds = truth + noise."""
    from align_rl.alignment.candidates import BackgroundTask

    from .tiny_align import LAT, LON, tiny_models, tiny_states

    times = np.datetime64("2003-01-01T00", "ns") + np.arange(3 * n_bg) * np.timedelta64(6, "h")
    truth, norm = tiny_states(times, seed=3)
    x = norm.normalize(truth.values.astype(np.float64)).astype(np.float32)
    rng = np.random.default_rng(1)
    tasks = [BackgroundTask(i, int(times[3 * i].astype(np.int64)),
                            (x[3 * i] + 0.3 * rng.standard_normal(x[0].shape)).astype(np.float32),
                            x[3 * i], x[3 * i + 1], x[3 * i + 2]) for i in range(n_bg)]
    codec, _, fc = tiny_models(cfg)
    return {"codec": codec, "forecaster": fc, "normalizer": norm, "lat": LAT, "lon": LON,
            "tasks": tasks, "weights": {"assim": 1.0}}


def test_validator_pairs_draws_and_scores_the_reference_zero(tmp_path):
    """The reference against itself: identical paired draws, a gain of exactly 0; another model
    gets a non-zero gain and its own MSE."""
    from align_rl.alignment.validation import Validator, ranking_weights

    cfg = tiny_config(tmp_path, ["rewards.names=[assim, forecast, phys]", "rewards.forecast_hours=6"])
    v = _val_context(cfg)
    _, ref, _ = tiny_models(cfg)
    val = Validator(v["codec"], v["forecaster"], ref, v["normalizer"], v["lat"], v["lon"], v["tasks"],
                    cfg, ranking_weights("M", cfg.rewards.weights), members=3)
    s = val.score(ref)
    assert abs(s["val/reward_gain"]) < 1e-12 and s["val/mse"] == s["val/mse_ref"]
    _, other, _ = tiny_models(cfg, seed=7)
    s2 = val.score(other)
    assert s2["val/reward_gain"] != 0.0 and s2["val/mse"] != s2["val/mse_ref"]
    assert ranking_weights("P", {"assim": 1.0}) == {"phys": 1.0}


@pytest.mark.slow
def test_run_dpo_keeps_the_best_validated_checkpoint(tmp_path, ray_session):
    cfg, ws, ref, st = _setup(tmp_path, ["dpo.val_every=2", "dpo.val_members=2", "dpo.anchor=1.0",
                                         "dpo.warmup_steps=2", "rewards.names=[assim]",
                                         "pairs.variants=[M]"])
    res = run_dpo(cfg, ws, ws.pairs, ref, steps=4, progress=False, validation=_val_context(cfg))
    vals = [h for h in res.history if "val/reward_gain" in h]
    assert [h["step"] for h in vals] == [2, 4]
    assert res.history[0]["learning_rate"] == pytest.approx(cfg.dpo.lr / 2)  # warm-up
    gains = {0: 0.0, **{h["step"]: h["val/reward_gain"] for h in vals}}
    best = max(gains, key=lambda k: (gains[k], -k))
    assert res.best["step"] == best and res.checkpoint.name == "best.pt"
    _, meta = load_model(res.checkpoint, "diffusion")
    assert meta["extra"]["dpo_step"] == best
    assert any(k.startswith("model_minus_ref/chosen_t") for k in res.history[-1])
