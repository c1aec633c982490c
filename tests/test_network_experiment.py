"""The observing-network experiment (the paper's Table 5 analogue, docs/method.md §10.1) on a tiny
world: the synthetic network written as IODA files and read back, QC counts, paired DPS analyses,
the verdict of the evaluation report, and the command (bad observation files fail first)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from align_rl.config import load_config
from align_rl.errors import ConfigError
from align_rl.evaluation.baselines import shrink, spread_term
from align_rl.evaluation.metrics import crps_ensemble, mse, spread_skill
from align_rl.evaluation.network import (METHOD, SETTING, NetworkSettings, network_rows, results_dataset,
                                         run_network_experiment, verdict_lines)
from align_rl.evaluation.results import ScoreTable
from align_rl.evaluation.runner import EvalData
from align_rl.io.normalization import Normalizer
from align_rl.models.dit import build_dit
from align_rl.models.forecaster import EmulatorForecaster, build_emulator
from align_rl.models.vae import LatentCodec, build_vae
from align_rl.io.states import States
from align_rl.observations.ioda import read_ioda
from tests import test_evaluate as te

ARGS = ["run.wandb_mode=disabled", "data.grid=16x32", "data.test=[2005-01-01, 2005-12-31]",
        "vae.embed_dim=16", "vae.depth=1", "vae.heads=2", "vae.latent_channels=4",
        "diffusion.embed_dim=16", "diffusion.depth=1", "diffusion.heads=2",
        "sampler.steps=2", "sampler.corrections=0", "eval.times=3", "eval.members=2",
        "eval.batch_size=3", "guidance.dps_zeta=0.01"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("net")
    truth = te._world(24)
    norm = Normalizer.fit(truth.values)
    rng = np.random.default_rng(1)
    bg = truth.values + rng.normal(size=truth.values.shape).astype(np.float32) * norm.std[None, :, None, None].astype(np.float32) * 0.3
    backgrounds = States(bg[8:], truth.times[8:], truth.lat, truth.lon)
    cfg = load_config(None, [f"run.workdir={tmp}", *ARGS])
    codec = LatentCodec(build_vae(cfg.vae, te.GRID), torch.zeros(4), torch.ones(4)).eval()
    dit = build_dit(cfg.diffusion, codec.latent_shape)
    nn.init.normal_(dit.out.weight, std=0.1)
    forecaster = EmulatorForecaster(build_emulator({"hidden": 8, "depth": 1}, te.GRID))
    data = EvalData(truth, backgrounds, norm, codec, forecaster)
    models = {"reference": te.Prior(), "Align-DPS-M": te.Prior(a=0.9, s=0.45, dit=dit)}
    try:
        yield cfg, data, models, tmp
    finally:
        torch.set_num_threads(threads)


def test_experiment_files_qc_and_verdict(world):
    cfg, data, models, tmp = world
    st = NetworkSettings(sondes=8, surface=20, reference_k=0.5)
    out = tmp / "run1"
    doc = run_network_experiment(cfg, data, models, out, settings=st, progress=False)
    for f in ("report.md", "metrics.json", "network/sondes.nc", "network/surface.nc"):
        assert (out / f).is_file(), f
    sondes = read_ioda(out / "network" / "sondes.nc")
    assert len(np.unique(sondes.station)) == 8 and np.isfinite(sondes.pressure).all()
    # 8 sondes × 13 pressures × 5 variables and 20 surface stations × 4 variables, per time
    checked = sum(doc["qc"][0]["checked"].values())
    assert checked == 3 * (8 * 13 * 5 + 20 * 4)
    assert [q["check"] for q in doc["qc"]] == ["background", "reference"]
    used = checked - sum(sum(q["rejected"].values()) for q in doc["qc"])
    assert doc["observations"]["n_used"] == used > 0
    assert doc["baseline"] == "reference"
    assert list(doc["scores"]) == ["background", "reference", "Align-DPS-M", "Shrink-DPS-M"]
    assert doc["shrink"] == {"Align-DPS-M": "Shrink-DPS-M"}
    ch = doc["changes"]["Align-DPS-M"]
    # the change is the paired % change of the time means
    pt = doc["per_time"]
    m, b = (np.mean(pt[n]["member"]["mse"]) for n in ("Align-DPS-M", "reference"))
    assert ch["member"]["mse"]["pct"] == pytest.approx(100 * (m / b - 1))
    # the shrink row: the reference's ensemble mean with the aligned model's spread term per time
    np.testing.assert_allclose(pt["Shrink-DPS-M"]["ensmean"]["mse"], pt["reference"]["ensmean"]["mse"], rtol=1e-6)
    np.testing.assert_allclose(np.subtract(pt["Shrink-DPS-M"]["member"]["mse"], pt["Shrink-DPS-M"]["ensmean"]["mse"]),
                               np.subtract(pt["Align-DPS-M"]["member"]["mse"], pt["Align-DPS-M"]["ensmean"]["mse"]),
                               rtol=1e-5, atol=1e-9)
    for row in doc["scores"]:
        if row != "background":
            assert set(doc["scores"][row]["ensemble"]) >= {"crps", "spread_skill"}, row
    # the report's verdict: the four tests, Holm over the experiment's lines, spread/skill condition
    v = doc["verdict"]["Align-DPS-M"]
    assert v["setting"] == SETTING and v["method"] == METHOD and v["kind"] == "analysis"
    assert [t["name"] for t in v["tests"]] == ["ensemble-mean MSE vs reference", "CRPS vs reference",
                                               "single-member MSE vs shrink", "CRPS vs shrink"]
    assert v["p"] == max(t["p"] for t in v["tests"]) and v["p_holm"] == pytest.approx(v["p"])  # one line
    assert "spread/skill no further from 1" in v["conditions"]
    assert v["gain"] == all(v["conditions"].values()) and v["why"]
    ss = v["spread_skill"]
    assert ss["model"] == pytest.approx(np.mean(pt["Align-DPS-M"]["ensemble"]["spread_skill"]))
    assert ss["reference"] == pytest.approx(np.mean(pt["reference"]["ensemble"]["spread_skill"]))
    d = doc["decomposition"]["Align-DPS-M"]
    assert d["member"]["value"] == pytest.approx(d["ensmean"]["value"] + d["spread"]["value"], abs=1e-9)
    assert set(doc["obs_space"]) == {"background", "reference", "Align-DPS-M"}
    assert set(doc["obs_space"]["background"]) <= {"t", "u", "v", "q", "z", "t2m", "u10", "v10", "msl"}
    report = (out / "report.md").read_text()
    for text in ("Table 5", "Quality control", "background", "Align-DPS-M", "Shrink-DPS-M", "## Verdict",
                 "p (Holm)", "## Spread/skill", "## Decomposition", "O−B"):
        assert text in report, text
    assert json.loads((out / "metrics.json").read_text())["verdict"]["Align-DPS-M"]["p_holm"] == v["p_holm"]


def test_command_runs_and_refuses_a_bad_file_first(world, tmp_path, monkeypatch, capsys):
    import align_rl.network as cmd
    from align_rl.evaluation import runner

    cfg, data, models, _ = world
    monkeypatch.setattr(runner, "load_eval_data", lambda cfg, ws: (data, models["reference"]))
    monkeypatch.setattr(runner, "load_models", lambda specs, cfg, shape=None: {"Align-DPS-M": models["Align-DPS-M"]})
    monkeypatch.setattr(cmd, "check_model_specs", lambda specs: {})
    args = [f"run.workdir={tmp_path}", *ARGS, "--sondes", "4", "--surface", "10", "--reference-k", "0"]
    assert cmd.main(["--out", str(tmp_path / "net"), "--models", "Align-DPS-M=x.pt", *args]) == 0
    printed = capsys.readouterr().out
    assert "Align-DPS-M against reference and Shrink-DPS-M (p Holm" in printed
    doc = json.loads((tmp_path / "net" / "metrics.json").read_text())
    assert doc["observations"]["files"] == ["network/sondes.nc", "network/surface.nc"]
    assert [q["check"] for q in doc["qc"]] == ["background"]
    # rerun into the same (owned) folder: replaced
    assert cmd.main(["--out", str(tmp_path / "net"), *args]) == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("time,latitude,longitude,pressure,variable,value,error,units\n"
                   "2005-01-03T00:00:00Z,95.0,0.0,,airTemperature,280.0,1.0,K\n")
    monkeypatch.setattr(runner, "load_eval_data", lambda cfg, ws: pytest.fail("world loaded"))
    work = tmp_path / "fresh"
    before = sorted(p.name for p in tmp_path.iterdir())
    bad_args = [a if not a.startswith("run.workdir=") else f"run.workdir={work}" for a in args]
    with pytest.raises(SystemExit) as exc:
        cmd.main(["--obs", str(bad), *bad_args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "latitude" in err and "±90" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not work.exists()  # nothing written


# ----------------------------------------------------------------------------- the verdict on known ensembles
def _verdict_of(fields: dict[str, torch.Tensor], truth: torch.Tensor) -> dict:
    """The experiment's verdict (its Dataset, shrink rows, mse_line and Holm) of hand-made ensembles
    ``fields`` (name → (T, N, C, H, W)) against ``truth`` (T, C, H, W), scored with the evaluation's
    metric functions on a 2-channel toy state (no physical units needed)."""
    lat = np.linspace(-60, 60, truth.shape[-2])
    plan = network_rows(fields, "reference")
    table = ScoreTable()

    def add(row, x):
        table.add(SETTING, row, METHOD, "analysis", "member", {"mse": mse(x, truth.unsqueeze(1)).mean(dim=1).numpy()})
        table.add(SETTING, row, METHOD, "analysis", "ensmean", {"mse": mse(x.mean(dim=1), truth).numpy()})
        table.add(SETTING, row, METHOD, "analysis", "ensemble",
                  {"crps": crps_ensemble(x, truth, lat).mean(dim=-1).numpy(),
                   "spread_skill": spread_skill(x, truth, lat).mean(dim=-1).numpy()})

    for name, x in fields.items():
        add(name, x)
    for row, (_, target) in plan.trivial.items():
        add(row, shrink(fields["reference"], spread_term(fields[target]).numpy()))
    times = np.datetime64("2005-01-01T00", "ns") + np.arange(truth.shape[0]) * np.timedelta64(6, "h")
    ds = results_dataset(table, plan, times, "reference", fields["reference"].shape[1], "6x8", 0)
    return {ln["model"]: ln for ln in verdict_lines(ds, list(fields), "reference")}


def test_a_narrower_ensemble_gets_no_gain_and_a_better_one_does():
    """Aligned ensembles built from an under-dispersed reference's (spread/skill about 0.5):
    "narrow" has the same members' mean and half the spread (its single-member MSE falls, but the
    shrink row is the same ensemble and its spread/skill moves away from 1); "better" has a mean
    half-way to the truth and the same spread (ensemble-mean MSE, CRPS and single-member MSE all
    lower, spread/skill closer to 1): only it is a gain, Holm-corrected over both lines."""
    g = torch.Generator().manual_seed(0)
    T, N, C, H, W = 48, 8, 2, 6, 8
    truth = torch.randn(T, C, H, W, generator=g, dtype=torch.float64)
    mean = truth + 0.8 * torch.randn(T, C, H, W, generator=g, dtype=torch.float64)
    dev = torch.randn(T, N, C, H, W, generator=g, dtype=torch.float64)
    dev = dev - dev.mean(dim=1, keepdim=True)
    ref = mean.unsqueeze(1) + 0.4 * dev  # spread/skill about 0.5 (under-dispersed)
    narrow = mean.unsqueeze(1) + 0.2 * dev
    better = (0.5 * (mean + truth)).unsqueeze(1) + 0.4 * dev
    lines = _verdict_of({"reference": ref, "Align-narrow": narrow, "Align-better": better}, truth)
    n, b = lines["Align-narrow"], lines["Align-better"]
    single = {t["name"]: t for t in n["tests"]}
    assert single["single-member MSE vs shrink"]["value"] == pytest.approx(0.0, abs=1e-9)  # shrink = narrow
    assert single["ensemble-mean MSE vs reference"]["value"] == pytest.approx(0.0, abs=1e-9)
    assert not n["gain"] and "not significant" in n["why"][0]
    assert not n["conditions"]["spread/skill no further from 1"]
    assert n["spread_skill"]["model"] < n["spread_skill"]["reference"] < 1
    assert b["gain"], b["why"]
    assert all(t["value"] < 0 and t["ci"][1] < 0 for t in b["tests"])
    assert b["p_holm"] == pytest.approx(min(1.0, 2 * b["p"])) and "Holm over 2 lines" in b["why"][0]


def test_rows_name_the_shrink_baselines_and_refuse_clashes():
    plan = network_rows({"reference": 1, "Align-DPS-M": 2, "other": 3}, "reference")
    assert plan.trivial == {"Shrink-DPS-M": ("shrink", "Align-DPS-M"), "Shrink-other": ("shrink", "other")}
    assert plan.names() == ["reference", "Align-DPS-M", "other", "Shrink-DPS-M", "Shrink-other"]
    with pytest.raises(ConfigError, match="Shrink-DPS-M"):
        network_rows({"reference": 1, "Align-DPS-M": 2, "Shrink-DPS-M": 3}, "reference")
    with pytest.raises(ConfigError, match="one score network"):
        network_rows({"reference": [1, 2], "Align-DPS-M": 2}, "reference")
