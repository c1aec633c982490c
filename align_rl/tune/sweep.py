"""Ray Tune sweeps over β, learning rate, reward weights and the offline/online switch.

``python -m align_rl.sweep tune_configs/NAME.yaml [--config FILE] [key=value ...]``

A sweep file (YAML) holds::

    name: beta_lr                  # the sweep's folder: <run.workdir>/sweeps/<name>/
    question: ...                  # what the sweep answers (free text, copied into the results)
    base: {dpo: {steps: 60}}       # overrides of the align_rl config for every trial
                                   # (nested sections or dotted keys; `preset: paper` allowed)
    search:                        # dotted align_rl config key -> one search dimension
      dpo.beta: {grid: [1000, 8000]}
      dpo.lr: {loguniform: [1.0e-6, 1.0e-4]}
      pairs.mode: {choice: [M, P]}
      dpo.momentum: {uniform: [0.0, 1.0]}          # (any numeric key)
      rewards.weights: {simplex: {keys: [assim, forecast, phys], step: 0.25}}
    metric: val_mse                # one of VALIDATION_METRICS (reported after every stage)
    mode: min                      # min | max
    scheduler: asha                # asha | fifo; or a mapping {type: asha, grace_period: 1, ...}
    asha: {grace_period: 1, reduction_factor: 2}   # ASHA parameters (max_t defaults to stages)
    num_samples: 1                 # repeats of the grid (random dimensions drawn anew each time)
    stages: 3                      # DPO stages per trial, each followed by a validation and a report
    steps_per_stage: 20            # default: ceil(dpo.steps / stages)
    validation: {times: 4, members: 4, method: obsfree}   # a short evaluation on the val split
    resources_per_trial: {cpu: 1, gpu: 0}   # the trial driver; the learner asks for its own workers
    max_concurrent_trials: 1

Overrides on the command line whose first part is a section of the align_rl config
(``dpo.steps=10``) go to ``base``; the others change the sweep file (``num_samples=2``,
``asha.grace_period=2``, ``search.dpo.beta={grid: [500, 1000]}``). Every key is checked before
anything runs: a bad file raises :class:`~align_rl.errors.ConfigError` naming the key.

What a trial does (:func:`dpo_trial`): build its config (base + its point of the search space),
reselect the preference pairs of its reward weights and pair mode from the SHARED pair store's
stored per-candidate scores (:meth:`align_rl.io.pair_store.PairStore.reselect`; no new sampling, no
forecast rollouts), then ``stages`` times: :func:`align_rl.alignment.learner.run_dpo` for
``steps_per_stage`` more steps (the same ``out_dir``, so the optimiser state carries over and the
trial equals one run of ``stages × steps_per_stage`` steps), a short validation evaluation
(:func:`align_rl.evaluation.runner.run_evaluation` on ``validation.times`` times of the VAL split with one
guidance method), and ``tune.report`` of the metrics, so ASHA can stop weak trials early. Online
trials (``dpo.mode=online``) run the online loop instead, which draws fresh candidates by design.

Before the trials the driver makes sure that the shared inputs exist (dataset, pretrained
models, backgrounds, the reference's scored candidates in the pair store: each reused from its
cache) and evaluates the reference once on the same validation times, observations and sampler
seeds, so that every trial also reports its paired % change against the reference.

Outputs in ``<run.workdir>/sweeps/<name>/``: ``results.csv`` and ``results.md`` (one row per trial:
its parameters, stages done, whether ASHA stopped it, its last metrics), ``best_config.yaml`` (the
full align_rl config of the best trial, ``dpo.steps`` = the steps it trained; usable as
``python -m align_rl.train --config …``), ``best.json``, ``reference_val.json``, ``spec.yaml``, the
trials' folders (``trials/<trial id>/dpo``, ``…/val/stage_<k>``) and Tune's own records (``tune/``).
The table and the best configuration are also logged to wandb (``run.wandb_mode``, offline by
default).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import yaml

from align_rl import remote
from align_rl.config import Config, _apply, config_from_dict, load_config, parse_overrides
from align_rl.errors import ConfigError, InputError
from align_rl.logs import stage

LOG = logging.getLogger("align_rl.sweep")

SWEEP_KEYS = ("name", "question", "base", "search", "metric", "mode", "scheduler", "asha",
             "num_samples", "stages", "steps_per_stage", "validation", "resources_per_trial",
             "max_concurrent_trials")
DIMENSION_KINDS = ("grid", "choice", "loguniform", "uniform", "simplex")
ASHA_KEYS = ("grace_period", "reduction_factor", "brackets", "max_t")
VALIDATION_KEYS = ("times", "members", "method")
RESOURCE_KEYS = ("cpu", "gpu", "memory")

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
}
_DPO_METRICS = {"dpo_loss": "loss", "dpo_accuracy": "rewards/accuracies", "dpo_margin": "rewards/margins"}
VALIDATION_METRICS: tuple[str, ...] = (
    tuple(_EVAL_METRICS) + tuple(f"{k}_change_pct" for k in _EVAL_METRICS) + tuple(_DPO_METRICS)
)
"""Metrics every DPO trial reports after each stage (``*_change_pct``: % change against the
reference on the same validation times; negative = better for errors)."""


# ============================================================================= the sweep file


@dataclass
class Dimension:
    """One search dimension: ``key`` (dotted align_rl config key), ``kind`` (grid, choice,
    loguniform, uniform, simplex), ``values`` (grid / choice / the simplex points) or ``bounds``."""

    key: str
    kind: str
    values: list[Any] | None = None
    bounds: tuple[float, float] | None = None

    def domain(self):
        """The Ray Tune search domain."""
        from ray import tune

        if self.kind in ("grid", "simplex"):
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "loguniform":
            return tune.loguniform(*self.bounds)
        return tune.uniform(*self.bounds)

    def probe_values(self) -> list[Any]:
        """Values to check against the config (all listed values, or the bounds)."""
        return list(self.values) if self.values is not None else list(self.bounds)


@dataclass
class SweepSpec:
    name: str
    search: dict[str, Dimension]
    metric: str = "val_mse"
    mode: str = "min"
    question: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    scheduler: str = "asha"
    asha: dict[str, float] = field(default_factory=dict)
    num_samples: int = 1
    stages: int = 2
    steps_per_stage: int | None = None
    validation: dict[str, Any] = field(default_factory=lambda: {"times": 4, "members": 4,
                                                                "method": "obsfree"})
    resources_per_trial: dict[str, float] = field(default_factory=lambda: {"cpu": 1.0, "gpu": 0.0})
    max_concurrent_trials: int | None = 1
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in SWEEP_KEYS if k not in ("search",)}
        d["search"] = {k: _dim_to_yaml(v) for k, v in self.search.items()}
        return d

    def grid_size(self) -> int:
        n = 1
        for d in self.search.values():
            if d.kind in ("grid", "simplex"):
                n *= len(d.values)
        return n * self.num_samples


def _dim_to_yaml(d: Dimension) -> dict:
    if d.kind == "simplex":
        return {"grid": d.values}
    return {d.kind: list(d.values) if d.values is not None else list(d.bounds)}


def simplex_grid(keys: list[str], step: float) -> list[dict[str, float]]:
    """Every weight vector over ``keys`` with components in ``{0, step, 2 step, …, 1}`` summing to 1
    (``step`` must divide 1). E.g. 3 keys, step 0.5: 6 points."""
    if not keys:
        raise ConfigError("simplex needs at least one key")
    frac = Fraction(str(step)).limit_denominator(10_000)
    if not 0 < frac <= 1 or (1 / frac).denominator != 1:
        raise ConfigError(f"simplex step {step} must divide 1 (e.g. 0.5, 0.25, 0.2, 0.1)")
    n = int(1 / frac)
    out = []
    for combo in itertools.product(range(n + 1), repeat=len(keys)):
        if sum(combo) == n:
            out.append({k: round(c / n, 10) for k, c in zip(keys, combo)})
    return out


def _req_mapping(v: Any, key: str) -> dict:
    if not isinstance(v, dict):
        raise ConfigError(f"{key} must be a mapping, got {v!r}")
    return v


def _number(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key} must be a number, got {v!r}")
    return float(v)


def _int(v: Any, key: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _parse_dimension(key: str, raw: Any, where: str) -> Dimension:
    k = f"{where}.{key}"
    if isinstance(raw, list):
        raw = {"grid": raw}
    raw = _req_mapping(raw, k)
    if len(raw) != 1 or next(iter(raw)) not in DIMENSION_KINDS:
        raise ConfigError(f"{k} must be one of {{{', '.join(f'{d}: ...' for d in DIMENSION_KINDS)}}}, "
                          f"got {raw!r}")
    kind, arg = next(iter(raw.items()))
    if kind in ("grid", "choice"):
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"{k}.{kind} must be a non-empty list of values")
        return Dimension(key, kind, values=list(arg))
    if kind in ("loguniform", "uniform"):
        if not isinstance(arg, list) or len(arg) != 2:
            raise ConfigError(f"{k}.{kind} must be [low, high]")
        lo, hi = (_number(v, f"{k}.{kind}") for v in arg)
        if not lo < hi:
            raise ConfigError(f"{k}.{kind}: low {lo} must be < high {hi}")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{k}.loguniform: low {lo} must be > 0")
        return Dimension(key, kind, bounds=(lo, hi))
    # simplex
    arg = _req_mapping(arg, f"{k}.simplex")
    unknown = set(arg) - {"keys", "step", "min"}
    if unknown:
        raise ConfigError(f"{k}.simplex: unknown keys {sorted(unknown)}; use keys, step, min")
    if key != "rewards.weights":
        raise ConfigError(f"{k}: simplex is for rewards.weights only")
    keys = arg.get("keys", ["assim", "forecast", "phys"])
    if not isinstance(keys, list) or not all(isinstance(x, str) for x in keys) or len(set(keys)) != len(keys):
        raise ConfigError(f"{k}.simplex.keys must be a list of distinct reward names")
    if "step" not in arg:
        raise ConfigError(f"{k}.simplex.step is missing (e.g. step: 0.25)")
    step = _number(arg["step"], f"{k}.simplex.step")
    lo = _number(arg.get("min", 0.0), f"{k}.simplex.min")
    try:
        pts = simplex_grid(keys, step)
    except ConfigError as exc:
        raise ConfigError(f"{k}.simplex: {exc}") from None
    pts = [p for p in pts if min(p.values()) >= lo - 1e-12]
    if not pts:
        raise ConfigError(f"{k}.simplex: no point has every weight >= min={lo}")
    return Dimension(key, "simplex", values=pts)


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in dotted.items():
        d = out
        parts = k.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ConfigError(f"key {k!r} goes below a value that is not a section")
        if isinstance(v, dict) and isinstance(d.get(parts[-1]), dict):
            d[parts[-1]] = {**d[parts[-1]], **v}
        else:
            d[parts[-1]] = v
    return out


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "weights":
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def split_overrides(items: list[str]) -> tuple[list[str], dict[str, Any]]:
    """``key=value`` items -> (align_rl config overrides, sweep-file overrides as a nested dict).

    A key whose first part is a config section (``dpo.steps``) or ``preset`` goes to the config;
    ``search.<dotted config key>`` sets one search dimension; anything else is a sweep-file key."""
    sections = {f.name for f in dataclasses.fields(Config)} | {"preset"}
    cfg_items: list[str] = []
    spec: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key = item.split("=", 1)[0].strip()
        head = key.split(".")[0]
        if head in sections:
            cfg_items.append(item)
        elif head == "search":
            k, v = item.split("=", 1)
            dotted = k.strip()[len("search."):]
            if not dotted or head == k.strip():
                raise ConfigError(f"override {item!r}: write search.<config key>={{grid: [...]}}")
            spec.setdefault("search", {})[dotted] = parse_overrides([f"x={v}"])["x"]
        else:
            spec = _merge(spec, parse_overrides([item]))
    return cfg_items, spec


def parse_spec(raw: Any, source: str = "<sweep>", overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Validate a sweep mapping (see the module docstring); ConfigError names the bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a mapping (name, search, metric, ...)")
    raw = _merge(raw, overrides or {})
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(SWEEP_KEYS)}")
    name = raw.get("name") or Path(source).stem
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"{source}: name={name!r} must be letters, digits, - or _ (it names a folder)")
    search_raw = raw.get("search")
    if not search_raw:
        raise ConfigError(f"{source}: search is missing or empty; give at least one dimension, "
                          "e.g. search: {{dpo.beta: {{grid: [1000, 8000]}}}}")
    search_raw = _req_mapping(search_raw, f"{source}: search")
    search = {str(k): _parse_dimension(str(k), v, f"{source}: search") for k, v in search_raw.items()}
    metric = raw.get("metric", "val_mse")
    if metric not in VALIDATION_METRICS:
        raise ConfigError(f"{source}: metric={metric!r} is not reported by the trials; choose one of "
                          f"{', '.join(VALIDATION_METRICS)}")
    mode = raw.get("mode", "min")
    if mode not in ("min", "max"):
        raise ConfigError(f"{source}: mode={mode!r} must be min or max")
    sched = raw.get("scheduler", "asha")
    asha = dict(raw.get("asha") or {})
    if isinstance(sched, dict):
        sched = dict(sched)
        stype = sched.pop("type", None)
        asha = {**asha, **sched}
        sched = stype
    if sched is None or str(sched).lower() in ("none", "fifo"):
        sched = "fifo"
    elif str(sched).lower() != "asha":
        raise ConfigError(f"{source}: scheduler={sched!r} must be asha or fifo")
    else:
        sched = "asha"
    _req_mapping(asha, f"{source}: asha")
    bad = sorted(set(asha) - set(ASHA_KEYS))
    if bad:
        raise ConfigError(f"{source}: asha: unknown key(s) {bad}; valid: {', '.join(ASHA_KEYS)}")
    asha = {k: _int(v, f"{source}: asha.{k}", 1) for k, v in asha.items()}
    if "reduction_factor" in asha and asha["reduction_factor"] < 2:
        raise ConfigError(f"{source}: asha.reduction_factor must be >= 2")
    stages = _int(raw.get("stages", 2), f"{source}: stages")
    sps = raw.get("steps_per_stage")
    sps = None if sps is None else _int(sps, f"{source}: steps_per_stage")
    if asha.get("max_t", stages) > stages:
        raise ConfigError(f"{source}: asha.max_t={asha['max_t']} exceeds stages={stages}")
    if asha.get("grace_period", 1) > stages:
        raise ConfigError(f"{source}: asha.grace_period={asha['grace_period']} exceeds stages={stages}")
    val = {"times": 4, "members": 4, "method": "obsfree", **_req_mapping(raw.get("validation") or {},
                                                                         f"{source}: validation")}
    bad = sorted(set(val) - set(VALIDATION_KEYS))
    if bad:
        raise ConfigError(f"{source}: validation: unknown key(s) {bad}; valid: {', '.join(VALIDATION_KEYS)}")
    val["times"] = _int(val["times"], f"{source}: validation.times")
    val["members"] = _int(val["members"], f"{source}: validation.members", 2)
    if val["method"] not in ("obsfree", "repaint", "dps"):
        raise ConfigError(f"{source}: validation.method={val['method']!r} must be obsfree, repaint or dps")
    res = {"cpu": 1.0, "gpu": 0.0, **_req_mapping(raw.get("resources_per_trial") or {},
                                                   f"{source}: resources_per_trial")}
    bad = sorted(set(res) - set(RESOURCE_KEYS))
    if bad:
        raise ConfigError(f"{source}: resources_per_trial: unknown key(s) {bad}; valid: {', '.join(RESOURCE_KEYS)}")
    for k, v in res.items():
        if _number(v, f"{source}: resources_per_trial.{k}") < 0:
            raise ConfigError(f"{source}: resources_per_trial.{k}={v} must be >= 0")
    mct = raw.get("max_concurrent_trials", 1)
    mct = None if mct in (None, 0) else _int(mct, f"{source}: max_concurrent_trials")
    base = raw.get("base") or {}
    _req_mapping(base, f"{source}: base")
    q = raw.get("question", "")
    if not isinstance(q, str):
        raise ConfigError(f"{source}: question must be text")
    return SweepSpec(name=name, search=search, metric=metric, mode=mode, question=q.strip(),
                     base=_nest(base), scheduler=sched, asha=asha,
                     num_samples=_int(raw.get("num_samples", 1), f"{source}: num_samples"),
                     stages=stages, steps_per_stage=sps, validation=val,
                     resources_per_trial={k: float(v) for k, v in res.items()},
                     max_concurrent_trials=mct, source=source)


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"sweep file {p} does not exist (see tune_configs/)")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep file {p} is not valid YAML: {exc}") from None
    return parse_spec(raw, str(p), overrides)


def trial_config(base: Config | dict, params: dict[str, Any]) -> Config:
    """The align_rl config of one trial: ``base`` with the trial's dotted ``params`` applied."""
    d = base.to_dict() if isinstance(base, Config) else copy.deepcopy(base)
    cfg = config_from_dict(d)
    nested: dict[str, Any] = {}
    for k, v in params.items():
        if k == "rewards.weights":  # a full replacement, not a merge
            nested.setdefault("rewards", {})["weights"] = dict(v)
            continue
        d2 = nested
        parts = k.split(".")
        for p in parts[:-1]:
            d2 = d2.setdefault(p, {})
        d2[parts[-1]] = v
    _apply(cfg, nested)
    from align_rl.config import validate

    validate(cfg)
    return cfg


def check_spec_against_config(spec: SweepSpec, base: Config) -> None:
    """Every search key exists in the config and every listed value (or bound) is valid there."""
    for key, dim in spec.search.items():
        for v in dim.probe_values():
            try:
                trial_config(base, {key: v})
            except ConfigError as exc:
                raise ConfigError(f"{spec.source}: search.{key}: {exc}") from None
        if key == "rewards.weights":
            for v in dim.values or []:
                if set(v) != set(base.rewards.names):
                    raise ConfigError(f"{spec.source}: search.rewards.weights: points weigh {sorted(v)}, "
                                      f"the config's rewards are {base.rewards.names}")


def build_base_config(spec: SweepSpec, config_file: str | Path | None = None,
                      cfg_overrides: list[str] | None = None) -> Config:
    """``--config`` file, then the sweep's ``base``, then the command-line config overrides."""
    from align_rl.config import parse_overrides as po

    ov = _merge(spec.base, po(list(cfg_overrides or [])))
    try:
        cfg = load_config(config_file, overrides=ov)
    except ConfigError as exc:
        raise ConfigError(f"{spec.source}: base: {exc}") from None
    check_spec_against_config(spec, cfg)
    return cfg


# ============================================================================= paths


def sweep_dir(cfg: Config, spec: SweepSpec) -> Path:
    return Path(cfg.run.workdir).expanduser().resolve() / "sweeps" / spec.name


def steps_per_stage(spec: SweepSpec, cfg: Config) -> int:
    return int(spec.steps_per_stage or max(1, math.ceil(cfg.dpo.steps / spec.stages)))


# ============================================================================= trials


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


def eval_metrics(summary: dict, row: str) -> dict[str, float]:
    """The validation metrics of ``row`` (``"<model>/<method>"``) in a run_evaluation summary."""
    rows = summary["scores"]["main"]
    if row not in rows:
        raise InputError(f"evaluation summary has no row {row!r} (rows: {sorted(rows)})")
    out = {}
    for name, (tab, stat, m) in _EVAL_METRICS.items():
        v = rows[row].get(tab, {}).get(stat, {}).get(m)
        if v is not None:
            out[name] = float(v)
    return out


def with_changes(metrics: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """Add ``<metric>_change_pct`` = 100 (policy − reference) / |reference|."""
    out = dict(metrics)
    for k, v in metrics.items():
        r = reference.get(k)
        if r is not None and r != 0 and math.isfinite(r):
            out[f"{k}_change_pct"] = 100.0 * (v - r) / abs(r)
    return out


def _policy_pairs(store, cfg: Config):
    """The trial's pairs: reselected from the stored scores of the REFERENCE's candidates
    (policy version 0) with the trial's reward weights and pair mode."""
    import numpy as np

    from align_rl.io.pair_store import PairSet

    ps = store.reselect(cfg.rewards.weights, cfg.pairs.mode, per_background=cfg.pairs.pairs_per_background,
                        seed=cfg.run.seed, top_k=cfg.pairs.top_k_phys, decile=cfg.pairs.decile,
                        min_version=0, normalize=cfg.rewards.normalize)
    keep = np.flatnonzero(ps.version == 0)
    ps = PairSet(ps.winner[keep], ps.loser[keep], ps.background[keep], ps.version[keep], ps.hash[keep],
                 ps.mode)
    if len(ps) == 0:
        raise InputError(f"no {cfg.pairs.mode} pairs for weights {cfg.rewards.weights} in {store.path}")
    return ps


def dpo_trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: reselected pairs, DPO in ``stages``, a validation and a report after each."""
    from ray import tune

    from align_rl.alignment.learner import run_dpo
    from align_rl.io.pair_store import PairStore
    from align_rl.workspace import Workspace

    trial_id = tune.get_context().get_trial_id() or "trial"
    cfg = trial_config(ctx["base"], params)
    cfg.run.name = f"{ctx['name']}-{trial_id}"
    ws = Workspace(Path(ctx["workdir"]))
    tdir = Path(ctx["sweep_dir"]) / "trials" / trial_id
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "params.json").write_text(json.dumps(params, indent=1, default=str))
    vcfg = validation_config(cfg, ctx["validation"], seed=ctx["base"]["run"]["seed"])
    data = ctx["eval_data"]
    ref_metrics = ctx["reference_metrics"]
    method = ctx["validation"]["method"]
    sps, stages = int(ctx["steps_per_stage"]), int(ctx["stages"])
    ref_ckpt = Path(ctx["reference_ckpt"])
    store = PairStore.open(ctx["pairs"], mode="r")
    pairs = _policy_pairs(store, cfg)
    online: dict[str, Any] = {}
    if cfg.dpo.mode == "online":
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
            _validate_and_report(cfg, vcfg, ws, res, ctx, tdir, stage, data, ref_metrics, method,
                                 len(pairs) if cfg.dpo.mode == "offline" else store.num_pairs, t0)
    finally:
        if "pool" in online:
            online["pool"].shutdown()


def _validate_and_report(cfg, vcfg, ws, res, ctx, tdir, stage, data, ref_metrics, method, n_pairs, t0):
    """The stage's short validation of the policy ``res.checkpoint`` and ``tune.report``."""
    from ray import tune

    from align_rl.io.checkpoints import load_model
    from align_rl.evaluation.runner import run_evaluation

    model, _ = load_model(res.checkpoint, "diffusion")
    summary = run_evaluation(vcfg, ws, {"policy": model}, data=data, out=tdir / "val" / f"stage_{stage}",
                             progress=False)
    m = with_changes(eval_metrics(summary, f"policy/{method}"), ref_metrics)
    for k, src in _DPO_METRICS.items():
        if src in res.metrics:
            m[k] = float(res.metrics[src])
    m.update(stage=stage, dpo_steps=int(res.step), policy_version=int(res.version),
             pairs=int(n_pairs), stage_seconds=time.time() - t0)
    tune.report(m)


# ============================================================================= shared inputs


def prepare_shared(cfg: Config, spec: SweepSpec, out: Path, progress: bool = True) -> dict[str, Any]:
    """Dataset, pretrained models, backgrounds and the reference's scored candidates (each from its
    cache when present), then the reference's validation metrics (cached in
    ``reference_val.json``). Returns the trials' shared context."""
    from align_rl.evaluation.runner import run_evaluation
    from align_rl.workspace import Workspace

    ws = Workspace.from_config(cfg)
    pairs_path, world = _ensure_pairs(cfg, ws, spec, progress)
    vcfg = validation_config(cfg, spec.validation)
    data, ref_model = validation_data(cfg, ws, progress)
    ref_file = out / "reference_val.json"
    key = {"validation": spec.validation, "val": list(cfg.data.val), "seed": cfg.run.seed,
           "sampler": cfg.to_dict()["sampler"], "obs": cfg.to_dict()["obs"],
           "guidance": cfg.to_dict()["guidance"], "reference": _file_id(ws.final_checkpoint("diffusion"))}
    ref = None
    if ref_file.exists():
        stored = json.loads(ref_file.read_text())
        if stored.get("key") == json.loads(json.dumps(key)):
            ref = stored["metrics"]
    if ref is None:
        summary = run_evaluation(vcfg, ws, {"reference": ref_model}, data=data, out=out / "reference_val",
                                 progress=progress)
        ref = eval_metrics(summary, f"reference/{spec.validation['method']}")
        _write_atomic(ref_file, json.dumps({"key": key, "metrics": ref}, indent=1))
    return {"base": cfg.to_dict(), "name": spec.name, "workdir": str(ws.root), "sweep_dir": str(out),
            "world": str(world),
            "pairs": str(pairs_path), "reference_ckpt": str(ws.final_checkpoint("diffusion")),
            "validation": dict(spec.validation), "reference_metrics": ref, "eval_data": data,
            "stages": spec.stages, "steps_per_stage": steps_per_stage(spec, cfg)}


def validation_data(cfg: Config, ws: Any, progress: bool = False):
    """``(EvalData of the VAL split, reference ε model)`` from the caches of the BASE config.

    (Not ``load_eval_data(validation_config(...))``: the validation config moves ``data.test``,
    which is part of the dataset identity that the pretraining and background caches are keyed
    by, so it would retrain.)"""
    import numpy as np

    from align_rl.io import era5
    from align_rl.world.backgrounds import ensure_backgrounds
    from align_rl.world.dataset import ensure_world
    from align_rl.evaluation.runner import LEAD_STEPS, STEP_HOURS, EvalData
    from align_rl.training.pretraining import ensure_pretrained

    store = ensure_world(cfg, ws, progress=progress)
    pre = ensure_pretrained(cfg, ws, progress=progress)
    normalizer = getattr(pre, "normalizer", None) or era5.load_normalizer(store)
    h = np.timedelta64(1, "h")
    start = np.datetime64(cfg.data.val[0]) - 2 * STEP_HOURS * LEAD_STEPS * h
    end = np.datetime64(cfg.data.val[-1]) + np.timedelta64(1, "D") + STEP_HOURS * LEAD_STEPS * h
    truth = era5.open_states(store, time_range=[start, end], coarsen=cfg.data.coarsen,
                             expect_grid=cfg.data.grid, check_units=cfg.checks.units)
    bgs = ensure_backgrounds(cfg, ws, truth, pre.forecaster, progress=progress)
    return EvalData(truth, bgs, normalizer, pre.codec, pre.forecaster, truth_store=Path(store)), pre.eps_model


def _file_id(p: Path) -> str:
    st = Path(p).stat()
    return f"{Path(p).name}:{st.st_size}:{int(st.st_mtime)}"


def _ensure_pairs(cfg: Config, ws: Any, spec: SweepSpec, progress: bool) -> tuple[Path, Path]:
    """The shared pair store with the reference's scored candidates, exactly as the main job
    builds it (same store identity ``align_rl.pipeline.store_meta``, the same first
    ``pairs.backgrounds`` backgrounds of the seeded order): reused when the main job (or an
    earlier sweep) has built it, completed otherwise. Returns ``(store path, dataset path)``."""
    from align_rl.world.dataset import ensure_world
    from align_rl.io.pair_store import PairStore
    from align_rl.training.pretraining import ensure_pretrained
    from align_rl.pipeline import PrefData, store_meta

    world = ensure_world(cfg, ws, progress=progress)
    models = ensure_pretrained(cfg, ws, progress=progress)
    reference_ckpt = Path(models.paths.get("diffusion", ws.final_checkpoint("diffusion")))
    pref = PrefData(cfg, ws, world, models, progress)
    path = Path(cfg.pairs.store or ws.pairs)
    store = PairStore.open(path, tuple(models.codec.latent_shape), list(cfg.rewards.names),
                           meta=store_meta(cfg, reference_ckpt))
    first = [int(i) for i in pref.order[:int(cfg.pairs.backgrounds)]]
    todo = [i for i in first if (i, 0, cfg.pairs.guidance) not in store.done_keys()]
    if todo:
        pool = remote.workers().candidate_pool(cfg, models, pref.lat, pref.lon)
        try:
            pool.build(pref.tasks(todo), store, list(dict.fromkeys(cfg.pairs.variants)), progress=progress)
        finally:
            pool.shutdown()
    return path, Path(world)


def seed_trial_store(shared: Any, path: Path, pairs: Any) -> Any:
    """A trial's own pair store (online trials: their policy's candidates must not mix with other
    trials'): the reference's candidates of the shared store with the trial's reselected
    ``pairs`` (a :class:`~align_rl.io.pair_store.PairSet` of version-0 rows), committed as version 0."""
    import numpy as np

    from align_rl.io.pair_store import CandidateGroup, PairStore

    from align_rl.owned import remove_owned

    remove_owned(path, "trial pair store")  # only a store align_rl made (marker file)
    store = PairStore.open(path, shared.latent_shape, shared.reward_names, meta=dict(shared.g.attrs.get("meta", {})))
    bg = shared.backgrounds()
    cb = shared._col("candidates/background")
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


def _online_stage(cfg: Config, ws: Any, ctx: dict, store: Any, steps: int, out_dir: Path, state: dict):
    """Online trials: :func:`align_rl.alignment.online.run_online` up to ``steps`` learner steps (it resumes
    in ``out_dir``), with the trial's own sampler / reward actors and pair store."""
    from align_rl.alignment.online import run_online
    from align_rl.training.pretraining import ensure_pretrained
    from align_rl.pipeline import PrefData

    if "pool" not in state:
        base = config_from_dict(ctx["base"])  # the caches' identity is the base config's
        models = ensure_pretrained(base, ws, progress=False)
        state["pref"] = PrefData(base, ws, Path(ctx["world"]), models, progress=False)
        state["pool"] = remote.workers().candidate_pool(cfg, models, state["pref"].lat, state["pref"].lon)
    c = config_from_dict(cfg.to_dict())
    c.dpo.steps = int(steps)
    pref = state["pref"]
    return run_online(c, ws, state["pool"], store, pref.tasks, pref.order, Path(ctx["reference_ckpt"]),
                      cfg.pairs.mode, out_dir, progress=False, log=lambda m: None)


# ============================================================================= running


def _tune_scheduler(spec: SweepSpec):
    if spec.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    a = {"grace_period": 1, "reduction_factor": 2, **spec.asha}
    return ASHAScheduler(time_attr="training_iteration", max_t=int(a.pop("max_t", spec.stages)), **a)


def trial_resources(spec: SweepSpec, base: dict, params: dict):
    """What Tune reserves for a trial: its driver (``resources_per_trial``) and, for an online
    trial, one bundle per sampler / reward actor (``actors.*``), which Tune schedules inside the
    trial's placement group. The learner's workers are not in it (Ray Train V2 places them)."""
    from ray.tune import PlacementGroupFactory

    r = spec.resources_per_trial
    bundles = [{"CPU": float(r.get("cpu", 0.0)), "GPU": float(r.get("gpu", 0.0))}]
    if float(r.get("memory", 0.0)):
        bundles[0]["memory"] = float(r["memory"])
    cfg = trial_config(base, params)
    if cfg.dpo.mode == "online":
        a = cfg.actors
        bundles += [{"CPU": float(a.cpus_per_actor), "GPU": float(a.gpus_per_actor)}] * (a.samplers + a.rewarders)
    return PlacementGroupFactory([{k: v for k, v in b.items() if v} or {"CPU": 0.0} for b in bundles])


def local_cpus(spec: SweepSpec, cfg: Config) -> int:
    """CPUs of a local Ray instance (when no cluster is given) that hold one trial at a time:
    its reservation plus the learner's workers (logical CPUs; a laptop may have fewer cores)."""
    online = cfg.dpo.mode == "online" or "online" in (spec.search.get("dpo.mode").values or []
                                                    if "dpo.mode" in spec.search else [])
    need = float(spec.resources_per_trial.get("cpu", 0.0))
    need += cfg.dpo.num_workers * float(cfg.actors.cpus_per_actor)
    if online:
        need += (cfg.actors.samplers + cfg.actors.rewarders) * float(cfg.actors.cpus_per_actor)
    return max(os.cpu_count() or 1, math.ceil(need))


def _trial_dirname(trial) -> str:
    return trial.trial_id


def run_sweep(spec: SweepSpec, cfg: Config, trainable: Callable[[dict, dict], None] | None = None,
              ctx: dict[str, Any] | None = None, progress: bool = True) -> "SweepResult":
    """Run the sweep; write the results table and the best config. ``trainable(params, ctx)``
    replaces :func:`dpo_trial` (and the shared preparation) when given, with ``ctx`` as its context."""
    from ray import tune

    from align_rl.training.harness import init_ray

    out = sweep_dir(cfg, spec)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "spec.yaml", yaml.safe_dump(spec.to_dict(), sort_keys=False))
    t0 = time.time()
    init_ray(num_cpus=local_cpus(spec, cfg))
    if trainable is None:
        trainable = dpo_trial
        with stage("shared inputs of the trials", LOG):
            ctx = prepare_shared(cfg, spec, out, progress)
    ctx = dict(ctx or {})
    ctx.setdefault("stages", spec.stages)
    ctx.setdefault("sweep_dir", str(out))
    ctx.setdefault("workers", remote.provided())  # the Ray actors, for the trials' processes
    prep_s = time.time() - t0

    def entry(config: dict, ctx: dict) -> None:  # Tune passes the sampled point as `config`
        if ctx.get("workers") is not None:
            remote.provide(ctx["workers"])
        trainable(dict(config), ctx)

    base_d = cfg.to_dict()
    fn = tune.with_resources(tune.with_parameters(entry, ctx=ctx),
                             lambda config: trial_resources(spec, base_d, config))
    tuner = tune.Tuner(
        fn,
        param_space={k: d.domain() for k, d in spec.search.items()},
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=_tune_scheduler(spec),
                                    num_samples=spec.num_samples,
                                    max_concurrent_trials=spec.max_concurrent_trials,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=1 if progress else 0,
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )
    with stage(f"trials of sweep {spec.name}", LOG):
        grid = tuner.fit()
    result = collect_results(grid, spec, cfg)
    result.seconds = time.time() - t0
    result.prepare_seconds = prep_s
    write_results(result, spec, cfg, out)
    log_wandb(result, spec, cfg, out)
    return result


# ============================================================================= results


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    status: str  # completed | stopped early | error
    stages: int
    metrics: dict[str, float]
    error: str = ""


@dataclass
class SweepResult:
    rows: list[TrialRow]
    best: TrialRow | None
    best_config: Config | None
    seconds: float = 0.0
    prepare_seconds: float = 0.0


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return " ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


def _error_text(err: BaseException | None) -> str:
    """One line naming a trial's error: the original exception of a Ray task error."""
    if err is None:
        return ""
    cause = getattr(err, "cause", None) or err
    lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    return f"{type(cause).__name__}: {text}"[:300]


def collect_results(grid, spec: SweepSpec, cfg: Config) -> SweepResult:
    rows = []
    for r in grid:
        m = {k: float(v) for k, v in (r.metrics or {}).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
        it = int(m.get("training_iteration", 0))
        if r.error is not None:
            status = "error"
        elif it < spec.stages:
            status = "stopped early"
        else:
            status = "completed"
        tid = (r.metrics or {}).get("trial_id") or Path(r.path).name
        params = {k: r.config[k] for k in spec.search if k in (r.config or {})}
        rows.append(TrialRow(str(tid), params, status, it,
                             {k: v for k, v in m.items() if k in VALIDATION_METRICS or k in
                              ("dpo_steps", "pairs", "stage_seconds", "policy_version")},
                             _error_text(r.error)))
    rows.sort(key=lambda t: t.trial_id)
    sign = 1.0 if spec.mode == "min" else -1.0
    scored = [t for t in rows if t.status != "error" and spec.metric in t.metrics]
    finished = [t for t in scored if t.status == "completed"] or scored
    best = min(finished, key=lambda t: sign * t.metrics[spec.metric]) if finished else None
    best_cfg = None
    if best is not None:
        best_cfg = trial_config(cfg, best.params)
        steps = int(best.metrics.get("dpo_steps", 0)) or steps_per_stage(spec, cfg) * best.stages
        best_cfg.dpo.steps = steps
    return SweepResult(rows, best, best_cfg)


def _write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def results_columns(result: SweepResult, spec: SweepSpec) -> tuple[list[str], list[list[str]]]:
    metric_cols = [spec.metric] + [k for k in VALIDATION_METRICS if k != spec.metric
                                   and any(k in t.metrics for t in result.rows)]
    extra = [k for k in ("dpo_steps", "pairs") if any(k in t.metrics for t in result.rows)]
    header = ["trial", *spec.search, "status", "stages", *metric_cols, *extra, "best"]
    body = []
    for t in result.rows:
        row = [t.trial_id] + [_fmt(t.params.get(k, "")) for k in spec.search] + [t.status, str(t.stages)]
        row += [_fmt(t.metrics[k]) if k in t.metrics else "" for k in metric_cols + extra]
        row.append("*" if result.best is t else "")
        body.append(row)
    return header, body


def write_results(result: SweepResult, spec: SweepSpec, cfg: Config, out: Path) -> None:
    """``results.csv``, ``results.md``, ``best_config.yaml``, ``best.json`` (each atomically)."""
    import io

    header, body = results_columns(result, spec)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(body)
    _write_atomic(out / "results.csv", buf.getvalue())
    lines = [f"# Sweep `{spec.name}`", ""]
    if spec.question:
        lines += [f"**Question.** {spec.question}", ""]
    lines += [f"Metric: `{spec.metric}` ({spec.mode}); scheduler: {spec.scheduler}; "
              f"{len(result.rows)} trials, {spec.stages} stages of "
              f"{steps_per_stage(spec, cfg)} DPO steps; validation: {spec.validation['times']} val "
              f"times, {spec.validation['members']} members, {spec.validation['method']}. "
              f"Wall time {result.seconds / 60:.1f} min (shared inputs {result.prepare_seconds / 60:.1f} min).",
              "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    errors = [t for t in result.rows if t.error]
    if errors:
        lines += ["", "Errors:"] + [f"- {t.trial_id}: {t.error}" for t in errors]
    if result.best is not None:
        lines += ["", f"Best: trial {result.best.trial_id} with `{spec.metric}` = "
                  f"{result.best.metrics[spec.metric]:.5g}; parameters "
                  f"{_fmt(result.best.params)}; configuration in `best_config.yaml` "
                  "(`python -m align_rl.train --config best_config.yaml`)."]
    else:
        lines += ["", "No trial reported the metric; see the errors above and `tune/`."]
    _write_atomic(out / "results.md", "\n".join(lines) + "\n")
    if result.best_config is not None:
        head = (f"# Best configuration of sweep {spec.name} ({spec.metric} {spec.mode}: "
                f"{result.best.metrics[spec.metric]:.6g}, trial {result.best.trial_id})\n"
                f"# parameters: {_fmt(result.best.params)}\n"
                f"# use: python -m align_rl.train --config {out / 'best_config.yaml'}\n")
        d = result.best_config.to_dict()
        _write_atomic(out / "best_config.yaml", head + yaml.safe_dump(d, sort_keys=False))
        _write_atomic(out / "best.json", json.dumps(
            {"trial": result.best.trial_id, "params": result.best.params, "metrics": result.best.metrics,
             "metric": spec.metric, "mode": spec.mode}, indent=1, default=str))


def log_wandb(result: SweepResult, spec: SweepSpec, cfg: Config, out: Path) -> None:
    """The results table and the best configuration as one wandb run (``run.wandb_mode``)."""
    if cfg.run.wandb_mode == "disabled":
        return
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    header, body = results_columns(result, spec)
    run = wandb.init(project=cfg.run.wandb_project, name=f"sweep-{spec.name}", mode=cfg.run.wandb_mode,
                     dir=str(out), config={"sweep": spec.to_dict()}, reinit=True,
                     settings=wandb.Settings(silent=True, console="off"))
    try:
        run.log({"results": wandb.Table(columns=header, data=body)})
        if result.best is not None:
            run.summary.update({"best_trial": result.best.trial_id, "best_params": result.best.params,
                                f"best_{spec.metric}": result.best.metrics[spec.metric],
                                "best_config": result.best_config.to_dict()})
    finally:
        run.finish()


# ============================================================================= CLI


