"""The main job's stage graph: ``run(cfg)`` (what ``python -m align_rl.train`` calls).

World → pretraining → the preference split's backgrounds → candidates and pairs (sampler and
reward actors from :mod:`align_rl.remote`, committed to the preference store) → Diffusion-DPO per
variant of ``pairs.variants`` → the evaluation and its "Alignment against the paper" section
(:func:`align_rl.evaluation.stage.evaluate_aligned`). Every stage is reused from its cache when
its identity (:mod:`align_rl.identity`) is unchanged, so a killed run resumes from the committed
pairs and the last DPO checkpoint. The command's own docstring (:mod:`align_rl.train`) lists the
user-facing details.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from align_rl import identity, remote
from align_rl.alignment.async_loop import BUFFER_STORE, run_async
from align_rl.alignment.candidates import first_backgrounds
from align_rl.alignment.learner import run_dpo
from align_rl.alignment.online import run_online
from align_rl.alignment.pairs import alignment_seed
from align_rl.alignment.rewards import check_names
from align_rl.alignment.validation import ranking_weights
from align_rl.config import Config, with_values
from align_rl.errors import ConfigError
from align_rl.evaluation.stage import evaluate_aligned
from align_rl.io.pair_store import COMMIT_FILE, PairStore
from align_rl.logs import stage
from align_rl.models.loading import spec_of
from align_rl.training.harness import init_ray
from align_rl.training.resources import check_job
from align_rl.training.pretraining import ensure_pretrained
from align_rl.workspace import Workspace
from align_rl.world.dataset import ensure_world
from align_rl.world.splits import SplitData

LOG = logging.getLogger("align_rl.train")


def _log(msg: str) -> None:
    LOG.info(msg)


def open_pair_store(cfg: Config, ws: Workspace, latent_shape, reference_ckpt: Path,
                    log=_log):
    """The run's preference store for the current inputs (:func:`align_rl.identity.pair_store`).

    With ``pairs.store`` set, that store (an error if it was built for other inputs). By default
    ``<workdir>/pairs.zarr``: a store there built for other inputs (another dataset, reference
    model, sampler, rewards ...) is moved aside to ``pairs-<hash>.zarr`` (nothing is deleted), and
    a store set aside earlier for the current inputs is moved back, so switching configurations
    reuses each one's pairs.
    """
    meta = identity.pair_store(cfg, reference_ckpt)
    path = Path(cfg.pairs.store or ws.pairs)
    if cfg.pairs.store is None and (path / COMMIT_FILE).exists():
        old = dict(PairStore.open(path, mode="r").g.attrs.get("meta", {}))
        if old != meta:
            aside = path.with_name(f"pairs-{identity.digest(old)}.zarr")
            if not aside.exists():
                os.replace(path, aside)
                log(f"pair store {path} was built for other inputs: moved to {aside}")
            mine = path.with_name(f"pairs-{identity.digest(meta)}.zarr")
            if mine.exists() and not path.exists():
                os.replace(mine, path)
                log(f"reusing the pair store {mine} built earlier for these inputs")
    return PairStore.open(path, tuple(latent_shape), list(cfg.rewards.names), meta=meta)


def dpo_dir(cfg: Config, ws: Workspace, variant: str, meta: dict) -> Path:
    """The learner folder of one variant, keyed by everything its result depends on
    (:func:`align_rl.identity.dpo_run`)."""
    return Path(ws.dpo) / f"{variant}-{cfg.dpo.mode}-{identity.dpo_run(cfg, meta)}"


def validation_inputs(cfg: Config, ws: Workspace, store: Any, models: Any, progress: bool = True) -> dict:
    """What the learner's validation needs (:class:`align_rl.alignment.validation.Validator`):
    ``dpo.val_backgrounds`` backgrounds spread over ``data.val`` and the models (the forecaster as
    its spec, :func:`~align_rl.models.loading.spec_of`: the Train workers open their own)."""
    val = SplitData(cfg, ws, store, models, progress, split="val")
    return {"codec": models.codec, "forecaster": spec_of(models.forecaster), "normalizer": val.normalizer,
            "lat": val.lat, "lon": val.lon, "tasks": val.tasks(val.spread_ids(cfg.dpo.val_backgrounds))}


def _validation_for(ctx: dict | None, cfg: Config, variant: str) -> dict | None:
    return None if ctx is None else {**ctx, "weights": ranking_weights(variant, cfg.rewards.weights)}


def _dpo_variant(cfg: Config, ws: Workspace, v: str, pool: Any, pstore: Any, pref: Any, meta: dict,
                 models: Any, reference_ckpt: Path, val_ctx: dict | None, progress: bool):
    """DPO of one variant (``dpo.mode``) -> ``(DPOResult, number of pairs)``."""
    out_dir = dpo_dir(cfg, ws, v, meta)
    if cfg.dpo.mode == "async":  # samplers and learner at once (docs/method.md §9.4)
        res = run_async(cfg, remote.workers(),
                        lambda c: remote.workers().candidate_pool(c, models, pref.lat, pref.lon),
                        models.codec.latent_shape, pref.tasks, pref.order, reference_ckpt, v,
                        out_dir, progress=progress, log=_log, validation=_validation_for(val_ctx, cfg, v),
                        warm_store=pstore, meta=meta)
        return res, len(PairStore.open(out_dir / BUFFER_STORE, mode="r").pair_set(v, min_version=0))
    if cfg.dpo.mode in ("online", "sync"):  # sync rounds ("online" is their alias)
        # each run has its own lineage of policy versions, so its own buffer in its own folder
        vpath = out_dir / BUFFER_STORE
        vstore = PairStore.open(vpath, tuple(models.codec.latent_shape),
                                list(cfg.rewards.names), meta=meta)
        res = run_online(cfg, ws, pool, vstore, pref.tasks, pref.order, reference_ckpt, v,
                         out_dir, progress=progress, log=_log,
                         validation=_validation_for(val_ctx, cfg, v))
        return res, len(vstore.pair_set(v))
    # from the stored per-candidate scores with the current weights: the same pairs
    # as committed when nothing changed, a new selection when the weights did
    ps = pstore.reselect(
        cfg.rewards.weights, v, cfg.pairs.pairs_per_background,
        alignment_seed(cfg.run.seed, cfg.dpo.seed),
        cfg.pairs.top_k_phys, cfg.pairs.decile, min_version=0,
        normalize=cfg.rewards.normalize,
        bg_ids=first_backgrounds(pref.order, cfg.pairs.backgrounds))
    res = run_dpo(cfg, ws, (pstore, ps), reference_ckpt, out_dir=out_dir, mode=v,
                  progress=progress, validation=_validation_for(val_ctx, cfg, v))
    return res, len(ps)


def seed_list(cfg: Config) -> list[int]:
    """The alignment seeds the main job runs for each variant: ``0 … dpo.seeds − 1`` offset by
    ``dpo.seed`` (docs/method.md §9.5)."""
    return [int(cfg.dpo.seed) + k for k in range(int(cfg.dpo.seeds))]


def _check_inputs(cfg: Config) -> None:
    """Fail before any expensive step."""
    check_names(list(cfg.rewards.names), cfg.rewards.weights)
    for v in cfg.pairs.variants:
        if v == "P" and "phys" not in cfg.rewards.names:
            raise ConfigError("pairs.variants has P (ranked by Geo-Score): add phys to rewards.names")


def run(cfg: Config, progress: bool = True, evaluate: bool = True) -> dict:
    """The main job (see the module docstring); returns a summary dict (also written to
    ``<workdir>/train_summary.json``). One console line per stage start and end
    (:func:`align_rl.logs.stage`); the Ray actors come from :mod:`align_rl.remote`."""
    _check_inputs(cfg)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    ws = Workspace.from_config(cfg)
    init_ray()
    check_job(cfg)  # every stage's Ray resources fit the cluster (else it would wait forever)
    with stage("world", LOG) as st:
        store = ensure_world(cfg, ws, progress=progress)
    timings["world_s"] = st.seconds
    with stage("pretraining", LOG) as st:
        models = ensure_pretrained(cfg, ws, progress=progress)
    timings["pretrain_s"] = st.seconds
    reference_ckpt = Path(models.paths.get("diffusion", ws.final_checkpoint("diffusion")))
    with stage("backgrounds of the preference split", LOG) as st:
        pref = SplitData(cfg, ws, store, models, progress, split="pref")
    timings["backgrounds_s"] = st.seconds
    _log(f"preference split: {len(pref.times)} usable times, using "
         f"{min(int(cfg.pairs.backgrounds), len(pref.times))} "
         f"backgrounds × {cfg.pairs.candidates} candidates ({cfg.pairs.guidance})")

    meta = identity.pair_store(cfg, reference_ckpt)
    pstore = open_pair_store(cfg, ws, models.codec.latent_shape, reference_ckpt)
    variants = list(dict.fromkeys(cfg.pairs.variants))
    pool = remote.workers().candidate_pool(cfg, models, pref.lat, pref.lon)
    results = {}
    info: dict[str, Any] = {"pairs": {}, "dpo": {}}
    try:
        if cfg.dpo.mode == "offline":
            with stage("pairs", LOG) as st:
                first = first_backgrounds(pref.order, cfg.pairs.backgrounds)
                built = pool.build(pref.tasks(first), pstore, variants, progress=progress)
            timings["pairs_s"] = st.seconds
            _log(f"pairs: {built['pairs']} new ({built['backgrounds']} backgrounds in "
                 f"{built['seconds']:.1f} s); store holds {pstore.num_pairs} pairs")
        pool.release()  # free the actors' resources for the learner
        pstore.verify()  # a cached DPO result is trusted only on a sound store (chunks, COMMIT)
        val_ctx = None
        if cfg.dpo.val_every:
            with stage("validation backgrounds", LOG):
                val_ctx = validation_inputs(cfg, ws, store, models, progress)
        for v in variants:
            results[v] = []
            for s in seed_list(cfg):
                cfg_s = with_values(cfg, {"dpo.seed": s})
                label = f"DPO-{v}" + (f" seed {s}" if len(seed_list(cfg)) > 1 else "")
                with stage(label, LOG) as st:
                    res, info["pairs"][v] = _dpo_variant(cfg_s, ws, v, pool, pstore, pref, meta,
                                                         models, reference_ckpt, val_ctx, progress)
                timings[f"dpo_{v}_s"] = timings.get(f"dpo_{v}_s", 0.0) + st.seconds
                results[v].append(res)
                acc = res.metrics.get("rewards/accuracies", float("nan"))
                _log(f"{label}: {res.step} steps, version {res.version}, loss "
                     f"{res.metrics.get('loss', float('nan')):.4f}, accuracy {acc:.2f} -> "
                     f"{res.checkpoint}")
            info["dpo"][v] = {"steps": results[v][0].step, "beta": cfg.dpo.beta, "lr": cfg.dpo.lr,
                              "anchor": cfg.dpo.anchor, "t": [cfg.dpo.t_min, cfg.dpo.t_max],
                              "mode": cfg.dpo.mode, "seeds": seed_list(cfg),
                              "best_step": [r.best.get("step") for r in results[v]]}
    finally:
        pool.shutdown()

    def entry(s, r):
        return {"seed": s, "checkpoint": str(r.checkpoint), "version": r.version, "step": r.step,
                "metrics": r.metrics, "best": r.best}

    # per variant: the first seed's result, and every seed's under "seeds"
    summary: dict[str, Any] = {"variants": {v: {**entry(seed_list(cfg)[0], rs[0]),
                                                "seeds": [entry(s, r) for s, r in zip(seed_list(cfg), rs)]}
                                            for v, rs in results.items()},
                               "pairs_store": str(pstore.path), "pairs_total": pstore.num_pairs}
    if evaluate:
        with stage("evaluation", LOG) as st:
            summary.update(evaluate_aligned(cfg, ws, models.eps_model,
                                            {v: [r.checkpoint for r in rs] for v, rs in results.items()},
                                            variants, info, progress=progress))
        timings["eval_s"] = st.seconds
    timings["total_s"] = time.perf_counter() - t_start
    summary["timings"] = timings
    (ws.root / "train_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    _log("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return summary
