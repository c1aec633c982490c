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


def test_a_search_dimension_on_the_command_line_replaces_the_files():
    """The simplex of reward_simplex.yaml replaced by one weighting (the default's, to validate it
    exactly as the front's trials): not merged into a dimension of two kinds."""
    _, ov = split_overrides(["name=reward_default",
                             "search.rewards.weights={grid: [{assim: 1, forecast: 1, phys: 1}]}"])
    spec = load_spec(REPO / "tune_configs" / "reward_simplex.yaml", ov)
    dim = spec.search["rewards.weights"]
    assert spec.name == "reward_default" and dim.kind == "grid"
    assert dim.values == [{"assim": 1, "forecast": 1, "phys": 1}] and spec.grid_size() == 1


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


TWO_CPU_SWEEP = """
import sys
import ray
from align_rl.training.harness import init_ray
init_ray(num_cpus=2)  # the sweep keeps the running instance
print("ray CPUs:", ray.cluster_resources()["CPU"], flush=True)
from align_rl.sweep import main
sys.exit(main(sys.argv[1:]))
"""
"""``python -m align_rl.sweep`` on a 2-CPU local Ray instance (arguments after ``-c``)."""


def ray_cpus(stdout: str) -> float:
    return float(next(ln.split(":")[1] for ln in stdout.splitlines() if ln.startswith("ray CPUs:")))


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
    # a 2-CPU Ray instance, the learner with the DEFAULT resources (1 worker × 2 CPUs; the tiny
    # world's overrides lower them) and the trials with the smoke sweep's own reservation
    default_cpus = load_config(None, []).dpo.cpus_per_worker
    assert default_cpus == 2
    cmd = [sys.executable, "-c", TWO_CPU_SWEEP, str(REPO / "tune_configs" / "smoke.yaml"),
           "--config", str(cfg_path), "--quiet", "steps_per_stage=2", "run.wandb_mode=offline",
           f"dpo.cpus_per_worker={default_cpus}"]
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
    assert "Pareto front" in (out / "report.md").read_text() and (out / "front.png").stat().st_size > 0
    assert ray_cpus(p.stdout) == 2.0
    # every cache was built once, for the base config: one pretraining run per model, and the
    # reference the pairs were drawn with is the one the trials trained against
    from align_rl.io.pair_store import PairStore
    from align_rl import identity

    for model in ("forecaster", "vae", "diffusion"):
        assert len([d for d in (run / "checkpoints" / model).iterdir() if d.is_dir()]) == 1, model
    meta = dict(PairStore.open(run / "pairs.zarr", mode="r").g.attrs["meta"])
    assert meta["reference"] == identity.reference(run / "checkpoints" / "diffusion" / "final.pt")
    assert list((out / "wandb").glob("offline-run-*")), "the results table is logged to wandb (offline)"


# ----------------------------------------------------------------------------- resources


TWO_CPUS = ({"CPU": 2.0, "GPU": 0.0}, [{"CPU": 2.0, "GPU": 0.0}])


def test_resource_check_sums_what_is_held_at_once_and_checks_each_bundle_on_a_node():
    from align_rl.training.resources import Need, check_fits

    learner = Need("DPO learner", ({"CPU": 2.0, "GPU": 0.0},), ("dpo.num_workers", "dpo.cpus_per_worker"))
    driver = Need("the trial's driver", ({"CPU": 1.0, "GPU": 0.0},), ("resources_per_trial.cpu",))
    check_fits([learner], "x", capacity=TWO_CPUS)  # 2 of 2 CPUs
    with pytest.raises(ConfigError) as e:
        check_fits([driver, learner], "a sweep trial", capacity=TWO_CPUS)  # 3 of 2
    msg = str(e.value)
    assert "3 CPU but the Ray cluster has 2" in msg
    assert all(k in msg for k in ("dpo.cpus_per_worker", "dpo.num_workers", "resources_per_trial.cpu"))
    # two 1-CPU nodes hold 2 CPUs in all, but no node holds a 2-CPU worker
    split = ({"CPU": 2.0, "GPU": 0.0}, [{"CPU": 1.0, "GPU": 0.0}, {"CPU": 1.0, "GPU": 0.0}])
    with pytest.raises(ConfigError, match="no node has that much"):
        check_fits([learner], "x", capacity=split)
    gpu = Need("DPO learner", ({"CPU": 1.0, "GPU": 1.0},), ("dpo.gpus_per_worker",))
    with pytest.raises(ConfigError, match="1 GPU but the Ray cluster has 0"):
        check_fits([gpu], "x", capacity=TWO_CPUS)


def test_smoke_sweep_defaults_fit_two_cpus_and_a_trial_that_cannot_start_is_named():
    from align_rl.tune.run import check_trials, trial_phases

    spec = load_spec(REPO / "tune_configs" / "smoke.yaml")
    cfg = build_base_config(spec)
    assert cfg.dpo.cpus_per_worker == 2 and cfg.dpo.num_workers == 1  # the default learner
    assert check_trials(spec, cfg, capacity=TWO_CPUS) == 1
    phases = dict(trial_phases(spec, cfg, use_gpu=False))
    assert sum(p.total()["CPU"] for p in phases["training"]) == 2.0
    # the trial holding a CPU of its own beside its learner: 3 of 2 CPUs, refused naming the keys
    spec1 = load_spec(REPO / "tune_configs" / "smoke.yaml", {"resources_per_trial": {"cpu": 1}})
    with pytest.raises(ConfigError) as e:
        check_trials(spec1, cfg, capacity=TWO_CPUS)
    assert "resources_per_trial.cpu" in str(e.value) and "dpo.cpus_per_worker" in str(e.value)
    assert "dpo.beta=" in str(e.value)  # which trial
    # a searched learner size is checked at each of its values
    spec2 = parse_spec(_spec(search={"dpo.cpus_per_worker": {"grid": [1, 4]}}, scheduler="fifo"))
    with pytest.raises(ConfigError, match="dpo.cpus_per_worker=4"):
        check_trials(spec2, build_base_config(spec2), capacity=TWO_CPUS)
    # concurrency: two trials at once need 4 CPUs; unset, as many as fit
    with pytest.raises(ConfigError, match="max_concurrent_trials: 1"):
        check_trials(load_spec(REPO / "tune_configs" / "smoke.yaml", {"max_concurrent_trials": 2}),
                     cfg, capacity=TWO_CPUS)
    eight = ({"CPU": 8.0, "GPU": 0.0}, [{"CPU": 8.0, "GPU": 0.0}])
    assert check_trials(load_spec(REPO / "tune_configs" / "smoke.yaml", {"max_concurrent_trials": 0}),
                        cfg, capacity=eight) == 4


def test_cluster_sweep_runs_one_trial_per_gpu():
    """tune_configs/cluster_simplex.yaml: each trial (learner, validation actors) takes one GPU's
    worth of shares, so a cluster of N one-GPU workers runs N trials at once."""
    from align_rl.tune.run import check_trials, trial_phases

    spec = load_spec(REPO / "tune_configs" / "cluster_simplex.yaml")
    cfg = build_base_config(spec)
    gpus = [sum(p.total()["GPU"] for p in parts) for _, parts in trial_phases(spec, cfg, use_gpu=True)]
    assert max(gpus) == pytest.approx(1.0)
    nodes = [{"CPU": 8.0, "GPU": 1.0}] * 4
    total = {"CPU": 32.0, "GPU": 4.0}
    assert spec.max_concurrent_trials is None
    assert check_trials(spec, cfg, capacity=(total, nodes)) == 4
    # a CPU-only cluster cannot run them: refused, naming the learner's GPU share
    with pytest.raises(ConfigError, match="dpo.gpus_per_worker"):
        check_trials(spec, cfg, capacity=({"CPU": 32.0, "GPU": 0.0}, [{"CPU": 32.0, "GPU": 0.0}]))

    # the KubeRay sweep job: that spec on the paper config, on its fixed-size worker group
    docs = list(yaml.safe_load_all((REPO / "cluster" / "rayjob_sweep.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    args = job["spec"]["entrypoint"].split()
    assert args[:3] == ["python", "-m", "align_rl.sweep"]
    spec_path, conf_path = (REPO / a.replace("/home/ray/align_rl/", "") for a in (args[3], args[5]))
    assert args[4] == "--config" and spec_path == REPO / "tune_configs" / "cluster_simplex.yaml"
    cfg = build_base_config(spec, conf_path)
    assert cfg.run.workdir.startswith("/mnt/align-rl/")  # the shared volume: one pair store for all trials
    cluster = job["spec"]["rayClusterSpec"]
    group = cluster["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
    pod = group["template"]["spec"]["containers"][0]["resources"]["requests"]
    node = {"CPU": float(pod["cpu"]), "GPU": float(pod["nvidia.com/gpu"])}
    head = {"CPU": float(cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]),
            "GPU": 0.0}
    nodes = [head] + [node] * group["replicas"]
    total = {k: sum(n[k] for n in nodes) for k in ("CPU", "GPU")}
    assert check_trials(spec, cfg, capacity=(total, nodes)) == total["GPU"] == 16
    env = {e["name"] for c in (cluster["headGroupSpec"], group) for e in c["template"]["spec"]["containers"][0]["env"]}
    assert env == {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}


@pytest.mark.ray
def test_an_infeasible_sweep_is_refused_before_any_trial(tmp_path, ray_session):
    """On the tests' 4-CPU Ray instance a learner of 8 CPUs can never start: the sweep refuses it
    before preparing anything or starting Tune."""
    spec = parse_spec(_spec(scheduler="fifo"), "big.yaml")
    cfg = build_base_config(spec, cfg_overrides=[f"run.workdir={tmp_path}", "run.wandb_mode=disabled",
                                                 "dpo.cpus_per_worker=8"])
    with pytest.raises(ConfigError, match=r"8 CPU but the Ray cluster has 4.*dpo\.cpus_per_worker"):
        run_sweep(spec, cfg, trainable=analytic_trial, ctx={"steps_per_stage": 1}, progress=False)
    assert not (tmp_path / "sweeps").exists()  # nothing written


# ----------------------------------------------------------------------------- several objectives


def test_pareto_front_of_a_hand_made_point_set():
    import numpy as np

    from align_rl.tune.pareto import pareto_mask

    # (analysis MSE: min, forecast MSE: min, Geo-Score: max)
    pts = np.array([
        [1.0, 5.0, 50.0],  # 0 front: best analysis
        [5.0, 1.0, 50.0],  # 1 front: best forecast
        [3.0, 3.0, 90.0],  # 2 front: balanced, best Geo-Score
        [3.0, 3.0, 80.0],  # 3 dominated by 2 (worse Geo-Score only)
        [2.0, 6.0, 40.0],  # 4 dominated by 0
        [1.0, 5.0, 50.0],  # 5 equal to 0: on the front too (neither dominates)
        [0.5, np.nan, 99.0],  # 6 a missing value: never on the front
        [6.0, 6.0, 10.0],  # 7 dominated by all of 0-3
    ])
    mask = pareto_mask(pts, ["min", "min", "max"])
    assert mask.tolist() == [True, True, True, False, False, True, False, False]
    # brute force over pairs agrees
    x = pts * np.array([1, 1, -1])
    for i in range(len(x)):
        if not np.all(np.isfinite(x[i])):
            continue
        dom = any(np.all(x[j] <= x[i]) and np.any(x[j] < x[i]) for j in range(len(x)) if np.all(np.isfinite(x[j])))
        assert mask[i] == (not dom)
    # one objective: the front is the minimum (with ties)
    assert pareto_mask(np.array([[3.0], [1.0], [1.0], [2.0]]), ["min"]).tolist() == [False, True, True, False]
    assert pareto_mask(np.array([[3.0], [1.0]]), ["max"]).tolist() == [True, False]


def test_several_objectives_in_a_sweep_file():
    raw = _spec(objectives={"val_mse": "min", "val_fc_mse": "min", "val_geo_score": "max"}, scheduler="fifo")
    s = parse_spec(raw, "x.yaml")
    assert s.goals() == {"val_mse": "min", "val_fc_mse": "min", "val_geo_score": "max"}
    assert (s.metric, s.mode) == ("val_mse", "min")  # ranked by the first
    raw = _spec(objectives=["val_fc_crps", {"val_geo_score": "max"}], scheduler="fifo")
    del raw["metric"]
    s = parse_spec(raw, "x.yaml")
    assert s.goals() == {"val_fc_crps": "min", "val_geo_score": "max"} and s.metric == "val_fc_crps"
    assert parse_spec(_spec(), "x.yaml").goals() == {"val_mse": "min"}
    assert load_spec(REPO / "tune_configs" / "reward_simplex.yaml").goals()["val_geo_score"] == "max"
    # the file round-trips through spec.yaml
    again = parse_spec(yaml.safe_load(yaml.safe_dump(s.to_dict())), "y.yaml")
    assert again.goals() == s.goals()
    for bad, key in [
        (dict(objectives={"val_mse": "min", "val_geo_score": "max"}), "scheduler: asha"),
        (dict(objectives={"val_msx": "min"}, scheduler="fifo"), "objectives.val_msx"),
        (dict(objectives={"val_mse": "lowest"}, scheduler="fifo"), "objectives.val_mse"),
        (dict(objectives={"val_mse": "min"}, metric="val_fc_mse", scheduler="fifo"), "metric"),
        (dict(objectives="val_mse", scheduler="fifo"), "objectives"),
    ]:
        with pytest.raises(ConfigError) as e:
            parse_spec(_spec(**bad), "x.yaml")
        assert key in str(e.value) and "x.yaml" in str(e.value)


def _row(tid, w, metrics, status="completed"):
    from align_rl.tune.results import TrialRow

    return TrialRow(tid, {"rewards.weights": w}, status, 2, metrics)


def _m(mse, fc, geo, lo=-1.0, hi=0.5):
    """Metrics of a trial given its % changes of analysis MSE, forecast MSE and Geo-Score."""
    ref = {"val_mse": 1.0, "val_fc_mse": 2.0, "val_geo_score": 80.0}
    m = {"val_mse": 1.0 * (1 + mse / 100), "val_fc_mse": 2.0 * (1 + fc / 100), "val_geo_score": 80.0 * (1 + geo / 100)}
    m.update({f"{k}_change_pct": c for k, c in zip(ref, (mse, fc, geo))})
    m.update({f"{k}_change_lo": c + lo for k, c in zip(ref, (mse, fc, geo))})
    m.update({f"{k}_change_hi": c + hi for k, c in zip(ref, (mse, fc, geo))})
    return m


def test_sweep_report_has_the_front_its_intervals_the_chosen_trial_and_a_picture(tmp_path):
    from align_rl.tune.results import collect_results, write_results

    spec = parse_spec({"name": "mo", "question": "which weighting?", "scheduler": "fifo",
                       "search": {"rewards.weights": {"simplex": {"keys": ["assim", "forecast", "phys"], "step": 0.5}}},
                       "objectives": {"val_mse": "min", "val_fc_mse": "min", "val_geo_score": "max"}}, "mo.yaml")
    cfg = build_base_config(spec, cfg_overrides=[f"run.workdir={tmp_path}"])
    w = lambda a, f, p: {"assim": a, "forecast": f, "phys": p}  # noqa: E731
    rows = [
        _row("t0", w(1, 0, 0), _m(-4.0, 1.0, -2.0)),    # front: best analysis, worse elsewhere
        _row("t1", w(0, 1, 0), _m(-1.0, -3.0, 1.0)),    # front, beats the reference everywhere
        _row("t2", w(0.5, 0.5, 0), _m(-2.0, -1.0, 0.5)),  # front, beats the reference everywhere
        _row("t3", w(0, 0, 1), _m(-0.5, -0.5, 0.2)),    # dominated by t2
        _row("t4", w(0.5, 0, 0.5), _m(-9.0, -9.0, 9.0), status="stopped early"),  # not completed
    ]

    class _R:  # what Tune's ResultGrid yields
        def __init__(self, r):
            self.metrics = dict(r.metrics, training_iteration=2 if r.status == "completed" else 1,
                                trial_id=r.trial_id)
            self.config, self.error, self.path = r.params, None, f"/x/{r.trial_id}"
            import pandas as pd  # every stage's report: the change halves from stage 1 to 2

            first = {k: v / 2 for k, v in r.metrics.items() if k.endswith("_change_pct")}
            self.metrics_dataframe = pd.DataFrame([dict(first, dpo_steps=10, stage=1),
                                                   dict(r.metrics, dpo_steps=20, stage=2)])

    res = collect_results([_R(r) for r in rows], spec, cfg)
    assert sorted(t.trial_id for t in res.front) == ["t0", "t1", "t2"]
    # chosen: better than the reference on all three, then the lowest analysis MSE
    assert res.best.trial_id == "t2"
    res.reference = {"val_mse": 1.0, "val_fc_mse": 2.0, "val_geo_score": 80.0}
    res.seconds = 90.0
    out = tmp_path / "sweeps" / "mo"
    write_results(res, spec, cfg, out)
    rep = (out / "report.md").read_text()
    assert "which weighting?" in rep and "Pareto front (3 of 4 completed trials)" in rep
    front_lines = [ln for ln in rep.splitlines() if ln.startswith("| t") and not ln.startswith("| trial")]
    assert [ln.split(" | ")[0] for ln in front_lines] == ["| t0", "| t2", "| t1"]  # by analysis MSE
    t2 = next(ln for ln in front_lines if ln.startswith("| t2"))
    assert "-2.00 % [-3.00, -1.50]" in t2 and "+0.50 % [-0.50, +1.00]" in t2
    assert t2.rstrip(" |").endswith("yes | *")
    assert "| no |" in front_lines[0]  # t0 is worse than the reference on forecasts
    assert "**Chosen.** Trial t2" in rep and "best_config.yaml" in rep
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_config(out / "best_config.yaml")
    assert best.rewards.weights == {"assim": 0.5, "forecast": 0.5, "phys": 0.0}
    with open(out / "results.csv") as f:
        head = next(csv.reader(f))
    assert head[head.index("status") + 2: head.index("status") + 5] == ["val_mse", "val_fc_mse", "val_geo_score"]
    assert "val_mse_change_lo" in head
    # the learning curves: every stage of every trial
    with open(out / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    assert len(curves) == 2 * len(rows)
    t0 = [c for c in curves if c["trial"] == "t0"]
    assert [float(c["dpo_steps"]) for c in t0] == [10, 20]
    assert [float(c["val_mse_change_pct"]) for c in t0] == [-2.0, -4.0]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_change_intervals_are_the_paired_bootstrap_of_the_validation_times():
    import numpy as np

    from align_rl.evaluation.verdict import paired_change
    from align_rl.tune.trial import change_intervals

    rng = np.random.default_rng(0)
    ref = list(1.0 + rng.random(8))
    pol = [0.9 * r for r in ref]  # 10 % lower at every time: the interval is that point
    c = change_intervals({"val_mse": pol, "val_fc_mse": pol[:3]}, {"val_mse": ref, "val_fc_mse": ref}, seed=0)
    assert set(c) == {"val_mse_change_lo", "val_mse_change_hi"}  # different times: no interval
    assert c["val_mse_change_lo"] == pytest.approx(-10.0) and c["val_mse_change_hi"] == pytest.approx(-10.0)
    noisy = list(np.array(ref) * (1 + 0.1 * rng.standard_normal(8)))
    c = change_intervals({"val_mse": noisy}, {"val_mse": ref}, seed=3)
    assert [c["val_mse_change_lo"], c["val_mse_change_hi"]] == paired_change(np.array(noisy), np.array(ref), seed=3)["ci"]


def test_a_trial_with_fewer_backgrounds_reselects_from_the_first_of_the_seeded_order(tmp_path):
    """The shared store holds the most backgrounds any trial uses; a trial with
    ``pairs.backgrounds = n`` takes the pairs of the first n of the seeded order only."""
    import numpy as np

    from align_rl.io.pair_store import PairStore
    from align_rl.tune.trial import _policy_pairs

    from .test_pair_store import NAMES, SHAPE, group

    order = [5, 2, 7, 0, 3, 6]  # the seeded order of the pref split's backgrounds
    st = PairStore.open(tmp_path / "s.zarr", SHAPE, NAMES)
    st.append([group(i) for i in order])
    cfg = load_config(overrides=["rewards.names=[assim, phys]", "rewards.weights={assim: 1, phys: 0}",
                                 "pairs.backgrounds=3", "pairs.decile=0.34", "pairs.pairs_per_background=4"])
    ps = _policy_pairs(st, cfg, order)
    bg_ids = st.backgrounds()["bg_id"][ps.background]
    assert set(bg_ids.tolist()) == {5, 2, 7}
    everything = _policy_pairs(st, cfg)  # no order: every stored background
    assert set(st.backgrounds()["bg_id"][everything.background].tolist()) == set(order)
    # the kept pairs are exactly those of the full reselection on those backgrounds
    keep = np.isin(st.backgrounds()["bg_id"][everything.background], [5, 2, 7])
    np.testing.assert_array_equal(np.sort(ps.hash), np.sort(everything.hash[keep]))


def test_a_trial_that_reserves_nothing_is_placed_by_a_placeholder_bundle():
    """Ray Tune needs a non-empty first bundle; a trial asking no CPU and no GPU gets 1 MiB of
    memory, and an online trial's actor bundles follow it."""
    from align_rl.tune.run import PLACEHOLDER_MEMORY, trial_resources

    spec = load_spec(REPO / "tune_configs" / "smoke.yaml")
    base = build_base_config(spec).to_dict()
    pgf = trial_resources(spec, base, {"dpo.beta": 2000})
    assert pgf.bundles == [{"memory": PLACEHOLDER_MEMORY}]
    online = trial_resources(spec, base, {"dpo.beta": 2000, "dpo.mode": "online"})
    assert online.bundles[0] == {"memory": PLACEHOLDER_MEMORY} and len(online.bundles) == 3
    assert all(b == {"CPU": 1.0} for b in online.bundles[1:])
    spec1 = load_spec(REPO / "tune_configs" / "smoke.yaml", {"resources_per_trial": {"cpu": 1}})
    assert trial_resources(spec1, base, {"dpo.beta": 2000}).bundles == [{"CPU": 1.0}]


def test_a_request_larger_than_a_growing_cluster_is_reported_not_refused(monkeypatch, capsys):
    """Through RAY_ADDRESS (a launcher or KubeRay cluster, which an autoscaler may grow) the check
    warns; on the fixed local instance it refuses."""
    import ray

    from align_rl.training import resources
    from align_rl.training.resources import Need, check_fits

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(resources, "cluster_capacity", lambda: TWO_CPUS)
    big = [Need("DPO learner", ({"CPU": 4.0, "GPU": 0.0},), ("dpo.cpus_per_worker",))]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="dpo.cpus_per_worker"):
        check_fits(big, "the job")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    check_fits(big, "the job")
    assert "warning" in capsys.readouterr().err


def test_the_main_job_and_the_online_loop_are_checked_phase_by_phase():
    """The main job's defaults fit 2 CPUs (the pool is released before the learner); an online
    loop that keeps its pool beside the learner needs both at once."""
    from align_rl.training.resources import check_job, check_online, job_phases

    cfg = load_config(None, [])
    phases = dict(job_phases(cfg, use_gpu=False))
    assert [p.what for p in phases["DPO"]] == ["DPO learner"]
    check_job(cfg, capacity=TWO_CPUS)
    check_online(cfg, capacity=TWO_CPUS)
    with pytest.raises(ConfigError, match=r"DPO of the online loop.*4 CPU but the Ray cluster has 2"):
        check_online(cfg, release_pool=False, capacity=TWO_CPUS)
    with pytest.raises(ConfigError, match=r"DPO of the job.*dpo\.cpus_per_worker"):
        check_job(load_config(overrides=["dpo.cpus_per_worker=3"]), capacity=TWO_CPUS)
    with pytest.raises(ConfigError, match=r"candidate pool of the job.*actors\.samplers"):
        check_job(load_config(overrides=["actors.samplers=2"]), capacity=TWO_CPUS)
