"""Pretraining on Ray Train: throughput of each model and 2 DDP workers against 1, in one run.

For each model (forecaster emulator, VAE, latent DiT; the demo config's sizes on its grid) the real
training loop runs under ``TorchTrainer`` for ``--steps`` steps at the config's batch size in three
layouts, side by side: 1 worker × 1 thread, 1 worker × 2 threads, 2 DDP workers (gloo) × 1 thread.
Samples/s is the loop's own count (global samples over the time of the optimiser steps, without
the start-up of the worker group, validation and checkpoints), the median over ``--repeats`` runs;
the ratios compare the 2-worker run with each 1-worker run. The data are random normalised fields
of the right shapes (throughput does not depend on their values).

``--pretrain-all`` also times ``python -m align_rl.pretrain all`` on the embedded default (a fresh
workdir unless ``--workdir`` is given; the world store is reused when present there) and records
its summary.

    python bench/bench_pretrain.py [--steps 20] [--repeats 1] [--models forecaster vae diffusion]
                                   [--pretrain-all] [--workdir runs/bench_pretrain] [--no-write]

Writes/replaces the section "Pretraining on Ray Train" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, demo_arrays, replace_section  # noqa: E402
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from align_rl.config import PretrainConfig, load_config  # noqa: E402

SECTION = "## Pretraining on Ray Train (align_rl.pretrain)"
LAYOUTS = (("1 worker x 1 thread", 1, 1), ("1 worker x 2 threads", 1, 2), ("2 DDP workers x 1 thread", 2, 1))


def machine() -> str:
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} cores"


def write_section(text: str) -> None:
    replace_section(SECTION, text)


def jobs(cfg, n_frames: int = 64) -> dict[str, dict]:
    """Loop configs of the three models on random data of the demo shapes."""
    import ray

    g, x, times, z = demo_arrays(cfg, n_frames)
    C, h, w = z.shape[1:]
    seq = ray.put({"values": x, "times": times})
    frames = ray.put({"values": x})
    lat = ray.put({"z": z, "z_b": z[::-1].copy()})
    from dataclasses import asdict

    common = {"seed": 0, "wandb": {"mode": "disabled"}, "progress": False}

    def section(name):
        s = getattr(cfg, name)
        return {"model_cfg": asdict(s), "lr": float(s.lr), "batch_size": int(s.batch_size)}

    return {
        "forecaster": {**common, **section("forecaster"), "grid": [g.nlat, g.nlon],
                       "data": {"train": seq, "val": seq}},
        "vae": {**common, **section("vae"), "grid": [g.nlat, g.nlon], "kl_weight": cfg.vae.kl_weight,
                "data": {"train": frames, "val": frames}},
        "diffusion": {**common, **section("diffusion"), "latent_shape": [C, h, w],
                      "data": {"train": lat, "val": lat}},
    }


def throughput(models: list[str], steps: int, repeats: int) -> tuple[dict, str]:
    from align_rl.training.harness import init_ray, run_training

    init_ray(num_cpus=os.cpu_count())
    cfg = load_config()
    js = jobs(cfg)
    res: dict[str, dict[str, list[float]]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_pretrain_"))
    for m in models:
        res[m] = {}
        for _ in range(repeats):
            for name, workers, threads in LAYOUTS:  # side by side, interleaved over repeats
                pre = PretrainConfig(num_workers=workers, cpus_per_worker=threads,
                                     checkpoint_every=steps, val_every=10 * steps, max_failures=0)
                t0 = time.perf_counter()
                r = run_training(m, dict(js[m], steps=steps), pre, tmp, f"{m}-{workers}-{threads}-{time.time_ns()}")
                res[m].setdefault(name, []).append(r.samples_per_s)
                res[m].setdefault(name + " wall", []).append(time.perf_counter() - t0)
                print(f"{m:10s} {name:26s} {r.samples_per_s:8.1f} samples/s  (fit {time.perf_counter() - t0:.0f} s)",
                      flush=True)
    lines = [
        f"Demo sizes ({cfg.data.grid} grid; batch: forecaster {cfg.forecaster.batch_size}, VAE "
        f"{cfg.vae.batch_size}, diffusion {cfg.diffusion.batch_size}), {steps} optimiser steps per run, "
        f"median of {repeats} run(s); samples/s counts the optimiser steps only (not the worker-group "
        "start-up, validation or checkpoints).",
        "",
        "| model | " + " | ".join(n for n, _, _ in LAYOUTS) + " | 2 workers / 1×1 | 2 workers / 1×2 |",
        "|---|" + "---:|" * (len(LAYOUTS) + 2),
    ]
    for m in models:
        med = {n: statistics.median(res[m][n]) for n, _, _ in LAYOUTS}
        two = med[LAYOUTS[2][0]]
        lines.append(f"| {m} | " + " | ".join(f"{med[n]:.1f}" for n, _, _ in LAYOUTS)
                     + f" | {two / med[LAYOUTS[0][0]]:.2f} | {two / med[LAYOUTS[1][0]]:.2f} |")
    walls = [statistics.median(res[m][n + ' wall']) for m in models for n, _, _ in LAYOUTS]
    lines += ["", f"Each `fit()` took {min(walls):.0f}–{max(walls):.0f} s in all (worker-group start-up "
              "included), so short runs are dominated by Ray Train's start-up on this machine."]
    return res, "\n".join(lines)


def pretrain_all(workdir: str | None) -> str:
    wd = Path(workdir or tempfile.mkdtemp(prefix="pretrain_all_")).resolve()
    cmd = [sys.executable, "-m", "align_rl.pretrain", "all", f"run.workdir={wd}", "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"pretrain all failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    s = json.loads((wd / "pretrain_summary.json").read_text())
    tr = s.get("training", {})

    def sec(k: str) -> str:
        v = tr.get(k, {}).get("seconds")
        return f"{v:.0f} s" if v else "cached"

    return "\n".join([
        f"`python -m align_rl.pretrain all` on the embedded default: **{wall / 60:.1f} min** wall "
        f"(target ≤ 15 min; world store {'reused' if (wd / 'world.zarr').exists() and workdir else 'built'}; "
        f"training: forecaster {sec('forecaster')}, VAE {sec('vae')}, diffusion {sec('diffusion')}, "
        f"backgrounds {tr.get('diffusion', {}).get('background_seconds', 0):.0f} s). Summary "
        "(validation split, normalised units):",
        "",
        "| quantity | value | reference |",
        "|---|---:|---|",
        f"| forecaster 6 h RMSE | {s['forecaster_rmse_6h']:.4f} | persistence {s['persistence_rmse_6h']:.4f} |",
        f"| 48 h background RMSE | {s['background_rmse_48h']:.4f} | climatology {s['climatology_rmse']:.4f}, "
        f"persistence {s['persistence_rmse_48h']:.4f} |",
        f"| VAE reconstruction MSE | {s['vae_recon_mse']:.4f} | target ≤ 0.02 |",
        f"| diffusion validation loss (DSM) | {s['diffusion_val_loss']:.4f} | 1.0 = predicting ε̂ = 0 |",
    ])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--models", nargs="*", default=["forecaster", "vae", "diffusion"])
    p.add_argument("--pretrain-all", action="store_true")
    p.add_argument("--workdir", default=None)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    parts = [SECTION, "", f"Machine: {machine()}; load average at start "
             f"{os.getloadavg()[0]:.1f} (the machine is shared: compare ratios, not absolute times).", ""]
    if a.pretrain_all:
        parts += ["### `pretrain all`", "", pretrain_all(a.workdir), ""]
    if a.models:
        _, table = throughput(a.models, a.steps, a.repeats)
        parts += ["### Training throughput (samples/s)", "", table, ""]
    text = "\n".join(parts)
    print(text)
    if not a.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
