"""One configuration for every command: dataclass sections, YAML files and ``key=value`` overrides.

Load order: the preset (``demo`` or ``paper``), then ``--config FILE`` (YAML, nested like the
sections in :mod:`align_rl.config_sections`), then ``section.key=value`` overrides from the command
line (values parsed as YAML, so ``dpo.beta=8000``, ``rewards.weights={assim: 1, forecast: 1, phys: 0}``,
``guidance.methods=[dps]``). Unknown keys and badly typed values raise :class:`ConfigError` naming
the key and the fix. The loading machinery (YAML 1.2 scalars, dotted keys, typed apply, rules) is
:mod:`align_rl.loader`, shared with the sweep files (:mod:`align_rl.tune.spec`).

:func:`validate` is one pass over the whole configuration, run by :func:`load_config` before any
command does work: every float must be finite, every key in :data:`RANGES` must satisfy its rule
(a range, an integer bound, a set of choices or the names of a registry such as
``align_rl.diffusion.guidance.METHODS``), and a few rules tie keys together. A new numeric
config field needs an entry in :data:`RANGES` (``tests/test_hardening.py`` checks that every one
has), and every new field declares the caches its value enters, ``cached(default, *caches)`` or
``runtime(default)`` (:mod:`align_rl.config_sections`; ``tests/test_identity_declared.py``).
YAML values are read as in YAML 1.2: ``0x40``, ``0o17``, ``1_000`` or ``1:20`` stay strings, and
``1e-5`` is a number.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

import numpy as np

from align_rl.config_sections import (  # noqa: F401 - the sections are part of this module's API
    PRESETS, ActorsConfig, ChecksConfig, Config, DataConfig, DiffusionConfig, cached, runtime,
    DPOConfig, EvalConfig, ForecasterConfig, GuidanceConfig, ObsConfig, PairsConfig,
    PretrainConfig, RewardConfig, RunConfig, SamplerConfig, VAEConfig,
)
from align_rl import plugins
from align_rl.errors import ConfigError, InputError
from align_rl.io.grid import Grid
from align_rl.models.shapes import dit_problems, vae_latent_shape, vae_problems
from align_rl.loader import (  # noqa: F401 - Rule and its makers, yaml_load: part of this module's API
    Rule, apply, check_rules, choice, in_range, integer, is_num, merge, nest, parse_overrides,
    raise_problems, read_yaml_file, registry, set_dotted, yaml_load,
)


def _mapping_fields() -> frozenset[str]:
    """Names of the mapping-valued fields (``weights``): a layer of overrides replaces them whole."""
    out = set()
    for sec in dataclasses.fields(Config):
        for name, tp in typing.get_type_hints(typing.get_type_hints(Config)[sec.name]).items():
            if typing.get_origin(tp) is dict:
                out.add(name)
    return frozenset(out)


MAPPING_FIELDS = _mapping_fields()


def merge_overrides(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Nested config overrides ``b`` layered over ``a`` (sections merge, ``rewards.weights`` and
    other mapping-valued fields are replaced whole); dotted keys of either are nested first."""
    return merge(nest(a), nest(b), replace=MAPPING_FIELDS)


def with_values(cfg: Config | dict[str, Any], values: dict[str, Any]) -> Config:
    """A new validated config: ``cfg`` (a Config or its ``to_dict()``) with ``values`` (dotted keys
    or nested sections; a mapping-valued field is replaced whole) applied. ``cfg`` is untouched."""
    d = cfg.to_dict() if isinstance(cfg, Config) else cfg
    tree: dict[str, Any] = {}
    for k, v in values.items():
        set_dotted(tree, str(k), v)
    return config_from_dict(merge(d, tree, replace=MAPPING_FIELDS))


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    preset: str | None = None,
) -> Config:
    """Build the configuration: preset, then YAML file, then overrides; then validate."""
    cfg = Config()
    file_data = read_yaml_file(path, "config file") if path is not None else {}
    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    preset = preset or ov.pop("preset", None) or file_data.pop("preset", None) or "demo"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    apply(cfg, PRESETS[preset])
    apply(cfg, file_data)
    apply(cfg, ov)
    validate(cfg)
    expand_paths(cfg)
    resolve_workdir(cfg)
    return cfg


def expand_paths(cfg: Config) -> Config:
    """``~`` and ``~user`` at the start of every path key (:data:`PATH_KEYS`) expanded to the home
    folder (a URL such as ``gs://…`` is left as it is). Returns ``cfg`` (changed in place)."""
    for key in PATH_KEYS:
        v = _key(cfg, key)
        if isinstance(v, str) and v.startswith("~"):
            sec, name = key.split(".")
            setattr(getattr(cfg, sec), name, str(Path(v).expanduser()))
    return cfg


def in_ray_job() -> bool:
    """True in the driver of a ``ray job submit`` (its working directory is a temporary copy)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")) or \
        "runtime_resources/working_dir_files" in os.getcwd()


def resolve_workdir(cfg: Config) -> Config:
    """Make ``cfg.run.workdir`` absolute (see :class:`RunConfig`): a relative one is taken below
    ``run.root``, else ``$ALIGN_RL_ROOT``, else ``~/align_rl`` in the driver of a ``ray job
    submit`` (so caches and resumable checkpoints outlive the job's temporary folder), else the
    current directory. Returns ``cfg`` (changed in place)."""
    wd = Path(cfg.run.workdir).expanduser()
    if not wd.is_absolute():
        base = cfg.run.root or os.environ.get("ALIGN_RL_ROOT")
        if base:
            wd = Path(base).expanduser() / wd
        elif in_ray_job():
            wd = Path("~/align_rl").expanduser() / wd
    cfg.run.workdir = str(wd.resolve())
    return cfg


def config_from_dict(d: dict[str, Any]) -> Config:
    """Inverse of :meth:`Config.to_dict` (used to ship configs to Ray workers and checkpoints)."""
    cfg = Config()
    apply(cfg, d)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation


def _date_range(v: Any) -> bool:
    if not isinstance(v, list) or len(v) != 2:
        return False
    a, b = (np.datetime64(str(x), "ns") for x in v)
    return bool(a <= b)


POSITIVE = in_range(0, lo_open=True)
NON_NEGATIVE = in_range(0)
FRACTION = in_range(0, 1, lo_open=True)  # (0, 1]
DATE_RANGE = Rule("[start, end] ISO dates with start <= end, e.g. [2000-01-01, 2002-12-31]", _date_range)
GUIDANCE_METHODS = registry("align_rl.diffusion.guidance", "METHODS")
PAIR_MODES = registry("align_rl.alignment.pairs", "MODES")

PRECISION = choice("auto", "fp32", "bf16")  # <model>.precision (align_rl.training.loop.PRECISIONS)

RANGES: dict[str, Rule] = {
    # full key -> rule; "key[]" applies to every list entry, "key.*" to every mapping value
    "run.seed": integer(0),
    "run.device": choice("auto", "cpu", "cuda"),
    "run.wandb_mode": choice("offline", "online", "disabled"),
    "data.source": choice("simulate", "zarr"),
    "data.coarsen": integer(1),
    "data.days": integer(1),
    "data.members": integer(1),
    "data.seed": integer(0),
    "data.burn_in_days": NON_NEGATIVE,
    "data.gap_days": NON_NEGATIVE,
    "data.train": DATE_RANGE,
    "data.val": DATE_RANGE,
    "data.pref": DATE_RANGE,
    "data.test": DATE_RANGE,
    "obs.density": FRACTION,
    "obs.sigma_o": NON_NEGATIVE,
    "obs.mode": choice("point", "column"),
    "obs.r_floor": POSITIVE,
    "forecaster.kind": registry("align_rl.models.loading", "KINDS"),
    "forecaster.hidden": integer(1),
    "forecaster.depth": integer(1),
    "forecaster.steps": integer(1),
    "forecaster.precision": PRECISION,
    "forecaster.val_every": integer(0),  # 0: pretrain.val_every
    "forecaster.patience": integer(0),  # 0: no early stopping
    "forecaster.lr": POSITIVE,
    "forecaster.batch_size": integer(1),
    "vae.preset": choice("demo", "paper"),
    "vae.patch": integer(1),
    "vae.latent_channels": integer(1),
    "vae.embed_dim": integer(1),
    "vae.depth": integer(1),
    "vae.heads": integer(1),
    "vae.window": integer(1),
    "vae.kl_weight": NON_NEGATIVE,
    "vae.steps": integer(1),
    "vae.precision": PRECISION,
    "vae.num_workers": integer(0),  # 0: pretrain.num_workers
    "vae.cpus_per_worker": integer(0),  # 0: pretrain.cpus_per_worker
    "vae.val_every": integer(0),  # 0: pretrain.val_every
    "vae.patience": integer(0),  # 0: no early stopping
    "vae.lr": POSITIVE,
    "vae.batch_size": integer(1),
    "diffusion.preset": choice("demo", "paper"),
    "diffusion.patch": integer(1),
    "diffusion.embed_dim": integer(1),
    "diffusion.depth": integer(1),
    "diffusion.heads": integer(1),
    "diffusion.eps_skip": choice("background", "gaussian", "none"),
    "diffusion.num_workers": integer(0),  # 0: pretrain.num_workers
    "diffusion.cpus_per_worker": integer(0),  # 0: pretrain.cpus_per_worker
    "diffusion.steps": integer(1),
    "diffusion.precision": PRECISION,
    "diffusion.val_every": integer(0),  # 0: pretrain.val_every
    "diffusion.patience": integer(0),  # 0: no early stopping
    "diffusion.lr": POSITIVE,
    "diffusion.batch_size": integer(1),
    "pretrain.num_workers": integer(0),  # 0: auto
    "pretrain.cpus_per_worker": integer(1),
    "pretrain.checkpoint_every": integer(1),
    "pretrain.val_every": integer(1),
    "pretrain.max_failures": integer(0),
    "pretrain.background_batch": integer(1),
    "sampler.steps": integer(1),
    "sampler.corrections": integer(0),
    "sampler.tau": POSITIVE,
    "sampler.members": integer(1),
    "sampler.decode": choice("anchored", "plain"),
    "sampler.autocast": choice("none", "bf16", "bf16_dps"),
    "data.stats_times": integer(0),  # 0: every training time
    "guidance.methods[]": GUIDANCE_METHODS,
    "guidance.dps_zeta": NON_NEGATIVE,
    "guidance.dps_likelihood": choice("norm", "gaussian"),
    "guidance.dps_gamma": NON_NEGATIVE,
    "rewards.weights.*": NON_NEGATIVE,
    "rewards.normalize": registry("align_rl.alignment.rewards", "NORMALIZATIONS"),
    "rewards.forecast_hours": Rule("a positive multiple of 6 (hours of 6 h forecast steps)",
                                   lambda v: isinstance(v, int) and v >= 6 and v % 6 == 0),
    "rewards.geo_level": Rule("a pressure level of the data (50, 100, …, 1000 hPa)",
                              lambda v: v in (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)),
    "rewards.geo_equator_band": in_range(0, 90, hi_open=True),
    "pairs.mode": PAIR_MODES,
    "pairs.candidates": integer(2),  # rewards compare candidates
    "pairs.backgrounds": integer(1),
    "pairs.pairs_per_background": integer(1),
    "pairs.top_k_phys": integer(1),
    "pairs.decile": in_range(0, 0.5, lo_open=True),  # top and bottom decile·N of N candidates
    "pairs.guidance": GUIDANCE_METHODS,
    "pairs.variants[]": PAIR_MODES,
    "dpo.beta": POSITIVE,
    "dpo.lr": POSITIVE,
    "dpo.batch_size": integer(1),
    "dpo.steps": integer(1),
    "dpo.seed": integer(0),
    "dpo.seeds": integer(1),
    "dpo.grad_clip": POSITIVE,
    "dpo.num_workers": integer(1),
    "dpo.checkpoint_every": integer(1),
    "dpo.mode": choice("offline", "online", "sync", "async"),
    "dpo.reuse": integer(1),
    "dpo.refresh_reference": integer(0),
    "dpo.sync_every": integer(1),
    "dpo.staleness": integer(0),
    "dpo.online_backgrounds": integer(1),
    "dpo.max_failures": integer(0),
    "dpo.cpus_per_worker": POSITIVE,
    "dpo.gpus_per_worker": in_range(0, 1, lo_open=True),
    "dpo.anchor": NON_NEGATIVE,
    "dpo.t_min": in_range(0, 1, hi_open=True),
    "dpo.t_max": in_range(0, 1, lo_open=True),
    "dpo.warmup_steps": integer(0),
    "dpo.val_every": integer(0),
    "dpo.val_backgrounds": integer(1),
    "dpo.val_members": integer(2),  # rewards compare candidates
    "actors.samplers": integer(1),
    "actors.forecasters": integer(1),
    "actors.rewarders": integer(1),
    "actors.cpus_per_actor": NON_NEGATIVE,
    "actors.gpus_per_actor": NON_NEGATIVE,
    "actors.max_restarts": integer(-1),  # -1: restart without limit (Ray)
    "actors.max_task_retries": integer(-1),
    "actors.batch_size": integer(1),
    "eval.times": integer(1),
    "eval.members": integer(2),  # ensemble mean, CRPS and spread/skill need 2
    "eval.ablations[]": choice("density", "error"),
    "eval.densities[]": FRACTION,
    "eval.errors[]": NON_NEGATIVE,
    "eval.map_samples": integer(1),
    "eval.blend_times": integer(0),  # 0: no Blend-val baseline
    "eval.batch_size": integer(1),
    "eval.sampling": choice("auto", "actor", "driver"),
}
"""The range or choices of every config key that has one (full dotted key)."""


PATH_KEYS = ("run.workdir", "run.root", "data.path", "data.normalization", "forecaster.path",
             "forecaster.mean_path", "forecaster.std_path", "pairs.store", "eval.out")
"""Config keys that hold a file or folder path (``~`` is expanded by :func:`expand_paths`)."""


def _key(cfg: Config, key: str) -> Any:
    sec, name = key.split(".")
    return getattr(getattr(cfg, sec), name)


def _path_rules(cfg: Config) -> list[str]:
    out = []
    for key in PATH_KEYS:
        v = _key(cfg, key)
        if v is not None and not str(v).strip():
            out.append(f"{key} is an empty path; give a file or folder path"
                       + ("" if key == "run.workdir" else " or leave it unset (the default)"))
    return out


def _shape_rules(cfg: Config, grid: tuple[int, int]) -> list[str]:
    """The networks' sizes against the grid and each other (:mod:`align_rl.models.shapes`)."""
    v, d = cfg.vae, cfg.diffusion
    keys = ("patch", "window", "embed_dim", "heads", "latent_channels")
    if not all(isinstance(getattr(v, k), int) and getattr(v, k) >= 1 for k in keys):
        return []  # a range rule names it
    out = vae_problems(v, grid)
    if out or not all(isinstance(getattr(d, k), int) and getattr(d, k) >= 1
                      for k in ("patch", "embed_dim", "heads")):
        return out
    return dit_problems(d, vae_latent_shape(v, grid))


EVAL_MODEL_NAMES = ("reference", "Align-M", "Align-P")
"""The model names the main job evaluates (``python -m align_rl.evaluate`` adds the names of
its ``--models``)."""


def _kind_needs_path(kind: str) -> bool:
    """A registered forecaster kind that reads ``forecaster.path`` (an unknown one is reported by
    its own rule)."""
    from align_rl.models.loading import KINDS

    return kind in KINDS and KINDS[kind].needs_path


def _cross_rules(cfg: Config) -> list[str]:
    """Rules that tie keys together or need more than a range."""
    out: list[str] = _path_rules(cfg)
    try:
        grid = Grid.parse(cfg.data.grid).shape
    except InputError as exc:
        out.append(f"data.grid: {exc}")
        grid = None
    if grid is not None:
        out += _shape_rules(cfg, grid)
    pc = cfg.pairs
    if is_num(pc.top_k_phys) and is_num(pc.candidates) and 2 * pc.top_k_phys > pc.candidates:
        out.append(f"pairs.top_k_phys={pc.top_k_phys} needs 2 × {pc.top_k_phys} = {2 * pc.top_k_phys} "
                   f"candidates (k winners and k losers, disjoint), but pairs.candidates={pc.candidates}; "
                   f"use pairs.top_k_phys <= {max(1, pc.candidates // 2)}")
    if cfg.eval.baseline not in cfg.eval.models:
        out.append(f"eval.baseline={cfg.eval.baseline!r} must be one of eval.models "
                   f"({', '.join(map(str, cfg.eval.models)) or 'none'}): % changes are against it")
    if not cfg.eval.models:
        out.append("eval.models must name at least one model (reference)")
    if len(set(cfg.eval.models)) != len(cfg.eval.models):
        out.append(f"eval.models={cfg.eval.models} names a model twice")
    if cfg.data.source == "zarr" and not cfg.data.path:
        out.append("data.source=zarr needs data.path=PATH_OR_URL of a WeatherBench2 store")
    if not cfg.forecaster.path and _kind_needs_path(cfg.forecaster.kind):
        out.append(f"forecaster.kind={cfg.forecaster.kind} needs forecaster.path=FILE")
    w = cfg.rewards.weights
    if all(is_num(v) for v in w.values()) and sum(w.values()) <= 0:
        out.append("rewards.weights must have at least one positive weight")
    if "P" in cfg.pairs.variants and "phys" not in cfg.rewards.names:
        out.append("pairs.variants has P (ranked by Geo-Score): add phys to rewards.names")
    if not cfg.pairs.variants:
        out.append("pairs.variants must name at least one pair mode (M and/or P)")
    if is_num(cfg.dpo.t_min) and is_num(cfg.dpo.t_max) and not cfg.dpo.t_min < cfg.dpo.t_max:
        out.append(f"dpo.t_min={cfg.dpo.t_min} must be below dpo.t_max={cfg.dpo.t_max} "
                   "(t is drawn from U(t_min, t_max))")
    if not cfg.guidance.methods:
        out.append("guidance.methods must name at least one method (obsfree, repaint, dps)")
    if cfg.run.device == "cuda" and is_num(cfg.actors.gpus_per_actor) and cfg.actors.gpus_per_actor <= 0:
        out.append("run.device=cuda needs actors.gpus_per_actor > 0 (the share of a GPU each actor "
                   "reserves, e.g. 0.25), or run.device=auto")
    if cfg.run.root is not None and not str(cfg.run.root).strip():
        out.append("run.root must be a folder path (or unset)")
    return out


def validate(cfg: Config) -> None:
    """One pass over the whole configuration; raises one :class:`ConfigError` listing every
    problem, each naming the full key (``data.days``) and what is allowed. The ``run.plugins``
    modules are imported first (:mod:`align_rl.plugins`): the names they register count."""
    plugins.load(cfg.run.plugins)
    raise_problems(check_rules(cfg, RANGES) + _cross_rules(cfg), "config")
