"""48 h backgrounds: the input times, the forecasts against an analytic answer, the cache, actors.

The reference world advects every field eastward by one grid column per 6 h, and the reference
forecaster does exactly that (a roll in longitude), so the 48 h forecast from the truth at
``t − 48 h`` must equal the truth at ``t`` (in physical units, after the round trip through the
normalisation).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from align_rl.world.backgrounds import (
    KEY_ATTR,
    background_inputs,
    ensure_backgrounds,
)
from align_rl.identity import forecaster_digest
from align_rl.config import load_config
from align_rl.errors import InputError
from align_rl.io.grid import Grid
from align_rl.models.forecaster import Forecaster
from align_rl.models.loading import spec_of
from align_rl.io.normalization import Normalizer
from align_rl.io.schema import N_CHANNELS
from align_rl.io.states import States
from align_rl.workspace import Workspace

GRID = Grid(8, 16)
H6 = np.timedelta64(6, "h")


def _times(starts: list[str], n: int) -> np.ndarray:
    return np.concatenate([np.datetime64(s, "ns") + np.arange(n) * H6 for s in starts])


def advecting_states(times: np.ndarray, seed: int = 0) -> States:
    """Smooth fields that move east by one column per 6 h (physical units, per-channel scales)."""
    rng = np.random.default_rng(seed)
    lat = np.deg2rad(GRID.lat)[:, None]
    lon = np.deg2rad(GRID.lon)[None]
    patterns = (np.cos(lat) * np.cos(2 * lon + 1.0),
                np.cos(lat) ** 2 * np.sin(3 * lon) + 0.5 * np.sin(2 * lat) * np.cos(lon))
    a = rng.standard_normal((N_CHANNELS, 2))  # every channel mixes two smooth patterns
    base = a[:, 0, None, None] * patterns[0] + a[:, 1, None, None] * patterns[1]
    mean = np.linspace(-10.0, 5e4, N_CHANNELS)[:, None, None]
    std = np.linspace(0.5, 300.0, N_CHANNELS)[:, None, None]
    t0 = times[0]
    steps = ((times - t0) // H6).astype(int)
    vals = np.stack([mean + std * np.roll(base, int(k), axis=-1) for k in steps]).astype(np.float32)
    norm = Normalizer.fit(vals)
    return States(vals, times, GRID.lat, GRID.lon, {"normalization": norm.to_dict(), "source": "advect"})


class RollForecaster(nn.Module, Forecaster):
    """Moves the current frame east by ``shift`` columns per step (ignores the older frame)."""

    def __init__(self, shift: int = 1):
        super().__init__()
        self.register_buffer("shift", torch.tensor(shift))

    def step(self, x_prev, x_curr):
        return torch.roll(x_curr, int(self.shift), dims=-1)


def _cfg(tmp_path, *extra):
    return load_config(overrides=[f"run.workdir={tmp_path}", "data.grid=8x16", "vae.window=2", "actors.forecasters=2",
                                  "pretrain.background_batch=3", "actors.cpus_per_actor=1", *extra])


def test_background_inputs_need_both_frames_six_hours_apart():
    # two stretches of 12 and 9 six-hourly times, a gap between them
    t = _times(["2000-01-01", "2001-01-01"], 12)[:21]
    target, prev, curr = background_inputs(t)
    # a 48 h forecast verifying at index i starts from i-8 and needs i-9: only i = 9, 10, 11
    assert target.tolist() == [9, 10, 11]
    assert curr.tolist() == [1, 2, 3] and prev.tolist() == [0, 1, 2]
    assert np.all(t[target] - t[curr] == np.timedelta64(48, "h"))
    # a missing frame removes every target that needs it
    # hours 0..78 without 18 h: targets at 54, 60 h (inputs 0/6, 6/12 h) and 78 h (24/30 h);
    # 66 h and 72 h need the 18 h frame
    t2 = np.delete(_times(["2000-01-01"], 14), 3)
    target2, _, _ = background_inputs(t2)
    assert [str(x)[:13] for x in t2[target2]] == ["2000-01-03T06", "2000-01-03T12", "2000-01-04T06"]


def test_fingerprint_follows_the_weights():
    a, b = RollForecaster(1), RollForecaster(1)
    assert forecaster_digest(a) == forecaster_digest(b)
    assert forecaster_digest(a) != forecaster_digest(RollForecaster(2))
    with pytest.raises(InputError, match="fingerprint"):
        forecaster_digest(object())


@pytest.mark.ray
def test_backgrounds_equal_the_advected_truth_and_are_cached(tmp_path, ray_session, monkeypatch):
    import align_rl.world.backgrounds as bgmod

    cfg = _cfg(tmp_path)
    ws = Workspace.from_config(cfg)
    truth = advecting_states(_times(["2000-01-01"], 16))
    calls = []
    real = bgmod.compute_backgrounds

    def counting(*args, **kwargs):
        calls.append(len(args[4]))  # number of targets computed
        return real(*args, **kwargs)

    monkeypatch.setattr(bgmod, "compute_backgrounds", counting)
    first = truth.select(None, "2000-01-03T12")  # 11 times -> targets 9, 10
    bg = ensure_backgrounds(cfg, ws, first, RollForecaster(1), progress=False)
    assert calls == [2]
    assert bg.times.tolist() == first.times[9:].tolist()
    np.testing.assert_allclose(bg.values, first.values[9:], rtol=1e-5, atol=1e-3)

    # the whole stretch: only the 5 missing times are computed, the store holds all 7
    bg = ensure_backgrounds(cfg, ws, truth, RollForecaster(1), progress=False)
    assert calls == [2, 5]
    np.testing.assert_allclose(bg.values, truth.values[9:], rtol=1e-5, atol=1e-3)
    assert bg.attrs[KEY_ATTR]["forecaster"] == forecaster_digest(RollForecaster(1))

    # a rerun reuses everything
    again = ensure_backgrounds(cfg, ws, truth, RollForecaster(1), progress=False)
    assert calls == [2, 5]
    np.testing.assert_array_equal(again.values, bg.values)

    # another forecaster is another key: all 7 recomputed, and now they differ from the truth
    other = ensure_backgrounds(cfg, ws, truth, RollForecaster(2), progress=False)
    assert calls == [2, 5, 7]
    assert not np.allclose(other.values, truth.values[9:], atol=1e-2)
    # shifted by 16 columns over 8 steps = the full circle: equals the truth at t - 48 h
    np.testing.assert_allclose(other.values, truth.values[1:8], rtol=1e-5, atol=1e-3)

    # another dataset configuration is another key too
    cfg2 = _cfg(tmp_path, "data.seed=1")
    ensure_backgrounds(cfg2, ws, truth, RollForecaster(2), progress=False)
    assert calls == [2, 5, 7, 7]


def test_backgrounds_need_inputs(tmp_path):
    cfg = _cfg(tmp_path)
    truth = advecting_states(_times(["2000-01-01"], 9))  # 48 h + 6 h = 9 frames are not enough
    with pytest.raises(InputError, match="t − 54 h"):
        ensure_backgrounds(cfg, Workspace.from_config(cfg), truth, RollForecaster(1), progress=False)


@pytest.mark.ray
def test_forecast_actor_restarts_after_being_killed(tmp_path, ray_session):
    import ray

    from actors.forecast import forecast_batches, make_forecasters

    cfg = _cfg(tmp_path, "actors.max_restarts=2", "actors.max_task_retries=2")
    (actor,) = make_forecasters(cfg, ray.put(spec_of(RollForecaster(1))), n=1)
    x = np.random.default_rng(0).standard_normal((6, 2, N_CHANNELS, 8, 16)).astype(np.float32)
    out = ray.get(actor.rollout.remote(x[:2, 0], x[:2, 1], 3))
    assert out.shape == (2, 3, N_CHANNELS, 8, 16)
    np.testing.assert_allclose(out[:, 2], np.roll(x[:2, 1], 3, axis=-1))
    pid = ray.get(actor.info.remote())["pid"]
    ray.kill(actor, no_restart=False)  # a crash: Ray restarts the actor and retries its tasks
    res = forecast_batches([actor], [(x[i, 0][None], x[i, 1][None]) for i in range(6)], 4)
    for i in range(6):
        np.testing.assert_allclose(res[i][0], np.roll(x[i, 1], 4, axis=-1))
    assert ray.get(actor.info.remote())["pid"] != pid
    ray.kill(actor, no_restart=True)


def test_truth_window_covers_the_background_inputs_and_the_forecast_lead():
    """One window for every split (pairs, validation, evaluation): the first day's background
    needs the truth 54 h before it, the last analysis its truth ``forecast_hours`` later."""
    import numpy as np

    from align_rl.world.splits import truth_window

    for fh in (24, 48):
        start, end = truth_window(["2004-01-01", "2004-01-31"], fh)
        assert start <= np.datetime64("2004-01-01T00") - np.timedelta64(54, "h")
        assert end >= np.datetime64("2004-01-31T18") + np.timedelta64(fh, "h")
        assert end - start < np.timedelta64(31 * 24 + fh + 96, "h")  # no more than it needs
