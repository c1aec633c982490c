"""The independence check of the data splits (align_rl/world/independence.py, docs/method.md §2.1).

Synthetic weather with a known answer: smooth random eddy fields that decorrelate over ~2 days
(AR(1) in time). Independent stretches pass; a held-out stretch that is a noisy copy of a training
stretch fails, and so does a copy turned in longitude once the stored turn is undone.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from align_rl.errors import InputError
from align_rl.world.independence import (
    check_store,
    check_stretches,
    eddy_unit,
    independent_correlations,
    same_index_correlations,
    unrotate,
)

H, W, T = 16, 32, 120  # 30 days of 6-hourly states


def _weather(rng: np.random.Generator, t: int = T, days: float = 2.0) -> np.ndarray:
    """(t, H, W) smooth eddy fields, AR(1) in time with an e-folding of ``days`` days."""
    a = np.exp(-1.0 / (4 * days))
    k = np.arange(1, 8)
    lat = np.linspace(-1, 1, H)[:, None]
    lon = np.linspace(0, 2 * np.pi, W, endpoint=False)[None]
    coef = rng.normal(size=(len(k), 4))
    out = np.empty((t, H, W))
    for i in range(t):
        coef = a * coef + np.sqrt(1 - a * a) * rng.normal(size=coef.shape)
        f = np.zeros((H, W))
        for j, kk in enumerate(k):
            f += (coef[j, 0] * np.cos(kk * lon) + coef[j, 1] * np.sin(kk * lon)) * np.cos(np.pi * lat * (1 + j % 3) / 2)
            f += (coef[j, 2] * np.cos(kk * lon) + coef[j, 3] * np.sin(kk * lon)) * np.sin(np.pi * lat * (1 + j % 2))
        out[i] = 5e4 + 300.0 * f
    return out


def test_eddy_unit_is_a_pearson_correlation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 5, H, W))
    ua, ub = eddy_unit(a), eddy_unit(b)
    ea = (a - a.mean(-1, keepdims=True)).reshape(5, -1)
    eb = (b - b.mean(-1, keepdims=True)).reshape(5, -1)
    want = [np.corrcoef(ea[i], eb[i])[0, 1] for i in range(5)]
    np.testing.assert_allclose(np.sum(ua * ub, -1), want, atol=1e-12)
    # the zonal mean does not count: adding a zonally uniform field changes nothing
    np.testing.assert_allclose(eddy_unit(a + np.linspace(0, 9e3, H)[None, :, None]), ua, atol=1e-12)


def test_independent_stretches_pass():
    rng = np.random.default_rng(1)
    train = [_weather(rng) for _ in range(3)]
    held = {"val": [_weather(rng)], "test": [_weather(rng)]}
    rep = check_stretches(train, held)
    assert rep.passed, rep.table()
    assert abs(np.median(independent_correlations(train, 40))) < 0.1  # ≥ 10 days apart: chance


def test_a_copy_of_training_weather_fails_even_turned():
    rng = np.random.default_rng(2)
    train = [_weather(rng) for _ in range(3)]
    copy = train[1] + 0.3 * (_weather(rng) - 5e4)  # training weather, a little noise
    turned = np.roll(copy, 8, axis=-1)  # turned 90° east: 8 of 32 columns
    rep = check_stretches(train, {"val": [_weather(rng)], "test": [copy]})
    assert not rep.passed and [s.passed for s in rep.splits] == [True, False]
    assert "SHARES WEATHER WITH TRAIN" in rep.table()
    # as stored, a turned copy looks independent; undone, it is caught
    assert check_stretches(train, {"test": [turned]}).passed
    assert not check_stretches(train, {"test": [unrotate(turned, 90.0)]}).passed


def test_same_index_skips_beyond_the_shorter_stretch():
    rng = np.random.default_rng(3)
    a, b = _weather(rng, 10), _weather(rng, 6)
    assert same_index_correlations(a, [b]).shape == (6,)
    np.testing.assert_allclose(same_index_correlations(b, [b]), 1.0)


def test_too_short_a_store_is_refused():
    rng = np.random.default_rng(4)
    with pytest.raises(InputError, match="longer than 10 days"):
        check_stretches([_weather(rng, 8)], {"test": [_weather(rng, 8)]})
    with pytest.raises(InputError, match="training stretch"):
        check_stretches([], {"test": [_weather(rng, 8)]})


def _store(path, members: list[np.ndarray], rotations=None):
    """A WeatherBench2-layout store of z500 only: member m as the year 2000 + m."""
    import xarray as xr

    times = np.concatenate([np.datetime64(f"{2000 + m}-01-01T00", "ns")
                            + np.arange(len(z)) * np.timedelta64(6, "h") for m, z in enumerate(members)])
    z = np.concatenate(members)[:, None]
    ds = xr.Dataset({"geopotential": (("time", "level", "latitude", "longitude"), z.astype(np.float32))},
                    coords={"time": times, "level": [500], "latitude": np.linspace(-80, 80, H),
                            "longitude": np.arange(W) * 360.0 / W})
    ds.attrs["splits"] = json.dumps({"train": ["2000-01-01", "2001-12-31"], "val": ["2002-01-01", "2002-12-31"],
                                     "test": ["2003-01-01", "2003-12-31"]})
    if rotations is not None:
        ds.attrs["member_rotation_deg"] = json.dumps(rotations)
    ds.to_zarr(path)
    return path


def test_check_store_and_command(tmp_path, capsys):
    """The command on a store: independent members pass (exit 0); members that are turned copies
    of a training member, as the earlier world made them, fail once the stored turns are undone
    (exit 1)."""
    from align_rl.data.__main__ import main as data_main

    def main(argv):
        try:
            return data_main(argv)
        except SystemExit as exc:
            return int(exc.code)

    rng = np.random.default_rng(5)
    good = _store(tmp_path / "good.zarr", [_weather(rng) for _ in range(4)])
    assert check_store(good).passed
    assert main(["independence", str(good), "--json", str(tmp_path / "r.json")]) == 0
    assert "independent" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True
    base = _weather(rng)
    copies = [np.roll(base + 0.2 * (_weather(rng) - 5e4), k, axis=-1) for k in (0, 8, 16, 24)]
    bad = _store(tmp_path / "bad.zarr", copies, rotations=[0.0, 90.0, 180.0, 270.0])
    rep = check_store(bad)
    assert not rep.passed and all(not s.passed for s in rep.splits)
    assert main(["independence", str(bad)]) == 1
    # bad input: a missing store, ranges without train
    assert main(["independence", str(tmp_path / "nowhere.zarr")]) == 2
    assert main(["independence", str(good), "--test", "2003-01-01", "2003-12-31"]) == 2


@pytest.mark.slow
def test_default_world_splits_are_independent(tmp_path):
    """The default world (data defaults, ~3-4 min): every held-out split passes the check
    (``ALIGN_RL_WORLD`` may name an already simulated default world to check instead)."""
    from align_rl.config import load_config
    from align_rl.world.simulate import build_world

    path = os.environ.get("ALIGN_RL_WORLD")
    if not path:
        path = build_world(load_config(), tmp_path / "world.zarr", progress=False)
    rep = check_store(path)
    assert [s.split for s in rep.splits] == ["val", "pref", "test"]
    assert rep.passed, rep.table()
