"""Cost of denormal floats in a training step once the loss has vanished, and the fix.

    python bench/bench_denormals.py [--steps 8] [--no-write]

A saturated Diffusion-DPO loss (−log σ of a margin of ~50) has gradients of ~1e-9 and below, and
AdamW's state and updates then hold denormal floats, which x86 CPUs process tens of times slower.
This runs the demo DiT (one thread, batch 32) with AdamW: two steps with a live loss, then
``--steps`` steps with the loss scaled by 1e-30 (denormal gradients), with and without
:func:`align_rl.cpu.configure_worker` (flush denormals to zero), interleaved. Writes the section
"Denormals in training steps" of BENCHMARKS.md (medians of the vanished-loss steps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import cpu_name, replace_section  # noqa: E402

from align_rl.config import load_config  # noqa: E402
from align_rl.models.dit import build_dit  # noqa: E402

SECTION = "## Denormals in training steps (bench/bench_denormals.py)"


def run(flush: bool, steps: int) -> list[float]:
    """Step times (s) of the vanished-loss steps."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(flush)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dit = build_dit(load_config().diffusion, (69, 8, 16))
    opt = torch.optim.AdamW(dit.parameters(), 1e-5, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    z, zb = torch.randn(32, 69, 8, 16, generator=g), torch.randn(32, 69, 8, 16, generator=g)
    t = torch.rand(32, generator=g)
    times = []
    for i in range(2 + steps):
        t0 = time.perf_counter()
        scale = 1.0 if i < 2 else 1e-30
        loss = scale * (dit(z, t, zb) - z).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    torch.set_flush_denormal(False)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    slow = statistics.median(run(False, a.steps))
    fast = statistics.median(run(True, a.steps))
    text = (f"{SECTION}\n\n{cpu_name()}, torch {torch.__version__}, one thread; demo DiT, batch 32, "
            f"AdamW; median of {a.steps} steps whose loss was scaled by 1e-30 (the gradients of a "
            "saturated DPO loss).\n\n"
            "| denormals | seconds per step |\n|---|---:|\n"
            f"| kept (torch's default) | {slow:.2f} |\n"
            f"| flushed to zero (`align_rl.cpu.configure_worker`, every worker and actor) | {fast:.2f} |\n"
            f"| **ratio** | **{slow / fast:.0f} ×** |\n")
    print(text)
    if not a.no_write:
        replace_section(SECTION, text)


if __name__ == "__main__":
    main()
