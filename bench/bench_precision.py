"""Per-step cost of the pretraining models' real training step: float32 against bf16 autocast
(and ``torch.compile``), one process, side by side in one run.

The step is :meth:`align_rl.training.loop.Loop.train_step` (batch, loss, backward, clipping, AdamW)
of each pretraining task at the demo config's sizes and batch, on random normalised fields of the
right shapes, without Ray (the per-step cost, not a worker group's start-up). Each variant runs
``--warmup`` steps, then ``--steps`` timed steps; the table gives the median seconds per step
and the ratio to float32 in the same run. bf16 is fast only where the CPU has bf16 arithmetic
(AVX512-BF16 or AMX): the CPU's flags are printed beside the table.

    python bench/bench_precision.py [--steps 20] [--warmup 5] [--threads 1 2]
                                    [--models forecaster vae diffusion] [--variants fp32 bf16 compile]

Prints a markdown table (BENCHMARKS.md, "Precision of the pretraining steps").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, demo_arrays  # noqa: E402

from align_rl.config import load_config  # noqa: E402
from align_rl.training.loop import Loop, Worker  # noqa: E402
from align_rl.training.tasks import pretrain_task  # noqa: E402


def bf16_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return "unknown"
    have = sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f"))
    return ", ".join(have) or "none of avx512f, avx512_bf16, amx_bf16"


def configs(n_frames: int = 64) -> dict[str, dict]:
    """Loop configs of the three pretraining tasks on random data of the demo shapes."""
    cfg = load_config()
    g, x, times, z = demo_arrays(cfg, n_frames)
    C, h, w = z.shape[1:]
    common = {"seed": 0, "make_task": pretrain_task, "checkpoint_every": 10**9, "val_every": 0}

    def section(name):
        s = getattr(cfg, name)
        return {"task": name, "model_cfg": asdict(s), "lr": float(s.lr), "batch_size": int(s.batch_size),
                "steps": 10**6}

    seq = {"values": x, "times": times}
    return {
        "forecaster": {**common, **section("forecaster"), "grid": [g.nlat, g.nlon],
                       "data": {"train": seq, "val": seq}},
        "vae": {**common, **section("vae"), "grid": [g.nlat, g.nlon], "kl_weight": cfg.vae.kl_weight,
                "data": {"train": {"values": x}, "val": {"values": x}}},
        "diffusion": {**common, **section("diffusion"), "latent_shape": [C, h, w],
                      "data": {"train": {"z": z, "z_b": z[::-1].copy()}, "val": {"z": z, "z_b": z}}},
    }


def step_seconds(config: dict, variant: str, steps: int, warmup: int) -> float:
    """Median seconds per training step of one task in one variant."""
    torch.manual_seed(0)
    loop = Loop(dict(config, precision="bf16" if variant == "bf16" else "fp32"), Worker())
    if variant == "compile":
        loop.model = torch.compile(loop.model)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loop.train_step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--models", nargs="+", default=["forecaster", "vae", "diffusion"])
    ap.add_argument("--variants", nargs="+", default=["fp32", "bf16"])
    a = ap.parse_args()
    cfgs = configs()
    torch.set_flush_denormal(True)
    rows = []
    for m in a.models:
        for th in a.threads:
            torch.set_num_threads(th)
            res = {v: step_seconds(cfgs[m], v, a.steps, a.warmup) for v in a.variants}
            rows.append((m, th, res))
            print(f"{m:10s} {th} thread(s): " + "  ".join(f"{v} {s * 1000:.0f} ms" for v, s in res.items()),
                  flush=True)
    print(f"\n{cpu_name()}; bf16 flags: {bf16_flags()}; torch {torch.__version__}; median of "
          f"{a.steps} steps after {a.warmup} warm-up steps, demo sizes and batches, one process.\n")
    print("| model | threads | " + " | ".join(f"{v} ms/step" for v in a.variants) + " | "
          + " | ".join(f"{v} / fp32" for v in a.variants if v != "fp32") + " |")
    print("|---|---:|" + "---:|" * (2 * len(a.variants) - 1))
    for m, th, res in rows:
        print(f"| {m} | {th} | " + " | ".join(f"{res[v] * 1000:.0f}" for v in a.variants) + " | "
              + " | ".join(f"{res['fp32'] / res[v]:.2f}x faster" for v in a.variants if v != "fp32") + " |")


if __name__ == "__main__":
    main()
