"""The score command against hand computations."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from align_rl.io import era5
from align_rl.io.grid import Grid
from align_rl.io.schema import CHANNELS
from align_rl.score import main
from align_rl.evaluation.scoring import score_stores
from align_rl.io.states import States
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
    # a truth store without statistics: physical scores only, no mse/mae
    assert main(["--analysis", str(tp), "--truth", str(ap)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "mse" not in out and out["normalization"] is None and "wrmse" in out
    assert main(["--analysis", str(tp), "--truth", str(ap), "--normalization", str(tp)]) == 0
    assert json.loads(capsys.readouterr().out)["mse"] > 0
    # no shared times
    later = States(truth.values, truth.times + np.timedelta64(30, "D"), truth.lat, truth.lon,
                   dict(truth.attrs))
    lp = write_layout(tmp_path / "later.zarr", later)
    with pytest.raises(SystemExit) as exc:
        main(["--analysis", str(lp), "--truth", str(tp), "--out", str(tmp_path / "m.json")])
    assert exc.value.code == 2
    assert "share no time steps" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "m.csv").exists()
    # different grids
    coarse = make_states(grid=Grid(8, 16), T=2, start=str(truth.times[0]))
    cp = write_layout(tmp_path / "coarse.zarr", coarse)
    with pytest.raises(SystemExit):
        main(["--analysis", str(cp), "--truth", str(tp)])
    assert "differs from the truth grid" in capsys.readouterr().err
    assert main(["--analysis", str(cp), "--truth", str(tp), "--regrid", "truth-to-analysis"]) == 0
    assert json.loads(capsys.readouterr().out)["grid"] == "8x16"
    # an output inside an input store is refused before anything runs
    with pytest.raises(SystemExit) as exc:
        main(["--analysis", str(ap), "--truth", str(tp), "--out", str(tp / "metrics.json")])
    assert exc.value.code == 2 and "never writes into its inputs" in capsys.readouterr().err
    assert not (tp / "metrics.json").exists()


def test_score_stores_api_and_cli_entry(stores):
    truth, _, tp, ap = stores
    res = score_stores(ap, tp, progress=False)
    proc = subprocess.run([sys.executable, "-m", "align_rl.score", "--analysis", str(ap), "--truth", str(tp)],
                          capture_output=True, text=True, check=True)
    cli = json.loads(proc.stdout)
    assert cli["mse"] == pytest.approx(res["mse"]) and cli["geo_score"] == pytest.approx(res["geo_score"])


# ------------------------------------------------------------------ WeatherBench2 stores, pole rows


def _wb2_store(path, values: dict, times, grid, extra: dict | None = None):
    """A WeatherBench2-layout store as published: (time, level, longitude, latitude) dims,
    latitude 90 → −90 with pole rows, only the given variables and levels."""
    import xarray as xr

    lat_desc = grid.lat[::-1]
    data = {}
    for name, (levels, arr) in {**values, **(extra or {})}.items():  # arr (T, L, H, W), lat ascending
        a = np.asarray(arr)[..., ::-1, :]  # to north → south
        da = xr.DataArray(a, dims=("time", "level", "latitude", "longitude"),
                          coords={"time": times, "level": np.array(levels, dtype=np.int64),
                                  "latitude": lat_desc, "longitude": grid.lon})
        data[name] = da.transpose("time", "level", "longitude", "latitude")
    ds = xr.Dataset(data)
    ds.to_zarr(path, mode="w", consolidated=False)
    return path


def _independent_scores(a, t, lat_asc, d_deg, rows=None):
    """Area-weighted RMSEs with the `scores` package and cell areas written out for a grid with
    pole rows (interior rows 2 sin(d/2) cos φ, pole rows 1 − cos(d/2)); a, t (T, H, W)."""
    import xarray as xr
    from scores.continuous import mse as scores_mse

    d = np.deg2rad(d_deg)
    area = np.where(np.isclose(np.abs(lat_asc), 90.0), 1 - np.cos(d / 2),
                    2 * np.sin(d / 2) * np.cos(np.deg2rad(lat_asc)))
    rows = np.ones(len(lat_asc), bool) if rows is None else rows
    dims = ("time", "latitude", "longitude")
    fa = xr.DataArray(a[:, rows], dims=dims, coords={"latitude": lat_asc[rows]})
    ob = xr.DataArray(t[:, rows], dims=dims, coords={"latitude": lat_asc[rows]})
    w = xr.DataArray(area[rows], dims=("latitude",), coords={"latitude": lat_asc[rows]})
    per_time = scores_mse(fa, ob, reduce_dims=["latitude", "longitude"], weights=w).values
    return float(np.mean(np.sqrt(per_time))), float(np.sqrt(np.mean(per_time)))


def test_wb2_store_with_pole_rows_and_only_z_t_matches_an_independent_computation(tmp_path, capsys):
    from align_rl.io.grid import LatLonGrid

    g = LatLonGrid(121, 240, poles=True)
    T = 4
    times = np.datetime64("2020-01-01T00", "ns") + np.arange(T) * np.timedelta64(6, "h")
    rng = np.random.default_rng(3)
    la = np.deg2rad(g.lat)[:, None]
    lo = np.deg2rad(g.lon)[None, :]
    z = np.stack([[5.5e4 - 4000 * np.sin(la) ** 2 + 300 * np.cos(la) * np.sin(3 * lo + k) + 0 * lo
                   for k in (0.1, 0.9)] for _ in range(T)]) + 50 * rng.standard_normal((T, 2, *g.shape))
    t = 250 + 30 * np.cos(la) + 2 * rng.standard_normal((T, 2, *g.shape))
    truth = _wb2_store(tmp_path / "era5.zarr", {"geopotential": ([500, 850], z), "temperature": ([500, 850], t)},
                       times, g)
    # errors that grow toward the poles, so that the pole rows' weight matters
    grow = 1 + 3 * np.abs(np.sin(la))
    za = z + 40 * grow * rng.standard_normal(z.shape)
    ta = t + 1.5 * grow * rng.standard_normal(t.shape)
    u = 10 * rng.standard_normal((T, 1, *g.shape))
    ana = _wb2_store(tmp_path / "ana.zarr", {"geopotential": ([500, 850], za), "temperature": ([850, 500], ta[:, ::-1])},
                     times, g, extra={"u_component_of_wind": ([500], u)})
    before = {f: f.read_bytes() for f in sorted(truth.rglob("*")) if f.is_file()}
    out = tmp_path / "metrics.json"
    assert main(["--analysis", str(ana), "--truth", str(truth), "--out", str(out),
                 "--regions", "global,tropics,extratropics,band:60:90"]) == 0
    res = json.loads(out.read_text())
    assert res["channels"] == ["z500", "z850", "t500", "t850"]
    assert res["not_scored"] == {"analysis_only": ["u500", "u850"], "truth_only": []}  # level union
    assert res["grid"] == "121x240 with poles" and res["normalization"] is None
    assert "mse" not in res and "geo_score" not in res
    assert "WeatherBench2" in res["conventions"]["wrmse_wb2"] and "per-time" in res["conventions"]["wrmse"]
    fields = {"z500": (za[:, 0], z[:, 0]), "z850": (za[:, 1], z[:, 1]),
              "t500": (ta[:, 0], t[:, 0]), "t850": (ta[:, 1], t[:, 1])}
    regions = {"global": None, "tropics": np.abs(g.lat) <= 20, "extratropics": np.abs(g.lat) >= 20,
               "band:60:90": g.lat >= 60}
    for region, rows in regions.items():
        for ch, (a_, t_) in fields.items():
            per_time, wb2 = _independent_scores(a_, t_, g.lat, g.dlat, rows)
            assert res["regions"][region]["wrmse"][ch] == pytest.approx(per_time, rel=1e-6)
            assert res["regions"][region]["wrmse_wb2"][ch] == pytest.approx(wb2, rel=1e-6)
    assert res["wrmse"] == res["regions"]["global"]["wrmse"]
    # pole rows count: cos-latitude weights (zero on the poles) give another number
    cosw = np.cos(np.deg2rad(g.lat))
    cos_rmse = np.mean(np.sqrt((cosw[None, :, None] * (za[:, 0] - z[:, 0]) ** 2).sum((1, 2)) / (cosw.sum() * 240)))
    assert abs(cos_rmse - res["wrmse"]["z500"]) / res["wrmse"]["z500"] > 1e-5
    # the CSV beside it, one row per region, metric and channel
    import csv as _csv

    rows = list(_csv.DictReader((tmp_path / "metrics.csv").open()))
    assert len(rows) == 4 * 2 * 4
    r = next(r for r in rows if r["region"] == "band:60:90" and r["metric"] == "wrmse_wb2" and r["channel"] == "t850")
    assert float(r["value"]) == pytest.approx(res["regions"]["band:60:90"]["wrmse_wb2"]["t850"], rel=1e-12)
    assert r["units"] == "K"
    assert {f: f.read_bytes() for f in sorted(truth.rglob("*")) if f.is_file()} == before
    # --rmse wb2 gives only WeatherBench2's convention; --variables selects
    capsys.readouterr()
    assert main(["--analysis", str(ana), "--truth", str(truth), "--rmse", "wb2", "--variables", "z"]) == 0
    res2 = json.loads(capsys.readouterr().out)
    assert "wrmse" not in res2 and set(res2["wrmse_wb2"]) == {"z500", "z850"}
    assert res2["wrmse_wb2"]["z500"] == pytest.approx(res["wrmse_wb2"]["z500"], rel=1e-12)


def test_region_parsing_errors(stores, capsys):
    _, _, tp, ap = stores
    for bad, msg in (("band:10", "band:LO:HI"), ("arctic", "unknown region"), ("band:80:70", "LO < HI")):
        with pytest.raises(SystemExit) as exc:
            main(["--analysis", str(ap), "--truth", str(tp), "--regions", bad])
        assert exc.value.code == 2 and msg in capsys.readouterr().err
