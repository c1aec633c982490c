"""Training throughput of the demo networks (forward + backward + AdamW step) on 32 × 64.

For each model (forecaster emulator, VAE, DiT over the 69 × 8 × 16 latent) at batch 16, the
median wall time of a training step over ``--repeats`` steps (after warm-up) with 1 and with 2
torch threads, side by side in one run; samples/s = batch / median. Also lists the parameter
counts of the demo and paper presets (the paper ones built on the meta device).

    python bench/bench_models.py [--repeats 10] [--batch 16] [--no-write]

Writes/replaces the section "Model throughput" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, replace_section  # noqa: E402

from align_rl.config import load_config  # noqa: E402
from align_rl.diffusion.schedule import add_noise  # noqa: E402
from align_rl.io.grid import Grid  # noqa: E402
from align_rl.models.dit import build_dit  # noqa: E402
from align_rl.models.forecaster import build_emulator  # noqa: E402
from align_rl.models.vae import build_vae, vae_loss  # noqa: E402

SECTION = "## Model throughput (align_rl.models)"


def machine() -> str:
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} cores"


def write_section(text: str) -> None:
    replace_section(SECTION, text)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def make_steps(cfg, batch: int):
    """name -> (model, closure computing the training loss of one batch)."""
    grid = Grid.parse(cfg.data.grid)
    H, W = grid.shape
    g = torch.Generator().manual_seed(0)
    x0, x1, x2 = (torch.randn(batch, 69, H, W, generator=g) for _ in range(3))
    fc = build_emulator(cfg.forecaster, grid)
    vae = build_vae(cfg.vae, grid)
    dit = build_dit(cfg.diffusion, vae.latent_shape)
    z0 = torch.randn(batch, *vae.latent_shape, generator=g)
    zb = torch.randn(batch, *vae.latent_shape, generator=g)

    def fc_loss():
        return ((fc(x0, x1) - x2) ** 2).mean()

    def vae_step():
        recon, mean, logvar = vae(x0)
        return vae_loss(recon, x0, mean, logvar, cfg.vae.kl_weight)[0]

    def dit_step():
        t = torch.rand(batch)
        eps = torch.randn_like(z0)
        return ((dit(add_noise(z0, t, eps), t, zb) - eps) ** 2).mean()

    return {"forecaster (emulator)": (fc, fc_loss), "VAE": (vae, vae_step),
            "DiT": (dit, dit_step)}


def time_step(model, loss_fn, repeats: int, threads: int) -> float:
    torch.set_num_threads(threads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times, cpu = [], []
    for i in range(repeats + 2):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu)


def paper_counts() -> dict[str, int]:
    cfg = load_config(preset="paper")
    with torch.device("meta"):
        vae = build_vae(cfg.vae, cfg.data.grid)
        dit = build_dit(cfg.diffusion, vae.latent_shape)
    return {"VAE": n_params(vae), "DiT": n_params(dit)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    cfg = load_config()
    steps = make_steps(cfg, args.batch)
    paper = paper_counts()
    load0 = os.getloadavg()[0]
    rows = []
    for name, (model, fn) in steps.items():
        # interleave thread counts so that both see the same machine load
        t1, c1 = time_step(model, fn, args.repeats, 1)
        t2, _ = time_step(model, fn, args.repeats, 2)
        rows.append((name, n_params(model), paper.get(name), t1, c1, t2))
        print(f"{name}: {n_params(model):,} params, 1 thread {t1 * 1000:.0f} ms/step "
              f"({c1 * 1000:.0f} ms CPU), 2 threads {t2 * 1000:.0f} ms/step", flush=True)
    load1 = os.getloadavg()[0]
    c = cfg
    lines = [
        SECTION,
        "",
        f"`python bench/bench_models.py` — {machine()}; load average {load0:.1f} → {load1:.1f} "
        "(the machine is shared, so absolute times are noisy). One training step = forward + "
        f"backward + AdamW update on a batch of {args.batch} at {c.data.grid} (random inputs); median "
        f"of {args.repeats} steps after 2 warm-up steps.",
        "",
        f"Demo sizes: forecaster hidden {c.forecaster.hidden}, depth {c.forecaster.depth}; VAE "
        f"embedding {c.vae.embed_dim}, {c.vae.depth}+{c.vae.depth} window blocks (window {c.vae.window}), "
        f"patch {c.vae.patch}; DiT embedding {c.diffusion.embed_dim}, depth {c.diffusion.depth}, "
        f"patch {c.diffusion.patch}.",
        "",
        "CPU ms/step (1 thread) is the process CPU time of a step: it is what the step costs on an "
        "idle core and is less sensitive to other jobs on the machine than the wall time.",
        "",
        "| model | params (demo) | params (paper, 128×256) | ms/step, 1 thread | CPU ms/step, 1 thread "
        "| samples/s, 1 thread | ms/step, 2 threads | samples/s, 2 threads | 2 vs 1 thread |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, n, npaper, t1, c1, t2 in rows:
        pp = f"{npaper / 1e6:.1f} M" if npaper else "—"
        lines.append(
            f"| {name} | {n / 1e6:.2f} M | {pp} | {t1 * 1000:.0f} | {c1 * 1000:.0f} | {args.batch / t1:.0f} | "
            f"{t2 * 1000:.0f} | {args.batch / t2:.0f} | {t1 / t2:.2f}× |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
