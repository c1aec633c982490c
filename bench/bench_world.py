"""Benchmark of the embedded world: generation time of the default dataset and member decorrelation.

    python bench/bench_world.py [--repeats 1] [--curve-days 30] [--no-write]

1. Builds the default dataset (config ``data`` defaults: members × days × 4 six-hourly states on
   the default grid, including the burn-in) with ``align_rl.world.simulate.build_world`` into a
   temporary folder; reports the wall time (median over repeats), states/s and store size.
2. Decorrelation: runs ``3`` members with no burn-in for ``--curve-days`` days and reports the mean
   pairwise correlation of the z500 eddy field (departure from the zonal mean) against the time
   since the perturbation, as stored and with the members' rotations undone; plus the values of
   the default dataset.
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
from align_rl.world.simulate import build_world, member_correlation, simulate  # noqa: E402

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
    ap.add_argument("--curve-days", type=int, default=30)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    cfg = load_config()
    d = cfg.data
    n_states = d.members * d.days * 4
    load0 = os.getloadavg()
    times, cpus, size, attrs = [], [], 0, {}
    for _ in range(args.repeats):
        tmp = Path(tempfile.mkdtemp(prefix="bench_world_"))
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            out = build_world(cfg, tmp / "world.zarr", progress=False)
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            size = dir_size(out)
            attrs = stored_attrs(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()
    med, cpu = statistics.median(times), statistics.median(cpus)
    threads = attrs.get("threads")
    print(f"default world: {n_states} states in {med:.1f} s ({n_states / med:.2f} states/s), "
          f"process CPU time {cpu:.1f} s, {threads} model thread(s)")

    corr_lines = []
    if args.curve_days > 0:
        m = 3
        t0 = time.perf_counter()
        st = simulate(d.grid, args.curve_days, m, seed=1, burn_in_days=0.0, progress=False)
        tc = time.perf_counter() - t0
        v = st.values.reshape((m, -1) + st.values.shape[1:])
        c = member_correlation(v)
        ca = member_correlation(v, shifts_deg=st.attrs["member_rotation_deg"])
        for day in (0, 1, 2, 5, 10, 15, 19, 20, 25, 30):
            if day * 4 < len(c):
                corr_lines.append(f"| {day} | {c[day * 4]:.3f} | {ca[day * 4]:.3f} |")
        print("correlation vs day:", " ".join(s.split("|")[2].strip() for s in corr_lines))
        print(f"(curve run {m}×{args.curve_days} d took {tc:.1f} s)")
    mc = attrs.get("member_correlation_z500", {})
    ma = attrs.get("member_correlation_z500_aligned", {})
    text = f"""{SECTION}

`python bench/bench_world.py` — machine: {machine()}; shared with other jobs while measured
(load average {load0[0]:.1f} before, {load1[0]:.1f} after), so times are upper bounds.

| dataset (config `data` defaults) | states | wall time (median of {args.repeats}) | states/s | process CPU time | model threads | store size |
|---|---|---|---|---|---|---|
| {d.members} members × {d.days} days + {d.burn_in_days:g} days burn-in, {d.grid}, T21 L20, dt 60 min | {n_states} | {med:.1f} s | {n_states / med:.2f} | {cpu:.1f} s | {threads} | {size / 2**20:.0f} MiB |

Target: ≥ 1,000 six-hourly states in ≤ 5 minutes (300 s) on this 2-core machine. With one model
thread the process CPU time is what the wall time is on an idle machine (the generation is
single-threaded when the machine is busy, see `align_rl.world.simulate.model_thread_count`).

Member decorrelation: mean pairwise Pearson correlation of the z500 eddy field (departure from the
zonal mean) between members at the same time. Members start from the one restart, each turned in
longitude by m/M of the circle and perturbed with 1 K grid-point temperature noise; "as stored"
compares the fields as they are, "aligned" first turns each member back (so it measures how far
the dynamics have diverged). Default dataset: as stored {mc.get('first_state')} at the first
state, {mc.get('mean')} averaged over all times; aligned {ma.get('first_state')} at the first
state, {ma.get('mean')} averaged. Against days since the perturbation (3 members, no burn-in):

| day | as stored | aligned |
|---|---|---|
""" + "\n".join(corr_lines) + "\n"
    if not args.no_write:
        write_section(text)
    print(text)


if __name__ == "__main__":
    main()
