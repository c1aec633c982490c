"""Pretraining on Ray Train: datasets, the schedule, a worker crash mid-run, DDP, the cache.

The reference world advects every field eastward by one grid column per 6 h (see
``tests/test_backgrounds.py``): a forecaster can learn it, persistence cannot.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from align_rl.config import load_config
from align_rl.io.grid import Grid
from align_rl.training.datasets import (
    FrameDataset,
    LatentPairDataset,
    SequenceDataset,
    consecutive_starts,
    draw_indices,
)
from align_rl.training.loop import lr_at

from .test_backgrounds import _times, advecting_states

H6 = np.timedelta64(6, "h")


# ----------------------------------------------------------------------------- no Ray


def test_consecutive_starts_skip_gaps_between_members():
    t = _times(["2000-01-01", "2001-01-01"], 5)  # two members of 5 frames
    assert consecutive_starts(t, 3).tolist() == [0, 1, 2, 5, 6, 7]
    assert consecutive_starts(t, 5).tolist() == [0, 5]
    assert consecutive_starts(t, 6).tolist() == []
    t2 = np.delete(t, 2)  # a missing frame in the first member
    assert consecutive_starts(t2, 2).tolist() == [0, 2, 4, 5, 6, 7]


def test_datasets_return_the_frames_they_index():
    t = _times(["2000-01-01", "2001-01-01"], 4)
    v = np.arange(8, dtype=np.float32)[:, None, None, None] * np.ones((1, 69, 2, 4), np.float32)
    seq = SequenceDataset(v, t, 3)
    assert len(seq) == 4
    x0, x1, x2 = seq.batch(np.array([1, 2]))
    # sample 1 starts at frame 1, sample 2 at frame 4 (the second member)
    assert x0[:, 0, 0, 0].tolist() == [1, 4] and x2[:, 0, 0, 0].tolist() == [3, 6]
    assert torch.equal(seq[2][1], torch.from_numpy(v[5]))
    frames = FrameDataset(v)
    assert frames.batch(np.array([7, 0]))[0][:, 0, 0, 0].tolist() == [7, 0]
    z = np.random.default_rng(0).standard_normal((5, 4, 2, 2)).astype(np.float32)
    pairs = LatentPairDataset(z, -z)
    a, b = pairs.batch(np.array([3]))
    assert torch.equal(a, -b) and torch.equal(a[0], torch.from_numpy(z[3]))


def test_batches_depend_on_seed_step_rank_only():
    a = draw_indices(100, 8, seed=0, step=5, rank=0)
    assert np.array_equal(a, draw_indices(100, 8, seed=0, step=5, rank=0))
    assert len(set(a.tolist())) == 8  # without replacement
    assert not np.array_equal(a, draw_indices(100, 8, seed=0, step=5, rank=1))
    assert not np.array_equal(a, draw_indices(100, 8, seed=0, step=6, rank=0))
    assert len(draw_indices(3, 8, 0, 0)) == 8  # fewer samples than a batch: with replacement


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    steps, lr = 1000, 1e-3  # warm-up over min(100, steps/10) = 100 steps
    assert lr_at(0, steps, lr) == pytest.approx(1e-5)
    assert lr_at(99, steps, lr) == pytest.approx(1e-3)
    assert lr_at(100, steps, lr) == pytest.approx(1e-3)
    mid = 100 + (steps - 100) // 2  # half way through the cosine: 0.1 + 0.9 * 0.5
    assert lr_at(mid, steps, lr) == pytest.approx(0.55e-3)
    assert lr_at(steps, steps, lr) == pytest.approx(1e-4)


# ----------------------------------------------------------------------------- Ray Train


def _forecaster_job(n_times: int = 24):
    import ray

    truth = advecting_states(_times(["2000-01-01"], n_times))
    from align_rl.io.era5 import load_normalizer
    from align_rl.training.datasets import normalized_values

    norm = normalized_values(truth, load_normalizer(truth))
    ref = ray.put({"values": norm, "times": truth.times})
    return {"model_cfg": {"hidden": 8, "depth": 1}, "grid": [8, 16], "data": {"train": ref, "val": ref},
            "lr": 3e-3, "batch_size": 4, "seed": 0, "wandb": {"mode": "disabled"}, "progress": False}


def _replay(job: dict, world: int) -> dict:
    """The same optimisation without Ray: each step averages the gradients of the ``world``
    workers' batches (what DDP's all-reduce does), then clips and steps."""
    import ray

    from align_rl.training.datasets import draw_indices
    from align_rl.training.loop import lr_at, per_worker_batch, step_generator
    from align_rl.training.tasks import TASKS

    task = TASKS["forecaster"]
    torch.manual_seed(job["seed"])
    model = task.build(job)
    opt = torch.optim.AdamW(model.parameters(), lr=job["lr"], weight_decay=0.0)
    ds = task.dataset(ray.get(job["data"]["train"]))
    per = per_worker_batch(job["batch_size"], world)
    for step in range(job["steps"]):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, job["steps"], job["lr"])
        opt.zero_grad()
        for rank in range(world):
            batch = ds.batch(draw_indices(len(ds), per, job["seed"], step, rank))
            loss, _ = task.loss(model, batch, step_generator(job["seed"], step, rank), job)
            (loss / world).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.state_dict()


@pytest.mark.ray
def test_ddp_worker_crash_resumes_from_the_last_checkpoint(tmp_path, ray_session):
    """Two DDP workers (gloo); rank 0 dies (os._exit) after the checkpoint of step 20. The worker
    group restarts and continues from step 20 (not 0): the step counter runs on, and the final
    weights are those of an uninterrupted two-worker optimisation replayed here without Ray.
    The model learns the advection: one 6 h step beats persistence clearly."""
    from align_rl.config import PretrainConfig
    from align_rl.training.harness import run_training

    pre = PretrainConfig(num_workers=2, cpus_per_worker=1, checkpoint_every=10, val_every=10, max_failures=2)
    job = dict(_forecaster_job(), steps=40, lr=1e-2)
    marker = tmp_path / "crashed"
    res = run_training("forecaster", dict(job, crash={"at_step": 15, "marker": str(marker)}),
                       pre, tmp_path / "ray", "crash")
    assert marker.read_text().startswith("crashed after step 20")
    assert res.starts == [0, 20]  # the second attempt started from the step-20 checkpoint
    assert [h["step"] for h in res.history] == [10, 20, 30, 40]  # none redone, none skipped
    assert [h["attempt"] for h in res.history] == [1, 1, 2, 2]

    # equal up to float round-off (all-reduce order), which Adam amplifies where gradients are
    # ~0; a run restarted from step 0 or without the optimiser state is ~100x further off
    ref = _replay(job, world=2)
    diff = sum(float(torch.sum((res.state_dict[k] - v) ** 2)) for k, v in ref.items())
    norm = sum(float(torch.sum(v**2)) for v in ref.values())
    assert diff**0.5 < 1e-3 * norm**0.5, (diff**0.5, norm**0.5)
    m = res.metrics
    assert m["step"] == 40
    assert m["val/rmse_6h"] < 0.5 * m["val/rmse_persistence"], m


@pytest.mark.ray
def test_early_stopping_stops_every_worker_and_returns_the_best_model(tmp_path, ray_session):
    """Two DDP workers, learning rate 0: the validation loss never falls below the starting
    model's, so with val_every 5 and patience 2 the run stops at step 10 of 40 on both workers
    (the broadcast agrees) and returns the starting weights as the best model."""
    from align_rl.config import PretrainConfig
    from align_rl.training.harness import run_training
    from align_rl.training.tasks import TASKS

    pre = PretrainConfig(num_workers=2, cpus_per_worker=1, checkpoint_every=20, val_every=250, max_failures=0)
    job = dict(_forecaster_job(), steps=40, lr=0.0, val_every=5, patience=2)
    res = run_training("forecaster", job, pre, tmp_path / "ray", "patience")
    m = res.metrics
    assert (m["best_step"], m["last_step"], m["stopped_early"]) == (0, 10, True), m
    assert [h["step"] for h in res.history if "val/loss" in h] == [5, 10]
    torch.manual_seed(job["seed"])
    start = TASKS["forecaster"].build(job).state_dict()
    assert all(torch.equal(res.state_dict[k], v) for k, v in start.items())


def _tiny_store(tmp_path):
    from align_rl.io.store import write_states

    g = Grid(16, 32)
    times = _times(["2000-01-01", "2001-01-01"], 24)
    rng = np.random.default_rng(1)
    base = rng.standard_normal((69, g.nlat, g.nlon))
    k = ((times - times[0]) // H6).astype(int)
    vals = np.stack([100.0 + 10.0 * np.roll(base, int(s), axis=-1) for s in k]).astype(np.float32)
    from align_rl.io.normalization import Normalizer
    from align_rl.io.states import States

    st = States(vals, times, g.lat, g.lon, {"normalization": Normalizer.fit(vals[:24]).to_dict()})
    return write_states(tmp_path / "tiny.zarr", st)


TINY = [
    "data.grid=16x32", "data.train=[2000-01-01, 2000-12-31]", "data.val=[2001-01-01, 2001-12-31]",
    "forecaster.hidden=8", "forecaster.depth=1", "forecaster.steps=6", "forecaster.batch_size=4",
    "vae.embed_dim=16", "vae.depth=1", "vae.heads=2", "vae.window=4", "vae.latent_channels=4",
    "vae.steps=6", "vae.batch_size=4",
    "diffusion.embed_dim=16", "diffusion.depth=1", "diffusion.heads=2", "diffusion.steps=6",
    "diffusion.batch_size=4", "pretrain.checkpoint_every=3", "pretrain.val_every=3",
    "pretrain.background_batch=8", "actors.forecasters=1", "run.wandb_mode=disabled",
    "checks.units=false",  # random fields around 100, not physical values (align_rl.io.plausibility)
]


@pytest.mark.ray
@pytest.mark.slow
def test_pretrain_all_trains_caches_and_retrains_what_changed(tmp_path, ray_session, capsys, monkeypatch):
    from align_rl.training.pretraining import SUMMARY_FILE
    from align_rl.pretrain import main
    from align_rl.workspace import Workspace

    store = _tiny_store(tmp_path)
    args = ["all", f"run.workdir={tmp_path / 'run'}", "data.source=zarr", f"data.path={store}", *TINY]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "VAE reconstruction MSE" in out and "climatology" in out and "persistence" in out
    cfg = load_config(overrides=args[1:])
    ws = Workspace.from_config(cfg)
    summary = json.loads((ws.root / SUMMARY_FILE).read_text())
    for k in ("forecaster_rmse_6h", "persistence_rmse_6h", "background_rmse_48h", "climatology_rmse",
              "vae_recon_mse", "diffusion_val_loss"):
        assert np.isfinite(summary[k]), k
    assert summary["background_times"] == 24 - 9
    assert ws.backgrounds.exists()
    mtimes = {s: ws.final_checkpoint(s).stat().st_mtime_ns for s in ("forecaster", "vae", "diffusion")}

    # a rerun reuses the three checkpoints
    from align_rl.training.pretraining import ensure_pretrained

    models = ensure_pretrained(cfg, ws)
    assert {s: ws.final_checkpoint(s).stat().st_mtime_ns for s in mtimes} == mtimes
    assert models.codec.latent_shape == (4, 4, 8) and models.eps_model is not None

    # a changed diffusion config retrains the diffusion model only (and reuses the backgrounds)
    import align_rl.training.pretraining as pt

    trained = []

    def fake_train(cfg, ws, stage, *a, **k):
        trained.append(stage)
        raise RuntimeError("stop here")

    monkeypatch.setattr(pt, "_train", fake_train)
    with pytest.raises(RuntimeError, match="stop here"):
        ensure_pretrained(load_config(overrides=args[1:] + ["diffusion.lr=0.002"]), ws)
    assert trained == ["diffusion"]
    # a changed VAE retrains the VAE first (and then the diffusion model, whose latents changed)
    with pytest.raises(RuntimeError, match="stop here"):
        ensure_pretrained(load_config(overrides=args[1:] + ["vae.kl_weight=0.001"]), ws)
    assert trained == ["diffusion", "vae"]


def test_cli_rejects_a_bad_stage_and_a_bad_key(tmp_path, capsys):
    from align_rl.pretrain import main

    with pytest.raises(SystemExit) as e:
        main(["everything"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["vae", f"run.workdir={tmp_path}", "vae.stepz=3"])
    assert e.value.code == 2
    assert "stepz" in capsys.readouterr().err
