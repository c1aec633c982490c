"""Time one paper-scale DPS analysis on a CUDA GPU; appends a row to BENCHMARKS.md.

``python bench/gpu_paper_scale.py [--members 1] [--steps 128] [--corrections 2] [--no-write]``
``python bench/gpu_paper_scale.py --dry-run``   (a tiny version on the CPU, for tests)

Fields 69 × 128 × 256; randomly initialised networks of the ``paper`` preset (VAE: embedding 1024,
24 window blocks each way, latent 69 × 32 × 64; DiT: embedding 1024, 24 blocks, (2, 2) patches);
128 predictor steps + 2 Langevin corrections; latent DPS (gradient through ε_θ and the decoder);
bf16 autocast. 1 % of the points observed. The paper reports about 30 s per analysis on an A100.
Prints the GPU name and the seconds; must finish in under 5 minutes on one GPU. On a machine
without CUDA it exits with status 2 and a message (use ``--dry-run`` there).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from align_rl.diffusion.analysis import analyse  # noqa: E402
from align_rl.config import load_config  # noqa: E402
from align_rl.io.grid import Grid  # noqa: E402
from align_rl.models.dit import build_dit  # noqa: E402
from align_rl.models.vae import LatentCodec, build_vae  # noqa: E402
from align_rl.world.observations import make_observations  # noqa: E402

SECTION_HEAD = "## Paper-scale analysis on a GPU (bench/gpu_paper_scale.py)"


def append_row(row: str, path: Path) -> None:
    """Add ``row`` to the GPU table of BENCHMARKS.md (creating the section when absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    header = (f"{SECTION_HEAD}\n\nOne DPS analysis, 69 × 128 × 256, paper-preset networks (random "
              "weights), 128 steps + 2 corrections, bf16 autocast. The paper: ~30 s on an A100.\n\n"
              "| date (UTC) | device | guidance | members | K | C | seconds | peak GPU memory (GiB) |\n"
              "|---|---|---|---|---|---|---|---|\n")
    if SECTION_HEAD not in text:
        text = text.rstrip() + "\n\n" + header + row + "\n"
    else:
        head, tail = text.split(SECTION_HEAD, 1)
        lines = tail.split("\n")
        end = next((i for i, ln in enumerate(lines) if i > 0 and (ln.startswith("#") or ln.startswith("<!--"))),
                   len(lines))  # this section only
        rows = [i for i, ln in enumerate(lines[:end]) if ln.startswith("|")]
        if not rows:
            raise SystemExit(f"the section {SECTION_HEAD!r} of {path} has no table; restore its header")
        last = rows[-1]
        lines.insert(last + 1, row)
        text = head + SECTION_HEAD + "\n".join(lines)
    path.write_text(text)


def build(preset: str, grid: str, overrides: list[str]):
    cfg = load_config(None, [f"data.grid={grid}", *overrides], preset=preset)
    g = Grid.parse(cfg.data.grid)
    vae = build_vae(cfg.vae, g)
    codec = LatentCodec(vae, torch.zeros(vae.latent_channels), torch.ones(vae.latent_channels))
    dit = build_dit(cfg.diffusion, codec.latent_shape)
    torch.nn.init.normal_(dit.out.weight, std=0.02)  # a non-zero ε (the zero init would hide the work)
    return cfg, g, codec, dit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="tiny networks on a 32x64 grid, 2 steps, on the CPU: checks the script runs")
    p.add_argument("--members", type=int, default=1)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--corrections", type=int, default=2)
    p.add_argument("--method", default="dps", choices=["obsfree", "repaint", "dps"])
    p.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    p.add_argument("--bench-file", default=str(ROOT / "BENCHMARKS.md"))
    a = p.parse_args(argv)

    if a.dry_run:
        device = torch.device("cpu")
        cfg, grid, codec, dit = build("demo", "32x64", [
            "vae.embed_dim=16", "vae.depth=1", "vae.heads=2", "diffusion.embed_dim=16",
            "diffusion.depth=1", "diffusion.heads=2"])
        steps, corr, autocast, name = 2, 1, None, "CPU (dry run)"
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device: this benchmark times one paper-scale analysis on a GPU. "
                  "Run it on a GPU machine, or pass --dry-run for a tiny CPU check.", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        cfg, grid, codec, dit = build("paper", "128x256", [])
        steps, corr = a.steps, a.corrections
        autocast = {"device_type": "cuda", "dtype": torch.bfloat16}
        name = torch.cuda.get_device_name(0)
    codec = codec.to(device).eval()
    dit = dit.to(device).eval()
    for prm in list(codec.parameters()) + list(dit.parameters()):
        prm.requires_grad_(False)  # DPS needs ∂/∂z only
    n_vae = sum(p.numel() for p in codec.parameters())
    n_dit = sum(p.numel() for p in dit.parameters())
    gen = torch.Generator(device=device).manual_seed(0)
    truth = torch.randn(1, 69, *grid.shape, device=device, generator=gen)
    x_b = torch.randn(1, 69, *grid.shape, device=device, generator=gen)
    obs = make_observations(truth, 0.01, 0.0, generator=gen)
    sampler = {"steps": steps, "corrections": corr, "tau": cfg.sampler.tau}
    print(f"device: {name}; VAE {n_vae / 1e6:.1f} M, DiT {n_dit / 1e6:.1f} M parameters; "
          f"grid {grid}, latent {tuple(codec.latent_shape)}; {a.method}, K={steps}, C={corr}, "
          f"N={a.members}", flush=True)
    # warm-up: kernels, allocator (two steps)
    analyse(codec, dit, x_b, obs, a.method, dict(sampler, steps=2), cfg.guidance, generator=gen,
            members=a.members, autocast=autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    an = analyse(codec, dit, x_b, obs, a.method, sampler, cfg.guidance, generator=gen,
                 members=a.members, autocast=autocast, progress=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    assert an.fields.shape == (1, a.members, 69, *grid.shape)
    print(f"{name}: one {a.method} analysis ({a.members} member(s), K={steps}, C={corr}) in "
          f"{seconds:.1f} s; peak GPU memory {peak:.1f} GiB", flush=True)
    if not a.dry_run and not a.no_write:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
        append_row(f"| {stamp} | {name} | {a.method} | {a.members} | {steps} | {corr} | {seconds:.1f} | {peak:.1f} |",
                   Path(a.bench_file))
        print(f"appended a row to {a.bench_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
