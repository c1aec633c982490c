"""One configuration for every command: dataclass sections, YAML files and ``key=value`` overrides.

Load order: the preset (``demo`` or ``paper``), then ``--config FILE`` (YAML, nested like the
sections below), then ``section.key=value`` overrides from the command line (values parsed as YAML,
so ``dpo.beta=8000``, ``rewards.weights={assim: 1, forecast: 1, phys: 0}``, ``guidance.methods=[dps]``).
Unknown keys and badly typed values raise :class:`ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


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
    steps: int = 1000
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
    steps: int = 32  # K predictor steps (paper: 128)
    corrections: int = 1  # C Langevin corrections per step (paper: 2)
    tau: float = 0.1  # Langevin step size factor
    members: int = 8  # ensemble members per background


@dataclass
class GuidanceConfig:
    methods: list[str] = field(default_factory=lambda: ["obsfree", "repaint", "dps"])
    dps_zeta: float = 1.0  # DPS guidance scale ζ
    dps_likelihood: str = "norm"  # norm (‖r‖_R, the paper) | gaussian (½‖r‖²_{R+γ(σ/μ)²})
    dps_gamma: float = 1e-2


@dataclass
class RewardConfig:
    names: list[str] = field(default_factory=lambda: ["assim", "forecast", "phys"])
    weights: dict[str, float] = field(
        default_factory=lambda: {"assim": 1.0, "forecast": 1.0, "phys": 1.0}
    )
    forecast_hours: int = 48
    geo_level: int = 500
    geo_equator_band: float = 15.0


@dataclass
class PairsConfig:
    mode: str = "M"  # M (top/bottom decile of the composite) | P (top/bottom 5 by Geo-Score)
    candidates: int = 16  # N candidates per background (paper: 32)
    backgrounds: int = 32  # preference backgrounds drawn from the pref split
    pairs_per_background: int = 8
    top_k_phys: int = 5
    decile: float = 0.1
    guidance: str = "dps"  # guidance used to draw candidates
    store: str | None = None  # default: <workdir>/pairs.zarr
    # pair modes the main job aligns a model for, one aligned model each (M and/or P)
    variants: list[str] = field(default_factory=lambda: ["M"])


@dataclass
class DPOConfig:
    # β of L = −log σ(−β(Δ_w − Δ_l)); Δ = ‖ε−ε_θ‖² − ‖ε−ε_ref‖² as the MEAN over latent elements,
    # no factor ½, ω(λ_t) ≡ 1, the paper's T folded into β (align_rl/dpo.py)
    beta: float = 8000.0
    lr: float = 1e-5
    batch_size: int = 16
    steps: int = 300
    grad_clip: float = 1.0
    num_workers: int = 1
    use_gpu: bool = False
    checkpoint_every: int = 100
    mode: str = "offline"  # offline | online
    sync_every: int = 50  # online: learner steps between weight syncs / pair refreshes
    staleness: int = 2  # online: pairs older than this many policy versions leave the buffer
    online_backgrounds: int = 8  # online: new backgrounds per refresh
    max_failures: int = 2  # worker-group restarts from the last checkpoint before a run fails
    cpus_per_worker: float = 1.0  # CPUs of each learner worker (and its torch threads)


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
        "sampler": {"steps": 128, "corrections": 2, "members": 32},
        "pairs": {"candidates": 32},
        "dpo": {"beta": 8000.0, "lr": 1e-5, "batch_size": 32, "steps": 500},
    },
}


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
            val = yaml.safe_load(v) if v != "" else ""
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
            file_data = yaml.safe_load(p.read_text()) or {}
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


def _choice(value: Any, allowed: tuple, key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(value: float, key: str, strict: bool = True) -> None:
    if (value <= 0) if strict else (value < 0):
        raise ConfigError(f"{key}={value!r} must be {'>' if strict else '>='} 0")


def validate(cfg: Config) -> None:
    """Raise ConfigError for values that cannot work, naming the key and what is allowed."""
    from .grid import Grid
    from .errors import InputError

    try:
        Grid.parse(cfg.data.grid)
    except InputError as exc:
        raise ConfigError(f"data.grid: {exc}") from None
    _choice(cfg.data.source, ("simulate", "zarr"), "data.source")
    if cfg.data.source == "zarr" and not cfg.data.path:
        raise ConfigError("data.source=zarr needs data.path=PATH_OR_URL of a WeatherBench2 store")
    _choice(cfg.run.wandb_mode, ("offline", "online", "disabled"), "run.wandb_mode")
    _choice(str(cfg.diffusion.eps_skip), ("background", "gaussian", "none"), "diffusion.eps_skip")
    for key in ("num_workers", "cpus_per_worker"):
        if int(getattr(cfg.diffusion, key)) < 0:
            raise ConfigError(f"diffusion.{key}={getattr(cfg.diffusion, key)} must be >= 0 "
                              f"(0: use pretrain.{key})")
    _choice(cfg.run.device, ("auto", "cpu", "cuda"), "run.device")
    if not 0 < cfg.obs.density <= 1:
        raise ConfigError(f"obs.density={cfg.obs.density} must lie in (0, 1]")
    _positive(cfg.obs.sigma_o, "obs.sigma_o", strict=False)
    _positive(cfg.obs.r_floor, "obs.r_floor")
    _choice(cfg.obs.mode, ("point", "column"), "obs.mode")
    _choice(cfg.forecaster.kind, ("emulator", "onnx", "torch"), "forecaster.kind")
    for g in cfg.guidance.methods:
        _choice(g, ("obsfree", "repaint", "dps"), "guidance.methods[]")
    _choice(cfg.guidance.dps_likelihood, ("norm", "gaussian"), "guidance.dps_likelihood")
    _choice(cfg.pairs.guidance, ("obsfree", "repaint", "dps"), "pairs.guidance")
    _choice(cfg.pairs.mode, ("M", "P"), "pairs.mode")
    for v in cfg.pairs.variants:
        _choice(v, ("M", "P"), "pairs.variants[]")
    if cfg.dpo.sync_every < 1 or cfg.dpo.staleness < 0 or cfg.dpo.steps < 1:
        raise ConfigError("dpo.steps and dpo.sync_every must be >= 1, dpo.staleness >= 0")
    if cfg.actors.samplers < 1 or cfg.actors.rewarders < 1 or cfg.actors.batch_size < 1:
        raise ConfigError("actors.samplers, actors.rewarders and actors.batch_size must be >= 1")
    _choice(cfg.dpo.mode, ("offline", "online"), "dpo.mode")
    _positive(cfg.dpo.beta, "dpo.beta")
    _positive(cfg.dpo.lr, "dpo.lr")
    for k in ("steps", "members"):
        _positive(getattr(cfg.sampler, k), f"sampler.{k}")
    _positive(cfg.sampler.corrections, "sampler.corrections", strict=False)
    _positive(cfg.sampler.tau, "sampler.tau")
    _positive(cfg.guidance.dps_zeta, "guidance.dps_zeta", strict=False)
    _positive(cfg.guidance.dps_gamma, "guidance.dps_gamma", strict=False)
    for ab in cfg.eval.ablations:
        _choice(ab, ("density", "error"), "eval.ablations[]")
    if cfg.eval.members < 2:
        raise ConfigError("eval.members must be >= 2 (ensemble mean, CRPS and spread/skill need it)")
    for k in ("times", "batch_size", "map_samples"):
        _positive(getattr(cfg.eval, k), f"eval.{k}")
    for d in cfg.eval.densities:
        if not 0 < d <= 1:
            raise ConfigError(f"eval.densities entry {d} must lie in (0, 1]")
    for e in cfg.eval.errors:
        _positive(e, "eval.errors[]", strict=False)
    if cfg.pairs.candidates < 2:
        raise ConfigError("pairs.candidates must be >= 2 (rewards compare candidates)")
    for k, w in cfg.rewards.weights.items():
        if w < 0:
            raise ConfigError(f"rewards.weights.{k}={w} must be >= 0")
    if sum(cfg.rewards.weights.values()) <= 0:
        raise ConfigError("rewards.weights must have at least one positive weight")
    if cfg.data.stats_times < 0:
        raise ConfigError(f"data.stats_times={cfg.data.stats_times} must be >= 0 (0: every training time)")
    if cfg.run.root is not None and not str(cfg.run.root).strip():
        raise ConfigError("run.root must be a folder path (or unset)")
