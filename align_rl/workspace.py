"""Where a run keeps its artifacts; the keys that say when they can be reused are computed by
:mod:`align_rl.identity`.

Layout below ``run.workdir``::

    world.zarr                 the dataset (embedded world) with normalisation statistics,
                               keyed by the data section (attribute config_hash)
    normalization/<key>.json   statistics computed for a zarr store without them
    checkpoints/<model>/       pretraining checkpoints (forecaster, vae, diffusion) + final.pt,
                               whose identity is stored in the checkpoint
    backgrounds.zarr           48 h backgrounds, keyed by dataset and forecaster content
    pairs.zarr                 preference store (candidates, scores, pairs), append-only;
                               stores for other inputs are set aside as pairs-<key>.zarr
    dpo/<variant>-<mode>-<key> learner checkpoints and policy versions
    eval/                      report.md, metrics.json, metrics.csv, maps, analyses.zarr
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from align_rl.config import Config
from align_rl.owned import clean_tree


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def from_config(cls, cfg: Config) -> "Workspace":
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
