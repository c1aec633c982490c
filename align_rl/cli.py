"""Checks every command runs on its arguments before any work starts.

- :func:`parse_args`: options and positionals in any order (``pretrain all --force vae.steps=2``
  as well as ``pretrain --force all vae.steps=2``);
- :func:`split_model_specs`: ``--models A=x.pt run.workdir=W`` gives the models ``A`` and the
  override ``run.workdir=W`` (an item whose name starts with a config section is an override);
- :func:`check_model_specs`: every ``NAME=CHECKPOINT`` parses and names an existing diffusion
  checkpoint;
- :func:`preflight`: the inputs the configuration names exist and the outputs it would replace
  belong to align_rl, before a world is simulated or a model trained. It reads, never writes
  (except adopting an output folder written before ownership markers, see :mod:`align_rl.owned`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from align_rl.config import Config
from align_rl.errors import CheckpointError, ConfigError, InputError
from align_rl.io.checkpoints import read_checkpoint
from align_rl.owned import require_owned


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_intermixed_args``: positionals may come before, between or after options."""
    return parser.parse_intermixed_args(argv)


def _sections() -> set[str]:
    return {f.name for f in dataclasses.fields(Config)} | {"preset"}


def split_model_specs(items: list[str]) -> tuple[list[str], list[str]]:
    """``(model specs, config overrides)`` of the items given after ``--models``."""
    models, overrides = [], []
    for item in items:
        name = item.split("=", 1)[0]
        if ("." in name and name.split(".", 1)[0] in _sections()) or name == "preset":
            overrides.append(item)
        else:
            models.append(item)
    return models, overrides


def check_model_specs(specs: list[str]) -> dict[str, Path]:
    """``{name: checkpoint}`` of ``NAME=CHECKPOINT`` items, each an existing diffusion checkpoint."""

    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise ConfigError(f"--models entry {spec!r} must be NAME=CHECKPOINT, e.g. Align-M=dpo/policy.pt")
        if name == "reference":
            raise ConfigError("--models: the name 'reference' is the pretrained model; choose another name")
        if name in out:
            raise ConfigError(f"--models names {name!r} twice")
        p = Path(path).expanduser()
        if not p.is_file():
            raise CheckpointError(f"checkpoint {p} of model {name!r} does not exist; fix the path")
        kind = read_checkpoint(p)["kind"]
        if kind != "diffusion":
            raise CheckpointError(f"checkpoint {p} of model {name!r} is a {kind} checkpoint, not a "
                                  "diffusion model (align_rl.io.checkpoints.save_model(..., 'diffusion', ...))")
        out[name] = p
    return out


def _is_pair_store_or_empty(p: Path) -> bool:
    if not p.exists():
        return True
    if not p.is_dir():
        return False
    if not any(p.iterdir()):
        return True
    try:
        meta = json.loads((p / "zarr.json").read_text())
    except (OSError, ValueError):
        return (p / "COMMIT").exists()
    return str(meta.get("attributes", {}).get("format", "")).startswith("align_rl.pairs/")


def preflight(cfg: Config, outputs: tuple[str, ...] = (), eval_out: str | None = None) -> None:
    """Fail before any work when an input the config names is missing or an output folder it
    would replace is not align_rl's. ``outputs``: ``eval`` (the evaluation folder: ``eval_out``,
    else ``eval.out``, else ``<workdir>/eval``), ``pairs`` (``pairs.store``)."""

    d = cfg.data
    if d.source == "zarr" and "://" not in str(d.path) and not Path(str(d.path)).expanduser().exists():
        raise InputError(f"data.path={d.path} does not exist; point it at a WeatherBench2-layout store")
    fc = cfg.forecaster
    if fc.path and not Path(fc.path).expanduser().exists():
        raise CheckpointError(f"forecaster.path={fc.path} does not exist; fix the path")
    for key in ("mean_path", "std_path"):
        v = getattr(fc, key)
        if fc.kind != "emulator" and v and not Path(v).expanduser().exists():
            raise InputError(f"forecaster.{key}={v} does not exist; fix the path")
    if "pairs" in outputs and cfg.pairs.store:
        p = Path(cfg.pairs.store).expanduser()
        if not _is_pair_store_or_empty(p):
            raise InputError(f"pairs.store={p} exists and is not an align_rl preference store; nothing "
                             "was written: point pairs.store at a new or empty folder")
    if "eval" in outputs:
        out = Path(eval_out or cfg.eval.out or Path(cfg.run.workdir) / "eval").expanduser()
        require_owned(out, "evaluation output (eval.out)")
