"""The job configuration's sections: one dataclass per section, the whole :class:`Config`, and the
presets (``demo``, ``paper``).

Every field's range or choices are in :data:`align_rl.config.RANGES`; loading, overrides and
validation are in :mod:`align_rl.config`. Units and meanings are in the comments beside each field.

Every field also declares which caches its value enters (:mod:`align_rl.identity`, whose
:data:`~align_rl.identity.CACHES` names them): ``cached(default, "pairs", ...)``, or
``runtime(default)`` for a field that says how or where the job runs and enters no cache's key.
A field enters only the keys that hold its value directly; the caches built from those results
follow by content (a pretrained model's weights, the reference checkpoint's bytes, the preference
store's ``meta``). ``tests/test_identity_declared.py`` checks that every field declares one or the
other, so a new field cannot leave a stale cache unnoticed.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from align_rl import identity


def cached(default: Any, *caches: str, unless_set: bool = False) -> Any:
    """A field whose value enters the keys of ``caches`` (names of :data:`align_rl.identity.CACHES`).
    ``unless_set``: it counts only when it differs from ``default``, so that adding the field does
    not invalidate the caches of runs made before it. A list or dict default is copied per config."""
    unknown = [c for c in caches if c not in identity.CACHES]
    if unknown or not caches:
        raise ValueError(f"cached(...) names no cache or unknown caches {unknown}; "
                         f"choose from {', '.join(identity.CACHES)}, or declare the field runtime(...)")
    return _field(default, {identity.CACHES_META: tuple(caches), identity.UNLESS_SET_META: bool(unless_set)})


def runtime(default: Any) -> Any:
    """A field that says how or where the job runs (resources, folders, logging, the device), not
    what any cached result holds: it enters no cache's key."""
    return _field(default, {identity.CACHES_META: ()})


def _field(default: Any, metadata: dict) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    name: str = runtime("default")
    # every artifact of a run lives below this folder; a relative workdir is resolved, when the
    # config is loaded, against run.root, else $ALIGN_RL_ROOT, else (the driver of a `ray job
    # submit`, whose working directory is a temporary copy) ~/align_rl, else the current directory
    workdir: str = runtime("runs/default")
    root: str | None = runtime(None)  # base of a relative run.workdir (shared storage on a cluster)
    seed: int = cached(0, "forecaster", "vae", "diffusion", "pairs", "sweep_reference")
    device: str = runtime("auto")  # auto | cpu | cuda
    wandb_mode: str = runtime("offline")  # offline | online | disabled
    wandb_project: str = runtime("align_rl")
    # modules imported in the driver and in every Ray actor and Train worker before work starts
    # (align_rl.plugins): they register rewards, guidance methods and forecaster kinds by name
    plugins: list[str] = runtime([])


@dataclass
class DataConfig:
    # simulate (embedded Held–Suarez world) | zarr (WeatherBench2-layout store)
    source: str = cached("simulate", "dataset")
    # store path or gs:// URL when source == zarr (the store enters the caches by its content, not
    # its path: identity.dataset)
    path: str | None = runtime(None)
    # target grid NLATxNLON of the cell-centred WeatherBench family
    grid: str = cached("32x64", "dataset")
    # exact block-average factor for a cell-centred store (else: regridded to grid)
    coarsen: int = cached(1, "dataset")
    # statistics of a zarr store without a `normalization` attribute: a JSON file (python -m
    # align_rl.data stats STORE --out FILE) or a store holding them; unset: computed over data.train
    # on data.grid and kept in <workdir>/normalization/ (never written into the store)
    normalization: str | None = cached(None, "dataset", unless_set=True)
    # at most this many evenly spaced data.train times for those statistics (0: all of them)
    stats_times: int = cached(1000, "dataset", unless_set=True)
    # simulated days per member (the embedded world; 6 × 44 × 4 = 1,056 states)
    days: int = cached(44, "dataset")
    # independent simulated trajectories; member m is stored as year 2000 + m
    members: int = cached(6, "dataset")
    seed: int = cached(0, "dataset")
    # embedded world: one long run; days discarded after perturbing the restart, and days skipped
    # between members (>= 10 keeps the members', hence the splits', weather independent)
    burn_in_days: float = cached(1.0, "dataset")
    gap_days: float = cached(12.0, "dataset")
    # time ranges [start, end] (inclusive, ISO dates); the embedded world maps members to years
    train: list[str] = cached(["2000-01-01", "2002-12-31"], "dataset")
    val: list[str] = cached(["2003-01-01", "2003-12-31"], "dataset", "sweep_reference")
    pref: list[str] = cached(["2004-01-01", "2004-12-31"], "dataset", "pairs")
    test: list[str] = cached(["2005-01-01", "2005-12-31"], "dataset")


@dataclass
class ObsConfig:
    # fraction of observed (channel, point) pairs
    density: float = cached(0.01, "pairs", "sweep_reference")
    # observation-error std, normalised units
    sigma_o: float = cached(0.0, "pairs", "sweep_reference")
    # point (Bernoulli per channel and point) | column (all channels at a point)
    mode: str = cached("point", "pairs", "sweep_reference")
    # floor on the observation-error variance R, normalised units
    r_floor: float = cached(1e-2, "pairs", "sweep_reference")


@dataclass
class ForecasterConfig:
    # emulator | onnx | torch | a kind registered by a run.plugins module
    kind: str = cached("emulator", "forecaster")
    # ONNX file or torch checkpoint for kind onnx / torch (later caches: by content, through the
    # forecaster's fingerprint)
    path: str | None = cached(None, "forecaster")
    # FengWu-style mean/std files (npy) for kind onnx
    mean_path: str | None = cached(None, "forecaster")
    std_path: str | None = cached(None, "forecaster")
    # ONNX model expects latitude descending (FengWu)
    lat_north_to_south: bool = cached(True, "forecaster")
    # emulator (demo sizes measured in bench/bench_models.py: ~0.23 s per training step of 16 on
    # one idle core at 32x64)
    hidden: int = cached(64, "forecaster")
    depth: int = cached(4, "forecaster")
    steps: int = cached(800, "forecaster")
    lr: float = cached(1e-3, "forecaster")
    batch_size: int = cached(16, "forecaster")
    # precision of the training step's forward pass (align_rl.training.loop.autocast): auto = bf16
    # autocast where the hardware does bf16 arithmetic (1.5x faster steps on an AVX512-BF16 CPU,
    # BENCHMARKS.md), else fp32; fp32 | bf16 force it. Rollouts always run in float32
    precision: str = cached("auto", "forecaster")
    # early stopping as for diffusion (0, 0: validate every pretrain.val_every, train all steps)
    val_every: int = cached(0, "forecaster", unless_set=True)
    patience: int = cached(0, "forecaster", unless_set=True)


@dataclass
class VAEConfig:
    preset: str = cached("demo", "vae")  # demo | paper
    patch: int = cached(4, "vae")
    latent_channels: int = cached(69, "vae")
    embed_dim: int = cached(128, "vae")
    depth: int = cached(3, "vae")  # window blocks in the encoder and again in the decoder
    heads: int = cached(4, "vae")
    window: int = cached(4, "vae")  # in tokens (patches); must divide H/patch and W/patch
    kl_weight: float = cached(1e-6, "vae")
    # 3,000 steps: reconstruction MSE 0.0070 and Geo-Score 78 on the validation split, against
    # 0.0200 and 48 after 1,000 (BENCHMARKS.md, "Method study")
    steps: int = cached(3000, "vae")
    lr: float = cached(1e-3, "vae")
    batch_size: int = cached(16, "vae")
    # as forecaster.precision; fp32 by default: bf16 made the VAE's window-attention step no faster
    precision: str = cached("fp32", "vae", unless_set=True)
    # Ray Train workers and CPUs (= torch threads) per worker, as for diffusion: one 2-thread
    # worker took a VAE step 1.2x faster than 2 single-thread DDP workers (BENCHMARKS.md)
    num_workers: int = runtime(1)
    cpus_per_worker: int = runtime(2)
    # early stopping as for diffusion (0, 0: validate every pretrain.val_every, train all steps)
    val_every: int = cached(0, "vae", unless_set=True)
    patience: int = cached(0, "vae", unless_set=True)


@dataclass
class DiffusionConfig:
    preset: str = cached("demo", "diffusion")  # demo | paper
    patch: int = cached(2, "diffusion")
    # must be >= latent_channels·patch² (69·4 = 276), else tokens lose information
    embed_dim: int = cached(288, "diffusion")
    depth: int = cached(4, "diffusion")
    heads: int = cached(4, "diffusion")
    # also add z_b's patch embedding to the noisy tokens (beside cross-attention)
    background_skip: bool = cached(False, "diffusion")
    # output skip: ε̂ = E_G[ε | z_t, z_b] + F_θ, the network learning the residual from a Gaussian
    # optimum, so ε̂ follows the scale of z_t (the final LayerNorm cannot) and the sampler's ODE
    # stays stable. background: z_0 ~ N(z_b, s²) with s² the per-channel latent background error
    # of the training pairs; gaussian: z_0 ~ N(0, I); none: no skip (checkpoints without the key)
    eps_skip: str = cached("background", "diffusion")
    # Ray Train workers for the score model (0 = pretrain.num_workers) and CPUs (= torch threads)
    # per worker (0 = pretrain.cpus_per_worker): on CPUs one 2-thread worker beats 2 DDP workers
    num_workers: int = runtime(1)
    cpus_per_worker: int = runtime(2)
    steps: int = cached(2000, "diffusion")
    lr: float = cached(1e-3, "diffusion")
    batch_size: int = cached(32, "diffusion")
    precision: str = cached("auto", "diffusion")  # as forecaster.precision (1.4x on a bf16 CPU)
    # early stopping on the validation split's score-matching loss: validate every val_every
    # steps (0 = pretrain.val_every), stop after patience validations without a lower loss and
    # keep the best (0 = train all steps, keep the last). On the independent default world the
    # loss is lowest after a few hundred steps and rises after (BENCHMARKS.md, pretraining); 3
    # validations: the loss was flat within 1 % from step 150 to its minimum and rose after it
    val_every: int = cached(50, "diffusion")
    patience: int = cached(3, "diffusion")


@dataclass
class PretrainConfig:
    # DDP workers (Ray Train); 0 = auto: one per free CPU of the Ray cluster (/ cpus_per_worker),
    # at most 2 (on a 2-core machine 2 workers x 1 thread keep both cores busy)
    num_workers: int = runtime(0)
    use_gpu: bool = runtime(False)
    cpus_per_worker: int = runtime(1)  # CPUs (= torch threads) per worker
    checkpoint_every: int = runtime(250)
    # validation interval of a model whose own val_every is 0; with its patience it picks the model
    # kept, so it enters the pretrained models' keys (only when changed: older keys stay)
    val_every: int = cached(250, "forecaster", "vae", "diffusion", unless_set=True)
    max_failures: int = runtime(2)
    # times per forecast-actor call when computing the 48 h backgrounds
    background_batch: int = runtime(32)


@dataclass
class SamplerConfig:
    # K predictor steps (paper: 128; on the demo prior K = 16 is as accurate as 32)
    steps: int = cached(16, "pairs", "sweep_reference")
    # C Langevin corrections per step (paper: 2); on the demo prior C = 0 is as accurate and faster
    corrections: int = cached(0, "pairs", "sweep_reference")
    tau: float = cached(0.1, "pairs", "sweep_reference")  # Langevin step size factor
    members: int = cached(8, "pairs", "sweep_reference")  # ensemble members per background
    # how analyses leave the latent space (docs/method.md §4): anchored = x_b + D(z_a) − D(E(x_b))
    # (the codec's error on the background cancels); plain = D(z_a) (the paper)
    decode: str = cached("anchored", "pairs", "sweep_reference")
    # GPU speed (docs/method.md §5.3): bf16 autocast of the network passes on CUDA (none | bf16 |
    # bf16_dps: also DPS's differentiated pass); torch.compile of the score network in GPU actors
    autocast: str = cached("none", "pairs", "sweep_reference", unless_set=True)
    compile: bool = cached(False, "pairs", "sweep_reference", unless_set=True)


@dataclass
class GuidanceConfig:
    methods: list[str] = cached(["obsfree", "repaint", "dps"], "pairs", "sweep_reference")
    # DPS guidance scale ζ (demo: chosen on the val split, BENCHMARKS.md)
    dps_zeta: float = cached(0.7, "pairs", "sweep_reference")
    # norm (‖r‖_R, the paper) | gaussian (½‖r‖²_{R+γ(σ/μ)²})
    dps_likelihood: str = cached("norm", "pairs", "sweep_reference")
    dps_gamma: float = cached(1e-2, "pairs", "sweep_reference")


@dataclass
class RewardConfig:
    names: list[str] = cached(["assim", "forecast", "phys"], "pairs")
    weights: dict[str, float] = cached({"assim": 1.0, "forecast": 1.0, "phys": 1.0}, "dpo")
    # each component is put on one scale within its background before weighting (docs/method.md §7):
    # zscore over the N candidates | rank (scaled to [-1, 1]) | none (the raw weighted sum)
    normalize: str = cached("zscore", "dpo")
    forecast_hours: int = cached(48, "pairs")
    geo_level: int = cached(500, "pairs")
    geo_equator_band: float = cached(15.0, "pairs")


@dataclass
class PairsConfig:
    # M (top/bottom fraction of the composite) | P (top/bottom k by Geo-Score); the variant names
    # its DPO folder (dpo/<variant>-<mode>-<key>), so it is no part of the key
    mode: str = runtime("M")
    candidates: int = cached(16, "pairs", "dpo")  # N candidates per background (paper: 32)
    # preference backgrounds drawn from the pref split: at most this many (a larger value takes
    # every usable time, 158 on the default world, in the main job and in sweeps alike); 160 against 64 gave a larger gain on val at equal learner
    # steps, 3 seeds (BENCHMARKS.md, "Online against offline")
    backgrounds: int = cached(160, "dpo")
    pairs_per_background: int = cached(16, "dpo")
    # -P: winners = top k by Geo-Score, losers = bottom k (paper: 5 of 32)
    top_k_phys: int = cached(4, "dpo")
    # -M: winners/losers = top/bottom fraction of the composite (the paper: a decile of 32
    # candidates; a quarter of 16 gives 4 × 4 pairs per background, ~1,000 pairs from 64)
    decile: float = cached(0.25, "dpo")
    # candidates are drawn from p(z | z_b) (the paper); a guided method is an option
    guidance: str = cached("obsfree", "pairs", "dpo")
    store: str | None = runtime(None)  # default: <workdir>/pairs.zarr
    # pair modes the main job aligns a model for, one aligned model each (M and/or P)
    variants: list[str] = runtime(["M", "P"])


@dataclass
class DPOConfig:
    # β of L = −log σ(−β(Δ_w − Δ_l)); Δ = ‖ε−ε_θ‖² − ‖ε−ε_ref‖² as the MEAN over latent elements,
    # no factor ½, ω(λ_t) ≡ 1, the paper's T folded into β (align_rl/alignment/dpo.py)
    beta: float = cached(4000.0, "dpo")  # the paper's 8000 in the reference code's −½β convention
    lr: float = cached(1e-5, "dpo")
    batch_size: int = cached(16, "dpo")
    # validation on the demo world peaks at 100-200 steps (BENCHMARKS.md)
    steps: int = cached(200, "dpo")
    grad_clip: float = cached(1.0, "dpo")
    # guards (docs/method.md §9.3): λ of the winners' denoising anchor λ·Δ_w (0 = plain DPO); the
    # range that t is drawn from (the paper: [0, 1]); linear learning-rate warm-up steps
    anchor: float = cached(5.0, "dpo")
    t_min: float = cached(0.0, "dpo")
    t_max: float = cached(1.0, "dpo")
    warmup_steps: int = cached(25, "dpo")
    # validation-driven selection: every val_every steps (0 = off) the policy draws val_members
    # candidates for val_backgrounds backgrounds of data.val, scored against the reference's
    # (align_rl/alignment/validation.py); the best checkpoint (val/reward_gain) is the result
    val_every: int = cached(50, "dpo")
    val_backgrounds: int = cached(8, "dpo")
    val_members: int = cached(8, "dpo")
    num_workers: int = cached(1, "dpo")
    use_gpu: bool = cached(False, "dpo")
    checkpoint_every: int = cached(100, "dpo")
    # offline | sync (rounds: sample, then train; "online" is its alias) | async (samplers and the
    # learner run at once: docs/method.md §9.4)
    mode: str = cached("offline", "dpo")
    # sync/async: learner steps between weight publications (async: k)
    sync_every: int = cached(50, "dpo_sampled")
    # sync/async: pairs more than this many policy versions behind leave (s)
    staleness: int = cached(2, "dpo_sampled")
    online_backgrounds: int = cached(8, "dpo_sampled")  # sync: new backgrounds per refresh
    reuse: int = cached(4, "dpo_sampled")  # async: times each pair may be trained on (u)
    # async: the reference becomes the policy every r versions (0: off)
    refresh_reference: int = cached(0, "dpo_sampled")
    # async: start the buffer with the offline store's pairs (version 0)
    warm_start: bool = cached(True, "dpo_sampled")
    # worker-group restarts from the last checkpoint before a run fails
    max_failures: int = cached(2, "dpo")
    # CPUs of each learner worker (and its torch threads)
    cpus_per_worker: float = cached(2.0, "dpo")
    # the alignment seed (docs/method.md §9.5): the learner's batch order, t and ε, and the pair
    # draw from the stored candidates; 0 is run.seed itself. The main job aligns each variant for
    # seeds seed … seed + seeds − 1 and evaluates every one (the report: the mean and the
    # across-seed spread; a gain must hold for every seed). The default job runs one seed to stay
    # near its time budget; dpo.seeds=3 gives the evidence that BENCHMARKS.md records
    seed: int = cached(0, "dpo")
    seeds: int = runtime(1)  # how many runs, each its own folder
    # GPU share of each learner worker when it uses GPUs (< 1: shares a GPU, e.g. with a sweep trial's
    # validation actors: one trial per GPU)
    gpus_per_worker: float = cached(1.0, "dpo", unless_set=True)


@dataclass
class ActorsConfig:
    samplers: int = runtime(1)
    forecasters: int = runtime(1)
    rewarders: int = runtime(1)
    cpus_per_actor: float = runtime(1.0)
    gpus_per_actor: float = runtime(0.0)
    max_restarts: int = runtime(3)
    max_task_retries: int = runtime(3)
    batch_size: int = runtime(4)  # backgrounds per sampler / reward actor call


@dataclass
class EvalConfig:
    # held-out analysis times spread over the test split (intervals are over these)
    times: int = runtime(48)
    # ensemble members per analysis (≥ 2: ensemble mean, CRPS, spread/skill)
    members: int = runtime(4)
    models: list[str] = runtime(["reference"])
    baseline: str = runtime("reference")
    ablations: list[str] = runtime([])  # density | error
    densities: list[float] = runtime([0.01, 0.03, 0.05, 0.1])
    errors: list[float] = runtime([0.0, 0.02, 0.05])
    map_samples: int = runtime(10)
    # validation times (spread over data.val like the test times) on which the reference's ensemble
    # mean is blended towards the background, w fitted by least squares: the Blend-val baseline
    # every MSE verdict line must beat (docs/method.md §10); 0 turns it off
    blend_times: int = runtime(16)
    out: str | None = runtime(None)  # default: <workdir>/eval
    # backgrounds per sampler call (each call runs batch_size × members rows)
    batch_size: int = runtime(8)
    # where the analyses run: actor (a Ray actor holding actors.gpus_per_actor of a GPU) | driver |
    # auto (the actor when actors reserve GPUs, i.e. run.device is not cpu and gpus_per_actor > 0)
    sampling: str = runtime("auto")


@dataclass
class ChecksConfig:
    # plausibility of physical inputs read from stores (temperature in K, geopotential in m²/s²,
    # wind in m/s, humidity in kg/kg, pressure in Pa); false for unusual data
    units: bool = runtime(True)


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
        """The content hash of some sections (:func:`align_rl.identity.section_digest`: fields
        declared ``cached(..., unless_set=True)`` count only when they differ from their default)."""
        return identity.section_digest(self, *sections)


PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    "paper": {
        "data": {"grid": "128x256"},
        "vae": {"preset": "paper", "embed_dim": 1024, "depth": 24, "heads": 16, "window": 8,
                "lr": 2e-4, "batch_size": 32, "steps": 140_000,
                "num_workers": 0, "cpus_per_worker": 0},  # the pretrain section's GPU workers
        "diffusion": {"preset": "paper", "embed_dim": 1024, "depth": 24, "heads": 16,
                      "steps": 100_000, "lr": 1e-4, "batch_size": 32,
                      "num_workers": 0, "cpus_per_worker": 0},  # the pretrain section's GPU workers
        "sampler": {"steps": 128, "corrections": 2, "members": 32, "decode": "plain"},
        "guidance": {"dps_zeta": 1.0},
        "pairs": {"candidates": 32, "decile": 0.1, "top_k_phys": 5},
        "dpo": {"beta": 4000.0, "lr": 1e-5, "batch_size": 32, "steps": 500},
    },
}
