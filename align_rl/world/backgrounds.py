"""The 48 h backgrounds ``x_b(t)``: the forecaster's 8 × 6 h forecast from the truth at ``t − 48 h``.

docs/method.md §3: the forecaster takes two frames, so the forecast that verifies at ``t`` starts from the
truth at ``t − 54 h`` and ``t − 48 h``; a background exists at every time ``t`` of the states whose
two input times are in the states too (with 6-hourly data: from the 10th frame of each
uninterrupted stretch on).

The forecasts run on Ray forecast actors (:mod:`align_rl.remote`: ``workers().forecast``) in
batches of ``cfg.pretrain.background_batch``. The result is cached in ``ws.backgrounds`` (a WeatherBench2-layout
zarr store, physical units) whose attribute ``background_key`` (:func:`align_rl.identity.backgrounds`)
records the dataset by content, the normalisation statistics and the forecaster by content (its
weights, or its ONNX file and statistics). A call with the same key reuses the stored backgrounds and
only computes the times missing from the store; a changed key recomputes them all.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from align_rl import identity, remote
from align_rl.errors import InputError
from align_rl.io.era5 import load_normalizer, open_states
from align_rl.io.normalization import Normalizer
from align_rl.io.states import States
from align_rl.io.store import write_states
from align_rl.training.harness import init_ray

STEP = np.timedelta64(6, "h")
LEAD_STEPS = 8  # 8 × 6 h = 48 h
KEY_ATTR = "background_key"


def background_inputs(times: np.ndarray, lead_steps: int = LEAD_STEPS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices ``(target, prev, curr)`` into ``times`` (datetime64, ascending): ``times[curr] =
    times[target] − lead_steps · 6 h`` and ``times[prev] = times[curr] − 6 h``, for every target
    whose two input times exist. int64 arrays of equal length."""
    t = np.asarray(times, dtype="datetime64[ns]")
    lead = np.timedelta64(lead_steps * STEP, "ns")
    step = np.timedelta64(STEP, "ns")

    def find(want: np.ndarray) -> np.ndarray:
        i = np.searchsorted(t, want)
        ok = (i < len(t)) & (t[np.minimum(i, len(t) - 1)] == want)
        return np.where(ok, i, -1)

    curr = find(t - lead)
    prev = find(t - lead - step)
    ok = (curr >= 0) & (prev >= 0)
    target = np.flatnonzero(ok).astype(np.int64)
    return target, prev[ok].astype(np.int64), curr[ok].astype(np.int64)


def background_key(cfg, ws, states: States, forecaster: Any, normalizer: Normalizer) -> dict[str, Any]:
    """The cache key (:func:`align_rl.identity.backgrounds`): the run's dataset by content, the
    statistics, the grid, the forecaster and the lead time."""
    return identity.backgrounds(cfg, ws, states, forecaster, normalizer, LEAD_STEPS * 6)


def _normalizer_of(states: States) -> Normalizer:
    return load_normalizer(states)


def _open_cache(path: Path, key: dict) -> States | None:
    if not path.exists():
        return None

    try:
        cached = open_states(path, check_units=False)  # derived from checked inputs
    except InputError:
        return None  # unreadable: recompute
    stored = cached.attrs.get(KEY_ATTR)
    if isinstance(stored, str):
        try:
            stored = json.loads(stored)
        except ValueError:
            return None
    return cached if identity.same(stored, key) else None


def compute_backgrounds(
    cfg,
    states: States,
    forecaster: Any,
    target: np.ndarray,
    prev: np.ndarray,
    curr: np.ndarray,
    normalizer: Normalizer,
    progress: bool = True,
) -> np.ndarray:
    """48 h forecasts for the given index triples, on Ray forecast actors -> physical float32
    ``(len(target), 69, H, W)``."""

    init_ray()
    bs = max(1, int(cfg.pretrain.background_batch))
    chunks = [np.arange(i, min(i + bs, len(target))) for i in range(0, len(target), bs)]

    def norm(idx: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(normalizer.normalize(states.values[idx]), dtype=np.float32)

    batches = [(norm(prev[c]), norm(curr[c])) for c in chunks]
    forecast = remote.workers().forecast
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(target), desc="backgrounds (48 h forecasts)", unit="t")
    out = np.empty((len(target),) + states.values.shape[1:], dtype=np.float32)
    try:
        def store(i: int, res: np.ndarray) -> None:
            out[chunks[i]] = normalizer.denormalize(res).astype(np.float32)
            if bar is not None:
                bar.update(len(chunks[i]))

        forecast(cfg, forecaster, batches, LEAD_STEPS, on_result=store)
    finally:
        if bar is not None:
            bar.close()
    if not np.all(np.isfinite(out)):
        raise InputError("the forecaster produced NaN or inf backgrounds; check the forecaster")
    return out


def ensure_backgrounds(cfg, ws, states: States, forecaster: Any, progress: bool = True) -> States:
    """48 h backgrounds (physical units) at every time of ``states`` whose inputs (``t − 54 h`` and
    ``t − 48 h``) are in ``states``; cached in ``ws.backgrounds`` (see the module docstring).

    ``states``: truth with its normalisation statistics in ``attrs`` (as :func:`open_states`
    returns it); ``forecaster``: any forecaster of :mod:`align_rl.models.forecaster` (normalised
    ``rollout``). Returns :class:`States` whose ``times`` are the background times (ascending) and
    whose ``attrs`` hold ``normalization`` and ``background_key``. Raises :class:`InputError` when no
    time has its inputs.
    """

    target, prev, curr = background_inputs(states.times)
    if len(target) == 0:
        raise InputError(
            f"no time of the {len(states)} states has both inputs of a 48 h forecast (t − 54 h and "
            "t − 48 h); give at least 10 consecutive 6-hourly states"
        )
    normalizer = _normalizer_of(states)
    key = background_key(cfg, ws, states, forecaster, normalizer)
    path = Path(ws.backgrounds)
    want = states.times[target]
    cached = _open_cache(path, key)
    have = np.zeros(len(target), dtype=bool)
    if cached is not None:
        have = np.isin(want, cached.times)
    if not have.all():
        t0 = time.perf_counter()
        miss = ~have
        new = compute_backgrounds(cfg, states, forecaster, target[miss], prev[miss], curr[miss],
                                  normalizer, progress)
        times = want[miss]
        if cached is not None:  # merge with what the store already holds
            keep = ~np.isin(cached.times, times)
            times = np.concatenate([cached.times[keep], times])
            new = np.concatenate([cached.values[keep], new])
        order = np.argsort(times)
        attrs = {"normalization": normalizer.to_dict(), KEY_ATTR: key, "kind": "background",
                 "description": "48 h forecasts (8 x 6 h) of the forecaster from the truth at t - 48 h",
                 "seconds": round(time.perf_counter() - t0, 3)}
        merged = States(new[order], times[order], states.lat, states.lon, attrs)
        write_states(path, merged, overwrite=True)
        cached = _open_cache(path, key)
        if cached is None:  # pragma: no cover - the store was just written
            raise InputError(f"cannot read back the backgrounds written to {path}")
    idx = np.searchsorted(cached.times, want)
    attrs = dict(cached.attrs)
    attrs["normalization"] = normalizer.to_dict()
    attrs[KEY_ATTR] = key
    return States(cached.values[idx], want, states.lat, states.lon, attrs)
