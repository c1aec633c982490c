"""Validation of published policy versions beside the asynchronous learner (docs/method.md §9.4).

The learner never validates: a validator actor holds a :class:`PublishedValidation` and scores
the versions the learner publishes (:class:`~align_rl.alignment.validation.Validator`, the same
``val/reward_gain`` as the round-based learner's), keeping the best in ``out_dir/best.pt`` (the
reference itself, gain 0, until a version beats it) and every record in
``out_dir/validation.jsonl`` (a rerun keeps the records and the best).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from align_rl.alignment.dpo_task import BEST_FILE, GAIN
from align_rl.alignment.validation import Validator
from align_rl.config import config_from_dict
from align_rl.io.checkpoints import load_model, read_checkpoint, save_model
from align_rl.models.loading import open_forecaster

VALIDATION_FILE = "validation.jsonl"


def read_records(out_dir: str | Path) -> list[dict]:
    p = Path(out_dir) / VALIDATION_FILE
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def best_record(records: list[dict]) -> dict:
    """``{"step", "version", GAIN}`` of the best record (the reference, gain 0, when none beats it)."""
    best = {"step": 0, "version": 0, GAIN: 0.0}
    for r in records:
        if float(r[GAIN]) > float(best[GAIN]):
            best = {"step": int(r["step"]), "version": int(r["version"]), GAIN: float(r[GAIN])}
    return best


class PublishedValidation:
    """``validation``: the inputs of :class:`Validator` (``codec``, ``forecaster``,
    ``normalizer``, ``lat``, ``lon``, ``tasks``, ``weights``); ``cfg``: the run's config dict."""

    def __init__(self, validation: dict, cfg: dict, reference_ckpt: str | Path, out_dir: str | Path):
        self.cfg = config_from_dict(cfg)
        self.reference_ckpt, self.out_dir = str(reference_ckpt), Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ref, _ = load_model(reference_ckpt, "diffusion")
        self.policy, _ = load_model(reference_ckpt, "diffusion")
        self.diffusion_cfg = dict(read_checkpoint(reference_ckpt)["config"])
        v = validation
        # the forecaster travels as a specification (ForecasterSpec); this actor opens its own
        self.validator = Validator(v["codec"], open_forecaster(v["forecaster"]), ref, v["normalizer"], v["lat"], v["lon"],
                                   v["tasks"], self.cfg, v["weights"], int(self.cfg.dpo.val_members),
                                   seed=int(self.cfg.run.seed))
        self.records = read_records(self.out_dir)
        self.best = best_record(self.records)
        if not (self.out_dir / BEST_FILE).exists():
            self._save(ref, 0, 0)

    def _save(self, model: Any, step: int, version: int) -> None:
        save_model(self.out_dir / BEST_FILE, model, "diffusion", self.diffusion_cfg,
                   extra={"dpo_step": int(step), "dpo_version": int(version),
                          "reference": self.reference_ckpt, "best": dict(self.best)})

    def score(self, version: int, step: int, state_dict: dict) -> dict:
        """The record of policy ``version`` (after ``step`` learner steps): its ``val/...`` metrics,
        ``val/best_step``, the wall-clock ``t0``/``t1``; ``best.pt`` updated when it is the best."""
        done = [r for r in self.records if int(r["version"]) == int(version) and int(r["step"]) == int(step)]
        if done:
            return done[0]
        t0 = time.time()
        self.policy.load_state_dict(state_dict)
        self.policy.eval()
        m = self.validator.score(self.policy)
        if m[GAIN] > float(self.best[GAIN]):
            self.best = {"step": int(step), "version": int(version), GAIN: float(m[GAIN])}
            self._save(self.policy, step, version)
        rec = {"version": int(version), "step": int(step), **m, "val/best_step": self.best["step"],
               "t0": t0, "t1": time.time()}
        self.records.append(rec)
        with open(self.out_dir / VALIDATION_FILE, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec
