"""Time paper-scale analyses on a CUDA GPU: per analysis and per member; rows for BENCHMARKS.md.

``python bench/gpu_paper_scale.py [--out DIR] [--autocast bf16_dps] [--compile] [--no-write]``
``python bench/gpu_paper_scale.py --smoke``   (tiny networks on the CPU: checks that it runs)

Fields 69 × 128 × 256; randomly initialised networks of the ``paper`` preset (VAE: embedding 1024,
24 window blocks each way, latent 69 × 32 × 64; DiT: embedding 1024, 24 blocks, (2, 2) patches);
latent DPS (gradient through ε_θ and the decoder); 1 % of the points observed. Runs, each after a
two-step warm-up: DPS at the paper's K = 128, C = 2 with 1 and 4 members (one batch), DPS at the
K and C the accuracy bench recommends (``--rec-steps 32 --rec-corrections 1``: BENCHMARKS.md,
"Sampler accuracy against steps", demo choice) with 1 and 4 members, and ObsFree at K = 128,
C = 2. ``--autocast`` is ``sampler.autocast`` (docs/method.md §5.3; default ``bf16_dps``, as the
earlier rows; ``--also-autocast bf16`` times the first run again with DPS's gradient in float32,
the safe mode); ``--compile`` compiles the score network (``sampler.compile``). The paper reports
about 30 s per analysis on an A100; the issue's target is ≤ 10 s on this GPU at K = 128, C = 2.

Writes ``DIR/gpu_paper_scale.json`` and appends the rows to the GPU table of ``--bench-file``
(BENCHMARKS.md unless ``--no-write``). On a machine without CUDA it exits with status 2 and a
message (use ``--smoke`` there; ``--dry-run`` is the same).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from align_rl.config import load_config  # noqa: E402
from align_rl.devices import compile_module  # noqa: E402
from align_rl.diffusion.analysis import analyse  # noqa: E402
from align_rl.diffusion.precision import autocast_policy  # noqa: E402
from align_rl.io.grid import Grid  # noqa: E402
from align_rl.models.dit import build_dit  # noqa: E402
from align_rl.models.vae import LatentCodec, build_vae  # noqa: E402
from align_rl.world.observations import make_observations  # noqa: E402

SECTION_HEAD = "## Paper-scale analysis on a GPU (bench/gpu_paper_scale.py)"
TABLE_HEAD = ("| date (UTC) | device | guidance | autocast | compiled | members | K | C | seconds "
              "| seconds per member | peak GPU memory (GiB) |")
SMOKE_NETS = ["vae.embed_dim=16", "vae.depth=1", "vae.heads=2", "vae.latent_channels=4",
              "diffusion.embed_dim=16", "diffusion.depth=1", "diffusion.heads=2"]


def append_rows(rows: list[str], path: Path) -> None:
    """Add ``rows`` under the last table of the GPU section of ``path`` (the section and a table
    with :data:`TABLE_HEAD` are created when absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    table = TABLE_HEAD + "\n" + "|---" * TABLE_HEAD.count(" | ") + "|---|\n"
    if SECTION_HEAD not in text:
        text = text.rstrip() + f"\n\n{SECTION_HEAD}\n\n{table}" + "\n".join(rows) + "\n"
        path.write_text(text)
        return
    head, tail = text.split(SECTION_HEAD, 1)
    lines = tail.split("\n")
    end = next((i for i, ln in enumerate(lines) if i > 0 and (ln.startswith("#") or ln.startswith("<!--"))),
               len(lines))  # this section only
    if not any(ln.startswith(TABLE_HEAD) for ln in lines[:end]):
        lines[end:end] = ["", *table.rstrip("\n").split("\n")]
        end += len(table.rstrip("\n").split("\n")) + 1
    last = max(i for i, ln in enumerate(lines[:end]) if ln.startswith("|"))
    lines[last + 1:last + 1] = rows
    path.write_text(head + SECTION_HEAD + "\n".join(lines))


def build(preset: str, grid: str, overrides: list[str], device: torch.device):
    """Config, grid, codec and DiT of ``preset`` built directly on ``device`` (random weights)."""
    cfg = load_config(None, [f"data.grid={grid}", *overrides], preset=preset)
    g = Grid.parse(cfg.data.grid)
    with torch.device(device):
        vae = build_vae(cfg.vae, g)
        codec = LatentCodec(vae, torch.zeros(vae.latent_channels), torch.ones(vae.latent_channels))
        dit = build_dit(cfg.diffusion, codec.latent_shape)
    torch.nn.init.normal_(dit.out.weight, std=0.02)  # a non-zero ε (the zero init would hide the work)
    for prm in list(codec.parameters()) + list(dit.parameters()):
        prm.requires_grad_(False)  # DPS needs ∂/∂z only
    return cfg, g, codec.eval(), dit.eval()


def plan(a) -> list[dict]:
    """The timed runs: (method, K, C, members)."""
    K, C, k, c = a.steps, a.corrections, a.rec_steps, a.rec_corrections
    runs = [("dps", K, C, 1), ("dps", K, C, 4), ("dps", k, c, 1), ("dps", k, c, 4), ("obsfree", K, C, 1)]
    if a.only:
        runs = runs[:a.only]
    return [dict(method=m, steps=s, corrections=cc, members=n) for m, s, cc, n in runs]


def time_run(codec, dit, x_b, obs, run: dict, cfg, tau: float, autocast: str, device, gen) -> dict:
    """One warm-up (2 steps) and one timed analysis of ``run``."""
    ac, in_grad = autocast_policy(autocast, device)
    kw = dict(members=run["members"], autocast=ac, autocast_guidance=in_grad)
    sampler = {"steps": run["steps"], "corrections": run["corrections"], "tau": tau, "decode": "plain"}
    analyse(codec, dit, x_b, obs, run["method"], dict(sampler, steps=2), cfg.guidance, generator=gen, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    an = analyse(codec, dit, x_b, obs, run["method"], sampler, cfg.guidance, generator=gen, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    assert an.fields.shape == (1, run["members"], 69, *x_b.shape[-2:])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return dict(run, autocast=autocast, seconds=sec, per_member=sec / run["members"], peak_gib=peak)


def _gib(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", "--dry-run", dest="smoke", action="store_true",
                   help="tiny networks on a 32x64 grid, 2 steps, on the CPU: checks the script runs")
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--corrections", type=int, default=2)
    p.add_argument("--rec-steps", type=int, default=32, help="K the accuracy bench recommends")
    p.add_argument("--rec-corrections", type=int, default=1)
    p.add_argument("--only", type=int, default=0, help="run only the first N runs of the plan")
    p.add_argument("--autocast", default="bf16_dps", choices=["none", "bf16", "bf16_dps"])
    p.add_argument("--also-autocast", default=None, choices=["none", "bf16", "bf16_dps"],
                   help="time the first run again with this sampler.autocast (last)")
    p.add_argument("--compile", action="store_true", help="torch.compile the score network")
    p.add_argument("--out", default=None, help="folder for gpu_paper_scale.json")
    p.add_argument("--no-write", action="store_true", help="do not append to the bench file")
    p.add_argument("--bench-file", default=str(ROOT / "BENCHMARKS.md"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    if a.smoke:
        device, name = torch.device("cpu"), "CPU (dry run)"
        cfg, grid, codec, dit = build("demo", "32x64", SMOKE_NETS, device)
        a.steps, a.corrections, a.rec_steps, a.rec_corrections = 2, 1, 1, 0
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device: this benchmark times paper-scale analyses on a GPU. "
                  "Run it on a GPU machine, or pass --smoke for a tiny CPU check.", file=sys.stderr)
            return 2
        device, name = torch.device("cuda"), torch.cuda.get_device_name(0)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        cfg, grid, codec, dit = build("paper", "128x256", [], device)
    if a.compile:
        compile_module(dit)
    gen = torch.Generator(device=device).manual_seed(0)
    truth = torch.randn(1, 69, *grid.shape, device=device, generator=gen)
    x_b = torch.randn(1, 69, *grid.shape, device=device, generator=gen)
    obs = make_observations(truth, 0.01, 0.0, generator=gen)
    n_vae = sum(p.numel() for p in codec.parameters()) / 1e6
    n_dit = sum(p.numel() for p in dit.parameters()) / 1e6
    print(f"device: {name}; VAE {n_vae:.1f} M, DiT {n_dit:.1f} M parameters; grid {grid}, latent "
          f"{tuple(codec.latent_shape)}; autocast {a.autocast}, compiled {a.compile}", flush=True)
    results: list[dict] = []
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    info = {"device": name, "torch": torch.__version__, "autocast": a.autocast, "compile": a.compile,
            "vae_m": n_vae, "dit_m": n_dit, "date": stamp, "runs": results}
    runs = [(r, a.autocast) for r in plan(a)]
    if a.also_autocast:
        runs.append((runs[0][0], a.also_autocast))
    for run, mode in runs:
        r = time_run(codec, dit, x_b, obs, run, cfg, cfg.sampler.tau, mode, device, gen)
        results.append(r)
        print(f"{name}: one {r['method']} analysis ({r['members']} member(s), K={r['steps']}, "
              f"C={r['corrections']}, autocast {mode}) in {r['seconds']:.1f} s ({r['per_member']:.2f} s per member); "
              f"peak GPU memory {_gib(r['peak_gib'])} GiB", flush=True)
        if a.out:  # after each run: a time limit keeps what was measured
            Path(a.out).mkdir(parents=True, exist_ok=True)
            suffix = "-compiled" if a.compile else ""
            (Path(a.out) / f"gpu_paper_scale{suffix}.json").write_text(json.dumps(info, indent=1))
    rows = [f"| {stamp} | {name} | {r['method']} | {r['autocast']} | {'yes' if a.compile else 'no'} | "
            f"{r['members']} | {r['steps']} | {r['corrections']} | {r['seconds']:.1f} | "
            f"{r['per_member']:.2f} | {_gib(r['peak_gib'])} |" for r in results]
    if not a.smoke and not a.no_write:
        append_rows(rows, Path(a.bench_file))
        print(f"appended {len(rows)} rows to {a.bench_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
