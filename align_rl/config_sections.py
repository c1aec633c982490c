"""The job configuration's sections: one dataclass per section, the whole :class:`Config`, and the
presets (``demo``, ``paper``).

Every field's range or choices are in :data:`align_rl.config.RANGES`; loading, overrides and
validation are in :mod:`align_rl.config`. Units and meanings are in the comments beside each field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from align_rl import identity

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
    # modules imported in the driver and in every Ray actor and Train worker before work starts
    # (align_rl.plugins): they register rewards, guidance methods and forecaster kinds by name
    plugins: list[str] = field(default_factory=list)


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
    # embedded world: one long run; days discarded after perturbing the restart, and days skipped
    # between members (>= 10 keeps the members', hence the splits', weather independent)
    burn_in_days: float = 1.0
    gap_days: float = 12.0
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
    kind: str = "emulator"  # emulator | onnx | torch | a kind registered by a run.plugins module
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
    # early stopping as for diffusion (0, 0: validate every pretrain.val_every, train all steps)
    val_every: int = field(default=0, metadata=HASH_UNLESS_SET)
    patience: int = field(default=0, metadata=HASH_UNLESS_SET)


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
    # early stopping as for diffusion (0, 0: validate every pretrain.val_every, train all steps)
    val_every: int = field(default=0, metadata=HASH_UNLESS_SET)
    patience: int = field(default=0, metadata=HASH_UNLESS_SET)


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
    # early stopping on the validation split's score-matching loss: validate every val_every
    # steps (0 = pretrain.val_every), stop after patience validations without a lower loss and
    # keep the best (0 = train all steps, keep the last). On the independent default world the
    # loss is lowest after a few hundred steps and rises after (BENCHMARKS.md, pretraining)
    val_every: int = 50
    patience: int = 6


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
    # GPU speed (docs/method.md §5.3): bf16 autocast of the network passes on CUDA (none | bf16 |
    # bf16_dps: also DPS's differentiated pass); torch.compile of the score network in GPU actors
    autocast: str = field(default="none", metadata=HASH_UNLESS_SET)
    compile: bool = field(default=False, metadata=HASH_UNLESS_SET)


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
    # offline | sync (rounds: sample, then train; "online" is its alias) | async (samplers and the
    # learner run at once: docs/method.md §9.4)
    mode: str = "offline"
    sync_every: int = 50  # sync/async: learner steps between weight publications (async: k)
    staleness: int = 2  # sync/async: pairs more than this many policy versions behind leave (s)
    online_backgrounds: int = 8  # sync: new backgrounds per refresh
    reuse: int = 4  # async: times each pair may be trained on (u)
    refresh_reference: int = 0  # async: the reference becomes the policy every r versions (0: off)
    warm_start: bool = True  # async: start the buffer with the offline store's pairs (version 0)
    max_failures: int = 2  # worker-group restarts from the last checkpoint before a run fails
    cpus_per_worker: float = 2.0  # CPUs of each learner worker (and its torch threads)
    # the alignment seed (docs/method.md §9.5): the learner's batch order, t and ε, and the pair
    # draw from the stored candidates; 0 is run.seed itself. The main job aligns each variant for
    # seeds seed … seed + seeds − 1 and evaluates every one (the report: the mean and the
    # across-seed spread; a gain must hold for every seed). The default job runs one seed to stay
    # near its time budget; dpo.seeds=3 gives the evidence that BENCHMARKS.md records
    seed: int = 0
    seeds: int = 1
    # GPU share of each learner worker when it uses GPUs (< 1: shares a GPU, e.g. with a sweep trial's
    # validation actors: one trial per GPU)
    gpus_per_worker: float = field(default=1.0, metadata=HASH_UNLESS_SET)


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
    times: int = 48  # held-out analysis times spread over the test split (intervals are over these)
    members: int = 4  # ensemble members per analysis (≥ 2: ensemble mean, CRPS, spread/skill)
    models: list[str] = field(default_factory=lambda: ["reference"])
    baseline: str = "reference"
    ablations: list[str] = field(default_factory=list)  # density | error
    densities: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.05, 0.1])
    errors: list[float] = field(default_factory=lambda: [0.0, 0.02, 0.05])
    map_samples: int = 10
    # validation times (spread over data.val like the test times) on which the reference's ensemble
    # mean is blended towards the background, w fitted by least squares: the Blend-val baseline
    # every MSE verdict line must beat (docs/method.md §10); 0 turns it off
    blend_times: int = 16
    out: str | None = None  # default: <workdir>/eval
    batch_size: int = 8  # backgrounds per sampler call (each call runs batch_size × members rows)
    # where the analyses run: actor (a Ray actor holding actors.gpus_per_actor of a GPU) | driver |
    # auto (the actor when actors reserve GPUs, i.e. run.device is not cpu and gpus_per_actor > 0)
    sampling: str = "auto"


@dataclass
class ChecksConfig:
    # plausibility of physical inputs read from stores (temperature in K, geopotential in m²/s²,
    # wind in m/s, humidity in kg/kg, pressure in Pa); false for unusual data
    units: bool = True


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
        marked ``HASH_UNLESS_SET`` count only when they differ from their default)."""
        return identity.section_digest(self, *sections)


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
