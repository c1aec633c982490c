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
from align_rl.evaluation.network import NetworkSettings, run_network_experiment
from align_rl.evaluation.runner import EvalData
from align_rl.evaluation.verdict import gain_verdict
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
    assert doc["baseline"] == "reference" and set(doc["scores"]) == set(models)
    ch = doc["changes"]["Align-DPS-M"]
    assert doc["verdict"]["Align-DPS-M"] == gain_verdict({"analysis": ch})
    # the change is the paired % change of the time means
    m, b = (np.mean(doc["per_time"][n]["member"]["mse"]) for n in ("Align-DPS-M", "reference"))
    assert ch["member"]["mse"]["pct"] == pytest.approx(100 * (m / b - 1))
    assert set(doc["obs_space"]) == {"background", "reference", "Align-DPS-M"}
    assert set(doc["obs_space"]["background"]) <= {"t", "u", "v", "q", "z", "t2m", "u10", "v10", "msl"}
    report = (out / "report.md").read_text()
    for text in ("Table 5", "Quality control", "background", "Align-DPS-M", "verdict", "O−B"):
        assert text in report, text
    json.loads((out / "metrics.json").read_text())


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
    assert "Align-DPS-M against reference" in printed
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
