"""Alignment benchmarks at the demo scale; writes its section of BENCHMARKS.md.

``python bench/bench_align.py [--backgrounds 4] [--steps 8] [--no-write]``

1. Pair building throughput (sample → decode → 48 h forecast → rewards → pairs → commit) with 1 and
   2 sampler actors (one reward actor), in one run: pairs/s and backgrounds/s, and the ratio.
   Models are the demo-size networks (32 × 64 grid) with random weights on synthetic states
   (the cost does not depend on the weights); ``pairs.guidance`` = DPS, ``sampler.steps`` reduced
   to ``--steps`` to keep the run short.
2. One Diffusion-DPO step (policy forward + backward on winners and losers, reference forward on
   both, AdamW) against one plain denoising-score-matching step on the winners of the same pairs
   (forward + backward + AdamW), demo DiT, ``dpo.batch_size`` pairs: medians and their ratio.
   Floor ≈ 2.7×: two policy passes with gradients and two reference passes.
3. One online weight sync: ``CandidatePool.set_weights`` (``ray.put`` of the state dict once, then
   every sampler loads it), with 1 and 2 samplers: median seconds.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, replace_section  # noqa: E402
SECTION = "## Alignment (bench/bench_align.py)"


def machine() -> str:
    cpu = cpu_name()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}"


def write_section(text: str) -> None:
    replace_section(SECTION, text)


def synthetic(cfg, n_times: int):
    """Smooth random physical states 6-hourly from 2004-01-01 and their normaliser."""
    from align_rl.io.grid import Grid
    from align_rl.io.normalization import Normalizer
    from align_rl.io.schema import N_CHANNELS
    from align_rl.io.states import States

    g = Grid.parse(cfg.data.grid)
    H, W = g.shape
    la, lo = np.meshgrid(np.deg2rad(g.lat), np.deg2rad(g.lon), indexing="ij")
    rng = np.random.default_rng(0)
    mean, std = np.linspace(100.0, 5e4, N_CHANNELS), np.linspace(1.0, 500.0, N_CHANNELS)
    vals = np.empty((n_times, N_CHANNELS, H, W), np.float32)
    for i in range(n_times):
        a = rng.normal(size=(N_CHANNELS, 3))
        f = (a[:, :1, None] * np.sin(2 * la + i / 7)[None] + a[:, 1:2, None] * np.cos(lo + i / 5)[None]
             + 0.3 * a[:, 2:, None] * np.sin(la) * np.cos(2 * lo)[None])
        vals[i] = mean[:, None, None] + std[:, None, None] * f
    times = np.datetime64("2004-01-01T00", "ns") + np.arange(n_times) * np.timedelta64(6, "h")
    truth = States(vals, times, g.lat, g.lon)
    bg = States(vals + (0.3 * std[:, None, None] * rng.normal(size=vals.shape)).astype(np.float32),
                times, g.lat, g.lon)
    return truth, bg, Normalizer(mean, std)


def demo_models(cfg):
    from align_rl.io.grid import Grid
    from align_rl.models.dit import build_dit
    from align_rl.models.forecaster import EmulatorForecaster, build_emulator
    from align_rl.models.vae import LatentCodec, build_vae

    torch.manual_seed(0)
    g = Grid.parse(cfg.data.grid)
    vae = build_vae(cfg.vae, g)
    C = vae.latent_shape[0]
    codec = LatentCodec(vae, torch.zeros(C), torch.ones(C)).eval()
    dit = build_dit(cfg.diffusion, codec.latent_shape)
    with torch.no_grad():
        dit.out.weight.normal_(0, 0.02)
    fc = EmulatorForecaster(build_emulator(cfg.forecaster, g)).eval()
    return codec, dit.eval(), fc


def timed_pool_builds(cfg, models, truth, bg, n_bg: int, before=None, after=None) -> dict:
    """For 1 and 2 sampler actors: a CandidatePool, one warm-up background per sampler (imports,
    first calls, a GPU context; not timed), then ``n_bg`` backgrounds built and timed.
    ``before(pool) -> state`` runs after the warm-up, ``after(pool, state) -> dict`` right after
    the timed build (extra fields). Returns ``{n: {"seconds", "result", **extra}}``."""
    import tempfile

    from actors.pool import CandidatePool

    from align_rl.alignment.candidates import background_order, make_tasks, valid_times
    from align_rl.io.pair_store import PairStore

    fh = cfg.rewards.forecast_hours
    times = valid_times(truth.times, bg.times, "2004-01-01", "2004-12-31", fh)
    order = background_order(len(times), 0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            pool = CandidatePool(cfg, models, truth.lat, truth.lon, samplers=n)
            warm = make_tasks(order[:n], times, truth, bg, models.normalizer, fh)
            st = PairStore.open(Path(tmp) / f"s{n}.zarr", models.codec.latent_shape, cfg.rewards.names)
            pool.build(warm, st, ["M"], progress=False)
            state = before(pool) if before else None
            tasks = make_tasks(order[n:n + n_bg], times, truth, bg, models.normalizer, fh)
            t0 = time.perf_counter()
            res = pool.build(tasks, st, ["M"], progress=False)
            dt = time.perf_counter() - t0
            extra = after(pool, state) if after else {}
            pool.shutdown()
            out[n] = {"seconds": dt, "result": res, **extra}
    return out


def bench_pairs(cfg, models, truth, bg, n_bg: int) -> dict:
    out = {}
    for n, r in timed_pool_builds(cfg, models, truth, bg, n_bg).items():
        res, dt = r["result"], r["seconds"]
        out[n] = {"seconds": dt, "pairs": res["pairs"], "backgrounds": res["backgrounds"],
                  "pairs_per_s": res["pairs"] / dt, "bg_per_s": res["backgrounds"] / dt}
        print(f"{n} sampler(s): {res['pairs']} pairs from {res['backgrounds']} backgrounds in {dt:.1f} s")
    return out


def bench_steps(cfg, dit, repeats: int = 7) -> dict:
    from align_rl.alignment.dpo import dpo_loss
    from align_rl.models.dit import dsm_loss

    torch.set_num_threads(os.cpu_count() or 1)
    B = int(cfg.dpo.batch_size)
    g = torch.Generator().manual_seed(0)
    shape = dit.latent_shape
    zw, zl, zb = (torch.randn(B, *shape, generator=g) for _ in range(3))
    ref = copy.deepcopy(dit).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    pol = copy.deepcopy(dit).train()
    opt = torch.optim.AdamW(pol.parameters(), lr=1e-5)

    def dpo_step():
        loss, _ = dpo_loss(pol, ref, zw, zl, zb, 8000.0, generator=g)
        opt.zero_grad(); loss.backward(); opt.step()

    def dsm_step():
        loss = dsm_loss(pol, zw, zb, generator=g)
        opt.zero_grad(); loss.backward(); opt.step()

    times = {"dpo": [], "dsm": []}
    for f in (dpo_step, dsm_step):  # warm-up
        f()
    for _ in range(repeats):  # interleaved, side by side
        for name, f in (("dpo", dpo_step), ("dsm", dsm_step)):
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    d, s = statistics.median(times["dpo"]), statistics.median(times["dsm"])
    print(f"DPO step {d * 1e3:.0f} ms, DSM step {s * 1e3:.0f} ms, ratio {d / s:.2f}")
    return {"dpo_s": d, "dsm_s": s, "ratio": d / s, "batch": B}


def bench_sync(cfg, models, truth, repeats: int = 5) -> dict:
    import ray

    from actors.pool import CandidatePool

    out = {}
    sd = models.eps_model.state_dict()
    for n in (1, 2):
        pool = CandidatePool(cfg, models, truth.lat, truth.lon, samplers=n)
        ray.get([s.info.remote() for s in pool.samplers])  # started
        ts = [pool.set_weights(sd, v + 1) for v in range(repeats)]
        pool.shutdown()
        out[n] = statistics.median(ts)
        print(f"weight sync to {n} sampler(s): {out[n] * 1e3:.0f} ms")
    mb = sum(v.numel() * v.element_size() for v in sd.values()) / 2**20
    return {"by_samplers": out, "state_mb": mb}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backgrounds", type=int, default=4, help="timed backgrounds per run")
    p.add_argument("--steps", type=int, default=8, help="sampler steps (demo: 32)")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from align_rl.config import load_config

    cfg = load_config(overrides=[f"sampler.steps={a.steps}", "pairs.guidance=dps", "actors.batch_size=1",
                                 "run.wandb_mode=disabled"])
    load0 = os.getloadavg()[0]
    codec, dit, fc = demo_models(cfg)
    truth, bg, norm = synthetic(cfg, 24 + 2 * a.backgrounds + 16)
    models = SimpleNamespace(codec=codec, eps_model=dit, forecaster=fc, normalizer=norm)
    steps = bench_steps(cfg, dit)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]}})
    try:
        pairs = bench_pairs(cfg, models, truth, bg, a.backgrounds)
        sync = bench_sync(cfg, models, truth)
    finally:
        ray.shutdown()
    p1, p2 = pairs[1], pairs[2]
    text = f"""{SECTION}

Machine: {machine()}; measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, other jobs
sharing the machine (1-min load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end). Demo-size networks (32 × 64 grid, VAE and DiT of the `demo` preset, random
weights), {cfg.pairs.candidates} candidates per background, DPS guidance, sampler {a.steps} steps +
{cfg.sampler.corrections} correction, rewards {', '.join(cfg.rewards.names)} (48 h forecasts of every candidate).

| measurement | 1 sampler actor | 2 sampler actors | ratio (2 / 1) |
|---|---|---|---|
| pairs / s ({a.backgrounds} backgrounds, -M) | {p1['pairs_per_s']:.3f} | {p2['pairs_per_s']:.3f} | {p2['pairs_per_s'] / p1['pairs_per_s']:.2f} |
| backgrounds / s | {p1['bg_per_s']:.3f} | {p2['bg_per_s']:.3f} | {p2['bg_per_s'] / p1['bg_per_s']:.2f} |
| online weight sync (`set_weights`, {sync['state_mb']:.1f} MiB state dict) | {sync['by_samplers'][1] * 1e3:.0f} ms | {sync['by_samplers'][2] * 1e3:.0f} ms | |

On 2 cores the second sampler actor competes with the reward actor and the driver, so the ratio
stays well below 2; on a cluster each actor has its own CPUs / GPU fraction (`actors.*`).

| step (demo DiT, batch {steps['batch']} pairs) | median |
|---|---|
| Diffusion-DPO step (policy fwd+bwd on 2B, reference fwd on 2B, AdamW) | {steps['dpo_s'] * 1e3:.0f} ms |
| plain denoising step on the winners (fwd+bwd on B, AdamW) | {steps['dsm_s'] * 1e3:.0f} ms |
| ratio DPO / plain | {steps['ratio']:.2f} (floor ≈ 2.7) |
"""
    print(text)
    if not a.no_write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
