"""One configuration for every command: dataclass sections, YAML files and ``key=value`` overrides.

Load order: the preset (``demo`` or ``paper``), then ``--config FILE`` (YAML, nested like the
sections below), then ``section.key=value`` overrides from the command line (values parsed as YAML,
so ``dpo.beta=8000``, ``rewards.weights={assim: 1, forecast: 1, phys: 0}``, ``guidance.methods=[dps]``).
Unknown keys and badly typed values raise :class:`ConfigError` naming the key and the fix.

:func:`validate` is one pass over the whole configuration, run by :func:`load_config` before any
command does work: every float must be finite, every key in :data:`RANGES` must satisfy its rule
(a range, an integer bound or a set of choices), and a few rules tie keys together. A new numeric
config field needs an entry in :data:`RANGES` (``tests/test_hardening.py`` checks that every one
has). YAML values are read as in YAML 1.2: ``0x40``, ``0o17``, ``1_000`` or ``1:20`` stay strings,
and ``1e-5`` is a number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from align_rl.errors import ConfigError


# a field whose metadata holds HASH_UNLESS_SET is left out of the cache hashes while it holds its
# default, so that adding it does not invalidate the caches of runs made before it
HASH_UNLESS_SET = {"hash": "unless-set"}


@dataclass
class RunConfig:
    name: str = "default"
    # every artifact of a run lives below this folder; a relative workdir is resolved, when the
    # config is loaded, against run.root, else $ALIGN_RL_ROOT, else (the driver of a `ray job
    # submit`, whose working directory is a temporary copy) ~/align_rl, else the current directory
    workdir: str = "runs/default"
    root: str | None = None  # base of a relative run.workdir (shared storage on a cluster)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "align_rl"


@dataclass
class DataConfig:
    source: str = "simulate"  # simulate (embedded Held–Suarez world) | zarr (WeatherBench2-layout store)
    path: str | None = None  # store path or gs:// URL when source == zarr
    grid: str = "32x64"  # target grid NLATxNLON of the cell-centred WeatherBench family
    coarsen: int = 1  # exact block-average factor for a cell-centred store (else: regridded to grid)
    # statistics of a zarr store without a `normalization` attribute: a JSON file (python -m
    # align_rl.data stats STORE --out FILE) or a store holding them; unset: computed over data.train
    # on data.grid and kept in <workdir>/normalization/ (never written into the store)
    normalization: str | None = field(default=None, metadata=HASH_UNLESS_SET)
    # at most this many evenly spaced data.train times for those statistics (0: all of them)
    stats_times: int = field(default=1000, metadata=HASH_UNLESS_SET)
    days: int = 44  # simulated days per member (the embedded world; 6 × 44 × 4 = 1,056 states)
    members: int = 6  # independent simulated trajectories; member m is stored as year 2000 + m
    seed: int = 0
    burn_in_days: float = 15.0  # embedded world: discarded days after perturbing the members
    # time ranges [start, end] (inclusive, ISO dates); the embedded world maps members to years
    train: list[str] = field(default_factory=lambda: ["2000-01-01", "2002-12-31"])
    val: list[str] = field(default_factory=lambda: ["2003-01-01", "2003-12-31"])
    pref: list[str] = field(default_factory=lambda: ["2004-01-01", "2004-12-31"])
    test: list[str] = field(default_factory=lambda: ["2005-01-01", "2005-12-31"])


@dataclass
class ObsConfig:
    density: float = 0.01  # fraction of observed (channel, point) pairs
    sigma_o: float = 0.0  # observation-error std, normalised units
    mode: str = "point"  # point (Bernoulli per channel and point) | column (all channels at a point)
    r_floor: float = 1e-2  # floor on the observation-error variance R, normalised units


@dataclass
class ForecasterConfig:
    kind: str = "emulator"  # emulator | onnx | torch
    path: str | None = None  # ONNX file or torch checkpoint for kind onnx / torch
    mean_path: str | None = None  # FengWu-style mean/std files (npy) for kind onnx
    std_path: str | None = None
    lat_north_to_south: bool = True  # ONNX model expects latitude descending (FengWu)
    # emulator (demo sizes measured in bench/bench_models.py: ~0.23 s per training step of 16 on
    # one idle core at 32x64)
    hidden: int = 64
    depth: int = 4
    steps: int = 800
    lr: float = 1e-3
    batch_size: int = 16


@dataclass
class VAEConfig:
    preset: str = "demo"  # demo | paper
    patch: int = 4
    latent_channels: int = 69
    embed_dim: int = 128
    depth: int = 3  # window blocks in the encoder and again in the decoder
    heads: int = 4
    window: int = 4  # in tokens (patches); must divide H/patch and W/patch
    kl_weight: float = 1e-6
    # 3,000 steps: reconstruction MSE 0.0070 and Geo-Score 78 on the validation split, against
    # 0.0200 and 48 after 1,000 (BENCHMARKS.md, "Method study")
    steps: int = 3000
    lr: float = 1e-3
    batch_size: int = 16


@dataclass
class DiffusionConfig:
    preset: str = "demo"  # demo | paper
    patch: int = 2
    embed_dim: int = 288  # must be >= latent_channels·patch² (69·4 = 276), else tokens lose information
    depth: int = 4
    heads: int = 4
    background_skip: bool = False  # also add z_b's patch embedding to the noisy tokens (beside cross-attention)
    # output skip: ε̂ = E_G[ε | z_t, z_b] + F_θ, the network learning the residual from a Gaussian
    # optimum, so ε̂ follows the scale of z_t (the final LayerNorm cannot) and the sampler's ODE
    # stays stable. background: z_0 ~ N(z_b, s²) with s² the per-channel latent background error
    # of the training pairs; gaussian: z_0 ~ N(0, I); none: no skip (checkpoints without the key)
    eps_skip: str = "background"
    # Ray Train workers for the score model (0 = pretrain.num_workers) and CPUs (= torch threads)
    # per worker (0 = pretrain.cpus_per_worker): on CPUs one 2-thread worker beats 2 DDP workers
    num_workers: int = 1
    cpus_per_worker: int = 2
    steps: int = 2000
    lr: float = 1e-3
    batch_size: int = 32


@dataclass
class PretrainConfig:
    # DDP workers (Ray Train); 0 = auto: one per free CPU of the Ray cluster (/ cpus_per_worker),
    # at most 2 (on a 2-core machine 2 workers x 1 thread keep both cores busy)
    num_workers: int = 0
    use_gpu: bool = False
    cpus_per_worker: int = 1  # CPUs (= torch threads) per worker
    checkpoint_every: int = 250
    val_every: int = 250
    max_failures: int = 2
    background_batch: int = 32  # times per forecast-actor call when computing the 48 h backgrounds


@dataclass
class SamplerConfig:
    steps: int = 16  # K predictor steps (paper: 128; on the demo prior K = 16 is as accurate as 32)
    # C Langevin corrections per step (paper: 2); on the demo prior C = 0 is as accurate and faster
    corrections: int = 0
    tau: float = 0.1  # Langevin step size factor
    members: int = 8  # ensemble members per background
    # how analyses leave the latent space (docs/method.md §4): anchored = x_b + D(z_a) − D(E(x_b))
    # (the codec's error on the background cancels); plain = D(z_a) (the paper)
    decode: str = "anchored"


@dataclass
class GuidanceConfig:
    methods: list[str] = field(default_factory=lambda: ["obsfree", "repaint", "dps"])
    dps_zeta: float = 0.7  # DPS guidance scale ζ (demo: chosen on the val split, BENCHMARKS.md)
    dps_likelihood: str = "norm"  # norm (‖r‖_R, the paper) | gaussian (½‖r‖²_{R+γ(σ/μ)²})
    dps_gamma: float = 1e-2


@dataclass
class RewardConfig:
    names: list[str] = field(default_factory=lambda: ["assim", "forecast", "phys"])
    weights: dict[str, float] = field(
        default_factory=lambda: {"assim": 1.0, "forecast": 1.0, "phys": 1.0}
    )
    # each component is put on one scale within its background before weighting (docs/method.md §7):
    # zscore over the N candidates | rank (scaled to [-1, 1]) | none (the raw weighted sum)
    normalize: str = "zscore"
    forecast_hours: int = 48
    geo_level: int = 500
    geo_equator_band: float = 15.0


@dataclass
class PairsConfig:
    mode: str = "M"  # M (top/bottom fraction of the composite) | P (top/bottom k by Geo-Score)
    candidates: int = 16  # N candidates per background (paper: 32)
    backgrounds: int = 64  # preference backgrounds drawn from the pref split
    pairs_per_background: int = 16
    top_k_phys: int = 4  # -P: winners = top k by Geo-Score, losers = bottom k (paper: 5 of 32)
    # -M: winners/losers = top/bottom fraction of the composite (the paper: a decile of 32
    # candidates; a quarter of 16 gives 4 × 4 pairs per background, ~1,000 pairs from 64)
    decile: float = 0.25
    # candidates are drawn from p(z | z_b) (the paper); a guided method is an option
    guidance: str = "obsfree"
    store: str | None = None  # default: <workdir>/pairs.zarr
    # pair modes the main job aligns a model for, one aligned model each (M and/or P)
    variants: list[str] = field(default_factory=lambda: ["M", "P"])


@dataclass
class DPOConfig:
    # β of L = −log σ(−β(Δ_w − Δ_l)); Δ = ‖ε−ε_θ‖² − ‖ε−ε_ref‖² as the MEAN over latent elements,
    # no factor ½, ω(λ_t) ≡ 1, the paper's T folded into β (align_rl/alignment/dpo.py)
    beta: float = 4000.0  # the paper's 8000 in the reference code's −½β convention
    lr: float = 1e-5
    batch_size: int = 16
    steps: int = 200  # validation on the demo world peaks at 100-200 steps (BENCHMARKS.md)
    grad_clip: float = 1.0
    # guards (docs/method.md §9.3): λ of the winners' denoising anchor λ·Δ_w (0 = plain DPO); the
    # range that t is drawn from (the paper: [0, 1]); linear learning-rate warm-up steps
    anchor: float = 5.0
    t_min: float = 0.0
    t_max: float = 1.0
    warmup_steps: int = 25
    # validation-driven selection: every val_every steps (0 = off) the policy draws val_members
    # candidates for val_backgrounds backgrounds of data.val, scored against the reference's
    # (align_rl/alignment/validation.py); the best checkpoint (val/reward_gain) is the result
    val_every: int = 50
    val_backgrounds: int = 8
    val_members: int = 8
    num_workers: int = 1
    use_gpu: bool = False
    checkpoint_every: int = 100
    mode: str = "offline"  # offline | online
    sync_every: int = 50  # online: learner steps between weight syncs / pair refreshes
    staleness: int = 2  # online: pairs older than this many policy versions leave the buffer
    online_backgrounds: int = 8  # online: new backgrounds per refresh
    max_failures: int = 2  # worker-group restarts from the last checkpoint before a run fails
    cpus_per_worker: float = 2.0  # CPUs of each learner worker (and its torch threads)


@dataclass
class ActorsConfig:
    samplers: int = 1
    forecasters: int = 1
    rewarders: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    max_restarts: int = 3
    max_task_retries: int = 3
    batch_size: int = 4  # backgrounds per sampler / reward actor call


@dataclass
class EvalConfig:
    times: int = 12  # held-out analysis times from the test split (intervals are over these)
    members: int = 4  # ensemble members per analysis (≥ 2: ensemble mean, CRPS, spread/skill)
    models: list[str] = field(default_factory=lambda: ["reference"])
    baseline: str = "reference"
    ablations: list[str] = field(default_factory=list)  # density | error
    densities: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.05, 0.1])
    errors: list[float] = field(default_factory=lambda: [0.0, 0.02, 0.05])
    map_samples: int = 10
    out: str | None = None  # default: <workdir>/eval
    batch_size: int = 8  # backgrounds per sampler call (each call runs batch_size × members rows)


@dataclass
class ChecksConfig:
    # plausibility of physical inputs read from stores (temperature in K, geopotential in m²/s²,
    # wind in m/s, humidity in kg/kg, pressure in Pa); false for unusual data
    units: bool = True
    # forecaster.kind=torch may name a pickled module: loading it runs code from the file, so it is
    # refused unless this is true (TorchScript files and align_rl checkpoints need no trust)
    trust_pickle: bool = False


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    obs: ObsConfig = field(default_factory=ObsConfig)
    forecaster: ForecasterConfig = field(default_factory=ForecasterConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    actors: ActorsConfig = field(default_factory=ActorsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Short stable hash of some sections, used as a cache key for derived artifacts (fields
        marked ``HASH_UNLESS_SET`` count only when they differ from their default)."""
        d = {}
        for name in sections:
            sec = getattr(self, name)
            v = dataclasses.asdict(sec)
            for f in dataclasses.fields(sec):
                if f.metadata.get("hash") == "unless-set" and getattr(sec, f.name) == f.default:
                    v.pop(f.name)
            d[name] = v
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    "paper": {
        "data": {"grid": "128x256"},
        "vae": {"preset": "paper", "embed_dim": 1024, "depth": 24, "heads": 16, "window": 8,
                "lr": 2e-4, "batch_size": 32, "steps": 140_000},
        "diffusion": {"preset": "paper", "embed_dim": 1024, "depth": 24, "heads": 16,
                      "steps": 100_000, "lr": 1e-4, "batch_size": 32,
                      "num_workers": 0, "cpus_per_worker": 0},  # the pretrain section's GPU workers
        "sampler": {"steps": 128, "corrections": 2, "members": 32, "decode": "plain"},
        "guidance": {"dps_zeta": 1.0},
        "pairs": {"candidates": 32, "decile": 0.1, "top_k_phys": 5},
        "dpo": {"beta": 4000.0, "lr": 1e-5, "batch_size": 32, "steps": 500},
    },
}


class _Loader(yaml.SafeLoader):
    """YAML 1.2-style scalars: only decimal integers are integers (``0x40``, ``0o17``, ``1_000`` and
    the sexagesimal ``1:20`` stay strings) and ``1e-5`` is a float, as in the 1.2 core schema."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """Parse YAML text as config values are parsed (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0], key) for v in value] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping like {{a: 1, b: 2}}, got {value!r}")
        return {str(k): _coerce(v, args[1], key) for k, v in value.items()} if args else dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(
                f"unknown config key {key!r}; valid keys here: {', '.join(sorted(names))}"
            )
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{key} is a section; give it a mapping, e.g. {key}.KEY=VALUE")
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted!r} goes below a value that is not a section")
    d[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["dpo.beta=8000", "guidance.methods=[dps]"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        k, v = item.split("=", 1)
        try:
            val = yaml_load(v) if v != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        _set_dotted(out, k.strip(), val)
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    preset: str | None = None,
) -> Config:
    """Build the configuration: preset, then YAML file, then overrides; then validate."""
    cfg = Config()
    file_data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            file_data = yaml_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(file_data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    preset = preset or ov.pop("preset", None) or file_data.pop("preset", None) or "demo"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    _apply(cfg, PRESETS[preset])
    _apply(cfg, file_data)
    _apply(cfg, ov)
    validate(cfg)
    resolve_workdir(cfg)
    return cfg


def in_ray_job() -> bool:
    """True in the driver of a ``ray job submit`` (its working directory is a temporary copy)."""
    import os

    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")) or \
        "runtime_resources/working_dir_files" in os.getcwd()


def resolve_workdir(cfg: Config) -> Config:
    """Make ``cfg.run.workdir`` absolute (see :class:`RunConfig`): a relative one is taken below
    ``run.root``, else ``$ALIGN_RL_ROOT``, else ``~/align_rl`` in the driver of a ``ray job
    submit`` (so caches and resumable checkpoints outlive the job's temporary folder), else the
    current directory. Returns ``cfg`` (changed in place)."""
    import os

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
    _apply(cfg, d)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class Rule:
    """What a config value must be: ``ok(value)`` and the wording for the error message."""

    text: str
    ok: Callable[[Any], bool]

    def check(self, key: str, value: Any) -> str | None:
        try:
            good = bool(self.ok(value))
        except (TypeError, ValueError):
            good = False
        return None if good else f"{key}={value!r} must be {self.text}"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def in_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
             hi_open: bool = False) -> Rule:
    """A finite number within ``lo``..``hi`` (open or closed ends)."""
    if lo is not None and hi is not None:
        text = f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        text = f"a finite number {'<' if hi_open else '<='} {hi:g}"

    def ok(v):
        if not _is_num(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if hi_open else v > hi))

    return Rule(text, ok)


def integer(lo: int, hi: int | None = None) -> Rule:
    """An integer ``>= lo`` (and ``<= hi``)."""
    text = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    return Rule(text, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo
                and (hi is None or v <= hi))


def choice(*allowed: Any) -> Rule:
    """One of ``allowed``."""
    return Rule(f"one of {', '.join(map(str, allowed))}", lambda v: v in allowed)


def _date_range(v: Any) -> bool:
    import numpy as np

    if not isinstance(v, list) or len(v) != 2:
        return False
    a, b = (np.datetime64(str(x), "ns") for x in v)
    return bool(a <= b)


POSITIVE = in_range(0, lo_open=True)
NON_NEGATIVE = in_range(0)
FRACTION = in_range(0, 1, lo_open=True)  # (0, 1]
DATE_RANGE = Rule("[start, end] ISO dates with start <= end, e.g. [2000-01-01, 2002-12-31]", _date_range)
GUIDANCE_METHODS = ("obsfree", "repaint", "dps")
PAIR_MODES = ("M", "P")

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
    "data.train": DATE_RANGE,
    "data.val": DATE_RANGE,
    "data.pref": DATE_RANGE,
    "data.test": DATE_RANGE,
    "obs.density": FRACTION,
    "obs.sigma_o": NON_NEGATIVE,
    "obs.mode": choice("point", "column"),
    "obs.r_floor": POSITIVE,
    "forecaster.kind": choice("emulator", "onnx", "torch"),
    "forecaster.hidden": integer(1),
    "forecaster.depth": integer(1),
    "forecaster.steps": integer(1),
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
    "data.stats_times": integer(0),  # 0: every training time
    "guidance.methods[]": choice(*GUIDANCE_METHODS),
    "guidance.dps_zeta": NON_NEGATIVE,
    "guidance.dps_likelihood": choice("norm", "gaussian"),
    "guidance.dps_gamma": NON_NEGATIVE,
    "rewards.weights.*": NON_NEGATIVE,
    "rewards.normalize": choice("zscore", "rank", "none"),
    "rewards.forecast_hours": Rule("a positive multiple of 6 (hours of 6 h forecast steps)",
                                   lambda v: isinstance(v, int) and v >= 6 and v % 6 == 0),
    "rewards.geo_level": Rule("a pressure level of the data (50, 100, …, 1000 hPa)",
                              lambda v: v in (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)),
    "rewards.geo_equator_band": in_range(0, 90, hi_open=True),
    "pairs.mode": choice(*PAIR_MODES),
    "pairs.candidates": integer(2),  # rewards compare candidates
    "pairs.backgrounds": integer(1),
    "pairs.pairs_per_background": integer(1),
    "pairs.top_k_phys": integer(1),
    "pairs.decile": in_range(0, 0.5, lo_open=True),  # top and bottom decile·N of N candidates
    "pairs.guidance": choice(*GUIDANCE_METHODS),
    "pairs.variants[]": choice(*PAIR_MODES),
    "dpo.beta": POSITIVE,
    "dpo.lr": POSITIVE,
    "dpo.batch_size": integer(1),
    "dpo.steps": integer(1),
    "dpo.grad_clip": POSITIVE,
    "dpo.num_workers": integer(1),
    "dpo.checkpoint_every": integer(1),
    "dpo.mode": choice("offline", "online"),
    "dpo.sync_every": integer(1),
    "dpo.staleness": integer(0),
    "dpo.online_backgrounds": integer(1),
    "dpo.max_failures": integer(0),
    "dpo.cpus_per_worker": POSITIVE,
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
    "eval.batch_size": integer(1),
}
"""The range or choices of every config key that has one (full dotted key)."""


def _non_finite(key: str, value: Any) -> list[str]:
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{key}={value!r} must be a finite number"]
    if isinstance(value, (list, tuple)):
        return [m for i, v in enumerate(value) for m in _non_finite(f"{key}[{i}]", v)]
    if isinstance(value, dict):
        return [m for k, v in value.items() for m in _non_finite(f"{key}.{k}", v)]
    return []


def _cross_rules(cfg: Config) -> list[str]:
    """Rules that tie keys together or need more than a range."""
    from align_rl.errors import InputError
    from align_rl.io.grid import Grid

    out: list[str] = []
    try:
        Grid.parse(cfg.data.grid)
    except InputError as exc:
        out.append(f"data.grid: {exc}")
    if cfg.data.source == "zarr" and not cfg.data.path:
        out.append("data.source=zarr needs data.path=PATH_OR_URL of a WeatherBench2 store")
    if cfg.forecaster.kind in ("onnx", "torch") and not cfg.forecaster.path:
        out.append(f"forecaster.kind={cfg.forecaster.kind} needs forecaster.path=FILE")
    w = cfg.rewards.weights
    if all(_is_num(v) for v in w.values()) and sum(w.values()) <= 0:
        out.append("rewards.weights must have at least one positive weight")
    if "P" in cfg.pairs.variants and "phys" not in cfg.rewards.names:
        out.append("pairs.variants has P (ranked by Geo-Score): add phys to rewards.names")
    if not cfg.pairs.variants:
        out.append("pairs.variants must name at least one pair mode (M and/or P)")
    if _is_num(cfg.dpo.t_min) and _is_num(cfg.dpo.t_max) and not cfg.dpo.t_min < cfg.dpo.t_max:
        out.append(f"dpo.t_min={cfg.dpo.t_min} must be below dpo.t_max={cfg.dpo.t_max} "
                   "(t is drawn from U(t_min, t_max))")
    if not cfg.guidance.methods:
        out.append("guidance.methods must name at least one method (obsfree, repaint, dps)")
    if cfg.run.root is not None and not str(cfg.run.root).strip():
        out.append("run.root must be a folder path (or unset)")
    return out


def validate(cfg: Config) -> None:
    """One pass over the whole configuration; raises one :class:`ConfigError` listing every
    problem, each naming the full key (``data.days``) and what is allowed."""
    problems: list[str] = []
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        for f in dataclasses.fields(section):
            key = f"{sec.name}.{f.name}"
            value = getattr(section, f.name)
            bad = _non_finite(key, value)
            problems += bad
            if bad:
                continue
            if key in RANGES:
                problems.append(RANGES[key].check(key, value))
            if f"{key}[]" in RANGES and isinstance(value, list):
                problems += [RANGES[f"{key}[]"].check(f"{key}[{i}]", v) for i, v in enumerate(value)]
            if f"{key}.*" in RANGES and isinstance(value, dict):
                problems += [RANGES[f"{key}.*"].check(f"{key}.{k}", v) for k, v in value.items()]
    problems = [p for p in problems if p]
    problems += _cross_rules(cfg)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} bad config values: " + "; ".join(problems))
