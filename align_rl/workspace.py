"""Where a run keeps its artifacts, and the cache keys that say when they can be reused.

Layout below ``run.workdir``::

    world.zarr                 the dataset (embedded world) with normalisation statistics
    checkpoints/<model>/       pretraining checkpoints (forecaster, vae, diffusion) + final.pt
    backgrounds.zarr           48 h backgrounds, keyed by dataset and forecaster checkpoint
    pairs.zarr                 preference store (candidates, scores, pairs), append-only
    dpo/                       learner checkpoints and policy versions
    eval/                      report.md, metrics.json, metrics.csv, maps, analyses.zarr
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from align_rl.config import Config


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def from_config(cls, cfg: Config) -> "Workspace":
        from align_rl.owned import clean_tree

        root = Path(cfg.run.workdir).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        clean_tree(root)  # staging folders and temporary files of dead processes
        return cls(root)

    @property
    def world(self) -> Path:
        return self.root / "world.zarr"

    def checkpoints(self, model: str) -> Path:
        return self.root / "checkpoints" / model

    def final_checkpoint(self, model: str) -> Path:
        return self.checkpoints(model) / "final.pt"

    @property
    def backgrounds(self) -> Path:
        return self.root / "backgrounds.zarr"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs.zarr"

    @property
    def dpo(self) -> Path:
        return self.root / "dpo"

    @property
    def eval(self) -> Path:
        return self.root / "eval"
