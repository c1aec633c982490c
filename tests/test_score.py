"""The score command against hand computations."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from align_rl import era5
from align_rl.grid import Grid
from align_rl.schema import CHANNELS
from align_rl.score import main, score_stores
from align_rl.states import States
from tests.test_era5 import make_states, write_layout
from tests.test_geostrophic import balanced_states, hand_imbalance

GRID = Grid(16, 32)


def _truth(T: int = 4) -> States:
    s = make_states(grid=GRID, T=T, seed=5)
    bal = balanced_states(GRID, n=T, seed=6)  # realistic, nearly balanced z500/u500/v500
    for name in ("z500", "u500", "v500"):
        i = CHANNELS.index(name)
        s.values[:, i] = bal[:, i]
    s.attrs["normalization"] = era5.compute_normalizer(s).to_dict()
    return s


def _hand(analysis: np.ndarray, truth: np.ndarray, mean: np.ndarray, std: np.ndarray, lat: np.ndarray):
    """mse, mae, wrmse (69,), geo_score: per time step, then averaged — written out in numpy."""
    a = analysis.astype(np.float64)
    t = truth.astype(np.float64)
    na = (a - mean[:, None, None]) / std[:, None, None]
    nt = (t - mean[:, None, None]) / std[:, None, None]
    w = np.cos(np.deg2rad(lat))
    w = w / w.mean()
    mses, maes, wr, gs = [], [], [], []
    for k in range(len(a)):
        mses.append(np.mean((na[k] - nt[k]) ** 2))
        maes.append(np.mean(np.abs(na[k] - nt[k])))
        wr.append(np.sqrt(np.mean(w[None, :, None] * (a[k] - t[k]) ** 2, axis=(1, 2))))
        d, d_gt = hand_imbalance(a[k], lat), hand_imbalance(t[k], lat)
        gs.append(100 * 2 / (1 + np.exp(abs(d - d_gt) / d_gt)))
    return np.mean(mses), np.mean(maes), np.mean(wr, axis=0), np.mean(gs)


@pytest.fixture
def stores(tmp_path):
    truth = _truth()
    tp = write_layout(tmp_path / "truth.zarr", truth)
    rng = np.random.default_rng(11)
    # the analysis: a noisy copy of times 1..3 plus one time the truth lacks, stored north to south
    # in another dimension order, without normalisation statistics
    times = np.concatenate([truth.times[1:], truth.times[-1:] + np.timedelta64(6, "h")])
    vals = np.concatenate([truth.values[1:], truth.values[-1:]])
    std = vals.std(axis=(0, 2, 3), keepdims=True)
    noisy = (vals + 0.01 * std * rng.standard_normal(vals.shape)).astype(np.float32)
    ana = States(noisy, times, truth.lat, truth.lon)
    ap = write_layout(tmp_path / "ana.zarr", ana, order=("time", "level", "longitude", "latitude"),
                      lat_desc=True)
    return truth, ana, tp, ap


def test_truth_against_itself(stores, capsys):
    truth, _, tp, _ = stores
    assert main(["--analysis", str(tp), "--truth", str(tp)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mse"] == 0 and out["mae"] == 0
    assert set(out["wrmse"]) == set(CHANNELS) and all(v == 0 for v in out["wrmse"].values())
    assert out["geo_score"] == pytest.approx(100.0, abs=1e-9)
    assert out["n_times"] == len(truth)


def test_noisy_copy_matches_hand_computation(stores, tmp_path, capsys):
    truth, ana, tp, ap = stores
    dest = tmp_path / "metrics.json"
    assert main(["--analysis", str(ap), "--truth", str(tp), "--out", str(dest), "--chunk", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(dest.read_text())
    assert printed == written
    assert not list(tmp_path.glob("metrics.json.tmp-*"))
    assert written["n_times"] == 3  # the shared times only
    norm = truth.attrs["normalization"]
    mse, mae, wr, gs = _hand(ana.values[:3], truth.values[1:], np.array(norm["mean"]),
                             np.array(norm["std"]), truth.lat)
    assert written["mse"] == pytest.approx(mse, rel=1e-6)
    assert written["mae"] == pytest.approx(mae, rel=1e-6)
    np.testing.assert_allclose([written["wrmse"][c] for c in CHANNELS], wr, rtol=1e-6)
    assert written["geo_score"] == pytest.approx(gs, rel=1e-6)
    assert 0 < written["geo_score"] < 100
    assert written["mse"] == pytest.approx(1e-4, rel=0.2)  # 1 % noise of each channel's std


def test_normalization_option_and_errors(stores, tmp_path, capsys):
    truth, ana, tp, ap = stores
    # the analysis store has no statistics: as the truth it needs --normalization
    with pytest.raises(SystemExit) as exc:
        main(["--analysis", str(tp), "--truth", str(ap)])
    assert exc.value.code == 2
    assert "python -m align_rl.data stats" in capsys.readouterr().err
    assert main(["--analysis", str(tp), "--truth", str(ap), "--normalization", str(tp)]) == 0
    capsys.readouterr()
    # no shared times
    later = States(truth.values, truth.times + np.timedelta64(30, "D"), truth.lat, truth.lon,
                   dict(truth.attrs))
    lp = write_layout(tmp_path / "later.zarr", later)
    with pytest.raises(SystemExit) as exc:
        main(["--analysis", str(lp), "--truth", str(tp), "--out", str(tmp_path / "m.json")])
    assert exc.value.code == 2
    assert "share no time steps" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()
    # different grids
    coarse = make_states(grid=Grid(8, 16), T=2, start=str(truth.times[0]))
    cp = write_layout(tmp_path / "coarse.zarr", coarse)
    with pytest.raises(SystemExit):
        main(["--analysis", str(cp), "--truth", str(tp)])
    assert "differs from the truth grid" in capsys.readouterr().err


def test_score_stores_api_and_cli_entry(stores):
    truth, _, tp, ap = stores
    res = score_stores(ap, tp, progress=False)
    proc = subprocess.run([sys.executable, "-m", "align_rl.score", "--analysis", str(ap), "--truth", str(tp)],
                          capture_output=True, text=True, check=True)
    cli = json.loads(proc.stdout)
    assert cli["mse"] == pytest.approx(res["mse"]) and cli["geo_score"] == pytest.approx(res["geo_score"])
