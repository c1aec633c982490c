"""The Diffusion-DPO learner on Ray Train (docs/method.md §9): ``run_dpo``.

The training loop of :mod:`align_rl.training.loop` runs the task of
:mod:`align_rl.alignment.dpo_task` on ``cfg.dpo.num_workers`` workers (a ``TorchTrainer``; DDP over
gloo on CPU, nccl on GPU; one GPU per worker when :func:`align_rl.devices.resolve_use_gpu`
of ``run.device`` and ``dpo.use_gpu`` says so):

- policy initialised from ``init_ckpt`` (default: the reference), the reference frozen;
- AdamW (``cfg.dpo.lr``, no weight decay, linear warm-up over ``cfg.dpo.warmup_steps`` then
  constant), gradient norm clipped at ``cfg.dpo.grad_clip``; the global batch
  ``cfg.dpo.batch_size`` is split over the workers;
- validation (``dpo.val_every`` > 0 and validation inputs given): the checkpoint of the best
  ``val/reward_gain`` (the reference itself, gain 0, until a step beats it) is written to
  ``out_dir/best.pt`` and is the call's result;
- every ``cfg.dpo.checkpoint_every`` steps and at the end, rank 0 writes ``out_dir/policy.pt`` (a
  ``diffusion`` checkpoint, ``extra`` holding ``dpo_step``, ``dpo_version``), then
  ``out_dir/state.pt`` (policy, optimiser, step, version, history; atomically) and reports a Ray
  checkpoint;
- resume: the Ray checkpoint after a worker failure inside a run; ``out_dir/state.pt`` when
  ``run_dpo`` is called again (a rerun of the main job, the next online round);
- metrics every step (:mod:`align_rl.alignment.dpo`'s names, averaged over workers, plus
  ``grad_norm``, ``learning_rate``, ``step``, ``version``) go to wandb (``cfg.run.wandb_mode``,
  offline by default) and ``out_dir/metrics.jsonl``.

Versions: the pretrained reference is policy version 0; each ``run_dpo`` call that trains at
least one step publishes version ``v + 1`` where ``v`` is the version it started from (the
``dpo_version`` of ``init_ckpt``, or of ``out_dir``'s state when it resumes a finished call). A call
interrupted and rerun keeps its version.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align_rl.alignment.dpo_task import BEST_FILE, POLICY_FILE, dpo_task
from align_rl.alignment.pairs import alignment_seed
from align_rl.config import Config
from align_rl.errors import CheckpointError, ConfigError, InputError
from align_rl.io.checkpoints import read_checkpoint, verify_checkpoint
from align_rl.io.pair_store import PairDataset, PairSet, PairStore
from align_rl.devices import resolve_use_gpu
from align_rl.training.harness import fit_loop, init_ray, worker_scaling
from align_rl.training.loop import STATE_FILE, read_state

__all__ = ["BEST_FILE", "POLICY_FILE", "STATE_FILE", "DPOResult", "read_state", "resolve_pairs", "run_dpo"]


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
    """The result recorded in ``out_dir``; its checkpoint (``best.pt`` when validated, else the
    policy) is verified first (readable, checksum, a diffusion model): a damaged one raises
    CheckpointError naming it and the way out, never reported as the result."""
    m = dict(state["history"][-1]) if state["history"] else {}
    best = dict(state.get("best") or {})
    ck = out_dir / (BEST_FILE if best and (out_dir / BEST_FILE).exists() else POLICY_FILE)
    verify_checkpoint(ck, "diffusion", f"delete the folder {out_dir} to run this DPO again")
    return DPOResult(ck, m, int(state["version"]), int(state["step"]), list(state["history"]), best)


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


# ----------------------------------------------------------------------------- driver


def _diffusion_section(path: Path) -> dict:
    return dict(read_checkpoint(path)["config"])


def _version(state: dict | None, init_ckpt: Path, steps: int) -> tuple[int, bool]:
    """``(policy version this call publishes, resume from out_dir's state)``."""
    init_meta = read_checkpoint(init_ckpt)
    if init_meta["kind"] != "diffusion":
        raise CheckpointError(f"{init_ckpt} is a {init_meta['kind']} checkpoint, not the diffusion model")
    if state is None:
        return int(init_meta.get("extra", {}).get("dpo_version", 0)) + 1, False
    if int(state["step"]) < int(state.get("target", steps)):
        return int(state["version"]), True  # an interrupted call: same version
    return int(state["version"]) + 1, True


def _wandb(cfg: Config, out_dir: Path, mode: str, n_pairs: int) -> dict:
    d = cfg.to_dict()
    return {"mode": cfg.run.wandb_mode, "project": cfg.run.wandb_project,
            "dir": str(out_dir / "wandb"), "name": f"{cfg.run.name}-dpo-{mode}",
            "id": f"{cfg.run.name}-dpo-{mode}-{hashlib.sha256(str(out_dir).encode()).hexdigest()[:8]}",
            "config": {"dpo": d["dpo"], "rewards": d["rewards"], "mode": mode, "pairs": n_pairs}}


def _loop_config(cfg: Config, store_path: Path, ps: PairSet, reference_ckpt: Path, init_ckpt: Path,
                 steps: int, version: int, out_dir: Path, resume: bool, mode: str,
                 progress: bool, crash: dict | None, validation: dict | None) -> dict:
    """The config of :func:`align_rl.training.loop.train_loop` for the task of
    :mod:`align_rl.alignment.dpo_task`."""
    d = cfg.dpo
    val_every = int(d.val_every) if validation is not None and int(d.val_every) > 0 else 0
    return {
        "make_task": dpo_task, "label": f"DPO v{version}", "cfg": cfg.to_dict(), "plugins": list(cfg.run.plugins), "store": str(store_path),
        "winner": ps.winner.tolist(), "loser": ps.loser.tolist(), "background": ps.background.tolist(),
        "reference_ckpt": str(reference_ckpt), "init_ckpt": str(init_ckpt),
        "diffusion_cfg": _diffusion_section(reference_ckpt), "version": version,
        "steps": steps, "seed": alignment_seed(cfg.run.seed, cfg.dpo.seed), "lr": float(d.lr), "warmup": int(d.warmup_steps),
        "decay": "constant", "batch_size": int(d.batch_size), "grad_clip": float(d.grad_clip),
        "checkpoint_every": max(1, int(d.checkpoint_every)), "val_every": val_every, "log_every": 1,
        "threads": max(1, int(d.cpus_per_worker)), "out_dir": str(out_dir), "resume": resume,
        "progress": progress, "crash": crash, "validation": validation if val_every else None,
        "wandb": _wandb(cfg, out_dir, mode, len(ps)),
    }


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
    version, resume = _version(state, init_ckpt, steps)
    init_ray()
    use_gpu = resolve_use_gpu(cfg.run.device, bool(cfg.dpo.use_gpu), "dpo.use_gpu")
    conf = _loop_config(cfg, store_path, ps, reference_ckpt, init_ckpt, steps, version, out_dir,
                        resume, mode, progress, crash, validation)
    out_dir.mkdir(parents=True, exist_ok=True)
    scaling = worker_scaling(int(cfg.dpo.num_workers), cfg.dpo.cpus_per_worker, use_gpu,
                             cfg.dpo.gpus_per_worker)
    try:
        fit_loop(conf, scaling, out_dir / "ray", f"dpo-v{version}", int(cfg.dpo.max_failures))
    except Exception as exc:
        raise RuntimeError(f"DPO training failed: {exc}; checkpoints are in {out_dir} "
                           "(rerunning the same command resumes from the latest)") from exc
    state = read_state(out_dir)
    if state is None:
        raise RuntimeError(f"DPO training left no state in {out_dir}")
    return _result(out_dir, state)
