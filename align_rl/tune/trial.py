"""One sweep trial: its config, the DPO stages, a short validation after each and the report.

What a trial does (:func:`dpo_trial`): build its config (the sweep's base + its point of the search
space, :func:`trial_config`), reselect the preference pairs of its reward weights and pair mode
from the SHARED pair store's stored per-candidate scores
(:meth:`align_rl.io.pair_store.PairStore.reselect`; no new sampling, no forecast rollouts), then
``stages`` times: :func:`align_rl.alignment.learner.run_dpo` for ``steps_per_stage`` more steps
(the same ``out_dir``, so the optimiser state carries over and the trial equals one run of
``stages × steps_per_stage`` steps), a short validation evaluation
(:func:`align_rl.evaluation.runner.run_evaluation` on ``validation.times`` times of the VAL split
with one guidance method, :func:`validation_config`), and ``tune.report`` of the metrics
(:func:`eval_metrics`, :func:`with_changes`), so ASHA can stop weak trials early. Online trials
(``dpo.mode=online`` / ``sync``: the rounds; ``async``: the asynchronous loop, one run resumed per
stage) draw fresh candidates by design.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from align_rl import remote
from align_rl.alignment.learner import run_dpo
from align_rl.alignment.async_loop import run_async
from align_rl.alignment.candidates import first_backgrounds
from align_rl.alignment.pairs import alignment_seed
from align_rl.alignment.online import run_online
from align_rl.config import Config, config_from_dict, with_values
from align_rl.errors import InputError
from align_rl.evaluation.results import as_dataset, per_time_doc, score, split_row, was_scored
from align_rl.evaluation.runner import run_evaluation
from align_rl.evaluation.verdict import paired_change
from align_rl.io.checkpoints import load_model
from align_rl.io.pair_store import CandidateGroup, PairSet, PairStore
from align_rl.owned import remove_owned
from align_rl.training.pretraining import ensure_pretrained
from align_rl.workspace import Workspace
from align_rl.world.splits import SplitData

# validation metric -> (table, statistic, metric) in run_evaluation's summary
_EVAL_METRICS: dict[str, tuple[str, str, str]] = {
    "val_mse": ("analysis", "member", "mse"),
    "val_mae": ("analysis", "member", "mae"),
    "val_mse_ensmean": ("analysis", "ensmean", "mse"),
    "val_wrmse_z500": ("analysis", "member", "wrmse_z500"),
    "val_geo_score": ("analysis", "member", "geo_score"),
    "val_crps": ("analysis", "ensemble", "crps"),
    "val_fc_mse": ("forecast", "member", "mse"),
    "val_fc_mse_ensmean": ("forecast", "ensmean", "mse"),
    "val_spread_skill": ("analysis", "ensemble", "spread_skill"),
    "val_fc_crps": ("forecast", "ensemble", "crps"),
    "val_fc_spread_skill": ("forecast", "ensemble", "spread_skill"),
}
ONLINE_MODES = ("online", "sync", "async")  # trials that draw their own candidates (own store)
_DERIVED = {"val_spread_skill_gap": "val_spread_skill", "val_fc_spread_skill_gap": "val_fc_spread_skill"}
"""|spread/skill − 1| of the time-mean ratio (0 = a reliable ensemble; lower is better), so that
the ensemble's reliability can be an objective with mode min."""
_DPO_METRICS = {"dpo_loss": "loss", "dpo_accuracy": "rewards/accuracies", "dpo_margin": "rewards/margins"}
_SCORES = tuple(_EVAL_METRICS) + tuple(_DERIVED)
VALIDATION_METRICS: tuple[str, ...] = (
    _SCORES + tuple(f"{k}_change_pct" for k in _SCORES)
    + tuple(f"{k}_change_{end}" for k in _EVAL_METRICS for end in ("lo", "hi")) + tuple(_DPO_METRICS)
)
"""Metrics every DPO trial reports after each stage (``val_fc_*``: of the members' forecasts at
``rewards.forecast_hours``, 48 h by default; ``*_change_pct``: % change against the reference on
the same validation times, negative = lower; ``*_change_lo`` / ``*_change_hi``: its 95 %
moving-block bootstrap interval over the validation times,
:func:`align_rl.evaluation.verdict.paired_change`)."""


# ----------------------------------------------------------------------------- how a trial reads the evaluation


def eval_metrics(summary, row: str) -> dict[str, float]:
    """The validation metrics of ``row`` (``"<model>/<method>"``) in run_evaluation's results
    (an :class:`~align_rl.evaluation.results.Evaluation` or its Dataset): time means of the main
    setting, those not scored left out."""
    ds = as_dataset(summary)
    model, method = split_row(row)
    if model == "background" or not was_scored(ds, model, method):
        raise InputError(f"evaluation results have no row {row!r} (models: {list(ds.model.values)}, "
                         f"methods: {list(ds.method.values)})")
    out = {}
    for name, (tab, stat, m) in _EVAL_METRICS.items():
        v = score(ds, model, method, tab, m, stat)
        if v is not None:
            out[name] = float(v)
    for name, src in _DERIVED.items():
        if src in out:
            out[name] = abs(out[src] - 1.0)
    return out


def eval_per_time(summary, row: str) -> dict[str, list[float]]:
    """The per-time values (over the validation times, in time order) of the metrics of
    :func:`eval_metrics` that are scored per time (not the derived ones)."""
    ds = as_dataset(summary)
    cells = per_time_doc(ds, "main").get(row) or {}
    out = {}
    for name, (tab, stat, m) in _EVAL_METRICS.items():
        v = cells.get(tab, {}).get(stat, {}).get(m)
        if v is not None:
            out[name] = [float(x) for x in np.asarray(v, np.float64)]
    return out


def change_intervals(per_time: dict[str, list[float]], reference: dict[str, list[float]],
                     seed: int = 0) -> dict[str, float]:
    """``<metric>_change_lo`` / ``_hi``: the 95 % interval of the paired % change of each metric
    against the reference on the same times (:func:`align_rl.evaluation.verdict.paired_change`)."""
    out = {}
    for k, v in per_time.items():
        if k in reference and len(reference[k]) == len(v):
            c = paired_change(np.asarray(v), np.asarray(reference[k]), seed=seed)
            if all(math.isfinite(x) for x in c["ci"]):
                out[f"{k}_change_lo"], out[f"{k}_change_hi"] = c["ci"]
    return out


def with_changes(metrics: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """Add ``<metric>_change_pct`` = 100 (policy − reference) / |reference|."""
    out = dict(metrics)
    for k, v in metrics.items():
        r = reference.get(k)
        if r is not None and r != 0 and math.isfinite(r):
            out[f"{k}_change_pct"] = 100.0 * (v - r) / abs(r)
    return out


# ----------------------------------------------------------------------------- configs


def trial_config(base: Config | dict, params: dict[str, Any]) -> Config:
    """The align_rl config of one trial: ``base`` with the trial's dotted ``params`` applied
    (``rewards.weights`` replaced whole); ``base`` is untouched."""
    return with_values(base, params)


def trial_points(spec: Any) -> list[dict[str, Any]]:
    """Every listed point of the search space (grid, choice and simplex values; a range's two
    bounds), the configurations whose resources :func:`check_trials` checks."""
    keys = list(spec.search)
    return [dict(zip(keys, combo)) for combo in
            itertools.product(*(spec.search[k].probe_values() for k in keys))]


def validation_config(cfg: Config, val: dict[str, Any], seed: int | None = None) -> Config:
    """The short validation evaluation: VAL split times, one guidance method, no ablations,
    no wandb run of its own. ``seed`` (default ``cfg.run.seed``) fixes the observations and the
    sampler noise: give every trial the sweep's base seed so all comparisons are paired."""
    d = cfg.to_dict()
    if seed is not None:
        d["run"]["seed"] = int(seed)
    d["data"]["test"] = list(cfg.data.val)
    d["eval"].update(times=int(val["times"]), members=int(val["members"]), ablations=[],
                     map_samples=1, baseline="reference", out=None)
    d["guidance"]["methods"] = [val["method"]]
    d["run"]["wandb_mode"] = "disabled"
    return config_from_dict(d)


def candidate_pool(cfg: Config, models: Any, lat: Any, lon: Any) -> Any:
    """The sampler and reward actors that draw and score candidates (the candidate pool of
    :mod:`align_rl.remote`), for the shared pair store and for online trials."""
    return remote.workers().candidate_pool(cfg, models, lat, lon)


# ----------------------------------------------------------------------------- the trial


def _policy_pairs(store: PairStore, cfg: Config, order: list[int] | None = None) -> PairSet:
    """The trial's pairs: reselected from the stored scores of the REFERENCE's candidates
    (policy version 0) with the trial's reward weights and pair mode; with the seeded background
    ``order``, only those of its first ``pairs.backgrounds`` backgrounds (the shared store holds
    the most any trial uses)."""
    mine = None if order is None else first_backgrounds(order, cfg.pairs.backgrounds)
    ps = store.reselect(cfg.rewards.weights, cfg.pairs.mode, per_background=cfg.pairs.pairs_per_background,
                        seed=alignment_seed(cfg.run.seed, cfg.dpo.seed), top_k=cfg.pairs.top_k_phys,
                        decile=cfg.pairs.decile, min_version=0, normalize=cfg.rewards.normalize,
                        bg_ids=mine)
    keep = np.flatnonzero(ps.version == 0)
    ps = PairSet(ps.winner[keep], ps.loser[keep], ps.background[keep], ps.version[keep], ps.hash[keep],
                 ps.mode)
    if len(ps) == 0:
        raise InputError(f"no {cfg.pairs.mode} pairs for weights {cfg.rewards.weights} in {store.path}")
    return ps


def dpo_trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: reselected pairs, DPO in ``stages``, a validation and a report after each.
    ``ctx``: the shared context of :func:`align_rl.tune.inputs.prepare_shared`."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id() or "trial"
    cfg = trial_config(ctx["base"], params)
    cfg.run.name = f"{ctx['name']}-{trial_id}"
    ws = Workspace(Path(ctx["workdir"]))
    tdir = Path(ctx["sweep_dir"]) / "trials" / trial_id
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "params.json").write_text(json.dumps(params, indent=1, default=str))
    vcfg = validation_config(cfg, ctx["validation"], seed=ctx["base"]["run"]["seed"])
    sps, stages = int(ctx["steps_per_stage"]), int(ctx["stages"])
    ref_ckpt = Path(ctx["reference_ckpt"])
    store = PairStore.open(ctx["pairs"], mode="r")
    pairs = _policy_pairs(store, cfg, ctx.get("pref_order"))
    online: dict[str, Any] = {}
    if cfg.dpo.mode in ONLINE_MODES:
        store = seed_trial_store(store, tdir / "pairs.zarr", pairs)
    ckpt = None
    try:
        for stage in range(1, stages + 1):
            t0 = time.time()
            if cfg.dpo.mode == "offline":
                res = run_dpo(cfg, ws, (store, pairs), ref_ckpt, init_ckpt=ckpt, steps=stage * sps,
                              out_dir=tdir / "dpo", progress=False)
            else:
                res = _online_stage(cfg, ws, ctx, store, stage * sps, tdir / "dpo", online)
            ckpt = res.checkpoint
            n_pairs = len(pairs) if cfg.dpo.mode == "offline" else store.num_pairs
            tune.report(_validate_stage(vcfg, ws, res, ctx, tdir / "val" / f"stage_{stage}", stage,
                                        n_pairs, t0))
    finally:
        if "pool" in online:
            online["pool"].shutdown()


def _validate_stage(vcfg: Config, ws: Workspace, res: Any, ctx: dict, out: Path, stage: int,
                    n_pairs: int, t0: float) -> dict[str, float]:
    """The stage's short validation of the policy ``res.checkpoint``: the metrics to report."""
    model, _ = load_model(res.checkpoint, "diffusion")
    summary = run_evaluation(vcfg, ws, {"policy": model}, data=ctx["eval_data"], out=out, progress=False)
    row = f"policy/{ctx['validation']['method']}"
    m = with_changes(eval_metrics(summary, row), ctx["reference_metrics"])
    m.update(change_intervals(eval_per_time(summary, row), ctx.get("reference_per_time") or {},
                              seed=int(ctx["base"]["run"]["seed"])))
    for k, src in _DPO_METRICS.items():
        if src in res.metrics:
            m[k] = float(res.metrics[src])
    m.update(stage=stage, dpo_steps=int(res.step), policy_version=int(res.version),
             pairs=int(n_pairs), stage_seconds=time.time() - t0)
    return m


# ----------------------------------------------------------------------------- online trials


def seed_trial_store(shared: PairStore, path: Path, pairs: PairSet) -> PairStore:
    """A trial's own pair store (online trials: their policy's candidates must not mix with other
    trials'): the reference's candidates of the shared store with the trial's reselected
    ``pairs`` (a :class:`~align_rl.io.pair_store.PairSet` of version-0 rows), committed as version 0."""
    remove_owned(path, "trial pair store")  # only a store align_rl made (marker file)
    store = PairStore.open(path, shared.latent_shape, shared.reward_names, meta=dict(shared.g.attrs.get("meta", {})))
    bg = shared.backgrounds()
    cb = shared.candidate_backgrounds()
    sc = shared.scores()
    groups = []
    for b in np.unique(pairs.background):
        rows = np.flatnonzero(cb == b)
        sel = pairs.background == b
        local = np.stack([np.searchsorted(rows, pairs.winner[sel]), np.searchsorted(rows, pairs.loser[sel])], 1)
        groups.append(CandidateGroup(
            bg_id=int(bg["bg_id"][b]), time=int(bg["time"][b].astype("int64")), version=0,
            guidance=str(bg["guidance"][b]), z_b=shared.background_latents(np.array([b]))[0],
            latents=shared.candidate_latents(rows), scores={k: v[rows] for k, v in sc.items()},
            pairs={pairs.mode: local}))
    store.append(groups)
    return store


def _online_stage(cfg: Config, ws: Workspace, ctx: dict, store: PairStore, steps: int, out_dir: Path,
                  state: dict):
    """Online trials: :func:`align_rl.alignment.online.run_online` up to ``steps`` learner steps (it
    resumes in ``out_dir``), with the trial's own sampler / reward actors and pair store."""
    if "pref" not in state:
        base = config_from_dict(ctx["base"])  # the caches' identity is the base config's
        state["models"] = models = ensure_pretrained(base, ws, progress=False)
        state["pref"] = SplitData(base, ws, Path(ctx["world"]), models, progress=False, split="pref")
        if cfg.dpo.mode != "async":  # the asynchronous loop starts its own actors
            state["pool"] = candidate_pool(cfg, models, state["pref"].lat, state["pref"].lon)
    c = config_from_dict(cfg.to_dict())
    c.dpo.steps = int(steps)
    pref = state["pref"]
    if cfg.dpo.mode == "async":  # the trial's store warm-starts the buffer (docs/method.md §9.4)
        m = state["models"]
        return run_async(c, remote.workers(), lambda cc: candidate_pool(cc, m, pref.lat, pref.lon),
                         m.codec.latent_shape, pref.tasks,
                         pref.order, Path(ctx["reference_ckpt"]), cfg.pairs.mode, out_dir,
                         progress=False, log=lambda msg: None, warm_store=store)
    return run_online(c, ws, state["pool"], store, pref.tasks, pref.order, Path(ctx["reference_ckpt"]),
                      cfg.pairs.mode, out_dir, progress=False, log=lambda m: None)
