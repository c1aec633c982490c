"""The sweep file (``tune_configs/*.yaml``) as a typed spec, loaded by the job config's machinery.

:class:`SweepSpec` and its parts (:class:`Dimension`, :class:`Simplex`, :class:`Asha`,
:class:`Validation`, :class:`Resources`) are dataclasses; :func:`parse_spec` writes the YAML
mapping (plus ``key=value`` overrides) into them with :func:`align_rl.loader.apply` (types, unknown
keys), checks :data:`SPEC_RANGES` (ranges and choices, ``validation.method`` from the guidance
registry, ``metric`` from the metrics the trials report) and the rules that tie keys together.
Every :class:`~align_rl.errors.ConfigError` names the file, the key and what is allowed. The
file's fields are documented in :mod:`align_rl.sweep`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from align_rl.config import (
    Config, RewardConfig, load_config, merge_overrides, parse_overrides,
)
from align_rl.errors import ConfigError
from align_rl.loader import (
    Rule, apply, check_rules, choice, in_range, integer, is_num, merge, nest, parse_value,
    raise_problems, read_yaml_file, registry, split_item,
)
from align_rl.tune.trial import VALIDATION_METRICS, trial_config


@dataclass
class Simplex:
    """Every weighting of ``keys`` on the lattice ``{0, step, …, 1}`` summing to 1, each >= ``min``."""

    keys: list[str] = field(default_factory=lambda: list(RewardConfig().names))
    step: float | None = None
    min: float = 0.0


@dataclass
class Dimension:
    """One search dimension as written (exactly one of the kinds): ``grid`` / ``choice`` (values),
    ``loguniform`` / ``uniform`` (``[low, high]``), ``simplex`` (reward weightings, a grid)."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    loguniform: list[float] | None = None
    uniform: list[float] | None = None
    simplex: Simplex | None = None
    points: list[dict[str, float]] | None = field(default=None, init=False, repr=False)  # of the simplex

    @property
    def kind(self) -> str:
        return next(k for k in DIMENSION_KINDS if getattr(self, k) is not None)

    @property
    def values(self) -> list[Any] | None:
        """The listed values (grid, choice), the simplex points, or None (a range)."""
        if self.kind == "simplex":
            return self.points
        return getattr(self, self.kind) if self.kind in ("grid", "choice") else None

    @property
    def bounds(self) -> tuple[float, float] | None:
        return tuple(getattr(self, self.kind)) if self.kind in ("loguniform", "uniform") else None

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

    def to_yaml(self) -> dict[str, Any]:
        if self.kind == "simplex":
            return {"grid": self.values}
        return {self.kind: list(self.values) if self.values is not None else list(self.bounds)}


DIMENSION_KINDS = ("grid", "choice", "loguniform", "uniform", "simplex")


@dataclass
class Asha:
    """ASHA's parameters, in stages (unset: grace_period 1, reduction_factor 2, Ray's brackets,
    max_t = stages)."""

    grace_period: int | None = None
    reduction_factor: int | None = None
    brackets: int | None = None
    max_t: int | None = None

    def given(self) -> dict[str, int]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Validation:
    """The short evaluation after every stage: ``times`` VAL times, ``members`` per analysis, one
    guidance ``method``."""

    times: int = 4
    members: int = 4
    method: str = "obsfree"


@dataclass
class Resources:
    """What Tune reserves for a trial's driver (``memory`` in bytes; unset: none). No CPU by
    default: the driver waits while its learner trains (the learner's workers reserve their own,
    ``dpo.num_workers × dpo.cpus_per_worker``) and validates between stages, when the learner's
    CPUs are free; so one trial fits a machine that fits the learner."""

    cpu: float = 0.0
    gpu: float = 0.0
    memory: float | None = None

    def given(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class SweepSpec:
    """A sweep file (fields documented in :mod:`align_rl.sweep`); ``source`` is its path."""

    name: str = ""
    question: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Dimension] = field(default_factory=dict)
    metric: str = "val_mse"
    mode: str = "min"
    objectives: dict[str, str] = field(default_factory=dict)  # metric -> min | max (a Pareto front)
    scheduler: str = "asha"
    asha: Asha = field(default_factory=Asha)
    num_samples: int = 1
    stages: int = 2
    steps_per_stage: int | None = None
    validation: Validation = field(default_factory=Validation)
    resources_per_trial: Resources = field(default_factory=Resources)
    max_concurrent_trials: int | None = 1
    source: str = field(default="", init=False)

    def to_dict(self) -> dict[str, Any]:
        """The spec as written to ``spec.yaml`` (search last, unset ASHA / memory keys left out)."""
        d: dict[str, Any] = {k: getattr(self, k) for k in SWEEP_KEYS if k != "search"}
        d.update(asha=self.asha.given(), validation=dataclasses.asdict(self.validation),
                 resources_per_trial=self.resources_per_trial.given())
        d["search"] = {k: v.to_yaml() for k, v in self.search.items()}
        return d

    def goals(self) -> dict[str, str]:
        """The objectives (``metric -> mode``): ``objectives``, else the one ``metric``."""
        return dict(self.objectives) or {self.metric: self.mode}

    def grid_size(self) -> int:
        n = 1
        for d in self.search.values():
            if d.kind in ("grid", "simplex"):
                n *= len(d.values)
        return n * self.num_samples


SWEEP_KEYS = tuple(f.name for f in dataclasses.fields(SweepSpec) if f.init)


def _optional(rule: Rule) -> Rule:
    return Rule(f"{rule.text} (or unset)", lambda v: v is None or rule.ok(v))


NON_NEGATIVE = in_range(0)
SPEC_RANGES: dict[str, Rule] = {
    "name": Rule("letters, digits, - or _ (it names a folder)",
                 lambda v: bool(v) and v.replace("-", "").replace("_", "").isalnum()),
    "metric": Rule(f"a metric the trials report: one of {', '.join(VALIDATION_METRICS)}",
                   lambda v: v in VALIDATION_METRICS),
    "mode": choice("min", "max"),
    "scheduler": choice("asha", "fifo"),
    "asha.grace_period": _optional(integer(1)),
    "asha.reduction_factor": _optional(integer(2)),
    "asha.brackets": _optional(integer(1)),
    "asha.max_t": _optional(integer(1)),
    "num_samples": integer(1),
    "stages": integer(1),
    "steps_per_stage": _optional(integer(1)),
    "validation.times": integer(1),
    "validation.members": integer(2),  # rewards and the ensemble scores compare members
    "validation.method": registry("align_rl.diffusion.guidance", "METHODS"),
    "resources_per_trial.cpu": NON_NEGATIVE,
    "resources_per_trial.gpu": NON_NEGATIVE,
    "resources_per_trial.memory": _optional(NON_NEGATIVE),
    "max_concurrent_trials": _optional(integer(1)),
}
"""The range or choices of every sweep-file key that has one."""


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


# ----------------------------------------------------------------------------- checks


def _check_range(k: str, kind: str, arg: list[float]) -> None:
    if len(arg) != 2:
        raise ConfigError(f"{k}.{kind} must be [low, high]")
    lo, hi = arg
    if not (is_num(lo) and is_num(hi)):
        raise ConfigError(f"{k}.{kind} must be [low, high] finite numbers, got {arg!r}")
    if not lo < hi:
        raise ConfigError(f"{k}.{kind}: low {lo} must be < high {hi}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{k}.loguniform: low {lo} must be > 0")


def _simplex_points(key: str, k: str, s: Simplex) -> list[dict[str, float]]:
    if key != "rewards.weights":
        raise ConfigError(f"{k}: simplex is for rewards.weights only")
    if len(set(s.keys)) != len(s.keys):
        raise ConfigError(f"{k}.simplex.keys must be a list of distinct reward names")
    if s.step is None:
        raise ConfigError(f"{k}.simplex.step is missing (e.g. step: 0.25)")
    try:
        pts = simplex_grid(s.keys, s.step)
    except ConfigError as exc:
        raise ConfigError(f"{k}.simplex: {exc}") from None
    pts = [p for p in pts if min(p.values()) >= s.min - 1e-12]
    if not pts:
        raise ConfigError(f"{k}.simplex: no point has every weight >= min={s.min}")
    return pts


def check_dimension(key: str, dim: Dimension) -> None:
    """One dimension of ``search``: exactly one kind, with sound values (simplex points computed)."""
    k = f"search.{key}"
    given = [kind for kind in DIMENSION_KINDS if getattr(dim, kind) is not None]
    if len(given) != 1:
        raise ConfigError(f"{k} must be one of {{{', '.join(f'{d}: ...' for d in DIMENSION_KINDS)}}}, "
                          f"got {given or 'nothing'}")
    kind = given[0]
    if kind in ("grid", "choice") and not getattr(dim, kind):
        raise ConfigError(f"{k}.{kind} must be a non-empty list of values")
    if kind in ("loguniform", "uniform"):
        _check_range(k, kind, getattr(dim, kind))
    if kind == "simplex":
        dim.points = _simplex_points(key, k, dim.simplex)


def _cross_rules(spec: SweepSpec) -> None:
    if not spec.search:
        raise ConfigError("search is missing or empty; give at least one dimension, "
                          "e.g. search: {dpo.beta: {grid: [1000, 8000]}}")
    for key, dim in spec.search.items():
        check_dimension(key, dim)
    if spec.objectives and spec.objectives.get(spec.metric) != spec.mode:
        raise ConfigError(f"metric: {spec.metric} ({spec.mode}) must be one of the objectives "
                          f"with its mode ({spec.objectives}); leave metric out to rank by the first")
    if len(spec.objectives) > 1 and spec.scheduler == "asha":
        raise ConfigError("scheduler: asha stops trials on one metric and would discard weightings "
                          "on the Pareto front of the objectives; use scheduler: fifo with several "
                          "objectives")
    a = spec.asha
    if a.max_t is not None and a.max_t > spec.stages:
        raise ConfigError(f"asha.max_t={a.max_t} exceeds stages={spec.stages}")
    if a.grace_period is not None and a.grace_period > spec.stages:
        raise ConfigError(f"asha.grace_period={a.grace_period} exceeds stages={spec.stages}")


# ----------------------------------------------------------------------------- loading


def _normalise(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The file's shorthands: ``scheduler: {type: asha, …}`` (the rest goes to ``asha``), a
    scheduler ``none``/null (fifo), ``max_concurrent_trials: 0`` (no limit), a bare list as a grid
    dimension, a missing name (the file's stem)."""
    raw = dict(raw)
    raw["name"] = raw.get("name") or Path(source).stem
    sched = raw.get("scheduler", "asha")
    if isinstance(sched, dict):
        sched = dict(sched)
        asha = raw.get("asha") or {}
        if not isinstance(asha, dict):
            raise ConfigError(f"asha must be a mapping, got {asha!r}")
        raw["asha"] = {**asha, **{k: v for k, v in sched.items() if k != "type"}}
        sched = sched.get("type")
    raw["scheduler"] = "fifo" if sched is None or str(sched).lower() in ("none", "fifo") else \
        "asha" if str(sched).lower() == "asha" else sched
    for k in ("asha", "validation", "resources_per_trial", "base"):
        if raw.get(k) is None:
            raw.pop(k, None)
    if raw.get("max_concurrent_trials", 1) == 0:
        raw["max_concurrent_trials"] = None
    obj = raw.get("objectives")
    if obj is None:
        raw.pop("objectives", None)
    elif isinstance(obj, list):  # [val_mse, val_geo_score: max]: a bare name is minimised
        raw["objectives"] = {}
        for o in obj:
            raw["objectives"].update(o if isinstance(o, dict) else {str(o): "min"})
    elif not isinstance(obj, dict):
        raise ConfigError(f"objectives must map metrics to min | max, got {obj!r}")
    for k, m in (raw.get("objectives") or {}).items():
        if k not in VALIDATION_METRICS:
            raise ConfigError(f"objectives.{k}: not a metric the trials report; one of "
                              f"{', '.join(VALIDATION_METRICS)}")
        if m not in ("min", "max"):
            raise ConfigError(f"objectives.{k}: {m!r} must be min or max")
    if raw.get("objectives") and "metric" not in raw:  # ranked by the first objective
        raw["metric"], raw["mode"] = next(iter(raw["objectives"].items()))
    search = raw.get("search")
    if isinstance(search, dict):
        raw["search"] = {str(k): {"grid": v} if isinstance(v, list) else v for k, v in search.items()}
    elif search is not None:
        raise ConfigError(f"search must be a mapping of dotted config keys to dimensions, got {search!r}")
    return raw


def parse_spec(raw: Any, source: str = "<sweep>", overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Validate a sweep mapping (see :mod:`align_rl.sweep`) layered with ``overrides`` (a
    nested mapping, :func:`split_overrides`); ConfigError names the file and the bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a mapping (name, search, metric, ...)")
    over = overrides or {}
    if isinstance(over.get("search"), dict) and isinstance(raw.get("search"), dict):
        # a dimension given on the command line replaces the file's dimension of that key whole
        raw = {**raw, "search": {k: v for k, v in raw["search"].items() if k not in over["search"]}}
    try:
        spec = SweepSpec()
        apply(spec, _normalise(merge(raw, over, replace=("weights",)), source), what="sweep")
        spec.question = spec.question.strip()
        spec.base = nest(spec.base)
        raise_problems(check_rules(spec, SPEC_RANGES), "sweep")
        _cross_rules(spec)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    spec.source = source
    return spec


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep file (YAML read as the job configs are)."""
    raw = read_yaml_file(path, "sweep file", " (see tune_configs/)")
    return parse_spec(raw, str(path), overrides)


def split_overrides(items: list[str]) -> tuple[list[str], dict[str, Any]]:
    """``key=value`` items -> (align_rl config overrides, sweep-file overrides as a nested dict).

    A key whose first part is a config section (``dpo.steps``) or ``preset`` goes to the config;
    ``search.<dotted config key>`` sets one search dimension; anything else is a sweep-file key."""
    sections = {f.name for f in dataclasses.fields(Config)} | {"preset"}
    cfg_items: list[str] = []
    spec: dict[str, Any] = {}
    for item in items:
        key, value = split_item(item)
        head = key.split(".")[0]
        if head in sections:
            cfg_items.append(item)
        elif head == "search":
            dotted = key[len("search."):]
            if not dotted or key == head:
                raise ConfigError(f"override {item!r}: write search.<config key>={{grid: [...]}}")
            spec.setdefault("search", {})[dotted] = parse_value(value, item)
        else:
            spec = merge(spec, parse_overrides([item]))
    return cfg_items, spec


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
    ov = merge_overrides(spec.base, parse_overrides(list(cfg_overrides or [])))
    try:
        cfg = load_config(config_file, overrides=ov)
    except ConfigError as exc:
        raise ConfigError(f"{spec.source}: base: {exc}") from None
    check_spec_against_config(spec, cfg)
    return cfg


def steps_per_stage(spec: SweepSpec, cfg: Config) -> int:
    """DPO steps of one stage: ``steps_per_stage``, else ``ceil(dpo.steps / stages)``."""
    return int(spec.steps_per_stage or max(1, math.ceil(cfg.dpo.steps / spec.stages)))
