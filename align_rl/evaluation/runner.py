"""The evaluation runner: ``run_evaluation(cfg, ws, models)`` (what ``python -m align_rl.evaluate``
calls; the tables it reproduces and the files it writes are listed in :mod:`align_rl.evaluate`).

Every model × every method of ``guidance.methods`` analyses the same ``eval.times`` test times from
the same observations and the same sampler noise (paired comparisons, docs/method.md §10); the
analyses run in the driver or in an analysis actor (:func:`align_rl.devices.sampling_place`), their
scores go into a :class:`~align_rl.evaluation.results.ScoreTable`, and the results come back as an
:class:`~align_rl.evaluation.results.Evaluation` (the Dataset written to ``metrics.nc``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from align_rl import remote
from align_rl.config import Config
from align_rl.devices import sampling_place
from align_rl.diffusion.analysis import analyse
from align_rl.diffusion.guidance import needs_obs
from align_rl.errors import CheckpointError, ConfigError, InputError
from align_rl.evaluation.paper import paper_checks
from align_rl.evaluation.report import write_outputs
from align_rl.evaluation import baselines
from align_rl.evaluation.results import BACKGROUND, Evaluation, ScoreTable, scores_doc, summarise
from align_rl.evaluation.seeds import BLEND_VAL_ALIGNED, SEED_SEP, RowPlan, plan_rows
from align_rl.evaluation.skill import (
    STEP_HOURS,
    deterministic_metrics,
    forecast_from,
    probabilistic_metrics,
    forecast_steps,
    hours,
    member_inputs,
    score_batch,
)
from align_rl.io import era5
from align_rl.io.checkpoints import load_model
from align_rl.io.normalization import Normalizer
from align_rl.io.schema import channel_index
from align_rl.io.states import States
from align_rl.models.forecaster import first_frames
from align_rl.training.pretraining import ensure_pretrained
from align_rl.workspace import Workspace
from align_rl.world.backgrounds import LEAD_STEPS as BACKGROUND_STEPS
from align_rl.world.dataset import ensure_world
from align_rl.world.observations import make_observations
from align_rl.world.splits import open_split


@dataclass
class EvalData:
    """Everything the evaluation reads, in physical units (``truth`` must hold ``t`` and
    ``t + rewards.forecast_hours`` of every analysis time ``t``; ``backgrounds`` the 48 h forecasts
    valid at ``t`` and at ``t − 6 h``, the latter the first frame of the forecasts). ``val_truth``
    / ``val_backgrounds``: the same of the ``data.val`` split, on which the weight of the
    ``Blend-val`` baseline is fitted (None: no such baseline)."""

    truth: States
    backgrounds: States
    normalizer: Normalizer
    codec: Any
    forecaster: Any
    truth_store: Path | None = None  # store holding the truth (for the align_rl.score hint)
    val_truth: States | None = None
    val_backgrounds: States | None = None


@dataclass
class ObsSetting:
    name: str
    density: float
    sigma_o: float
    ablation: str = "main"  # main | density | error


@dataclass
class Inputs:
    """The normalised fields ``(T, 69, H, W)`` at the analysis times ``times``: the truth at ``t``
    and ``t + steps · 6 h``, the forecasts' first frame ``prev`` (the background at ``t − 6 h``) and
    the backgrounds at ``t``."""

    times: np.ndarray
    truth: torch.Tensor
    prev: torch.Tensor
    truth_fc: torch.Tensor
    background: torch.Tensor
    steps: int


@dataclass
class _Plan:
    """What one evaluation runs: settings × methods × models, ensembles and batches."""

    settings: list[ObsSetting]
    methods: list[str]
    baseline: str
    members: int
    batch: int
    map_n: int
    rows: RowPlan = field(default_factory=RowPlan)


@dataclass
class _Products:
    """What the sampling leaves: the scores; per (model, method) of the main setting the ensemble
    means (physical, (T, 69, H, W)) and the z500 errors of the first map times (``|ens. mean −
    truth|``, (map_n, H, W)), in batches; per setting the observed fraction; the failures; the
    blend weights (``Blend-P``: at Align-P's cost; ``blend_val``: fitted on validation times)."""

    table: ScoreTable = field(default_factory=ScoreTable)
    ens_means: dict = field(default_factory=dict)
    z500_err: dict = field(default_factory=dict)
    blend_weights: dict = field(default_factory=dict)
    blend_val: dict = field(default_factory=dict)
    obs_fraction: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)


@dataclass
class _Run:
    """One evaluation in progress."""

    cfg: Config
    data: EvalData
    inp: Inputs
    plan: _Plan
    prod: _Products = field(default_factory=_Products)
    val: Inputs | None = None  # the validation times of the Blend-val fit (None: no such baseline)


# ----------------------------------------------------------------------------- set-up
def select_times(truth: States, backgrounds: States, test_range: list[str] | None, n: int,
                 forecast_hours: int = STEP_HOURS * BACKGROUND_STEPS) -> np.ndarray:
    """``n`` analysis times, evenly spread over the test range, with a background at ``t`` and at
    ``t − 6 h`` (the forecasts' first frame) and the truth at ``t`` and ``t + forecast_hours``
    (datetime64[ns])."""
    cand = backgrounds.times
    if test_range:
        cand = backgrounds.select(test_range[0], test_range[-1]).times
    have = truth.times.astype("datetime64[ns]")
    cand = np.asarray(cand, dtype="datetime64[ns]")
    bgs = np.asarray(backgrounds.times, dtype="datetime64[ns]")
    ok = cand[np.isin(cand, have) & np.isin(cand - hours(STEP_HOURS), bgs)
              & np.isin(cand + hours(forecast_hours), have)]
    if len(ok) == 0:
        raise InputError(
            f"no test time in {test_range} has a background, the background 6 h before and the truth "
            f"{forecast_hours} h after; check data.test, rewards.forecast_hours and the backgrounds "
            "(python -m align_rl.pretrain all)"
        )
    if n >= len(ok):
        return ok
    idx = np.unique(np.round(np.linspace(0, len(ok) - 1, n)).astype(int))
    return ok[idx]


def observation_settings(cfg: Config) -> list[ObsSetting]:
    """The main setting (``obs.density``, ``obs.sigma_o``) and the requested ablations."""
    base = ObsSetting("main", cfg.obs.density, cfg.obs.sigma_o, "main")
    out = [base]
    for ab in cfg.eval.ablations:
        if ab == "density":
            out += [ObsSetting(f"density={d:g}", d, cfg.obs.sigma_o, "density") for d in cfg.eval.densities]
        elif ab == "error":
            out += [ObsSetting(f"sigma_o={e:g}", cfg.obs.density, e, "error") for e in cfg.eval.errors]
        else:
            raise ConfigError(f"eval.ablations entry {ab!r} is not one of density, error")
    return out


def load_eval_data(cfg: Config, ws: Workspace) -> tuple[EvalData, Any]:
    """Dataset, pretrained models and backgrounds from their caches (building them when absent).
    Returns ``(data, reference eps model)``."""

    store = ensure_world(cfg, ws)
    pre = ensure_pretrained(cfg, ws)
    normalizer = getattr(pre, "normalizer", None) or era5.load_normalizer(store)
    truth, bgs = open_split(cfg, ws, store, pre.forecaster, cfg.data.test)
    data = EvalData(truth, bgs, normalizer, pre.codec, pre.forecaster, truth_store=Path(store))
    if int(cfg.eval.blend_times) > 0:  # the Blend-val baseline's fit (backgrounds from their cache)
        data.val_truth, data.val_backgrounds = open_split(cfg, ws, store, pre.forecaster, cfg.data.val)
    return data, pre.eps_model


def data_and_models(cfg: Config, ws: Workspace, specs: list[str]) -> tuple[EvalData, dict[str, Any]]:
    """What a command evaluates: :func:`load_eval_data` and the models, the reference first, then
    the ``NAME=CHECKPOINT`` ``specs`` (:func:`load_models`)."""
    data, ref = load_eval_data(cfg, ws)
    models = {"reference": ref}
    models.update(load_models(specs, cfg, tuple(getattr(data.codec, "latent_shape", ())) or None))
    return data, models


def _norm_t(normalizer: Normalizer, states: States, times: np.ndarray) -> torch.Tensor:
    idx = [states.time_index(t) for t in times]
    if any(i is None for i in idx):
        raise InputError("a selected time is missing from the states")
    return torch.as_tensor(normalizer.normalize(states.values[idx].astype(np.float64)), dtype=torch.float32)


def prepare_inputs(data: EvalData, times: np.ndarray, steps: int) -> Inputs:
    """The normalised truth and backgrounds at ``times`` (forecast lead ``steps`` × 6 h); the
    forecasts' first frame starts from ``prev``, the background valid at ``t − 6 h``, which a
    data-assimilation system has at analysis time, never the truth, shifted by each analysis's
    increment (:func:`align_rl.models.forecaster.first_frames`, docs/method.md §7.3)."""
    norm = data.normalizer
    return Inputs(times, _norm_t(norm, data.truth, times),
                  _norm_t(norm, data.backgrounds, times - hours(STEP_HOURS)),
                  _norm_t(norm, data.truth, times + hours(STEP_HOURS * steps)),
                  _norm_t(norm, data.backgrounds, times), steps)


def validation_inputs(cfg: Config, data: EvalData, steps: int) -> Inputs | None:
    """The ``eval.blend_times`` validation times of the ``Blend-val`` fit, spread over ``data.val``
    as the test times are over ``data.test`` (:func:`select_times`, same forecast lead), with their
    normalised truth and backgrounds; None when ``eval.blend_times`` is 0 or ``data`` holds no
    validation split."""
    n = int(cfg.eval.blend_times)
    if n <= 0 or data.val_truth is None or data.val_backgrounds is None:
        return None
    try:
        times = select_times(data.val_truth, data.val_backgrounds, cfg.data.val, n, STEP_HOURS * steps)
    except InputError as exc:
        raise InputError(f"the Blend-val baseline (eval.blend_times={n}) needs validation times: {exc}; "
                         "or set eval.blend_times=0 to turn it off") from exc
    val = EvalData(data.val_truth, data.val_backgrounds, data.normalizer, data.codec, data.forecaster)
    return prepare_inputs(val, times, steps)


def _plan(cfg: Config, models: dict[str, Any], n_times: int, blend_val: bool = False) -> _Plan:
    members = int(cfg.eval.members)
    if members < 2:
        raise ConfigError("eval.members must be >= 2 (ensemble mean, CRPS and spread/skill need it)")
    baseline = cfg.eval.baseline if cfg.eval.baseline in models else next(iter(models))
    if isinstance(models[baseline], (list, tuple)):
        raise ConfigError(f"the baseline {baseline!r} must be one score network, not one per seed")
    return _Plan(observation_settings(cfg), list(cfg.guidance.methods), baseline,
                 members, max(1, int(cfg.eval.batch_size)), min(int(cfg.eval.map_samples), n_times),
                 plan_rows(models, baseline, blend_val=blend_val))


def _check_models(cfg: Config, models: dict[str, Any]) -> None:
    if not models:
        raise ConfigError("run_evaluation needs at least one model (name -> score network)")
    if BACKGROUND in models:
        raise ConfigError(f"a model may not be named {BACKGROUND!r} (the background's row); rename it")
    if not list(cfg.guidance.methods):
        raise ConfigError("guidance.methods is empty; name at least one of obsfree, repaint, dps")


# ----------------------------------------------------------------------------- sampling
def _analyse_batch(data: EvalData, eps_model: Any, x_b: torch.Tensor, obs: Any, method: str,
                   cfg: Config, generator: torch.Generator, members: int) -> torch.Tensor:
    """An ensemble of ``members`` analyses of one batch of backgrounds ``x_b`` (B, 69, H, W):
    (B, members, 69, H, W) normalised, float32 on the CPU. InputError when the sampler diverges."""
    if sampling_place(cfg) == "driver":
        an = analyse(data.codec, eps_model, x_b, obs, method, cfg.sampler, cfg.guidance,
                     generator=generator, members=members)
    else:  # in an analysis actor on a GPU share (eval.sampling)
        an = remote.workers().analyse(cfg, data.codec, eps_model, x_b, obs, method, cfg.sampler,
                                      cfg.guidance, generator=generator, members=members)
    return an.fields.float().cpu()


def _score_background(run: _Run) -> np.ndarray:
    """The background rows (the same in every setting and method) into the table; returns the
    background's z500 errors ``|x_b − x_GT|`` of the map times (map_n, H, W), physical."""
    data, inp, plan = run.data, run.inp, run.plan
    norm, lat, lon = data.normalizer, data.truth.lat, data.truth.lon
    f_bg = forecast_from(data.forecaster, inp.prev, inp.background, inp.steps)
    bg = {"analysis": deterministic_metrics(inp.background, inp.truth, norm, lat, lon),
          "forecast": deterministic_metrics(f_bg, inp.truth_fc, norm, lat, lon, geo=False)}
    for s in plan.settings:
        for meth in plan.methods:
            for stat in ("member", "ensmean"):
                for kind, metrics in bg.items():
                    run.prod.table.add(s.name, BACKGROUND, meth, kind, stat, metrics)
    iz, k = channel_index("z500"), plan.map_n
    return (norm.denormalize(inp.background[:k].double())
            - norm.denormalize(inp.truth[:k].double()))[:, iz].abs().numpy()


def _keep_maps(run: _Run, key: tuple[str, str], sl: slice, xa: torch.Tensor) -> None:
    """The main setting's ensemble mean of one batch (physical) and its z500 map errors."""
    norm, iz = run.data.normalizer, channel_index("z500")
    phys = norm.denormalize(xa.mean(dim=1).double())
    run.prod.ens_means.setdefault(key, []).append(phys.float().numpy())
    k = max(0, min(run.plan.map_n, sl.stop) - sl.start)
    if k:
        err = (phys[:k, iz] - norm.denormalize(run.inp.truth[sl][:k].double())[:, iz]).abs().numpy()
        run.prod.z500_err.setdefault(key, []).append(err)


def _sample_row(run: _Run, s: ObsSetting, obs: Any, meth: str, name: str, eps_model: Any,
                generator: torch.Generator) -> torch.Tensor:
    """Analyse every batch of times of one row (setting, method, model), forecast the members
    (:func:`_forecast_members`), then score each batch; a batch that diverges is scored as NaN and
    listed in the failures. Returns the analyses (T, N, 69, H, W), normalised."""
    data, inp, plan = run.data, run.inp, run.plan
    T, bs = len(inp.times), plan.batch
    batches = [slice(i, min(T, i + bs)) for i in range(0, T, bs)]
    analyses = []
    for sl in batches:
        try:
            xa = _analyse_batch(data, eps_model, inp.background[sl], obs[sl], meth, run.cfg, generator,
                                plan.members)
        except InputError as exc:  # diverged (NaN): score as NaN, report, go on
            run.prod.failures.append({"setting": s.name, "row": f"{name}/{meth}",
                                      "times": [sl.start, sl.stop], "error": str(exc)})
            xa = torch.full((sl.stop - sl.start, plan.members, *inp.background.shape[1:]), float("nan"))
        analyses.append(xa)
    members = torch.cat(analyses)
    _score_members(run, s, meth, name, members, maps=s.ablation == "main")
    return members


def _batches(run: _Run) -> list[slice]:
    T, bs = len(run.inp.times), run.plan.batch
    return [slice(i, min(T, i + bs)) for i in range(0, T, bs)]


def _score_members(run: _Run, s: ObsSetting, meth: str, name: str, members: torch.Tensor,
                   maps: bool = False, forecast: bool = True) -> None:
    """Score an analysis ensemble (T, N, 69, H, W) of one row and (``forecast``) the forecasts of
    its members, batch by batch, into the table; ``maps``: keep its ensemble means and z500 maps."""
    data, inp = run.data, run.inp
    forecasts = _forecast_members(run, members) if forecast else None
    for sl in _batches(run):
        xa = members[sl]
        if forecast:
            # the members' forecasts are made once above (_forecast_members, its first frames)
            scores = score_batch(xa, inp.truth[sl], None, inp.truth_fc[sl], data.forecaster,
                                 inp.steps, data.normalizer, data.truth.lat, data.truth.lon,
                                 forecasts=forecasts[sl])
        else:
            lat, lon = data.truth.lat, data.truth.lon
            scores = {("analysis", "member"): deterministic_metrics(xa, inp.truth[sl], data.normalizer, lat, lon),
                      ("analysis", "ensmean"): deterministic_metrics(xa.mean(dim=1), inp.truth[sl],
                                                                     data.normalizer, lat, lon),
                      ("analysis", "ensemble"): probabilistic_metrics(xa, inp.truth[sl], data.normalizer, lat)}
        for (kind, stat), metrics in scores.items():
            run.prod.table.add(s.name, name, meth, kind, stat, metrics)
        if maps:
            _keep_maps(run, (name, meth), sl, xa)


def _fit_blend_val(run: _Run, s: ObsSetting, si: int, mi: int, meth: str, eps_model: Any,
                   row: str | None = None) -> float:
    """The ``Blend-val`` weight of one (setting, method) and one row (``row``: the baseline when
    None, else an aligned row, :data:`~align_rl.evaluation.seeds.BLEND_VAL_ALIGNED`): its network
    ``eps_model`` analyses the validation times ``run.val`` (same sampler, guidance and members as
    the test rows; observations drawn from the validation truth with the setting's density and
    error; its own seeds, the same for every row, so the rows' fits are paired), and ``w`` is the
    least-squares weight of their ensemble mean towards the background
    (:func:`align_rl.evaluation.baselines.least_squares_weight`). Recorded in
    ``run.prod.blend_val`` under ``"<setting> <method>"`` (the baseline) or ``"<setting>
    <row>/<method>"``. Batches that diverge are left out (and listed in the failures); NaN when all
    do."""
    val, cfg, plan = run.val, run.cfg, run.plan
    row = row or plan.baseline
    obs = make_observations(val.truth, s.density, s.sigma_o, cfg.obs.mode, cfg.obs.r_floor,
                            generator=torch.Generator().manual_seed(cfg.run.seed * 1000 + 917 + si))
    gen = torch.Generator().manual_seed(cfg.run.seed * 1000 + 100 * si + mi + 50_000)
    T, out = len(val.times), []
    for sl in [slice(i, min(T, i + plan.batch)) for i in range(0, T, plan.batch)]:
        try:
            out.append(_analyse_batch(run.data, eps_model, val.background[sl], obs[sl], meth, cfg, gen,
                                      plan.members))
        except InputError as exc:
            run.prod.failures.append({"setting": s.name, "row": f"{row}/{meth} (validation, Blend-val fit)",
                                      "times": [sl.start, sl.stop], "error": str(exc)})
            out.append(torch.full((sl.stop - sl.start, plan.members, *val.background.shape[1:]), float("nan")))
    w = baselines.least_squares_weight(torch.cat(out), val.background, val.truth)
    key = f"{s.name} {meth}" if row == plan.baseline else f"{s.name} {row}/{meth}"
    run.prod.blend_val[key] = {
        "w": w, "setting": s.name, "method": meth, "row": row, "val_times": T,
        "first": np.datetime_as_string(val.times[0], unit="h"), "last": np.datetime_as_string(val.times[-1], unit="h")}
    return w


def _trivial_rows(run: _Run, s: ObsSetting, si: int, mi: int, meth: str, members: dict[str, torch.Tensor],
                  models: dict[str, Any]) -> None:
    """The trivial baselines of one (setting, method) from the stored members ``members`` (row →
    (T, N, 69, H, W) normalised; the baseline's, and the aligned ``-M`` rows' when ``Blend-val`` is
    on) (:mod:`align_rl.evaluation.baselines`): *shrink* the reference to the aligned row's spread
    term per time (scored with forecasts), *towards the background* to its time-mean single-member
    MSE (analyses only), ``Blend-val`` the reference with the weight fitted on validation times by
    the reference network (:func:`_fit_blend_val`; scored with forecasts), and ``Blend-val-<row>``
    the aligned row's members with the weight fitted the same way by that row's network ``models[row]``
    (then the seed-mean rows of those, :attr:`~align_rl.evaluation.seeds.RowPlan.trivial_means`)."""
    table, base = run.prod.table, run.plan.baseline
    reference = members[base]
    for row, (kind, target) in run.plan.rows.trivial.items():
        if row in run.plan.rows.trivial_means:
            continue  # a seed mean: after its seed rows
        if kind in ("blend-val", BLEND_VAL_ALIGNED):
            if target not in members:
                continue  # the row was not run here
            w = _fit_blend_val(run, s, si, mi, meth, models[target], None if kind == "blend-val" else target)
            if np.isfinite(w):
                _score_members(run, s, meth, row, baselines.blend(members[target], run.inp.background, w))
            continue
        mem = table.series(s.name, target, meth, "analysis", "member")
        ens = table.series(s.name, target, meth, "analysis", "ensmean")
        if "mse" not in mem or "mse" not in ens:
            continue  # the aligned row was not run here
        if kind == "shrink":
            _score_members(run, s, meth, row, baselines.shrink(reference, mem["mse"] - ens["mse"]))
        else:
            target_mse = float(np.nanmean(mem["mse"])) if np.isfinite(mem["mse"]).any() else float("nan")
            w = baselines.blend_weight(reference, run.inp.background, run.inp.truth, target_mse)
            run.prod.blend_weights[f"{s.name} {row}/{meth}"] = w
            _score_members(run, s, meth, row, baselines.blend(reference, run.inp.background, w), forecast=False)
    for row, seed_rows in run.plan.rows.trivial_means.items():
        table.add_mean(s.name, row, seed_rows, meth)


def _forecast_members(run: _Run, xa: torch.Tensor) -> torch.Tensor:
    """The ``rewards.forecast_hours`` forecasts (T, N, 69, H, W) normalised of every member of the
    analyses ``xa`` (T, N, 69, H, W), each from ``(background at t − 6 h + the member's increment,
    member)`` (:func:`align_rl.models.forecaster.first_frames`): in the driver, or,
    when the evaluation samples in an actor (:func:`align_rl.devices.sampling_place`), on forecast
    actors with their GPU shares (:data:`align_rl.remote.Workers.forecast`), one job per row."""
    inp = run.inp
    if sampling_place(run.cfg) == "driver":
        return forecast_from(run.data.forecaster, first_frames(inp.prev, inp.background, xa), xa, inp.steps)
    prev, cur = member_inputs(first_frames(inp.prev, inp.background, xa), xa)
    b = max(1, int(run.cfg.pretrain.background_batch))
    batches = [(prev[i:i + b].numpy(), cur[i:i + b].numpy()) for i in range(0, len(cur), b)]
    out: list[Any] = [None] * len(batches)
    remote.workers().forecast(run.cfg, run.data.forecaster, batches, inp.steps,
                              on_result=out.__setitem__)
    return torch.from_numpy(np.concatenate(out)).float().reshape(xa.shape)


def _jobs(plan: _Plan, models: dict[str, Any]) -> list[tuple[int, ObsSetting, int, str, str]]:
    """``(setting index, setting, method index, method, model)`` of every row, in order; no
    row in the ablations for a method that reads no observations."""
    return [(si, s, mi, meth, name) for si, s in enumerate(plan.settings)
            for mi, meth in enumerate(plan.methods) for name in models
            if s.ablation == "main" or needs_obs(meth)]


def _sample_all(run: _Run, models: dict[str, Any], progress: bool) -> None:
    """Every row of :func:`_jobs` (``models``: row name → network, one per seed row):
    observations drawn once per setting (seeded by the setting), sampler noise seeded by setting
    and method, so the models' rows (and seeds) are paired. After the last row of a (setting,
    method): the seed-mean rows, then the trivial baselines from the baseline's members."""
    cfg, jobs, rows = run.cfg, _jobs(run.plan, models), run.plan.rows
    bar = _progress_bar(len(jobs)) if progress else None
    obs: dict[int, Any] = {}
    for si, s in enumerate(run.plan.settings):
        obs[si] = make_observations(run.inp.truth, s.density, s.sigma_o, cfg.obs.mode, cfg.obs.r_floor,
                                    generator=torch.Generator().manual_seed(cfg.run.seed * 1000 + 17 + si))
        run.prod.obs_fraction[s.name] = obs[si].fraction
    keep = {run.plan.baseline} | {t for k, t in rows.trivial.values() if k == BLEND_VAL_ALIGNED}
    kept: dict[str, torch.Tensor] = {}  # the members the trivial rows of this (setting, method) need
    for j, (si, s, mi, meth, name) in enumerate(jobs):
        gen = torch.Generator().manual_seed(cfg.run.seed * 1000 + 100 * si + mi)
        members = _sample_row(run, s, obs[si], meth, name, models[name], gen)
        if name in keep:
            kept[name] = members
        if j + 1 == len(jobs) or jobs[j + 1][:3] != (si, s, mi):  # the (setting, method) is done
            for group, seed_rows in rows.groups.items():
                run.prod.table.add_mean(s.name, group, seed_rows, meth)
            if run.plan.baseline in kept:
                _trivial_rows(run, s, si, mi, meth, kept, models)
            kept = {}
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{s.name} {name}/{meth}")
    if bar is not None:
        bar.close()


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluate", unit="run")


# ----------------------------------------------------------------------------- main
def run_evaluation(
    cfg: Config,
    ws: Workspace,
    models: dict[str, Any] | None = None,
    data: EvalData | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> Evaluation:
    """Evaluate ``models`` (name → ε_θ, or name → [ε_θ per seed], :mod:`align_rl.evaluation.seeds`)
    × ``cfg.guidance.methods``, with the trivial baselines of the aligned models and (when ``data``
    holds the validation split and ``eval.blend_times`` > 0) the ``Blend-val`` row and the
    ``Blend-val-<row>`` rows of the aligned ``-M`` rows; write the report files.

    ``data``: the truth, backgrounds, normaliser, codec and forecaster (loaded from the workspace
    caches when None; then ``models`` defaults to ``{"reference": pretrained ε_θ}``). Returns the
    results (:class:`~align_rl.evaluation.results.Evaluation`: the Dataset written to
    ``metrics.nc`` and the rest of ``metrics.json``).
    """
    t_start = time.time()
    models = dict(models or {})
    if data is None:
        data, ref = load_eval_data(cfg, ws)
        models.setdefault("reference", ref)
    _check_models(cfg, models)
    steps = forecast_steps(cfg.rewards.forecast_hours)
    times = select_times(data.truth, data.backgrounds, cfg.data.test, cfg.eval.times, STEP_HOURS * steps)
    val = validation_inputs(cfg, data, steps)
    run = _Run(cfg, data, prepare_inputs(data, times, steps), _plan(cfg, models, len(times), val is not None),
               val=val)
    sampled = run.plan.rows.sampled
    for m in [*sampled.values(), data.codec]:
        if hasattr(m, "eval"):
            m.eval()
    bg_err = _score_background(run)
    _sample_all(run, sampled, progress)
    ev = _summarise(run, run.plan.rows.names())
    ev.meta["seconds"] = round(time.time() - t_start, 1)
    write_outputs(Path(out or cfg.eval.out or ws.eval), ev, *_maps_and_means(run.prod, bg_err), data)
    _log_wandb(cfg, ev)
    return ev


def _maps_and_means(prod: _Products, bg_err: np.ndarray) -> tuple[dict, dict]:
    """``(z500 error maps {"background" | "<model>/<method>": (map_n, H, W)}, finite ensemble
    means {(model, method): (T, 69, H, W)})`` (a store of NaNs is not written)."""
    maps = {"background": bg_err, **{f"{m}/{k}": np.concatenate(v) for (m, k), v in prod.z500_err.items()}}
    ens_means = {k: np.concatenate(v) for k, v in prod.ens_means.items()}
    return maps, {k: v for k, v in ens_means.items() if np.all(np.isfinite(v))}


def _summarise(run: _Run, models: list[str]) -> Evaluation:
    """The results Dataset (time means, paired changes) and the report's other facts."""
    cfg, plan, steps = run.cfg, run.plan, run.inp.steps
    settings = [s.__dict__ | {"observed_fraction": run.prod.obs_fraction[s.name]} for s in plan.settings]
    lat, lon = run.data.truth.lat, run.data.truth.lon
    attrs = {"members": plan.members, "grid": f"{len(lat)}x{len(lon)}",
             "forecast_hours": STEP_HOURS * steps, "forecast_steps": steps,
             "title": "Align-DA evaluation: scores per analysis time and paired changes"}
    ds = run.prod.table.to_dataset(settings, models, plan.methods, run.inp.times, attrs)
    ds = ds.assign_coords(plan.rows.coords([str(m) for m in ds["model"].values]))
    ds = summarise(ds, plan.baseline, seed=cfg.run.seed)
    meta = {
        "sampler": {k: getattr(cfg.sampler, k) for k in ("steps", "corrections", "tau")},
        "guidance": cfg.to_dict()["guidance"],
        "forecast_start": f"(background valid at t-6h + analysis increment, analysis at t), {steps} x {STEP_HOURS} h",
        "failures": run.prod.failures,
        "blend_weights": run.prod.blend_weights,
        "blend_val": run.prod.blend_val,
    }
    meta["checks"] = paper_checks(ds, plan.baseline)
    return Evaluation(ds, meta)


def _log_wandb(cfg: Config, ev: Evaluation) -> None:
    if cfg.run.wandb_mode == "disabled":
        return
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    flat = {}
    for row, tabs in scores_doc(ev.ds, "main").items():
        for tab, stats in tabs.items():
            for st, mets in stats.items():
                for m, v in mets.items():
                    flat[f"eval/{row}/{tab}/{st}/{m}"] = v
    try:
        run = wandb.init(project=cfg.run.wandb_project, name=f"{cfg.run.name}-eval",
                         mode=cfg.run.wandb_mode, dir=str(Path(cfg.run.workdir)), config=cfg.to_dict())
        run.log(flat)
        run.finish()
    except Exception as exc:  # logging must never lose a finished evaluation
        print(f"warning: wandb logging of the evaluation failed: {exc}", file=sys.stderr)


# ----------------------------------------------------------------------------- CLI
def load_models(specs: list[str], cfg: Config, latent_shape: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """``["Align-M=path.pt", ...]`` -> ``{name: LatentDiT}`` from ``align_rl.io.checkpoints`` files.
    Several seeds of one model: ``Align-M@seed0=a.pt Align-M@seed1=b.pt …`` -> ``{"Align-M":
    [LatentDiT per seed]}`` (:mod:`align_rl.evaluation.seeds`; seeds 0 … k−1, each once)."""

    out: dict[str, Any] = {}
    seeded: dict[str, dict[int, Any]] = {}
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"--models entry {spec!r} must be NAME=CHECKPOINT")
        name, path = spec.split("=", 1)
        if not Path(path).exists():
            raise CheckpointError(f"checkpoint {path} of model {name!r} does not exist")
        group, k = _seed_spec(name)
        shapes = {"latent_shape": latent_shape} if latent_shape else None
        model, _ = load_model(path, "diffusion", expect=cfg.diffusion, shapes=shapes)
        if k is None:
            out[name] = model
        else:
            seeded.setdefault(group, {})[k] = model
            out.setdefault(group, None)
    for group, by_seed in seeded.items():
        if group in out and out[group] is not None:
            raise ConfigError(f"--models names {group!r} both alone and with {SEED_SEP}<k>; use one form")
        if sorted(by_seed) != list(range(len(by_seed))):
            raise ConfigError(f"--models {group}{SEED_SEP}<k>: seeds {sorted(by_seed)} must be 0 … {len(by_seed) - 1}")
        out[group] = [by_seed[k] for k in range(len(by_seed))]
    return out


def _seed_spec(name: str) -> tuple[str, int | None]:
    """``"Align-M@seed2"`` -> ``("Align-M", 2)``; a name without a seed -> ``(name, None)``."""
    if SEED_SEP not in name:
        return name, None
    group, k = name.rsplit(SEED_SEP, 1)
    if not group or not k.isdigit():
        raise ConfigError(f"--models name {name!r}: a seed is written NAME{SEED_SEP}<k>, e.g. Align-M{SEED_SEP}0")
    return group, int(k)
