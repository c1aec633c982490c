"""Pretraining of the forecaster, the VAE and the latent diffusion model: ``ensure_pretrained``
(what ``python -m align_rl.pretrain`` calls; the order of the stages and the summary it prints are
described in :mod:`align_rl.pretrain`).

Each model trains in the one Ray Train loop (:mod:`align_rl.training.loop`, its task in
:mod:`align_rl.training.tasks`) and is written with its identity
(:func:`align_rl.identity.pretraining`: config section, dataset by content, grid, seed and, for the
score model, the VAE and the forecaster by content); a stored model whose identity matches is reused.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from align_rl import identity
from align_rl.config import Config, PretrainConfig
from align_rl.devices import resolve_use_gpu
from align_rl.errors import InputError
from align_rl.io.checkpoints import load_codec, load_model, save_model, verify_checkpoint
from align_rl.io.era5 import load_normalizer, open_states
from align_rl.io.grid import Grid
from align_rl.io.normalization import Normalizer
from align_rl.io.states import States
from align_rl.models.anchored import fit_anchor_weights
from align_rl.models.dit import background_error_var, build_dit
from align_rl.models.forecaster import EmulatorForecaster, build_emulator
from align_rl.models.loading import load_forecaster
from align_rl.models.vae import LatentCodec, build_vae, fit_latent_stats
from align_rl.training.datasets import fixed_subset, latent_pairs, normalized_values
from align_rl.training.harness import init_ray, run_training
from align_rl.training.loop import resolve_precision
from align_rl.training.quality import evaluate_models, format_summary  # noqa: F401 (the command prints it)
from align_rl.workspace import Workspace
from align_rl.world.backgrounds import ensure_backgrounds
from align_rl.world.dataset import ensure_world

STAGES = ("forecaster", "vae", "diffusion")
SUMMARY_FILE = "pretrain_summary.json"


@dataclass
class PretrainedModels:
    """The pretrained networks of a run (all in eval mode, on CPU).

    ``forecaster``: 6 h forecaster on normalised fields (``step``/``rollout``); ``codec``: the
    :class:`~align_rl.models.vae.LatentCodec` (VAE + latent statistics); ``eps_model``: the
    :class:`~align_rl.models.dit.LatentDiT`; ``normalizer``: the dataset's statistics; ``paths``:
    final checkpoint of each model; ``summary``: the quality numbers of :func:`evaluate_models`
    when they were computed in this call (else those stored in the summary file, or {})."""

    forecaster: Any
    codec: Any
    eps_model: Any
    normalizer: Normalizer | None = None
    paths: dict[str, Path] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


class PretrainData:
    """The dataset of a run, read lazily: ``store`` (path), ``grid`` ``(H, W)`` and ``normalizer``
    right away; the truth of the training and validation splits (``train``, ``val``: physical
    States) and their normalised values (``train_norm``, ``val_norm``: ``(T, 69, H, W)`` float32)
    on first use, so that a run whose models are all cached reads no fields."""

    def __init__(self, cfg: Config, store: Path | str):
        self.cfg, self.store = cfg, store
        self.grid: tuple[int, int] = Grid.parse(cfg.data.grid).shape
        self.normalizer: Normalizer = load_normalizer(store)
        self.refs: dict[str, Any] = {}
        self._split: dict[str, States] = {}
        self._norm: dict[str, np.ndarray] = {}

    def _load(self, name: str) -> States:
        if name not in self._split:
            self._split[name] = open_states(self.store, time_range=getattr(self.cfg.data, name),
                                            coarsen=self.cfg.data.coarsen, expect_grid=self.cfg.data.grid,
                                            check_units=self.cfg.checks.units)
        return self._split[name]

    def _normed(self, name: str) -> np.ndarray:
        if name not in self._norm:
            self._norm[name] = normalized_values(self._load(name), self.normalizer)
        return self._norm[name]

    @property
    def train(self) -> States:
        return self._load("train")

    @property
    def val(self) -> States:
        return self._load("val")

    @property
    def train_norm(self) -> np.ndarray:
        return self._normed("train")

    @property
    def val_norm(self) -> np.ndarray:
        return self._normed("val")

    def ref(self, name: str, value_fn) -> Any:
        """An object ref of ``value_fn()``, put in the object store once."""
        if name not in self.refs:
            init_ray()  # the project's loopback-only instance, not Ray's implicit default
            self.refs[name] = ray.put(value_fn())
        return self.refs[name]


# ----------------------------------------------------------------------------- helpers


def load_data(cfg: Config, ws: Workspace, progress: bool = True) -> PretrainData:
    """The dataset of the run (simulated when absent), read lazily (:class:`PretrainData`)."""
    return PretrainData(cfg, ensure_world(cfg, ws, progress=progress))


def _identity(cfg: Config, stage: str, data: PretrainData, deps: dict[str, str] | None = None) -> dict:
    return identity.pretraining(cfg, stage, data.store, data.grid, deps)


def cached_fix(path: Path, stage: str) -> str:
    """The way out named when a cached checkpoint of ``stage`` is damaged."""
    return (f"retrain it with python -m align_rl.pretrain {stage} --force, or delete {path} "
            "(or restore it from a copy)")


def _stored_identity(path: Path, stage: str) -> dict | None:
    """The identity stored in the final checkpoint of ``stage``; a damaged one (unreadable, checksum
    failing or missing, another kind of model) raises CheckpointError: it is never trained over."""
    return verify_checkpoint(path, stage, cached_fix(path, stage))["extra"].get("identity")


def _same(a: Any, b: Any) -> bool:
    return identity.same(a, b)


def _wandb(cfg: Config, ws: Workspace, stage: str, ident_hash: str) -> dict:
    return {"mode": cfg.run.wandb_mode, "project": cfg.run.wandb_project, "dir": str(ws.root / "wandb"),
            "name": f"pretrain-{stage}", "group": f"{cfg.run.name}-pretrain",
            "id": f"{cfg.run.name}-pretrain-{stage}-{ident_hash}".replace("/", "-")}


def _log(msg: str) -> None:
    print(f"[pretrain] {msg}", flush=True)


def _resources(cfg: Config, stage: str) -> PretrainConfig:
    """``cfg.pretrain`` with ``use_gpu`` resolved from ``run.device``
    (:func:`~align_rl.devices.resolve_use_gpu`) and, for a model whose section has them (the VAE,
    the score model), its own ``num_workers`` / ``cpus_per_worker`` (0: keep the pretrain value;
    the CPUs per worker capped by the Ray cluster's CPUs when the workers run on CPUs)."""
    init_ray()
    pre = replace(cfg.pretrain, use_gpu=resolve_use_gpu(cfg.run.device, cfg.pretrain.use_gpu,
                                                        "pretrain.use_gpu"))
    d = getattr(cfg, stage)
    if not hasattr(d, "cpus_per_worker"):
        return pre
    cpus = int(d.cpus_per_worker) or int(pre.cpus_per_worker)
    if not pre.use_gpu and ray.is_initialized():
        cpus = max(1, min(cpus, int(ray.cluster_resources().get("CPU", 1))))
    return replace(pre, num_workers=int(d.num_workers) or int(pre.num_workers), cpus_per_worker=cpus)


def _precision(precision: str, use_gpu: bool) -> str:
    """``precision`` for the log line, ``auto`` with what it means on this machine."""
    if precision != "auto":
        return precision
    return f"auto = {resolve_precision('auto', torch.device('cuda' if use_gpu else 'cpu'))} here"


def _train(cfg: Config, ws: Workspace, stage: str, loop_config: dict, ident: dict,
           num_workers: int | None = None, extra_loop: dict | None = None):
    """Train ``stage`` on Ray Train (:func:`~align_rl.training.harness.run_training`) under the run
    name ``<stage>-<identity hash>``; returns its :class:`~align_rl.training.harness.TrainResult`."""
    ih = identity.digest(ident)
    section = getattr(cfg, stage)
    lc = dict(loop_config)
    lc.update(model_cfg=asdict(section), steps=int(section.steps), lr=float(section.lr),
              val_every=int(section.val_every), patience=int(section.patience),
              batch_size=int(section.batch_size), seed=int(cfg.run.seed),
              precision=str(section.precision),
              wandb=_wandb(cfg, ws, stage, ih), plugins=list(cfg.run.plugins))
    lc.update(extra_loop or {})
    pre = _resources(cfg, stage)
    stop = (f" (at most; stops after {section.patience} validations without a lower loss)"
            if int(section.patience) else "")
    _log(f"training {stage}: {section.steps} steps{stop}, batch {section.batch_size}, "
         f"{num_workers or pre.num_workers or 'auto'} worker(s) × {pre.cpus_per_worker} CPU(s)"
         f"{' + 1 GPU' if pre.use_gpu else ''}, precision {_precision(lc['precision'], pre.use_gpu)} "
         f"(run {stage}-{ih})")
    res = run_training(stage, lc, pre, ws.checkpoints(stage), f"{stage}-{ih}", num_workers)
    kept = (f"; kept step {res.metrics['best_step']} of {res.metrics['last_step']}"
            if "best_step" in res.metrics else "")
    _log(f"{stage} done in {res.wall_s:.0f} s ({res.samples_per_s:.1f} samples/s); "
         + ", ".join(f"{k} {v:.4g}" for k, v in res.metrics.items() if k.startswith("val/")) + kept)
    return res


# ----------------------------------------------------------------------------- stages


def pretrain_forecaster(cfg: Config, ws: Workspace, data: PretrainData, force: bool = False,
                        loop_extra: dict | None = None):
    """The forecaster of ``cfg.forecaster``: the emulator is trained (or reused); ONNX / torch
    forecasters are loaded as configured. Returns ``(forecaster, info)``."""
    info: dict[str, Any] = {"trained": False}
    if cfg.forecaster.kind != "emulator" or cfg.forecaster.path:
        return load_forecaster(cfg, ws, data.normalizer), info
    path = ws.final_checkpoint("forecaster")
    ident = _identity(cfg, "forecaster", data)
    if not force and path.exists() and _same(_stored_identity(path, "forecaster"), ident):
        _log(f"forecaster: reusing {path}")
        return load_forecaster(cfg, ws, data.normalizer), info
    ref = data.ref("train_seq", lambda: {"values": data.train_norm, "times": data.train.times})
    vref = data.ref("val_seq", lambda: {"values": data.val_norm, "times": data.val.times})
    res = _train(cfg, ws, "forecaster", {"grid": list(data.grid), "data": {"train": ref, "val": vref}},
                 ident, extra_loop=loop_extra)
    net = build_emulator(cfg.forecaster, data.grid)
    net.load_state_dict(res.state_dict)
    save_model(path, net, "forecaster", cfg.forecaster,
               extra={"identity": ident, "metrics": res.metrics, "starts": res.starts,
                      "samples_per_s": res.samples_per_s, "seconds": res.wall_s})
    info.update(trained=True, metrics=res.metrics, samples_per_s=res.samples_per_s, seconds=res.wall_s)
    return EmulatorForecaster(net).eval(), info


def pretrain_vae(cfg: Config, ws: Workspace, data: PretrainData, force: bool = False,
                 loop_extra: dict | None = None):
    """Train (or reuse) the VAE, fit the latent statistics over the training split and save the
    :class:`LatentCodec`. Returns ``(codec, info)``."""
    info: dict[str, Any] = {"trained": False}
    path = ws.final_checkpoint("vae")
    ident = _identity(cfg, "vae", data)
    if not force and path.exists() and _same(_stored_identity(path, "vae"), ident):
        _log(f"vae: reusing {path}")
        codec, _ = load_codec(path, expect=cfg.vae)
        return codec, info
    ref = data.ref("train_frames", lambda: {"values": data.train_norm})
    vref = data.ref("val_frames", lambda: {"values": data.val_norm})
    res = _train(cfg, ws, "vae", {"grid": list(data.grid), "data": {"train": ref, "val": vref},
                                  "kl_weight": float(cfg.vae.kl_weight)}, ident, extra_loop=loop_extra)
    vae = build_vae(cfg.vae, data.grid)
    vae.load_state_dict(res.state_dict)
    vae.eval()
    t0 = time.perf_counter()
    mean, std = fit_latent_stats(vae, torch.from_numpy(data.train_norm), batch_size=32)
    codec = LatentCodec(vae, mean, std).eval()
    _log(f"latent statistics over {len(data.train_norm)} training frames in {time.perf_counter() - t0:.1f} s")
    save_model(path, codec, "vae", cfg.vae,
               extra={"identity": ident, "metrics": res.metrics, "starts": res.starts,
                      "samples_per_s": res.samples_per_s, "seconds": res.wall_s})
    info.update(trained=True, metrics=res.metrics, samples_per_s=res.samples_per_s, seconds=res.wall_s)
    return codec, info


def pretrain_diffusion(cfg: Config, ws: Workspace, data: PretrainData, codec, forecaster,
                       force: bool = False, loop_extra: dict | None = None, progress: bool = True):
    """Backgrounds of the training and validation splits, their latents, then train (or reuse)
    the diffusion model. Returns ``(eps_model, info)``; ``info["backgrounds"]`` holds the
    validation backgrounds (States)."""
    info: dict[str, Any] = {"trained": False}
    path = ws.final_checkpoint("diffusion")
    deps = identity.diffusion_deps(codec, forecaster)
    ident = _identity(cfg, "diffusion", data, deps)
    latent_shape = tuple(codec.latent_shape)
    if not force and path.exists() and _same(_stored_identity(path, "diffusion"), ident):
        _log(f"diffusion: reusing {path}")
        model, _ = load_model(path, "diffusion", expect=cfg.diffusion, shapes={"latent_shape": latent_shape})
        return model, info
    t0 = time.perf_counter()
    bg_train = ensure_backgrounds(cfg, ws, data.train, forecaster, progress=progress)
    bg_val = ensure_backgrounds(cfg, ws, data.val, forecaster, progress=progress)
    info["background_seconds"] = time.perf_counter() - t0
    _log(f"backgrounds: {len(bg_train)} train + {len(bg_val)} val times in {info['background_seconds']:.0f} s")
    z, zb = latent_pairs(codec, data.train, data.train_norm, bg_train, data.normalizer)
    vz, vzb = latent_pairs(codec, data.val, data.val_norm, bg_val, data.normalizer)

    skip_var = None
    if str(cfg.diffusion.eps_skip) == "background":
        skip_var = background_error_var(z, zb).tolist()
        _log(f"diffusion: latent background error variance s² mean {np.mean(skip_var):.4f} "
             f"(range {min(skip_var):.4f}–{max(skip_var):.4f}) for the output skip")
    loop = {"latent_shape": list(latent_shape), "skip_var": skip_var,
            "data": {"train": ray.put({"z": z, "z_b": zb}), "val": ray.put({"z": vz, "z_b": vzb})}}
    res = _train(cfg, ws, "diffusion", loop, ident, extra_loop=loop_extra)
    model = build_dit(cfg.diffusion, latent_shape)
    model.load_state_dict(res.state_dict)
    model.eval()
    save_model(path, model, "diffusion", cfg.diffusion,
               extra={"identity": ident, "metrics": res.metrics, "starts": res.starts,
                      "samples_per_s": res.samples_per_s, "seconds": res.wall_s})
    info.update(trained=True, metrics=res.metrics, samples_per_s=res.samples_per_s, seconds=res.wall_s)
    return model, info


# ----------------------------------------------------------------------------- entry points


def anchor_weights(cfg: Config, ws: Workspace, data: PretrainData, codec: Any, forecaster: Any,
                   progress: bool = True, max_samples: int = 128) -> torch.Tensor:
    """Per-channel weights (69,) of anchored decoding (:func:`align_rl.models.anchored.
    fit_anchor_weights`) on ``max_samples`` training times and their 48 h backgrounds (the
    cached backgrounds of the training split; a few seconds)."""
    bg = ensure_backgrounds(cfg, ws, data.train, forecaster, progress=progress)
    idx = np.searchsorted(data.train.times, bg.times)
    sel = fixed_subset(len(idx), max_samples)
    x = torch.from_numpy(np.ascontiguousarray(data.train_norm[idx[sel]]))
    xb = torch.from_numpy(np.ascontiguousarray(data.normalizer.normalize(bg.values[sel]), dtype=np.float32))
    was = codec.training
    codec.eval()
    try:
        return fit_anchor_weights(codec, x, xb)
    finally:
        codec.train(was)


def ensure_pretrained(cfg: Config, ws: Workspace, stages: tuple[str, ...] = STAGES,
                      force: tuple[str, ...] = (), evaluate: bool = False,
                      progress: bool = True, data: PretrainData | None = None) -> PretrainedModels:
    """The pretrained models of a run: reuse each final checkpoint whose identity matches the
    configuration (and the dataset, and for the diffusion model the VAE and forecaster), train
    what is missing, in the order forecaster → VAE (+ latent statistics) → backgrounds →
    diffusion. ``stages``: the models wanted (the diffusion model needs the other two; a stage
    left out is loaded only when needed). ``force``: stages to retrain even when cached.
    ``evaluate``: compute the summary (:func:`evaluate_models`) and write it to
    ``<workdir>/pretrain_summary.json``."""
    t0 = time.perf_counter()
    for s in tuple(stages) + tuple(force):
        if s not in STAGES:
            raise InputError(f"unknown pretraining stage {s!r}; choose from {', '.join(STAGES)}")
    data = data or load_data(cfg, ws, progress=progress)
    need = set(stages)
    if "diffusion" in need:
        need |= {"forecaster", "vae"}
    forecaster = codec = eps = None
    infos: dict[str, Any] = {}
    lx = {"progress": bool(progress)}
    if "forecaster" in need:
        forecaster, infos["forecaster"] = pretrain_forecaster(cfg, ws, data, force="forecaster" in force,
                                                              loop_extra=lx)
    if "vae" in need:
        codec, infos["vae"] = pretrain_vae(cfg, ws, data, force="vae" in force, loop_extra=lx)
    if "diffusion" in need:
        eps, infos["diffusion"] = pretrain_diffusion(cfg, ws, data, codec, forecaster,
                                                     force="diffusion" in force, loop_extra=lx,
                                                     progress=progress)
    if codec is not None and forecaster is not None:
        codec.anchor_weights = anchor_weights(cfg, ws, data, codec, forecaster, progress)
    paths = {s: ws.final_checkpoint(s) for s in STAGES if ws.final_checkpoint(s).exists()}
    models = PretrainedModels(forecaster, codec, eps, data.normalizer, paths)
    summary_path = ws.root / SUMMARY_FILE
    if evaluate and forecaster is not None and codec is not None and eps is not None:
        summary = evaluate_models(cfg, ws, data, models, progress=progress)
        summary["seconds"] = time.perf_counter() - t0
        summary["training"] = {k: {kk: vv for kk, vv in v.items() if kk != "backgrounds"}
                               for k, v in infos.items()}
        summary_path.write_text(json.dumps(summary, indent=2, default=str))
        models.summary = summary
    elif summary_path.exists():
        try:
            models.summary = json.loads(summary_path.read_text())
        except ValueError:
            models.summary = {}
    return models


