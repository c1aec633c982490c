"""Tiny stand-in models and data for the alignment tests (8 × 16 grid, 4-channel 2 × 4 latent)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from align_rl.config import load_config
from align_rl.io.normalization import Normalizer
from align_rl.io.schema import N_CHANNELS
from align_rl.io.states import States
from align_rl.workspace import Workspace

H, W = 8, 16
LAT = np.arange(-90 + 90 / H, 90, 180 / H)
LON = np.arange(0, 360, 360 / W)

OVERRIDES = [
    "data.grid=8x16",
    "vae.latent_channels=4", "vae.embed_dim=16", "vae.depth=1", "vae.heads=2", "vae.window=2",
    "diffusion.embed_dim=16", "diffusion.depth=1", "diffusion.heads=2",
    "forecaster.hidden=8", "forecaster.depth=1",
    "sampler.steps=3", "sampler.corrections=0",
    "pairs.candidates=6", "pairs.backgrounds=4", "pairs.pairs_per_background=3", "pairs.decile=0.2",
    "pairs.top_k_phys=2", "pairs.guidance=repaint",
    "dpo.batch_size=4", "dpo.steps=4", "dpo.checkpoint_every=2", "dpo.beta=500", "dpo.lr=0.001",
    "dpo.warmup_steps=0", "dpo.val_every=0", "dpo.cpus_per_worker=1", "dpo.seeds=1",
    "actors.batch_size=1", "run.wandb_mode=disabled",
]


def tiny_config(tmp_path: Path, extra: list[str] | None = None):
    return load_config(overrides=OVERRIDES + [f"run.workdir={tmp_path}"] + list(extra or []))


def tiny_states(times: np.ndarray, seed: int = 0) -> tuple[States, Normalizer]:
    """Smooth random physical states with a plausible 500 hPa geopotential and winds."""
    rng = np.random.default_rng(seed)
    mean = np.linspace(100.0, 5000.0, N_CHANNELS)
    std = np.linspace(1.0, 50.0, N_CHANNELS)
    la, lo = np.meshgrid(np.deg2rad(LAT), np.deg2rad(LON), indexing="ij")
    T = len(times)
    vals = np.empty((T, N_CHANNELS, H, W), np.float32)
    for i in range(T):
        a = rng.normal(size=(N_CHANNELS, 3))
        field = (a[:, :1, None] * np.sin(2 * la + i / 7)[None] + a[:, 1:2, None] * np.cos(lo + i / 5)[None]
                 + 0.3 * a[:, 2:, None] * np.sin(la) * np.cos(2 * lo)[None])
        vals[i] = mean[:, None, None] + std[:, None, None] * field
    return States(vals, times, LAT, LON), Normalizer(mean, std)


def tiny_models(cfg, seed: int = 0):
    from align_rl.models.dit import build_dit
    from align_rl.models.forecaster import EmulatorForecaster, EmulatorNet
    from align_rl.models.vae import LatentCodec, build_vae

    torch.manual_seed(seed)
    vae = build_vae(cfg.vae, (H, W))
    codec = LatentCodec(vae, torch.zeros(4), torch.ones(4)).eval()
    dit = build_dit(cfg.diffusion, codec.latent_shape)
    with torch.no_grad():  # leave the zero-initialised output: give the network a real response
        for lin in (dit.out, dit.final_ada):
            lin.weight.normal_(0, 0.05)
        for b in dit.blocks:
            b.ada.weight.normal_(0, 0.05)
    dit.eval()
    net = EmulatorNet(hidden=8, depth=1)
    with torch.no_grad():
        net.head.weight.normal_(0, 0.01)
    fc = EmulatorForecaster(net).eval()
    return codec, dit, fc


def tiny_world(tmp_path: Path, extra: list[str] | None = None, n_times: int = 24):
    """Config, workspace, models (namespace: codec, eps_model, forecaster, normalizer), truth and
    backgrounds (the truth plus a perturbation), and the reference checkpoint path."""
    from align_rl.io.checkpoints import save_model

    cfg = tiny_config(tmp_path, extra)
    ws = Workspace.from_config(cfg)
    times = np.datetime64("2004-01-01T00", "ns") + np.arange(n_times) * np.timedelta64(6, "h")
    truth, norm = tiny_states(times)
    rng = np.random.default_rng(5)
    bg = States(truth.values + (0.5 * norm.std[:, None, None] * rng.normal(size=truth.values.shape)).astype(np.float32),
                times, LAT, LON)
    codec, dit, fc = tiny_models(cfg)
    ref = save_model(ws.final_checkpoint("diffusion"), dit, "diffusion", cfg.diffusion)
    models = SimpleNamespace(codec=codec, eps_model=dit, forecaster=fc, normalizer=norm)
    return cfg, ws, models, truth, bg, ref


def write_tiny_world(path: Path, per_year: int = 24, years=(2000, 2003, 2004, 2005)) -> Path:
    """A WeatherBench2-layout store of smooth random states (8 × 16), ``per_year`` 6-hourly times
    from Jan 1 of each year (train 2000, val 2003, pref 2004, test 2005), with its statistics."""
    from align_rl.io.store import write_states

    vals, times = [], []
    for k, y in enumerate(years):
        t = np.datetime64(f"{y}-01-01T00", "ns") + np.arange(per_year) * np.timedelta64(6, "h")
        s, _ = tiny_states(t, seed=k)
        vals.append(s.values)
        times.append(t)
    st = States(np.concatenate(vals), np.concatenate(times), LAT, LON)
    st.attrs["normalization"] = Normalizer.fit(st.values).to_dict()
    return write_states(path, st)


TRAIN_OVERRIDES = [
    "data.source=zarr", "data.train=[2000-01-01, 2000-12-31]", "data.val=[2003-01-01, 2003-12-31]",
    "data.pref=[2004-01-01, 2004-12-31]", "data.test=[2005-01-01, 2005-12-31]",
    "forecaster.steps=10", "vae.steps=10", "diffusion.steps=10",
    "pretrain.checkpoint_every=10", "pretrain.val_every=10",
    "guidance.methods=[obsfree, dps]", "guidance.dps_zeta=0.01",
    "eval.times=2", "eval.members=2", "eval.map_samples=1", "eval.batch_size=2",
    "checks.units=false",  # smooth random fields, not physical values (align_rl.io.plausibility)
]
