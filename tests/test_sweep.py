"""Sweeps: the sweep-file schema and its errors, the reward-weight simplex, the shipped
tune_configs, and a Ray Tune run with ASHA on an analytic objective whose best point is known."""

from __future__ import annotations

import csv
import itertools
import json
import math
from math import comb
from pathlib import Path

import pytest
import yaml

from align_rl.config import load_config
from align_rl.errors import ConfigError
from align_rl.tune.run import run_sweep
from align_rl.tune.spec import build_base_config, load_spec, parse_spec, simplex_grid, split_overrides
from align_rl.tune.trial import eval_metrics, trial_config, validation_config, with_changes

REPO = Path(__file__).resolve().parents[1]
TUNE_CONFIGS = sorted((REPO / "tune_configs").glob("*.yaml"))


def _spec(**kw) -> dict:
    d = {"name": "t", "search": {"dpo.beta": {"grid": [1000, 8000]}}, "metric": "val_mse"}
    d.update(kw)
    return d


# ----------------------------------------------------------------------------- simplex


@pytest.mark.parametrize("k,step", [(3, 0.25), (3, 0.5), (2, 0.1), (3, 1.0), (4, 0.2)])
def test_simplex_grid_is_every_lattice_point_of_the_simplex(k, step):
    keys = [f"w{i}" for i in range(k)]
    pts = simplex_grid(keys, step)
    n = round(1 / step)
    assert len(pts) == comb(n + k - 1, k - 1)  # stars and bars
    assert len({tuple(p.values()) for p in pts}) == len(pts)
    for p in pts:
        assert list(p) == keys
        assert math.isclose(sum(p.values()), 1.0, abs_tol=1e-9)
        for v in p.values():
            assert math.isclose(v * n, round(v * n), abs_tol=1e-9) and 0 <= v <= 1
    # brute force over the lattice agrees
    brute = [c for c in itertools.product(range(n + 1), repeat=k) if sum(c) == n]
    assert sorted(tuple(round(v * n) for v in p.values()) for p in pts) == sorted(brute)


def test_simplex_dimension_in_a_spec_and_its_min():
    s = parse_spec(_spec(search={"rewards.weights": {"simplex": {"keys": ["assim", "forecast", "phys"],
                                                                 "step": 0.25, "min": 0.25}}}))
    pts = s.search["rewards.weights"].values
    assert sorted(tuple(p.values()) for p in pts) == [(0.25, 0.25, 0.5), (0.25, 0.5, 0.25), (0.5, 0.25, 0.25)]
    with pytest.raises(ConfigError, match="min"):
        parse_spec(_spec(search={"rewards.weights": {"simplex": {"step": 0.5, "min": 0.5}}}))


def test_simplex_step_must_divide_one():
    with pytest.raises(ConfigError, match="search.rewards.weights.simplex"):
        parse_spec(_spec(search={"rewards.weights": {"simplex": {"step": 0.3}}}))


# ----------------------------------------------------------------------------- schema errors


@pytest.mark.parametrize("raw,key", [
    (_spec(serach={}), "serach"),
    (_spec(metric="val_msee"), "metric"),
    (_spec(mode="lowest"), "mode"),
    (_spec(search={}), "search"),
    (_spec(search={"dpo.beta": {"grdi": [1, 2]}}), "search.dpo.beta"),
    (_spec(search={"dpo.lr": {"loguniform": [0, 1e-4]}}), "search.dpo.lr.loguniform"),
    (_spec(search={"dpo.lr": {"uniform": [1e-4, 1e-5]}}), "search.dpo.lr.uniform"),
    (_spec(search={"dpo.beta": {"grid": []}}), "search.dpo.beta.grid"),
    (_spec(search={"dpo.beta": {"simplex": {"step": 0.5}}}), "search.dpo.beta"),
    (_spec(scheduler="hyperband"), "scheduler"),
    (_spec(asha={"grace": 1}), "asha"),
    (_spec(asha={"reduction_factor": 1}), "asha.reduction_factor"),
    (_spec(stages=0), "stages"),
    (_spec(stages=2, asha={"max_t": 3}), "asha.max_t"),
    (_spec(validation={"method": "4dvar"}), "validation.method"),
    (_spec(validation={"members": 1}), "validation.members"),
    (_spec(validation={"time": 3}), "validation"),
    (_spec(resources_per_trial={"cpu": -1}), "resources_per_trial.cpu"),
    (_spec(resources_per_trial={"tpu": 1}), "resources_per_trial"),
    (_spec(num_samples=1.5), "num_samples"),
    (_spec(name="a/b"), "name"),
])
def test_invalid_sweep_files_name_the_key(raw, key):
    with pytest.raises(ConfigError) as e:
        parse_spec(raw, "x.yaml")
    assert key in str(e.value)
    assert "x.yaml" in str(e.value)


@pytest.mark.parametrize("search,key", [
    ({"dpo.betta": {"grid": [1, 2]}}, "search.dpo.betta"),
    ({"dpo.mode": {"grid": ["offline", "sometimes"]}}, "search.dpo.mode"),
    ({"dpo.beta": {"grid": [1000, -1]}}, "search.dpo.beta"),
    ({"rewards.weights": {"simplex": {"keys": ["assim", "phys"], "step": 0.5}}}, "search.rewards.weights"),
    ({"pairs.mode": {"choice": ["M", "Q"]}}, "search.pairs.mode"),
])
def test_search_keys_and_values_are_checked_against_the_config(search, key):
    spec = parse_spec(_spec(search=search), "x.yaml")
    with pytest.raises(ConfigError) as e:
        build_base_config(spec)
    assert key in str(e.value)


def test_bad_base_names_the_key(tmp_path):
    spec = parse_spec(_spec(base={"dpo": {"stesp": 3}}), "x.yaml")
    with pytest.raises(ConfigError, match=r"base: .*dpo\.stesp"):
        build_base_config(spec)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(bad)


def test_cli_reports_a_bad_file_with_exit_2(tmp_path, capsys):
    from align_rl.sweep import main

    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(_spec(metric="accuracy")))
    with pytest.raises(SystemExit) as e:
        main([str(p)])
    assert e.value.code == 2
    assert "metric" in capsys.readouterr().err


# ----------------------------------------------------------------------------- overrides / config


def test_overrides_go_to_the_config_or_to_the_sweep_file():
    cfg_items, spec_ov = split_overrides(["dpo.steps=7", "num_samples=3", "asha.grace_period=2",
                                          "search.dpo.lr={grid: [1.0e-5, 2.0e-5]}", "preset=demo"])
    assert cfg_items == ["dpo.steps=7", "preset=demo"]
    assert spec_ov == {"num_samples": 3, "asha": {"grace_period": 2},
                       "search": {"dpo.lr": {"grid": [1e-5, 2e-5]}}}
    spec = parse_spec(_spec(asha={"reduction_factor": 3}), "x.yaml", spec_ov)
    assert spec.num_samples == 3 and spec.asha.given() == {"reduction_factor": 3, "grace_period": 2}
    assert set(spec.search) == {"dpo.beta", "dpo.lr"}
    cfg = build_base_config(spec, cfg_overrides=cfg_items)
    assert cfg.dpo.steps == 7


def test_trial_config_applies_dotted_params_and_replaces_weights():
    base = load_config(overrides=["rewards.weights={assim: 1, forecast: 1, phys: 1}"])
    cfg = trial_config(base, {"dpo.beta": 123.0, "pairs.mode": "P",
                              "rewards.weights": {"assim": 0.5, "forecast": 0.0, "phys": 0.5}})
    assert cfg.dpo.beta == 123.0 and cfg.pairs.mode == "P"
    assert cfg.rewards.weights == {"assim": 0.5, "forecast": 0.0, "phys": 0.5}
    assert base.dpo.beta == load_config(None, []).dpo.beta  # the base is untouched


def test_validation_config_uses_the_val_split_one_method_and_a_fixed_seed():
    base = load_config(overrides=["run.seed=5"])
    v = validation_config(trial_config(base, {"run.seed": 9}),
                          {"times": 3, "members": 2, "method": "repaint"}, seed=5)
    assert v.data.test == base.data.val and v.guidance.methods == ["repaint"]
    assert v.eval.times == 3 and v.eval.members == 2 and v.eval.ablations == []
    assert v.run.seed == 5 and v.run.wandb_mode == "disabled"


def _results(rows: dict):
    """Summarised evaluation results (one time) holding ``{"<model>/<method>": {kind: {stat:
    {metric: value}}}}``."""
    import numpy as np

    from align_rl.evaluation.results import ScoreTable, summarise

    table = ScoreTable()
    for row, kinds in rows.items():
        model, method = row.split("/")
        for kind, stats in kinds.items():
            for stat, mets in stats.items():
                table.add("main", model, method, kind, stat, {k: [v] for k, v in mets.items()})
    setting = {"name": "main", "density": 0.01, "sigma_o": 0.0, "ablation": "main", "observed_fraction": 0.01}
    models = list(dict.fromkeys(r.split("/")[0] for r in rows))
    methods = list(dict.fromkeys(r.split("/")[1] for r in rows))
    ds = table.to_dataset([setting], models, methods, np.array(["2005-01-01"], "datetime64[ns]"),
                          {"members": 2, "grid": "4x8"})
    return summarise(ds, models[0])


def test_eval_metrics_and_changes_from_a_summary():
    row = {"analysis": {"member": {"mse": 0.5, "mae": 0.4, "geo_score": 90.0},
                        "ensmean": {"mse": 0.3}, "ensemble": {"crps": 0.2}},
           "forecast": {"member": {"mse": 0.8}, "ensmean": {"mse": 0.6}}}
    m = eval_metrics(_results({"policy/obsfree": row}), "policy/obsfree")
    assert m == {"val_mse": 0.5, "val_mae": 0.4, "val_mse_ensmean": 0.3, "val_geo_score": 90.0,
                 "val_crps": 0.2, "val_fc_mse": 0.8, "val_fc_mse_ensmean": 0.6}
    c = with_changes(m, {"val_mse": 0.4, "val_geo_score": 100.0})
    assert c["val_mse_change_pct"] == pytest.approx(25.0)
    assert c["val_geo_score_change_pct"] == pytest.approx(-10.0)
    assert "val_mae_change_pct" not in c
    from align_rl.errors import InputError

    with pytest.raises(InputError, match="no row 'policy/dps'"):
        eval_metrics(_results({"policy/obsfree": row}), "policy/dps")


@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=lambda p: p.name)
def test_shipped_tune_configs_are_valid_and_documented(path):
    text = path.read_text()
    assert text.startswith("#"), "each file says at the top which question it answers"
    spec = load_spec(path)
    assert spec.name == path.stem and spec.question
    build_base_config(spec)


def test_shipped_tune_configs_cover_the_research_questions():
    specs = {p.stem: load_spec(p) for p in TUNE_CONFIGS}
    assert {"p_vs_m", "reward_simplex", "beta_lr", "online_vs_offline", "smoke"} <= set(specs)
    assert specs["p_vs_m"].search["pairs.mode"].values == ["M", "P"]
    assert specs["reward_simplex"].search["rewards.weights"].kind == "simplex"
    assert len(specs["reward_simplex"].search["rewards.weights"].values) == 15
    assert {"dpo.beta", "dpo.lr"} <= set(specs["beta_lr"].search)
    assert specs["online_vs_offline"].search["dpo.mode"].values == ["offline", "online"]
    assert specs["smoke"].grid_size() == 2


# ----------------------------------------------------------------------------- Tune run


def analytic_trial(params: dict, ctx: dict) -> None:
    """A stand-in for a DPO trial with a known optimum: β = 100 and mode M, improving with stages.
    β = 1 fails (to check that an error is recorded, not fatal)."""
    from ray import tune

    from align_rl.errors import InputError

    beta, mode = float(params["dpo.beta"]), params["pairs.mode"]
    if beta == 1.0:
        raise InputError("deliberate failure of the beta=1 trial")
    for stage in range(1, ctx["stages"] + 1):
        val = (math.log10(beta) - 2.0) ** 2 + (0.5 if mode == "P" else 0.0) + 1.0 / stage
        tune.report({"val_mse": val, "dpo_steps": stage * ctx["steps_per_stage"], "stage": stage})


@pytest.mark.ray
def test_tune_sweep_with_asha_finds_the_known_best_and_writes_results(tmp_path, ray_session):
    spec = parse_spec({
        "name": "analytic", "question": "which beta?",
        "search": {"dpo.beta": {"grid": [100, 1000, 10, 1]}, "pairs.mode": {"grid": ["M", "P"]}},
        "metric": "val_mse", "mode": "min", "scheduler": "asha",
        "asha": {"grace_period": 1, "reduction_factor": 2}, "stages": 3, "steps_per_stage": 5,
        "resources_per_trial": {"cpu": 0.5}, "max_concurrent_trials": 1,
    }, "analytic.yaml")
    cfg = build_base_config(spec, cfg_overrides=[f"run.workdir={tmp_path}", "run.wandb_mode=disabled"])
    res = run_sweep(spec, cfg, trainable=analytic_trial, ctx={"steps_per_stage": 5}, progress=False)

    assert len(res.rows) == 8
    assert res.best is not None and res.best.params == {"dpo.beta": 100, "pairs.mode": "M"}
    assert res.best.status == "completed" and res.best.stages == 3
    assert res.best.metrics["val_mse"] == pytest.approx(1 / 3)
    statuses = {(r.params["dpo.beta"], r.params["pairs.mode"]): r.status for r in res.rows}
    assert statuses[(1, "M")] == "error" and statuses[(1, "P")] == "error"
    # ASHA stopped weak trials after the first rung (the best ran first, max_concurrent 1)
    assert sum(s == "stopped early" for s in statuses.values()) >= 3
    assert all(r.stages < 3 for r in res.rows if r.status == "stopped early")
    # β = 1000 and 10 are worse than the best at the first rung in both modes
    assert all(statuses[(b, m)] == "stopped early" for b in (1000, 10) for m in ("M", "P"))

    out = tmp_path / "sweeps" / "analytic"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    best_rows = [r for r in rows if r["best"] == "*"]
    assert len(best_rows) == 1 and best_rows[0]["dpo.beta"] == "100" and best_rows[0]["pairs.mode"] == "M"
    assert float(best_rows[0]["val_mse"]) == pytest.approx(1 / 3, rel=1e-3)
    md = (out / "results.md").read_text()
    assert "which beta?" in md and md.count("\n| ") == 9 and "deliberate failure" in md
    # the best configuration is a full align_rl config usable as --config
    best = load_config(out / "best_config.yaml")
    assert best.dpo.beta == 100.0 and best.pairs.mode == "M" and best.dpo.steps == 15
    assert best.run.workdir == cfg.run.workdir
    assert json.loads((out / "best.json").read_text())["params"] == {"dpo.beta": 100, "pairs.mode": "M"}
    assert (out / "spec.yaml").exists() and (out / "tune").is_dir()


# ----------------------------------------------------------------------------- real DPO trials


@pytest.mark.slow
@pytest.mark.ray
def test_dpo_trials_reselect_shared_pairs_train_in_stages_and_validate(tmp_path, ray_session):
    """Two trials (-M with assimilation-only weights, -P) on the tiny world: pairs reselected from
    the shared store's scores (the store is not modified), two DPO stages each, validation
    metrics that an independent evaluation of the final policy reproduces."""
    import numpy as np
    import torch

    from actors.pool import CandidatePool
    from align_rl.io.checkpoints import load_model
    from align_rl.evaluation.runner import EvalData, run_evaluation
    from align_rl.io.pair_store import PairStore
    from align_rl.tune.trial import dpo_trial, eval_metrics

    from align_rl.alignment.candidates import background_order, make_tasks, valid_times

    from .tiny_align import LAT, LON, tiny_world

    cfg, ws, models, truth, bg, ref_ckpt = tiny_world(
        tmp_path, ["data.val=[2004-01-01, 2004-01-06]", "actors.samplers=1", "pairs.variants=[M]"])
    store = PairStore.open(ws.pairs, models.codec.latent_shape, cfg.rewards.names)
    pool = CandidatePool(cfg, models, LAT, LON)
    times = valid_times(truth.times, bg.times, "2004-01-01", "2004-12-31", cfg.rewards.forecast_hours)
    tasks = make_tasks(background_order(len(times), cfg.run.seed)[:4], times, truth, bg, models.normalizer,
                       cfg.rewards.forecast_hours)
    pool.build(tasks, store, ["M"], progress=False)
    pool.shutdown()
    committed = store.committed
    val = {"times": 2, "members": 2, "method": "obsfree"}
    data = EvalData(truth, bg, models.normalizer, models.codec, models.forecaster)
    vcfg = validation_config(cfg, val, seed=cfg.run.seed)
    ref = eval_metrics(run_evaluation(vcfg, ws, {"reference": models.eps_model}, data=data,
                                      out=tmp_path / "refval", progress=False), "reference/obsfree")
    spec = parse_spec({"name": "tiny", "scheduler": "fifo", "stages": 2, "steps_per_stage": 2,
                       "validation": val, "resources_per_trial": {"cpu": 1},
                       "search": {"pairs.mode": {"grid": ["M", "P"]},
                                  "rewards.weights": {"grid": [{"assim": 1.0, "forecast": 0.0, "phys": 0.0}]}}},
                      "tiny.yaml")
    out = tmp_path / "sweeps" / "tiny"
    ctx = {"base": cfg.to_dict(), "name": "tiny", "workdir": str(ws.root), "sweep_dir": str(out),
           "world": "", "pairs": str(ws.pairs), "reference_ckpt": str(ref_ckpt), "validation": val,
           "reference_metrics": ref, "eval_data": data, "stages": 2, "steps_per_stage": 2}
    res = run_sweep(spec, cfg, trainable=dpo_trial, ctx=ctx, progress=False)

    assert [r.status for r in res.rows] == ["completed", "completed"], [r.error for r in res.rows]
    assert store.committed == committed  # trials only read the shared store
    sc = store.scores()
    ref_state = torch.load(ref_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for r in res.rows:
        mode = r.params["pairs.mode"]
        assert r.metrics["dpo_steps"] == 4 and r.stages == 2
        # the trial's pairs: every winner beats its loser on the trial's criterion
        w = r.params["rewards.weights"]
        ps = store.reselect(w, mode, cfg.pairs.pairs_per_background, cfg.run.seed,
                            cfg.pairs.top_k_phys, cfg.pairs.decile, min_version=0)
        assert r.metrics["pairs"] == len(ps) > 0
        crit = sc["phys"] if mode == "P" else sum(w[k] * sc[k] for k in w)
        assert np.all(crit[ps.winner] > crit[ps.loser])
        # the policy moved away from the reference, and its validation is reproducible
        ck = out / "trials" / r.trial_id / "dpo" / "policy.pt"
        model, _ = load_model(ck, "diffusion")
        moved = sum(float((p - ref_state[k]).abs().sum()) for k, p in model.state_dict().items())
        assert moved > 0
        again = eval_metrics(run_evaluation(vcfg, ws, {"policy": model}, data=data, out=tmp_path / f"v{mode}",
                                            progress=False), "policy/obsfree")
        assert r.metrics["val_mse"] == pytest.approx(again["val_mse"], rel=1e-6)
        assert r.metrics["val_mse_change_pct"] == pytest.approx(100 * (again["val_mse"] - ref["val_mse"]) / ref["val_mse"], rel=1e-6)
    best = load_config(out / "best_config.yaml")
    assert best.dpo.steps == 4 and best.pairs.mode == res.best.params["pairs.mode"]


@pytest.mark.slow
def test_sweep_cli_end_to_end_on_a_tiny_world(tmp_path):
    """``python -m align_rl.sweep tune_configs/smoke.yaml`` on a tiny world from scratch: shared
    inputs built as the main job builds them (pretraining, backgrounds, pairs), the reference
    validated once, two trials, the results table and a best configuration that loads."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from .test_job_submit import _pids_mentioning, tiny_train_config

    cfg_path, run = tiny_train_config(tmp_path)
    rt = tempfile.mkdtemp(prefix="arlsw", dir="/tmp")  # a private Ray temp dir (no shared address file)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=rt, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "align_rl.sweep", str(REPO / "tune_configs" / "smoke.yaml"),
           "--config", str(cfg_path), "--quiet", "steps_per_stage=2", "run.wandb_mode=offline"]
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500,
                           start_new_session=True)
    finally:
        left = _pids_mentioning(rt)
        shutil.rmtree(rt, ignore_errors=True)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    assert left == []
    out = run / "sweeps" / "smoke"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["dpo.beta"] for r in rows) == ["2000", "8000"]
    # ASHA (grace period 1, reduction factor 2) may stop the second trial after its first stage when
    # it validates worse than the first did there; which one depends on the numbers
    done = [r for r in rows if r["status"] == "completed"]
    assert done and all(r["stages"] == "2" for r in done)
    assert all(r["status"] == "stopped early" and r["stages"] == "1" for r in rows if r not in done)
    assert all(float(r["val_mse"]) > 0 and r["val_mse_change_pct"] != "" for r in rows)
    best = load_config(out / "best_config.yaml")
    assert best.dpo.beta in (2000.0, 8000.0) and best.dpo.steps == 4 and best.data.grid == "8x16"
    ref = json.loads((out / "reference_val.json").read_text())["metrics"]
    assert ref["val_mse"] > 0
    # the shared pair store is the main job's: pairs.backgrounds backgrounds of the reference
    commit = json.loads((run / "pairs.zarr" / "COMMIT").read_text())
    assert commit["backgrounds"] == best.pairs.backgrounds and commit["pairs"] > 0
    assert "best:" in p.stdout and (out / "results.md").exists()
    # every cache was built once, for the base config: one pretraining run per model, and the
    # reference the pairs were drawn with is the one the trials trained against
    from align_rl.io.pair_store import PairStore
    from align_rl import identity

    for model in ("forecaster", "vae", "diffusion"):
        assert len([d for d in (run / "checkpoints" / model).iterdir() if d.is_dir()]) == 1, model
    meta = dict(PairStore.open(run / "pairs.zarr", mode="r").g.attrs["meta"])
    assert meta["reference"] == identity.reference(run / "checkpoints" / "diffusion" / "final.pt")
    assert list((out / "wandb").glob("offline-run-*")), "the results table is logged to wandb (offline)"
