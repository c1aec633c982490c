"""The interpolating observation operator at scale: 10⁶ point observations on the 721 × 1440 grid
with 69 channels (docs/method.md §3.1); writes its section of BENCHMARKS.md.

``python bench/bench_obs_operator.py [--obs 1000000] [--grid 721x1440] [--repeats 3] [--no-write]``

Random observations (70 % upper-air at log-uniform pressures 50–1000 hPa of t, u, v, q, z; 30 %
surface), uniform over the sphere, one analysis time. Measures the median time of: building the
operator (:func:`align_rl.observations.operator.point_observations`), ``H x`` (apply), ``Hᵀ r``
(adjoint), and a DPS-like gradient ``∇_x √(Σ r²/σ²)`` through the operator (autograd, the same
call as the DPS guidance); memory: the operator's own tensors, and the growth of the process's
peak resident memory over each step (the field x itself, 69 × 721 × 1440 float32, is 286 MB).
No dense matrix is formed anywhere (a dense H would be 10⁶ × 7.2·10⁷ entries).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align_rl.io.normalization import Normalizer  # noqa: E402
from align_rl.io.schema import N_CHANNELS  # noqa: E402
from align_rl.observations.operator import point_observations  # noqa: E402
from align_rl.observations.records import ObsRecords  # noqa: E402
from bench._common import cpu_name, replace_section  # noqa: E402

SECTION = "## Observation operator at scale (bench/bench_obs_operator.py)"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _records(n: int, seed: int = 0) -> ObsRecords:
    rng = np.random.default_rng(seed)
    up = rng.random(n) < 0.7
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    lon = rng.uniform(0, 360, n)
    p = np.where(up, np.exp(rng.uniform(np.log(5000.0), np.log(100000.0), n)), np.nan)
    uv = np.array(["airTemperature", "windEastward", "windNorthward", "specificHumidity",
                   "geopotentialHeight"])
    sv = np.array(["airTemperature", "windEastward", "windNorthward", "pressureReducedToMeanSeaLevel"])
    var = np.where(up, uv[rng.integers(0, 5, n)], sv[rng.integers(0, 4, n)])
    t = np.full(n, np.datetime64("2020-01-01T00:00:00", "s"))
    return ObsRecords(t, lat, lon, p, var, rng.normal(size=n), np.ones(n))


def _time(fn, repeats: int) -> tuple[float, float, float]:
    """Median wall and CPU (process, all threads) seconds of ``fn()``, and the peak-RSS growth (MB)."""
    before = _peak_mb()
    ts, cs = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return statistics.median(ts), statistics.median(cs), _peak_mb() - before


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--obs", type=int, default=1_000_000)
    ap.add_argument("--grid", default="721x1440")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    H, W = (int(v) for v in a.grid.lower().split("x"))
    lat = np.linspace(-90, 90, H) if H % 2 else -90 + 90 / H + 180 / H * np.arange(H)
    lon = 360 / W * np.arange(W)
    norm = Normalizer(np.zeros(N_CHANNELS), np.ones(N_CHANNELS))
    rec = _records(a.obs)
    t0, c0 = time.perf_counter(), time.process_time()
    obs = point_observations(rec, rec.time[:1], np.timedelta64(3, "h"), lat, lon, norm)
    t_build, c_build = time.perf_counter() - t0, time.process_time() - c0
    op_mb = sum(t.numel() * t.element_size() for t in (obs.values, obs.variance, obs.row, obs.index,
                                                        obs.weight, obs.var_code)) / 2**20
    x = torch.randn(1, N_CHANNELS, H, W, generator=torch.Generator().manual_seed(0))
    r = torch.randn(obs.n_obs, generator=torch.Generator().manual_seed(1))
    t_apply = _time(lambda: obs.apply(x), a.repeats)
    t_adj = _time(lambda: obs.adjoint(r), a.repeats)

    def grad():
        xg = x.detach().requires_grad_(True)
        loss = torch.sqrt(obs.misfit(xg, members=1) + 1e-12).sum()
        (g,) = torch.autograd.grad(loss, xg)
        return g

    t_grad = _time(grad, a.repeats)
    rows = [("build the operator (once per analysis time)", (t_build, c_build, float("nan"))),
            ("apply H x", t_apply), ("adjoint Hᵀ r", t_adj),
            ("DPS-like gradient ∇ √(Σ r²/σ²) (autograd)", t_grad)]
    lines = [SECTION, "",
             f"{obs.n_obs:,} observations (70 % upper-air, interpolated in log-pressure; 30 % "
             f"surface) on the {H} × {W} grid, 69 channels, one analysis time; CPU: {cpu_name()}, "
             f"{torch.get_num_threads()} threads, float32; median of {a.repeats}. The operator "
             f"holds {op_mb:.0f} MB (indices and weights, 8 nodes per observation); the field x is "
             f"{x.numel() * 4 / 2**20:.0f} MB. Peak-memory growth is the process's peak resident "
             "memory over the step (0 when the step fits in memory already reached). Wall-clock "
             "time depends on what else runs on the machine; CPU time is the process's own (all "
             "threads).", "",
             "| step | wall (s) | CPU (s) | peak-memory growth (MB) |", "|---|---|---|---|"]
    for name, (t, c, m) in rows:
        lines.append(f"| {name} | {t:.3f} | {c:.3f} | {'—' if m != m else f'{m:.0f}'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_write:
        replace_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
