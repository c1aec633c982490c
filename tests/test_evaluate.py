"""The evaluation on tiny models and a tiny synthetic world (16 × 32): files, tables, pairing,
hand-checked background scores, and the analyses store read back by align_rl.score."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from align_rl.config import load_config
from align_rl.errors import ConfigError
from align_rl.evaluation.results import open_results, row_changes, row_scores, score, was_scored
from align_rl.evaluation.runner import EvalData, load_models, run_evaluation, select_times
from align_rl.evaluation.verdict import paired_change
from align_rl.io.grid import Grid
from align_rl.models.dit import build_dit
from align_rl.models.forecaster import EmulatorForecaster, build_emulator
from align_rl.models.vae import LatentCodec, build_vae
from align_rl.io.normalization import Normalizer
from align_rl.io.schema import N_CHANNELS, channel_index
from align_rl.io.states import States
from align_rl.io.store import write_states
from align_rl.workspace import Workspace
from tests.analytic_models import GaussianPrior

GRID = Grid(16, 32)


def _world(n_times: int, seed: int = 0) -> States:
    """Smooth random physical fields, 6-hourly from 2005-01-01 (the test split)."""
    rng = np.random.default_rng(seed)
    lat, lon = GRID.lat, GRID.lon
    la, lo = np.meshgrid(np.deg2rad(lat), np.deg2rad(lon), indexing="ij")
    scale = np.full(N_CHANNELS, 5.0)
    mean = np.full(N_CHANNELS, 10.0)
    iz = channel_index("z500")
    mean[iz], scale[iz] = 5.5e4, 800.0
    vals = np.empty((n_times, N_CHANNELS, *GRID.shape), np.float32)
    for t in range(n_times):
        a = rng.normal(size=(N_CHANNELS, 4))
        f = (a[:, 0, None, None] * np.cos(la) * np.cos(lo + 0.1 * t) + a[:, 1, None, None] * np.sin(2 * la)
             + a[:, 2, None, None] * np.cos(la) * np.sin(2 * lo) + 0.3 * a[:, 3, None, None])
        vals[t] = mean[:, None, None] + scale[:, None, None] * f
    times = np.datetime64("2005-01-01T00", "ns") + np.arange(n_times) * np.timedelta64(6, "h")
    return States(vals, times, lat, lon)


class Prior(nn.Module):
    """ε of the Gaussian prior N(a z_b, s² I), plus an optional small random DiT term."""

    def __init__(self, a=1.0, s=0.5, dit=None):
        super().__init__()
        self.g = GaussianPrior(a, s)
        self.dit = dit

    def forward(self, z, t, z_b):
        e = self.g(z, t, z_b)
        return e if self.dit is None else e + 0.01 * self.dit(z, t, z_b)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread avoids oversubscription on a shared machine
    try:
        yield from _setup(tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def _setup(tmp_path_factory):
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("eval")
    truth = _world(24)
    norm = Normalizer.fit(truth.values)
    truth.attrs["normalization"] = norm.to_dict()
    rng = np.random.default_rng(1)
    bg_vals = truth.values + rng.normal(size=truth.values.shape).astype(np.float32) * norm.std[None, :, None, None].astype(np.float32) * 0.3
    backgrounds = States(bg_vals[8:], truth.times[8:], truth.lat, truth.lon)  # t − 48 h exists
    cfg = load_config(None, [
        f"run.workdir={tmp}", "run.wandb_mode=disabled", "data.grid=16x32",
        "data.test=[2005-01-01, 2005-12-31]",
        "vae.embed_dim=16", "vae.depth=1", "vae.heads=2", "vae.latent_channels=4",
        "diffusion.embed_dim=16", "diffusion.depth=1", "diffusion.heads=2",
        "sampler.steps=4", "sampler.corrections=1", "sampler.tau=0.05",
        "eval.times=3", "eval.members=2", "eval.map_samples=2", "eval.batch_size=2",
        "eval.ablations=[density]", "eval.densities=[0.05]",
        "obs.density=0.1", "guidance.dps_zeta=0.01",
    ])
    vae = build_vae(cfg.vae, GRID)
    codec = LatentCodec(vae, torch.zeros(4), torch.ones(4)).eval()
    dit = build_dit(cfg.diffusion, codec.latent_shape)
    nn.init.normal_(dit.out.weight, std=0.1)
    forecaster = EmulatorForecaster(build_emulator({"hidden": 8, "depth": 1}, GRID))
    truth_store = write_states(tmp / "truth.zarr", truth)
    data = EvalData(truth, backgrounds, norm, codec, forecaster, truth_store=truth_store)
    ref = Prior()
    models = {"reference": ref, "copy": ref, "Align-M": Prior(a=0.9, s=0.45, dit=dit)}
    out = tmp / "eval"
    summary = run_evaluation(cfg, Workspace.from_config(cfg), models, data=data, out=out, progress=False)
    yield cfg, data, summary, out


def test_files_tables_and_rows(setup):
    cfg, data, summary, out = setup
    for f in ("report.md", "metrics.json", "metrics.csv", "maps/z500_error_reduction.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert not list(out.parent.glob("eval.tmp-*"))
    report = (out / "report.md").read_text()
    for text in ("Table 1", "Table 2", "Table 3", "Background", "| DPS |", "| Repaint |", "| ObsFree |",
                 "Align-M-DPS", "copy-Repaint", "CRPS", "spread/skill", "density=0.05", "Checks"):
        assert text in report, text
    doc = json.loads((out / "metrics.json").read_text())
    main = doc["scores"]["main"]
    for row in ("background", "reference/dps", "Align-M/obsfree", "copy/repaint"):
        assert row in main
    assert set(main["reference/dps"]["analysis"]) == {"member", "ensmean", "ensemble"}
    assert "geo_score" in main["reference/dps"]["analysis"]["member"]
    assert "Align-M/obsfree" not in doc["scores"]["density=0.05"]  # no obs-free ablation
    assert len(doc["per_time"]["main"]["reference/dps"]["analysis"]["member"]["mse"]) == 3
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("setting,table,row")
    assert any(r.startswith("main,forecast,Align-M/dps,Align-M,dps,member,wrmse_z500,") for r in rows)
    assert summary.ds.sizes["time"] == 3 and len(summary.meta["checks"]) == 2


def test_background_scores_match_a_hand_computation(setup):
    _, data, summary, _ = setup
    times = select_times(data.truth, data.backgrounds, ["2005-01-01", "2005-12-31"], 3)
    norm = data.normalizer
    idx_t = [data.truth.time_index(t) for t in times]
    idx_b = [data.backgrounds.time_index(t) for t in times]
    xt, xb = data.truth.values[idx_t].astype(np.float64), data.backgrounds.values[idx_b].astype(np.float64)
    mse = ((norm.normalize(xb) - norm.normalize(xt)) ** 2).mean(axis=(1, 2, 3)).mean()
    w = GRID.weights()[None, :, None]
    iz = channel_index("z500")
    wr = np.sqrt((w * (xb[:, iz] - xt[:, iz]) ** 2).mean(axis=(1, 2))).mean()
    bg = summary.ds.time_mean.sel(setting="main", model="background", kind="analysis", stat="member")
    for meth in ("obsfree", "repaint", "dps"):  # the background repeats along the methods
        assert float(bg.sel({"method": meth, "metric": "mse"})) == pytest.approx(mse, rel=1e-6)
        assert float(bg.sel({"method": meth, "metric": "wrmse_z500"})) == pytest.approx(wr, rel=1e-6)


def test_comparisons_are_paired(setup):
    """The same network under another name sees the same observations and noise: 0 % change."""
    _, _, summary, _ = setup
    for meth in ("obsfree", "repaint", "dps"):
        ch = row_changes(summary.ds, "copy", meth)
        for tab in ("analysis", "forecast"):
            for m, c in ch[tab]["member"].items():
                assert c["pct"] == pytest.approx(0.0, abs=1e-9), (meth, tab, m)
    assert row_scores(summary.ds, "Align-M", "dps") != row_scores(summary.ds, "reference", "dps")


def test_analyses_store_is_read_by_score(setup):
    from align_rl.evaluation.scoring import score_stores

    _, data, summary, out = setup
    store = out / summary.meta["files"]["analyses"]["reference/dps"]
    res = score_stores(store, data.truth_store, progress=False, check_units=False)  # synthetic fields
    assert res["n_times"] == 3
    assert res["mse"] == pytest.approx(score(summary.ds, "reference", "dps", "analysis", "mse", "ensmean"),
                                       rel=1e-4)
    assert res["wrmse"]["z500"] == pytest.approx(
        score(summary.ds, "reference", "dps", "analysis", "wrmse_z500", "ensmean"), rel=1e-4)


def test_paired_change_and_bad_model_spec():
    base = np.array([1.0, 2.0, 3.0, 4.0])
    c = paired_change(base * 0.9, base)
    assert c["pct"] == pytest.approx(-10.0)
    assert c["ci"][0] == pytest.approx(-10.0) and c["ci"][1] == pytest.approx(-10.0)
    c = paired_change(base + np.array([0.1, -0.1, 0.3, -0.2]), base)
    assert c["ci"][0] <= c["pct"] <= c["ci"][1]
    # NaN times are counted, not silently dropped
    c = paired_change(np.array([0.9, np.nan, 2.7, 3.6]), base[:4] * np.array([1, 1, 1, 1.0]))
    assert c["n_nan"] == 1 and c["n"] == 3


def test_block_bootstrap_widens_for_correlated_times():
    """Differences that persist over neighbouring times (AR(1), φ = 0.9): the block-bootstrap interval
    is wider than the one that treats times as independent (block 1), and both cover the mean."""
    rng = np.random.default_rng(0)
    T = 64
    d = np.zeros(T)
    for i in range(1, T):
        d[i] = 0.9 * d[i - 1] + 0.05 * rng.standard_normal()
    base = np.full(T, 1.0)
    iid = paired_change(base + d, base, block=1)
    blk = paired_change(base + d, base)
    assert blk["block"] > 1 and blk["ess"] < 0.5 * T  # block and ESS from the autocorrelation
    assert (blk["ci"][1] - blk["ci"][0]) > 1.3 * (iid["ci"][1] - iid["ci"][0])
    assert blk["ci"][0] <= blk["pct"] <= blk["ci"][1]


def test_load_models_refuses_an_entry_without_a_checkpoint():
    cfg = load_config(None, [])
    with pytest.raises(ConfigError, match="NAME=CHECKPOINT"):
        load_models(["no-equals-sign"], cfg)


def test_gpu_paper_scale_script_dry_run_and_cpu_refusal():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_paper_scale.py"
    r = subprocess.run([sys.executable, str(script), "--dry-run"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "CPU (dry run): one dps analysis" in r.stdout
    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, str(script), "--no-write"], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2 and "no CUDA device" in r.stderr


class _Diverging(nn.Module):
    def forward(self, z, t, z_b):
        return torch.full_like(z, float("nan"))


def test_a_diverging_model_is_reported_not_fatal(setup, tmp_path):
    cfg0, data, _, _ = setup
    cfg = load_config(None, [f"run.workdir={tmp_path}", "run.wandb_mode=disabled", "data.grid=16x32",
                             "data.test=[2005-01-01, 2005-12-31]", "sampler.steps=2",
                             "guidance.methods=[obsfree]", "eval.times=2", "eval.members=2",
                             "eval.map_samples=1"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = run_evaluation(cfg, Workspace.from_config(cfg), {"reference": Prior(), "bad": _Diverging()},
                           data=data, out=tmp_path / "ev", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert s.meta["failures"] and s.meta["failures"][0]["row"] == "bad/obsfree"
    analyses = s.meta["files"]["analyses"]
    assert "bad/obsfree" not in analyses and "reference/obsfree" in analyses
    assert "## Failures" in (tmp_path / "ev" / "report.md").read_text()
    assert np.isfinite(score(s.ds, "reference", "obsfree", "analysis", "mse"))
    assert score(s.ds, "bad", "obsfree", "analysis", "mse") != score(s.ds, "bad", "obsfree", "analysis", "mse")  # NaN
    assert s.ds.n_nan.sel({"setting": "main", "model": "bad", "method": "obsfree", "kind": "analysis",
                           "stat": "member", "metric": "mse"}) == 2


def test_cli_runs_the_reference_and_refuses_a_missing_checkpoint(setup, tmp_path, monkeypatch, capsys):
    import align_rl.evaluate as ev
    from align_rl.evaluation import runner

    _, data, _, _ = setup
    monkeypatch.setattr(runner, "load_eval_data", lambda cfg, ws: (data, Prior()))
    args = [f"run.workdir={tmp_path}", "run.wandb_mode=disabled", "data.grid=16x32",
            "data.test=[2005-01-01, 2005-12-31]", "sampler.steps=2", "guidance.methods=[obsfree]",
            "eval.times=2", "eval.members=2", "eval.map_samples=1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert ev.main(["--out", str(tmp_path / "cli"), *args]) == 0
        with pytest.raises(SystemExit) as exc:
            ev.main(["--models", f"Align-M={tmp_path / 'missing.pt'}", *args])
    finally:
        torch.set_num_threads(threads)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "missing.pt" in err and "does not exist" in err
    doc = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert doc["models"] == ["reference"] and "reference/obsfree" in doc["scores"]["main"]


def test_results_dataset_dims_sel_and_netcdf(setup):
    """The scores are one Dataset over (setting, model, method, kind, stat, metric, time); a
    ``.sel`` gives the numbers of metrics.json, and metrics.nc holds the same Dataset."""
    _, _, ev, out = setup
    ds = ev.ds
    assert ds.score.dims == ("setting", "model", "method", "kind", "stat", "metric", "time")
    assert list(ds.setting.values) == ["main", "density=0.05"]
    assert list(ds.model.values) == ["background", "reference", "copy", "Align-M", "Shrink-M"]
    assert list(ds.trivial_for.values) == ["", "", "", "", "Align-M"] and list(ds.n_seeds.values) == [1] * 5
    assert list(ds.method.values) == ["obsfree", "repaint", "dps"]
    assert list(ds.kind.values) == ["analysis", "forecast"]
    assert list(ds.stat.values) == ["member", "ensmean", "ensemble"]
    assert {"mse", "wrmse_z500", "geo_score", "crps", "spread_skill"} <= set(ds.metric.values)
    assert ds.sizes["time"] == 3 and ds.attrs["forecast_hours"] == 48 and ds.attrs["forecast_steps"] == 8
    for v in ("pct", "ci_lo", "ci_hi", "p_lo", "p_hi", "n", "n_nan", "block", "ess"):
        assert ds[v].dims == ("setting", "model", "method", "kind", "stat", "metric")
    doc = json.loads((out / "metrics.json").read_text())
    cell = {"setting": "main", "model": "Align-M", "method": "dps", "kind": "forecast", "stat": "member",
            "metric": "wrmse_z500"}
    assert float(ds.time_mean.sel(cell)) == doc["scores"]["main"]["Align-M/dps"]["forecast"]["member"]["wrmse_z500"]
    ch = doc["changes"]["main"]["Align-M/dps"]["forecast"]["member"]["wrmse_z500"]
    assert float(ds.pct.sel(cell)) == ch["pct"] and [float(ds.ci_lo.sel(cell)), float(ds.ci_hi.sel(cell))] == ch["ci"]
    assert int(ds.n.sel(cell)) == ch["n"] == 3
    assert list(ds.score.sel(cell).values) == doc["per_time"]["main"]["Align-M/dps"]["forecast"]["member"]["wrmse_z500"]
    # what was not scored: no geo_score of forecasts, no obs-free rows in the ablation
    assert not ds.scored.sel({**cell, "metric": "geo_score"})
    assert not ds.scored.sel({"setting": "density=0.05", "method": "obsfree", "model": "Align-M"}).any()
    assert not ds.compared.sel({"model": "reference"}).any()  # the baseline
    back = open_results(out / "metrics.nc")
    assert set(back.data_vars) == set(ds.data_vars)
    for v in ds.data_vars:
        np.testing.assert_array_equal(back[v].values, ds[v].values)
    assert list(back.model.values) == list(ds.model.values) and back.attrs["baseline"] == "reference"


class _CountingForecaster(nn.Module):
    """The forecaster, recording the number of steps of every rollout."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.steps = inner, []

    def rollout(self, prev, cur, steps):
        self.steps.append(steps)
        return self.inner.rollout(prev, cur, steps)


def test_forecast_lead_follows_rewards_forecast_hours(setup, tmp_path):
    """rewards.forecast_hours=24: 4 × 6 h forecasts, scored against the truth 24 h later."""
    from align_rl.evaluation.skill import forecast_steps

    _, data0, _, _ = setup
    spy = _CountingForecaster(data0.forecaster)
    data = EvalData(data0.truth, data0.backgrounds, data0.normalizer, data0.codec, spy)
    cfg = load_config(None, [f"run.workdir={tmp_path}", "run.wandb_mode=disabled", "data.grid=16x32",
                             "data.test=[2005-01-01, 2005-12-31]", "sampler.steps=2",
                             "guidance.methods=[obsfree]", "eval.times=2", "eval.members=2",
                             "eval.map_samples=1", "rewards.forecast_hours=24"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ev = run_evaluation(cfg, Workspace.from_config(cfg), {"reference": Prior()}, data=data,
                            out=tmp_path / "ev", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert spy.steps and set(spy.steps) == {4}
    assert ev.ds.attrs["forecast_hours"] == 24 and ev.ds.attrs["forecast_steps"] == 4
    assert ev.meta["forecast_start"].endswith("4 x 6 h")
    assert "Table 2 — 24 h forecasts" in (tmp_path / "ev" / "report.md").read_text()
    # the background's forecast score, by hand: 4 steps from (x(t − 6 h), x_b(t)) against x(t + 24 h)
    times = ev.times
    norm = data.normalizer

    def at(states, ts):
        idx = [states.time_index(t) for t in ts]
        return torch.as_tensor(norm.normalize(states.values[idx].astype(np.float64)), dtype=torch.float32)

    six, day = np.timedelta64(6, "h"), np.timedelta64(24, "h")
    with torch.no_grad():
        fc = data0.forecaster.rollout(at(data.truth, times - six), at(data.backgrounds, times), 4)[:, -1]
    want = ((fc.double() - at(data.truth, times + day).double()) ** 2).mean(dim=(1, 2, 3)).mean()
    assert score(ev.ds, "background", "obsfree", "forecast", "mse") == pytest.approx(float(want), rel=1e-6)
    assert forecast_steps(48) == 8
    with pytest.raises(ConfigError, match="multiple of 6"):
        forecast_steps(50)


def test_seeds_baselines_and_observation_tables_end_to_end(setup, tmp_path):
    """Two seeds of Align-M and one Align-P on 3 times: the seed rows and their mean, the shrink
    baseline (same ensemble mean as the reference, Align-M's spread term), the blend baseline (at
    Align-P's MSE), and the report's evidence sections with the observation tables."""
    from align_rl.evaluation.results import open_results

    _, data, _, _ = setup
    cfg = load_config(None, [f"run.workdir={tmp_path}", "run.wandb_mode=disabled", "data.grid=16x32",
                             "data.test=[2005-01-01, 2005-12-31]", "sampler.steps=2", "guidance.methods=[dps]",
                             "eval.times=3", "eval.members=2", "eval.map_samples=1", "eval.batch_size=3",
                             "eval.ablations=[density,error]", "eval.densities=[0.05,0.2]",
                             "eval.errors=[0.0,0.05]", "obs.density=0.1", "guidance.dps_zeta=0.01"])
    models = {"reference": Prior(), "Align-M": [Prior(a=0.9, s=0.45), Prior(a=0.95, s=0.4)],
              "Align-P": Prior(a=1.0, s=0.7)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ev = run_evaluation(cfg, Workspace.from_config(cfg), models, data=data, out=tmp_path / "ev", progress=False)
    finally:
        torch.set_num_threads(threads)
    ds = ev.ds
    assert list(ds.model.values) == ["background", "reference", "Align-M", "Align-M@seed0", "Align-M@seed1",
                                     "Align-P", "Shrink-M", "Blend-P"]

    def per_time(model, kind, stat, metric, setting="main"):
        return ds.score.sel({"setting": setting, "model": model, "method": "dps", "kind": kind, "stat": stat,
                             "metric": metric}).values

    for setting in ("main", "density=0.2", "sigma_o=0.05"):
        seeds = [per_time(f"Align-M@seed{k}", "analysis", "member", "mse", setting) for k in (0, 1)]
        np.testing.assert_allclose(per_time("Align-M", "analysis", "member", "mse", setting), np.mean(seeds, axis=0))
        # shrink: the reference's ensemble mean, Align-M's spread term
        np.testing.assert_allclose(per_time("Shrink-M", "analysis", "ensmean", "mse", setting),
                                   per_time("reference", "analysis", "ensmean", "mse", setting), rtol=1e-5)
        spread = lambda m: (per_time(m, "analysis", "member", "mse", setting)  # noqa: E731
                            - per_time(m, "analysis", "ensmean", "mse", setting))
        np.testing.assert_allclose(spread("Shrink-M"), spread("Align-M"), rtol=1e-3, atol=1e-7)
    w = ev.meta["blend_weights"]["main Blend-P/dps"]
    blend_mse = per_time("Blend-P", "analysis", "member", "mse").mean()
    p_mse = per_time("Align-P", "analysis", "member", "mse").mean()
    if 0 < w < 1:
        assert blend_mse == pytest.approx(p_mse, rel=1e-4)
    assert not ds.scored.sel({"model": "Blend-P", "kind": "forecast"}).any()
    report = (tmp_path / "ev" / "report.md").read_text()
    for text in ("## Verdict", "Holm family", "## Spread/skill", "## Decomposition", "## Trivial baselines",
                 "## Seeds", "Table 3 — Align vs reference over observation density",
                 "Table 4 — Align vs reference over observation error", "| 0.2 |", "| 0.05 |",
                 "Align-M-DPS analysis", "Align-P-DPS Geo-Score", "Shrink-M"):
        assert text in report, text
    doc = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {(v["model"], v["kind"], v["what"]) for v in doc["verdict"]} >= {
        ("Align-M", "analysis", "MSE"), ("Align-M", "forecast", "MSE"), ("Align-P", "analysis", "Geo-Score")}
    back = open_results(tmp_path / "ev" / "metrics.nc")
    assert list(back.seed_of.values)[3:5] == ["Align-M", "Align-M"]


def test_blend_val_row_is_fitted_on_validation_times_and_scored_on_test(setup, tmp_path):
    """With a validation split, the evaluation fits the Blend-val weight on ``eval.blend_times``
    validation times and scores the reference blended towards the background on test (analyses
    and forecasts): its ensemble mean is ``(1 − w) m_ref + w x_b`` (checked against the stored
    reference ensemble mean), the MSE verdict lines test against it, and the report shows w.
    ``eval.blend_times=0`` turns it off."""
    from dataclasses import replace

    from align_rl.evaluation.runner import validation_inputs
    from align_rl.io import era5

    _, data0, _, _ = setup
    # validation backgrounds far worse than the test ones, so that the fitted w lies inside (0, 1)
    bg = data0.backgrounds
    noise = np.random.default_rng(7).normal(size=bg.values.shape) * data0.normalizer.std[None, :, None, None]
    val_bg = States((bg.values + 3.0 * noise).astype(np.float32), bg.times, bg.lat, bg.lon, attrs=dict(bg.attrs))
    data = replace(data0, val_truth=data0.truth, val_backgrounds=val_bg)
    over = [f"run.workdir={tmp_path}", "run.wandb_mode=disabled", "data.grid=16x32",
            "data.test=[2005-01-01, 2005-12-31]", "data.val=[2005-01-03, 2005-01-04]", "sampler.steps=2",
            "guidance.methods=[dps]", "eval.times=3", "eval.members=2", "eval.map_samples=1",
            "eval.batch_size=3", "eval.blend_times=2", "obs.density=0.1", "guidance.dps_zeta=0.01"]
    cfg = load_config(None, over + ["eval.ablations=[density]", "eval.densities=[0.3]"])
    assert validation_inputs(load_config(None, over + ["eval.blend_times=0"]), data, 8) is None
    assert validation_inputs(cfg, data0, 8) is None  # no validation split given
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ev = run_evaluation(cfg, Workspace.from_config(cfg), {"reference": Prior(), "Align-M": Prior(a=0.9, s=0.45),
                                                             "Align-P": Prior(a=0.95, s=0.5)},
                            data=data, out=tmp_path / "ev", progress=False)
    finally:
        torch.set_num_threads(threads)
    ds = ev.ds
    assert list(ds.model.values) == ["background", "reference", "Align-M", "Align-P", "Shrink-M", "Blend-P",
                                     "Blend-val", "Blend-val-Align-M"]  # Blend-val-<row> for the -M row only
    assert str(ds.trivial_kind.sel(model="Blend-val").values) == "blend-val"
    assert str(ds.trivial_kind.sel(model="Blend-val-Align-M").values) == "blend-val-aligned"
    assert str(ds.trivial_for.sel(model="Blend-val-Align-M").values) == "Align-M"
    fit = ev.meta["blend_val"]["main dps"]
    assert fit["val_times"] == 2 and fit["first"].startswith("2005-01-03") and 0.0 < fit["w"] < 1.0
    w = fit["w"]
    for kind in ("analysis", "forecast"):
        for stat, metric in (("member", "mse"), ("ensmean", "mse"), ("ensemble", "crps"), ("ensemble", "spread_skill")):
            assert bool(ds.scored.sel({"setting": "main", "model": "Blend-val", "method": "dps", "kind": kind,
                                       "stat": stat, "metric": metric}))
    # the row's ensemble mean is the blend of the reference's stored ensemble mean (physical)
    norm = data.normalizer
    ref_mean = era5.open_states(tmp_path / "ev" / "analyses" / "reference-dps.zarr", check_units=False)
    idx = [data.truth.time_index(t) for t in ev.times]
    jdx = [data.backgrounds.time_index(t) for t in ev.times]
    y = norm.normalize(data.truth.values[idx].astype(np.float64))
    m = norm.normalize(ref_mean.values.astype(np.float64))
    xb = norm.normalize(data.backgrounds.values[jdx].astype(np.float64))
    want = (((1 - w) * m + w * xb - y) ** 2).mean(axis=(1, 2, 3))
    got = ds.score.sel({"setting": "main", "model": "Blend-val", "method": "dps", "kind": "analysis",
                        "stat": "ensmean", "metric": "mse"}).values
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # Blend-val-Align-M: Align-M's stored ensemble mean blended with Align-M's own val-fitted w
    fit_a = ev.meta["blend_val"]["main Align-M/dps"]
    w_a = fit_a["w"]
    assert fit_a["row"] == "Align-M" and fit_a["val_times"] == 2 and 0.0 <= w_a <= 1.0 and w_a != w
    al_mean = era5.open_states(tmp_path / "ev" / "analyses" / "Align-M-dps.zarr", check_units=False)
    m_a = norm.normalize(al_mean.values.astype(np.float64))
    want_a = (((1 - w_a) * m_a + w_a * xb - y) ** 2).mean(axis=(1, 2, 3))
    got_a = ds.score.sel({"setting": "main", "model": "Blend-val-Align-M", "method": "dps", "kind": "analysis",
                          "stat": "ensmean", "metric": "mse"}).values
    np.testing.assert_allclose(got_a, want_a, rtol=1e-4)
    assert was_scored(ds, "Blend-val-Align-M", "dps", "forecast", "ensmean")
    assert "density=0.3 Align-M/dps" in ev.meta["blend_val"]
    assert not any("Align-P/" in k for k in ev.meta["blend_val"])
    doc = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert doc["blend_val"]["main dps"]["w"] == pytest.approx(w)
    assert doc["blend_val"]["main Align-M/dps"]["w"] == pytest.approx(w_a)
    assert {v["model"] for v in doc["verdict"]} == {"Align-M", "Align-P"}  # no line of the blended rows
    for v in doc["verdict"]:
        if v["what"] == "MSE":
            assert "ensemble-mean MSE vs blend-val" in {t["name"] for t in v["tests"]}, v
    # an observation setting has its own fit, row and verdict test
    dense = ev.meta["blend_val"]["density=0.3 dps"]
    assert 0.0 <= dense["w"] <= 1.0 and was_scored(ds, "Blend-val", "dps", "analysis", "ensmean", "density=0.3")
    from align_rl.evaluation.sections import ablation_lines
    assert "ensemble-mean MSE vs blend-val" in {t["name"] for t in ablation_lines(ds, "density")[0]["tests"]}
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "### Towards the background, w from val (Blend-val)" in report
    assert f"density=0.3 DPS {dense['w']:.3f}" in report
    assert f"| DPS | {w:.3f} | analysis |" in report and f"| DPS | {w:.3f} | forecast |" in report
    assert "#### Both blended" in report
    for kind in ("analysis", "forecast"):
        assert f"| Blend-val-Align-M-DPS | {w:.3f} | {w_a:.3f} | {kind} |" in report
    assert "Blend-val-Align-P" not in report


def test_blend_val_rows_of_a_several_seed_model(setup, tmp_path):
    """A several-seed Align-M gets one ``Blend-val-Align-M@seed<k>`` per seed, each with its own
    val-fitted w, and ``Blend-val-Align-M``, their per-time mean (n_seeds 2); none of them gets a
    verdict line, and the *Both blended* table lists both seeds' weights."""
    from dataclasses import replace

    _, data0, _, _ = setup
    bg = data0.backgrounds  # far worse validation backgrounds: fitted weights inside (0, 1)
    noise = np.random.default_rng(7).normal(size=bg.values.shape) * data0.normalizer.std[None, :, None, None]
    val_bg = States((bg.values + 3.0 * noise).astype(np.float32), bg.times, bg.lat, bg.lon, attrs=dict(bg.attrs))
    data = replace(data0, val_truth=data0.truth, val_backgrounds=val_bg)
    cfg = load_config(None, [f"run.workdir={tmp_path}", "run.wandb_mode=disabled", "data.grid=16x32",
                             "data.test=[2005-01-01, 2005-12-31]", "data.val=[2005-01-03, 2005-01-04]",
                             "sampler.steps=2", "guidance.methods=[dps]", "eval.times=2", "eval.members=2",
                             "eval.map_samples=1", "eval.batch_size=2", "eval.blend_times=2", "obs.density=0.1",
                             "guidance.dps_zeta=0.01", "eval.ablations=[]"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ev = run_evaluation(cfg, Workspace.from_config(cfg),
                            {"reference": Prior(), "Align-M": [Prior(a=0.9, s=0.45), Prior(a=0.8, s=0.4)]},
                            data=data, out=tmp_path / "ev", progress=False)
    finally:
        torch.set_num_threads(threads)
    ds = ev.ds
    rows = ["Blend-val-Align-M@seed0", "Blend-val-Align-M@seed1", "Blend-val-Align-M"]
    assert list(ds.model.values)[-3:] == rows
    assert [str(ds.trivial_for.sel(model=r).values) for r in rows] == ["Align-M@seed0", "Align-M@seed1", "Align-M"]
    assert int(ds.n_seeds.sel(model="Blend-val-Align-M")) == 2
    sel = {"setting": "main", "method": "dps", "kind": "forecast", "stat": "ensmean", "metric": "mse"}
    per_seed = [ds.score.sel(sel | {"model": r}).values for r in rows[:2]]
    np.testing.assert_allclose(ds.score.sel(sel | {"model": rows[2]}).values, np.mean(per_seed, axis=0))
    w0, w1 = (ev.meta["blend_val"][f"main Align-M@seed{k}/dps"]["w"] for k in (0, 1))
    assert w0 != w1 and 0.0 < w0 < 1.0
    assert {v["model"] for v in ev.meta["verdict"]} == {"Align-M"}
    report = (tmp_path / "ev" / "report.md").read_text()
    assert f"| Blend-val-Align-M-DPS | {ev.meta['blend_val']['main dps']['w']:.3f} | {w0:.3f}, {w1:.3f} | analysis |" in report


def test_load_eval_data_opens_the_validation_split_for_blend_val(setup, tmp_path, monkeypatch):
    """The evaluation's loader opens ``data.val`` beside ``data.test`` when ``eval.blend_times`` > 0
    (the Blend-val fit), and not when it is 0."""
    from types import SimpleNamespace

    from align_rl.evaluation import runner

    _, data, _, _ = setup
    opened = []

    def fake_split(cfg, ws, store, forecaster, dates, progress=True):
        opened.append(list(dates))
        return data.truth, data.backgrounds

    pre = SimpleNamespace(normalizer=data.normalizer, codec=data.codec, forecaster=data.forecaster, eps_model=Prior())
    monkeypatch.setattr(runner, "ensure_world", lambda cfg, ws: tmp_path / "world.zarr")
    monkeypatch.setattr(runner, "ensure_pretrained", lambda cfg, ws: pre)
    monkeypatch.setattr(runner, "open_split", fake_split)
    base = [f"run.workdir={tmp_path}", "data.test=[2005-01-01, 2005-12-31]", "data.val=[2003-01-01, 2003-12-31]"]
    d, _ = runner.load_eval_data(load_config(None, base), Workspace.from_config(load_config(None, base)))
    assert opened == [["2005-01-01", "2005-12-31"], ["2003-01-01", "2003-12-31"]] and d.val_truth is data.truth
    opened.clear()
    d, _ = runner.load_eval_data(load_config(None, base + ["eval.blend_times=0"]), Workspace.from_config(load_config(None, base)))
    assert opened == [["2005-01-01", "2005-12-31"]] and d.val_truth is None


def test_evaluate_aligned_takes_one_checkpoint_per_seed(setup, tmp_path, monkeypatch):
    """The main job's contract: ``{variant: [checkpoint per seed]}`` (or one path, one seed); the
    seeds become seed rows and their mean the ``Align-<variant>`` row of the report's verdict."""
    from pathlib import Path

    from align_rl.evaluation import runner, stage

    _, data, _, _ = setup
    nets = {"m0.pt": Prior(a=0.9, s=0.45), "m1.pt": Prior(a=0.95, s=0.4), "p.pt": Prior(a=1.0, s=0.6)}
    monkeypatch.setattr(runner, "load_eval_data", lambda cfg, ws: (data, Prior()))
    monkeypatch.setattr(stage, "load_model", lambda path, kind, expect=None: (nets[Path(path).name], {}))
    cfg = load_config(None, [f"run.workdir={tmp_path}", "run.wandb_mode=disabled", "data.grid=16x32",
                             "data.test=[2005-01-01, 2005-12-31]", "sampler.steps=2", "guidance.methods=[dps]",
                             "eval.times=2", "eval.members=2", "eval.map_samples=1", f"eval.out={tmp_path / 'ev'}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = stage.evaluate_aligned(cfg, Workspace.from_config(cfg), Prior(),
                                     {"M": [Path("m0.pt"), Path("m1.pt")], "P": Path("p.pt")}, ["M", "P"],
                                     {"pairs": {}, "dpo": {}}, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert {"Align-M/dps", "Align-M@seed0/dps", "Align-M@seed1/dps", "Align-P/dps"} <= set(out["changes"])
    assert {(v["model"], v["kind"]) for v in out["verdict"]} >= {("Align-M", "analysis"), ("Align-M", "forecast"),
                                                                 ("Align-P", "analysis")}
    assert all(isinstance(v["gain"], bool) and 0 <= v["p_holm"] <= 1 for v in out["verdict"])
    report = Path(out["report"]).read_text()
    assert "## Alignment against the paper" in report and "### Verdict" in report and "Align-DPS-M | 2 |" in report
