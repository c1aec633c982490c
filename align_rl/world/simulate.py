"""Simulate the embedded Held–Suarez world and write it as a WeatherBench2-layout store.

The ``M`` members are consecutive stretches of one long run from the committed spun-up restart
(:func:`simulate`), ``data.gap_days`` apart, so that no member holds weather of another: the data
splits (members) are independent (docs/method.md §2; :mod:`align_rl.world.independence` checks a
store). Output every 6 h: member ``m`` is stored as the year ``2000 + m``
(``2000+m-01-01T00`` onwards), so the data splits are time ranges; ``4 · days`` states per member.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from align_rl import identity
from align_rl.config import Config, DataConfig
from align_rl.errors import InputError
from align_rl.io.era5 import open_states
from align_rl.io.grid import Grid
from align_rl.io.normalization import Normalizer
from align_rl.io.schema import N_CHANNELS, channel_index
from align_rl.io.states import States
from align_rl.io.store import write_states
from align_rl.world.diagnostics import DERIVED, Diagnoser
from align_rl.world.dycore import get_dycore, model_threads
from align_rl.world.spinup import DEFAULT_RESTART, load_restart

BASE_YEAR = 2000
OUTPUT_HOURS = 6
PERTURBATION_K = 1.0
MAX_DAYS = 365  # a member must fit in its year
MAX_BYTES = 8 * 2**30  # the states are held in memory before writing
SOURCE = "held-suarez dinosaur-torch"


def member_times(member: int, n_times: int) -> np.ndarray:
    """The 6-hourly times of member ``member``: year ``2000 + member`` from Jan 1 00 UTC."""
    start = np.datetime64(f"{BASE_YEAR + member:04d}-01-01T00:00", "ns")
    return start + np.arange(n_times) * np.timedelta64(OUTPUT_HOURS, "h")


def model_thread_count() -> int:
    """Intra-op threads for the model: torch's default on an idle machine, 1 when the machine is
    busy (the load average exceeds the cores). At T21 the tensors are small, and torch's
    worker threads spin-wait on an oversubscribed CPU: measured 10 s per step with 2 threads
    against 0.23 s with 1 thread at load 24 on 2 cores."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return 1 if load > cores - 0.5 else torch.get_num_threads()


class ThreadGovernor:
    """Drops the model to one intra-op thread when steps turn far slower than they were.

    ``model_thread_count`` decides once, from the load average at the start; a job that starts
    on the same cores later (a test suite, a second run) makes torch's worker threads spin-wait
    and the steps collapse (measured: 12 steps/s idle, 0.18 steps/s once a competing process
    started, 2 threads on 2 cores). Call ``tick()`` after each step: once the median of the last
    ``window`` step times exceeds ``factor`` times the best such median seen, the rest of the run
    uses one thread (``threads`` reports the count in use). ``clock`` is injectable for tests.
    """

    def __init__(self, threads: int, window: int = 8, factor: float = 4.0, clock=time.perf_counter):
        self.threads = int(threads)
        self.window, self.factor, self.clock = int(window), float(factor), clock
        self._last: float | None = None
        self._recent: list[float] = []
        self._best = float("inf")
        self.switched_at: int | None = None
        self._steps = 0

    def tick(self) -> None:
        now = self.clock()
        self._steps += 1
        if self._last is not None and self.threads > 1:
            self._recent = (self._recent + [now - self._last])[-self.window:]
            if len(self._recent) == self.window:
                med = float(np.median(self._recent))
                self._best = min(self._best, med)
                if med > self.factor * self._best:
                    self.threads = 1
                    self.switched_at = self._steps
                    torch.set_num_threads(1)
        self._last = now


def check_request(grid: str | Grid, days: int, members: int, burn_in_days: float = 0.0,
                  gap_days: float = 12.0) -> Grid:
    """Validate a simulation request; InputError naming the bad value and the fix."""
    g = grid if isinstance(grid, Grid) else Grid.parse(grid)
    if isinstance(days, bool) or int(days) != days or days <= 0:
        raise InputError(f"days={days!r} must be a positive whole number of days")
    if days > MAX_DAYS:
        raise InputError(f"days={days} exceeds {MAX_DAYS}: each member is stored as one calendar "
                         "year; use more members instead of more days")
    if isinstance(members, bool) or int(members) != members or members <= 0:
        raise InputError(f"members={members!r} must be a positive whole number")
    if burn_in_days < 0:
        raise InputError(f"burn_in_days={burn_in_days!r} must be >= 0")
    if gap_days < 0:
        raise InputError(f"gap_days={gap_days!r} must be >= 0 (days skipped between members; "
                         "at least 10 keeps the members' weather independent)")
    nbytes = members * days * (24 // OUTPUT_HOURS) * N_CHANNELS * g.nlat * g.nlon * 4
    if nbytes > MAX_BYTES:
        raise InputError(f"{members} members × {days} days on {g} need {nbytes / 2**30:.1f} GiB in "
                         f"memory (limit {MAX_BYTES / 2**30:.0f} GiB); use fewer days or members "
                         "or a coarser grid")
    return g


def simulate(grid: str | Grid = "32x64", days: int = 44, members: int = 6, seed: int = 0,
             burn_in_days: float = 1.0, restart: str | Path = DEFAULT_RESTART,
             progress: bool = True, gap_days: float = 12.0) -> States:
    """Run the world; returns the states (``members · 4 · days``, 69, H, W), physical units.

    The members are consecutive stretches of **one long run** (docs/method.md §2): the committed
    spun-up restart, perturbed by ``seed`` (std ``PERTURBATION_K`` K temperature noise), runs
    ``burn_in_days``; member 0 is the next ``days`` days, then ``gap_days`` are skipped after the
    6 h that follow its last state, member 1 is the next ``days`` days, and so on (with
    ``gap_days = 0`` the members are one continuous run). Member ``m`` of this run is stored as the year
    ``2000 + m``. States of one run more than ~10 days apart share no weather (their z500 eddy
    correlation is at the level of chance), so with ``gap_days`` ≥ 10 no member's weather appears
    in another member: the data splits, which are members, are independent
    (:mod:`align_rl.world.independence` checks a store). The cost is that of one member run for
    ``members · days + (members − 1) · gap_days + burn_in_days`` days; at T21 a batch of members
    costs as much per member-day as a single one on a CPU, so nothing is lost by running them in
    sequence. Members are ordered member-major (all times of member 0, then member 1, …)."""
    g = check_request(grid, days, members, burn_in_days, gap_days)
    d = get_dycore()
    state0, info = load_restart(restart, d.spec)
    gen = torch.Generator().manual_seed(int(seed))
    state = d.perturb(state0, PERTURBATION_K, gen)
    diag = Diagnoser(d, g)
    n_out = days * (24 // OUTPUT_HOURS)
    per_out = d.steps_per(OUTPUT_HOURS)
    n_burn = int(round(float(burn_in_days) * d.steps_per(24)))
    n_gap = int(round(float(gap_days) * d.steps_per(24)))
    values = np.empty((members, n_out, N_CHANNELS, g.nlat, g.nlon), dtype=np.float32)
    t0 = time.perf_counter()
    total = n_burn + (members * n_out - 1) * per_out + (members - 1) * n_gap
    threads = model_thread_count()
    governor = ThreadGovernor(threads)

    def step_done(_i):
        bar.update(1)
        governor.tick()

    with model_threads(threads), tqdm(total=total, desc=f"simulate {members}×{days} d on {g}",
                               unit="step", disable=not progress) as bar:
        state = d.advance(state, n_burn, callback=step_done)
        for m in range(members):
            if m:  # one output step, then the gap, after the previous member's last state
                state = d.advance(state, per_out + n_gap, callback=step_done)
            for k in range(n_out):
                if k:
                    state = d.advance(state, per_out, callback=step_done)
                values[m, k] = diag(state)[0]
    if not np.all(np.isfinite(values)):
        raise InputError("the simulation produced NaN/inf values (model blow-up); nothing written")
    corr = member_correlation(values)
    times = np.concatenate([member_times(m, n_out) for m in range(members)])
    attrs = {
        "source": SOURCE,
        "members": members,
        "days": days,
        "burn_in_days": float(burn_in_days),
        "gap_days": float(gap_days),
        "layout": "one run: member m holds its days m·(days + gap_days) days after the burn-in",
        "seed": int(seed),
        "perturbation_k": PERTURBATION_K,
        "model": d.spec.to_dict(),
        "restart": {k: v for k, v in info.items() if k != "model"},
        "derived_channels": list(DERIVED),
        "member_years": f"member m is the year {BASE_YEAR}+m, 6-hourly from Jan 1 00 UTC",
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "threads": threads,
        "threads_dropped_to_1_at_step": governor.switched_at,
        # mean correlation between members of the z500 eddy field (departure from zonal mean)
        # at the same index: ≈ 0 when the members hold independent weather
        "member_correlation_z500": {
            "first_state": None if members < 2 else round(float(corr[0]), 4),
            "mean": None if members < 2 else round(float(np.mean(corr)), 4),
        },
    }
    return States(values.reshape((members * n_out,) + values.shape[2:]), times, g.lat, g.lon, attrs)


def member_correlation(values: np.ndarray, channel: str = "z500",
                       shifts_deg: np.ndarray | None = None) -> np.ndarray:
    """Mean Pearson correlation between members of the eddy field (departure from the zonal mean)
    of ``channel``, per time: ``values`` (M, T, 69, H, W) -> (T,) (NaN when M < 2). With
    ``shifts_deg`` each member is first turned back by its rotation (nearest grid column)."""

    x = values[:, :, channel_index(channel)].astype(np.float64)  # (M, T, H, W)
    if shifts_deg is not None:
        d = 360.0 / x.shape[-1]
        x = np.stack([np.roll(x[i], -int(round(sh / d)), axis=-1)
                      for i, sh in enumerate(shifts_deg)])
    x = x - x.mean(axis=-1, keepdims=True)
    x = x.reshape(x.shape[0], x.shape[1], -1)
    x = x - x.mean(axis=-1, keepdims=True)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)
    m = x.shape[0]
    if m < 2:
        return np.full(x.shape[1], np.nan)
    pairs = [(a, b) for a in range(m) for b in range(a + 1, m)]
    return np.mean([np.sum(x[a] * x[b], axis=-1) for a, b in pairs], axis=0)


def fit_normalizer(states: States, train: list[str]) -> tuple[Normalizer, str]:
    """Normalisation statistics over the training time range, or over all times (and say so)
    when the range holds no state (a run with too few members)."""
    sel = states.select(train[0], train[1])
    if len(sel) > 0:
        return Normalizer.fit(sel.values), f"train {train[0]}..{train[1]} ({len(sel)} states)"
    return (Normalizer.fit(states.values),
            f"all {len(states)} states: the run has too few members to fill the training range "
            f"{train[0]}..{train[1]}")


def build_world(cfg: Config, out: str | Path, overwrite: bool = False, progress: bool = True
                ) -> Path:
    """Simulate the world that ``cfg.data`` describes and write it to ``out`` (atomic)."""
    data: DataConfig = cfg.data
    out = Path(out)
    g = check_request(data.grid, data.days, data.members, data.burn_in_days, data.gap_days)
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; remove it or pass --overwrite")
    if out.exists():
        from align_rl.owned import require_owned

        require_owned(out, "world store")  # --overwrite replaces only a store align_rl wrote
    states = simulate(g, data.days, data.members, data.seed, data.burn_in_days, progress=progress,
                      gap_days=data.gap_days)
    norm, how = fit_normalizer(states, data.train)
    states.attrs.update({
        "normalization": norm.to_dict(),
        "normalization_split": how,
        "splits": {k: list(getattr(data, k)) for k in ("train", "val", "pref", "test")},
        "config_hash": identity.world(cfg),
        "data_config": dataclasses.asdict(data),
    })
    return write_states(out, states, derived=DERIVED, overwrite=overwrite)


def store_normalization(path: str | Path, train: list[str]) -> str:
    """Compute the normalisation statistics of a local WeatherBench2-layout store over ``train``
    (all times when the range is empty) and write them into its attributes; returns which states
    they cover."""
    import json

    import zarr

    states = open_states(path, check_units=False)  # statistics of any store
    norm, how = fit_normalizer(states, train)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs.update({"normalization": json.dumps(norm.to_dict()), "normalization_split": how})
    zarr.consolidate_metadata(str(path))
    return how
