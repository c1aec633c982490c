"""The Diffusion-DPO learner on Ray Train (docs/method.md §9): ``run_dpo``.

A ``TorchTrainer`` (Ray Train V2; DDP over gloo on CPU, nccl on GPU) runs :func:`dpo_loop` on
``cfg.dpo.num_workers`` workers:

- policy initialised from ``init_ckpt`` (default: the reference), the reference frozen
  (``eval()``, ``requires_grad=False``, evaluated under ``no_grad``);
- AdamW (``cfg.dpo.lr``, no weight decay, linear warm-up over ``cfg.dpo.warmup_steps`` then
  constant), gradient norm clipped at ``cfg.dpo.grad_clip``; the global batch
  ``cfg.dpo.batch_size`` is split over the workers; the loss of :func:`align_rl.alignment.dpo.dpo_loss` with
  ``t ~ U(dpo.t_min, dpo.t_max)`` and the winners' anchor ``dpo.anchor``;
- validation (``dpo.val_every`` > 0, rank 0): the policy's candidates on ``data.val`` backgrounds
  against the reference's (:class:`align_rl.alignment.validation.Validator`); the checkpoint of the best
  ``val/reward_gain`` (the reference itself, gain 0, until a step beats it) is written to
  ``out_dir/best.pt`` and is the call's result;
- the pairs of step ``s`` on worker ``r`` and their ``(t, ε)`` are drawn from ``(seed, s, r)`` only,
  so a resumed run continues exactly where it stopped;
- every ``cfg.dpo.checkpoint_every`` steps and at the end, rank 0 writes ``out_dir/state.pt``
  (policy, optimiser, step, version, history; atomically) and ``out_dir/policy.pt`` (a ``diffusion``
  checkpoint that :func:`align_rl.io.checkpoints.load_model` reads, ``extra`` holding ``dpo_step``,
  ``dpo_version``) and reports a Ray checkpoint;
- resume: ``ray.train.get_checkpoint()`` after a worker failure inside a run; ``out_dir/state.pt``
  when ``run_dpo`` is called again (a rerun of the main job, the next online round);
- metrics (:mod:`align_rl.alignment.dpo`'s names, averaged over workers, plus ``grad_norm`` and
  ``learning_rate``) go to wandb (``cfg.run.wandb_mode``, offline by default) and
  ``out_dir/metrics.jsonl``.

Versions: the pretrained reference is policy version 0; each ``run_dpo`` call that trains at
least one step publishes version ``v + 1`` where ``v`` is the version it started from (the
``dpo_version`` of ``init_ckpt``, or of ``out_dir``'s state when it resumes a finished call). A call
interrupted and rerun keeps its version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from align_rl.config import Config, config_from_dict
from align_rl.cpu import configure_worker
from align_rl.errors import CheckpointError, ConfigError, InputError
from align_rl.io.pair_store import PairDataset, PairSet, PairStore
from align_rl.io.checkpoints import save_state  # atomic, with a checksum

STATE_FILE = "state.pt"
POLICY_FILE = "policy.pt"
BEST_FILE = "best.pt"


@dataclass
class DPOResult:
    """``checkpoint``: the policy (``diffusion`` checkpoint file); ``metrics``: the last step's
    metrics; ``version``: its policy version; ``step``: optimiser steps done in ``out_dir``;
    ``history``: every logged metrics dict of rank 0."""

    checkpoint: Path
    metrics: dict[str, float]
    version: int
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)  # {"step", "val/reward_gain"} when validated


def _result(out_dir: Path, state: dict) -> DPOResult:
    m = dict(state["history"][-1]) if state["history"] else {}
    best = dict(state.get("best") or {})
    ck = out_dir / (BEST_FILE if best and (out_dir / BEST_FILE).exists() else POLICY_FILE)
    return DPOResult(ck, m, int(state["version"]), int(state["step"]), list(state["history"]), best)


def bucket_means(m: dict[str, float]) -> dict[str, float]:
    """Replace the per-t-bucket sums and counts of :func:`align_rl.alignment.dpo.dpo_loss` by the winners'
    mean error-minus-reference per bucket (``model_minus_ref/chosen_t0.00-0.25`` …; absent when
    no pair of the batch fell in the bucket)."""
    out = {k: v for k, v in m.items() if not k.startswith("t_bucket/")}
    for i in range(4):
        n = m.get(f"t_bucket/count_{i}", 0.0)
        if n > 0:
            out[f"model_minus_ref/chosen_t{i / 4:.2f}-{(i + 1) / 4:.2f}"] = m[f"t_bucket/sum_chosen_{i}"] / n
    return out


def resolve_pairs(pairs_source: Any, mode: str = "M") -> tuple[Path, PairSet]:
    """``(store path, PairSet)`` of a pair source: a :class:`PairStore` or its path (its committed
    pairs of ``mode``), a ``(store or path, PairSet)`` tuple (e.g. from :meth:`PairStore.reselect`),
    or a :class:`PairDataset`."""
    if isinstance(pairs_source, PairDataset):
        return pairs_source.store.path, pairs_source.pairs
    if isinstance(pairs_source, tuple) and len(pairs_source) == 2:
        st, ps = pairs_source
        st = st if isinstance(st, PairStore) else PairStore.open(st, mode="r")
        return st.path, ps
    if isinstance(pairs_source, (str, Path, PairStore)):
        st = pairs_source if isinstance(pairs_source, PairStore) else PairStore.open(pairs_source, mode="r")
        return st.path, st.pair_set(mode)
    raise InputError(f"unknown pair source {type(pairs_source).__name__}; give a PairStore, its path, "
                     "(store, PairSet) or a PairDataset")


def read_state(out_dir: Path) -> dict | None:
    p = Path(out_dir) / STATE_FILE
    if not p.exists():
        return None
    from align_rl.io.checkpoints import load_state  # weights_only=True, checksum verified

    return load_state(p, fix=f"delete {out_dir} to restart")




# ----------------------------------------------------------------------------- worker loop


def _wandb(conf: dict):
    w = conf.get("wandb") or {}
    if w.get("mode", "disabled") == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        return None
    Path(w["dir"]).mkdir(parents=True, exist_ok=True)
    return wandb.init(mode=w["mode"], project=w.get("project", "align_rl"), dir=w["dir"],
                      name=w.get("name"), id=w.get("id"), resume="allow", config=w.get("config"),
                      settings=wandb.Settings(silent=True, console="off"))


def dpo_loop(conf: dict) -> None:
    """Ray Train worker function of the DPO learner (config built by :func:`run_dpo`)."""
    import ray.train
    import ray.train.torch

    from align_rl.io.checkpoints import load_model, save_model
    from align_rl.alignment.dpo import dpo_loss

    cfg = config_from_dict(conf["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    configure_worker(conf.get("threads", 1))
    device = ray.train.torch.get_device()
    out_dir = Path(conf["out_dir"])
    steps, seed, version = int(conf["steps"]), int(conf["seed"]), int(conf["version"])

    reference, _ = load_model(conf["reference_ckpt"], "diffusion", device=device)
    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    policy, _ = load_model(conf["init_ckpt"], "diffusion", device=device)
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=float(cfg.dpo.lr), weight_decay=0.0)

    state = None
    ck = ray.train.get_checkpoint()  # after a worker failure, or a run of the same name restored
    if ck is not None:
        with ck.as_directory() as d:
            state = read_state(Path(d))
    if conf.get("resume"):  # out_dir/state.pt is the commit point: the latest of the two wins
        mine = read_state(out_dir)
        if mine is not None and (state is None or int(mine["step"]) > int(state["step"])):
            state = mine
    start, history = 0, []
    if state is not None:
        policy.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start, history = int(state["step"]), list(state["history"])
    model = ray.train.torch.prepare_model(policy)
    raw = model.module if hasattr(model, "module") else model

    ds = PairDataset(conf["store"], PairSet(np.asarray(conf["winner"]), np.asarray(conf["loser"]),
                                            np.asarray(conf["background"]),
                                            np.zeros(len(conf["winner"]), np.int32),
                                            np.zeros((len(conf["winner"]), 16), np.uint8), "given"))
    per_worker = max(1, math.ceil(int(cfg.dpo.batch_size) / world))
    beta, clip = float(cfg.dpo.beta), float(cfg.dpo.grad_clip)
    lr0, warm = float(cfg.dpo.lr), int(cfg.dpo.warmup_steps)
    t_range, anchor = (float(cfg.dpo.t_min), float(cfg.dpo.t_max)), float(cfg.dpo.anchor)
    every = max(1, int(cfg.dpo.checkpoint_every))
    val_every = int(cfg.dpo.val_every) if conf.get("validation") else 0
    validator = None
    best = dict(state.get("best") or {}) if state is not None else {}
    if val_every and rank == 0:
        from align_rl.alignment.validation import Validator

        v = conf["validation"]
        validator = Validator(v["codec"], v["forecaster"], reference, v["normalizer"], v["lat"],
                              v["lon"], v["tasks"], cfg, v["weights"], int(cfg.dpo.val_members),
                              seed=int(cfg.run.seed))
        if not best:  # the starting policy; the reference itself scores a gain of 0 exactly
            same = str(conf["init_ckpt"]) == str(conf["reference_ckpt"])
            gain0 = 0.0 if same else validator.score(policy)["val/reward_gain"]
            best = {"step": start, "val/reward_gain": gain0}
            out_dir.mkdir(parents=True, exist_ok=True)
            save_model(out_dir / BEST_FILE, policy, "diffusion", conf["diffusion_cfg"],
                       extra={"dpo_step": start, "dpo_version": version,
                              "reference": str(conf["reference_ckpt"]), "best": best})
    run = _wandb(conf) if rank == 0 else None
    bar = None
    if rank == 0 and conf.get("progress", True):
        try:
            from ray.experimental.tqdm_ray import tqdm
        except ImportError:  # pragma: no cover
            from tqdm import tqdm
        bar = tqdm(total=steps, desc=f"DPO v{version}", position=0)
        bar.update(start)
    step, written = start, len(history)
    try:
        if start >= steps:
            ray.train.report({"step": start})
        while step < steps:
            t0 = time.perf_counter()
            rng = np.random.default_rng([seed, step, rank])
            idx = rng.choice(len(ds), per_worker, replace=len(ds) < per_worker)
            zw, zl, zb = (t.to(device) for t in ds.batch(idx))
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step * 997 + rank)
            for g in opt.param_groups:  # linear warm-up, then constant
                g["lr"] = lr0 * min(1.0, (step + 1) / warm) if warm > 0 else lr0
            loss, m = dpo_loss(model, reference, zw, zl, zb, beta, generator=gen, t_range=t_range,
                               anchor=anchor)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"DPO loss is {float(loss)} at step {step}; lower dpo.lr or dpo.beta")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            opt.step()
            step += 1
            m.update(grad_norm=gnorm, learning_rate=float(opt.param_groups[0]["lr"]))
            if world > 1:
                keys = sorted(m)
                v = torch.tensor([m[k] for k in keys], dtype=torch.float64)
                torch.distributed.all_reduce(v)
                m = {k: float(x) / world for k, x in zip(keys, v)}
            m = bucket_means(m)
            m.update(step=step, version=version, step_time_s=time.perf_counter() - t0)
            if validator is not None and (step % val_every == 0 or step == steps):
                raw.eval()
                vm = validator.score(raw)
                raw.train()
                m.update(vm)
                if vm["val/reward_gain"] > float(best["val/reward_gain"]):
                    best = {"step": step, "val/reward_gain": vm["val/reward_gain"]}
                    out_dir.mkdir(parents=True, exist_ok=True)
                    save_model(out_dir / BEST_FILE, raw, "diffusion", conf["diffusion_cfg"],
                               extra={"dpo_step": step, "dpo_version": version,
                                      "reference": str(conf["reference_ckpt"]), "best": best})
                m["val/best_step"] = float(best["step"])
            if rank == 0:
                history.append(dict(m))
                if run is not None:
                    run.log(m, step=step)
                if bar is not None:
                    bar.set_description(f"DPO v{version} loss {m['loss']:.3f} acc {m['rewards/accuracies']:.2f}")
                    bar.update(1)
            if step % every == 0 or step == steps:
                with tempfile.TemporaryDirectory() as tmp:
                    ckpt = None
                    if rank == 0:
                        st = {"model": raw.state_dict(), "optim": opt.state_dict(), "step": step,
                              "target": steps, "version": version, "history": history,
                              "best": best}
                        save_state(st, Path(tmp) / STATE_FILE)
                        out_dir.mkdir(parents=True, exist_ok=True)
                        save_model(out_dir / POLICY_FILE, raw, "diffusion", conf["diffusion_cfg"],
                                   extra={"dpo_step": step, "dpo_version": version,
                                          "reference": str(conf["reference_ckpt"])})
                        save_state(st, out_dir / STATE_FILE)  # after policy.pt: the commit point
                        with open(out_dir / "metrics.jsonl", "a") as f:
                            for h in history[written:]:
                                f.write(json.dumps(h) + "\n")
                        written = len(history)
                        ckpt = ray.train.Checkpoint.from_directory(tmp)
                    ray.train.report(m, checkpoint=ckpt, checkpoint_dir_name=f"step_{step:07d}")
                crash = conf.get("crash")
                if crash and rank == 0 and step >= int(crash["at_step"]) and not Path(crash["marker"]).exists():
                    Path(crash["marker"]).write_text(f"crashed after step {step}\n")
                    os._exit(1)  # a hard worker death (crash test)
    finally:
        if bar is not None:
            bar.close()
        if run is not None:
            run.finish()


# ----------------------------------------------------------------------------- driver


def _diffusion_section(path: Path) -> dict:
    from align_rl.io.checkpoints import read_checkpoint

    return dict(read_checkpoint(path)["config"])


def run_dpo(
    cfg: Config,
    ws: Any,
    pairs_source: Any,
    reference_ckpt: Path,
    init_ckpt: Path | None = None,
    steps: int | None = None,
    out_dir: Path | None = None,
    mode: str | None = None,
    progress: bool = True,
    crash: dict | None = None,
    validation: dict | None = None,
) -> DPOResult:
    """Diffusion-DPO of the policy against the frozen reference on the pairs of ``pairs_source``.

    ``cfg``: the run's config (``dpo``, ``run``); ``ws``: its :class:`~align_rl.workspace.Workspace`;
    ``pairs_source``: see :func:`resolve_pairs` (a store path uses ``mode``, default
    ``cfg.pairs.mode``); ``reference_ckpt``: the pretrained ``diffusion`` checkpoint (version 0);
    ``init_ckpt``: the policy's start (default the reference); ``steps``: total optimiser steps
    in ``out_dir`` (default ``cfg.dpo.steps``; a call with more steps than ``out_dir`` holds
    continues from there); ``out_dir``: default ``ws.dpo / pairs mode``. Called inside a Ray Tune
    trial, the TorchTrainer runs as that trial's child (Ray Train V2). ``crash``: tests only.
    ``validation``: what :class:`~align_rl.alignment.validation.Validator` needs (``codec``,
    ``forecaster``, ``normalizer``, ``lat``, ``lon``, ``tasks``, ``weights``), used when
    ``cfg.dpo.val_every`` > 0. Returns :class:`DPOResult` (its checkpoint the best validated one).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from align_rl.io.checkpoints import read_checkpoint
    from align_rl.training.harness import init_ray, repair_run_storage

    mode = mode or cfg.pairs.mode
    steps = int(cfg.dpo.steps if steps is None else steps)
    if steps < 1:
        raise ConfigError(f"dpo.steps={steps} must be >= 1")
    reference_ckpt = Path(reference_ckpt).resolve()
    init_ckpt = Path(init_ckpt).resolve() if init_ckpt is not None else reference_ckpt
    out_dir = Path(out_dir if out_dir is not None else Path(ws.dpo) / mode).resolve()
    state = read_state(out_dir)
    if state is not None and int(state["step"]) >= steps:
        return _result(out_dir, state)
    store_path, ps = resolve_pairs(pairs_source, mode)
    if len(ps) == 0:
        raise InputError(f"no preference pairs (mode {mode}) in {store_path}; build pairs first")
    init_meta = read_checkpoint(init_ckpt)
    if init_meta["kind"] != "diffusion":
        raise CheckpointError(f"{init_ckpt} is a {init_meta['kind']} checkpoint, not the diffusion model")
    ref_sec = _diffusion_section(reference_ckpt)
    resume = False
    if state is None:
        version = int(init_meta.get("extra", {}).get("dpo_version", 0)) + 1
    elif int(state["step"]) < int(state.get("target", steps)):
        version, resume = int(state["version"]), True  # an interrupted call: same version
    else:
        version, resume = int(state["version"]) + 1, True
    init_ray()
    workers = int(cfg.dpo.num_workers)
    res = {"CPU": float(cfg.dpo.cpus_per_worker)}
    if cfg.dpo.use_gpu:
        res["GPU"] = 1.0
    conf = {
        "cfg": cfg.to_dict(), "store": str(store_path),
        "winner": ps.winner.tolist(), "loser": ps.loser.tolist(), "background": ps.background.tolist(),
        "reference_ckpt": str(reference_ckpt), "init_ckpt": str(init_ckpt), "steps": steps,
        "seed": int(cfg.run.seed), "version": version, "out_dir": str(out_dir), "resume": resume,
        "threads": max(1, int(cfg.dpo.cpus_per_worker)), "diffusion_cfg": ref_sec,
        "progress": progress, "crash": crash,
        "validation": validation if int(cfg.dpo.val_every) > 0 else None,
        "wandb": {"mode": cfg.run.wandb_mode, "project": cfg.run.wandb_project,
                  "dir": str(out_dir / "wandb"), "name": f"{cfg.run.name}-dpo-{mode}",
                  "id": f"{cfg.run.name}-dpo-{mode}-{hashlib.sha256(str(out_dir).encode()).hexdigest()[:8]}",
                  "config": {"dpo": cfg.to_dict()["dpo"], "rewards": cfg.to_dict()["rewards"],
                             "mode": mode, "pairs": len(ps)}},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    repair_run_storage(out_dir / "ray", f"dpo-v{version}")  # a snapshot cut by a killed driver
    trainer = TorchTrainer(
        dpo_loop,
        train_loop_config=conf,
        torch_config=TorchConfig(backend="nccl" if cfg.dpo.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(cfg.dpo.use_gpu),
                                     resources_per_worker=res),
        run_config=RunConfig(name=f"dpo-v{version}", storage_path=str(out_dir / "ray"),
                             failure_config=FailureConfig(max_failures=int(cfg.dpo.max_failures)),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    try:
        trainer.fit()
    except Exception as exc:
        raise RuntimeError(f"DPO training failed: {exc}; checkpoints are in {out_dir} "
                           "(rerunning the same command resumes from the latest)") from exc
    state = read_state(out_dir)
    if state is None:
        raise RuntimeError(f"DPO training left no state in {out_dir}")
    return _result(out_dir, state)
