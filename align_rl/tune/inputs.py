"""The sweep's shared inputs, made once before the trials.

The dataset, pretrained models, backgrounds and the reference's scored candidates in the pair
store (each reused from its cache, exactly as the main job builds them), and the reference's
validation metrics on the same validation times, observations and sampler seeds as every trial,
so that each trial also reports its paired % change against the reference.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from align_rl import identity
from align_rl.alignment.candidates import first_backgrounds
from align_rl.config import Config
from align_rl.evaluation.runner import EvalData, run_evaluation
from align_rl.io import era5
from align_rl.pipeline import open_pair_store
from align_rl.training.pretraining import ensure_pretrained
from align_rl.tune.results import write_atomic
from align_rl.tune.spec import SweepSpec, steps_per_stage
from align_rl.tune.trial import (
    candidate_pool, eval_metrics, eval_per_time, trial_config, trial_points, validation_config,
)
from align_rl.workspace import Workspace
from align_rl.world.dataset import ensure_world
from align_rl.world.splits import SplitData, open_split

LOG = logging.getLogger("align_rl.sweep")


def prepare_shared(cfg: Config, spec: SweepSpec, out: Path, progress: bool = True) -> dict[str, Any]:
    """Dataset, pretrained models, backgrounds and the reference's scored candidates (each from its
    cache when present), then the reference's validation metrics (cached in
    ``reference_val.json``). Returns the trials' shared context."""
    ws = Workspace.from_config(cfg)
    val = asdict(spec.validation)
    n_bg = max(int(trial_config(cfg, p).pairs.backgrounds) for p in trial_points(spec))
    pairs_path, world, order = _ensure_pairs(cfg, ws, progress, n_bg)
    vcfg = validation_config(cfg, val)
    data, ref_model = validation_data(cfg, ws, progress)
    ref_file = out / "reference_val.json"
    key = identity.sweep_reference(cfg, val, ws.final_checkpoint("diffusion"))
    ref = ref_times = None
    if ref_file.exists():
        stored = json.loads(ref_file.read_text())
        if stored.get("key") == json.loads(json.dumps(key)) and "per_time" in stored:
            ref, ref_times = stored["metrics"], stored["per_time"]
    if ref is None:
        summary = run_evaluation(vcfg, ws, {"reference": ref_model}, data=data, out=out / "reference_val",
                                 progress=progress)
        row = f"reference/{spec.validation.method}"
        ref, ref_times = eval_metrics(summary, row), eval_per_time(summary, row)
        write_atomic(ref_file, json.dumps({"key": key, "metrics": ref, "per_time": ref_times}, indent=1))
    return {"base": cfg.to_dict(), "name": spec.name, "workdir": str(ws.root), "sweep_dir": str(out),
            "world": str(world), "pref_order": [int(i) for i in order],
            "pairs": str(pairs_path), "reference_ckpt": str(ws.final_checkpoint("diffusion")),
            "validation": val, "reference_metrics": ref, "reference_per_time": ref_times, "eval_data": data,
            "stages": spec.stages, "steps_per_stage": steps_per_stage(spec, cfg)}


def validation_data(cfg: Config, ws: Any, progress: bool = False):
    """``(EvalData of the VAL split, reference ε model)`` from the caches of the BASE config.

    (Not ``load_eval_data(validation_config(...))``: the validation config moves ``data.test``,
    which is part of the dataset identity that the pretraining and background caches are keyed
    by, so it would retrain.)"""
    store = ensure_world(cfg, ws, progress=progress)
    pre = ensure_pretrained(cfg, ws, progress=progress)
    normalizer = getattr(pre, "normalizer", None) or era5.load_normalizer(store)
    truth, bgs = open_split(cfg, ws, store, pre.forecaster, cfg.data.val, progress)
    return EvalData(truth, bgs, normalizer, pre.codec, pre.forecaster, truth_store=Path(store)), pre.eps_model


def _ensure_pairs(cfg: Config, ws: Any, progress: bool, backgrounds: int) -> tuple[Path, Path, list[int]]:
    """The shared pair store with the reference's scored candidates, exactly as the main job
    builds it (:func:`align_rl.pipeline.open_pair_store`: the same store identity, a store of
    other inputs moved aside; the first ``backgrounds`` of the seeded background order, the
    largest ``pairs.backgrounds`` of the trials): reused when the main job (or an earlier sweep)
    has built it, completed otherwise. Returns ``(store path, dataset path, seeded order)``."""
    world = ensure_world(cfg, ws, progress=progress)
    models = ensure_pretrained(cfg, ws, progress=progress)
    reference_ckpt = Path(models.paths.get("diffusion", ws.final_checkpoint("diffusion")))
    pref = SplitData(cfg, ws, world, models, progress, split="pref")
    store = open_pair_store(cfg, ws, tuple(models.codec.latent_shape), reference_ckpt)
    path = Path(store.path)
    if backgrounds > len(pref.order):  # at most the usable times, as in the main job
        LOG.warning(f"pairs.backgrounds={backgrounds} is more than the {len(pref.order)} usable times of "
                    f"data.pref: trials use all {len(pref.order)} (a wider data.pref gives more)")
        backgrounds = len(pref.order)
    first = first_backgrounds(pref.order, backgrounds)
    todo = [i for i in first if (i, 0, cfg.pairs.guidance) not in store.done_keys()]
    if todo:
        pool = candidate_pool(cfg, models, pref.lat, pref.lon)
        try:
            pool.build(pref.tasks(todo), store, list(dict.fromkeys(cfg.pairs.variants)), progress=progress)
        finally:
            pool.shutdown()
    return path, Path(world), [int(i) for i in pref.order]
