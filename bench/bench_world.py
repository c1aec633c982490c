"""Benchmark of the embedded world: generation time of the default dataset and the independence
of its splits.

    python bench/bench_world.py [--repeats 1] [--no-write]

1. Builds the default dataset (config ``data`` defaults: members × days × 4 six-hourly states on
   the default grid, one run with burn-in and gaps) with ``align_rl.world.simulate.build_world``
   into a temporary folder; reports the wall time (median over repeats), states/s and store size.
2. Independence: :func:`align_rl.world.independence.check_store` on that dataset (the table of
   ``python -m align_rl.data independence``).
Writes/replaces the section "Embedded world" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, replace_section  # noqa: E402

from align_rl.config import load_config  # noqa: E402
from align_rl.world.dataset import stored_attrs  # noqa: E402
from align_rl.world.independence import check_store  # noqa: E402
from align_rl.world.simulate import build_world  # noqa: E402

SECTION = "## Embedded world (align_rl.data)"


def machine() -> str:
    cpu = cpu_name()
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()}"


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def write_section(text: str) -> None:
    replace_section(SECTION, text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    cfg = load_config()
    d = cfg.data
    n_states = d.members * d.days * 4
    load0 = os.getloadavg()
    times, cpus, size, attrs, report = [], [], 0, {}, None
    for _ in range(args.repeats):
        tmp = Path(tempfile.mkdtemp(prefix="bench_world_"))
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            out = build_world(cfg, tmp / "world.zarr", progress=False)
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            size = dir_size(out)
            attrs = stored_attrs(out)
            report = check_store(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()
    med, cpu = statistics.median(times), statistics.median(cpus)
    threads = attrs.get("threads")
    print(f"default world: {n_states} states in {med:.1f} s ({n_states / med:.2f} states/s), "
          f"process CPU time {cpu:.1f} s, {threads} model thread(s)")

    text = f"""{SECTION}

`python bench/bench_world.py` — machine: {machine()}; shared with other jobs while measured
(load average {load0[0]:.1f} before, {load1[0]:.1f} after), so times are upper bounds.

| dataset (config `data` defaults) | states | wall time (median of {args.repeats}) | states/s | process CPU time | model threads | store size |
|---|---|---|---|---|---|---|
| {d.members} members × {d.days} days, one run, {d.burn_in_days:g} day(s) burn-in, {d.gap_days:g}-day gaps, {d.grid}, T21 L20, dt 60 min | {n_states} | {med:.1f} s | {n_states / med:.2f} | {cpu:.1f} s | {threads} | {size / 2**20:.0f} MiB |

Target: ≥ 1,000 six-hourly states in ≤ 5 minutes (300 s) on this 2-core machine. With one model
thread the process CPU time is what the wall time is on an idle machine (the generation is
single-threaded when the machine is busy, see `align_rl.world.simulate.model_thread_count`).

Independence of the splits (`python -m align_rl.data independence`, docs/method.md §2.1):

""" + report.table() + "\n"
    if not args.no_write:
        write_section(text)
    print(text)


if __name__ == "__main__":
    main()
