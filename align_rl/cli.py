"""Checks every command runs on its arguments before any work starts.

- :func:`parse_args`: options and positionals in any order (``pretrain all --force vae.steps=2``
  as well as ``pretrain --force all vae.steps=2``);
- :func:`split_model_specs`: ``--models A=x.pt run.workdir=W`` gives the models ``A`` and the
  override ``run.workdir=W`` (an item whose name starts with a config section is an override);
- :func:`check_model_specs`: every ``NAME=CHECKPOINT`` parses and names an existing diffusion
  checkpoint;
- :func:`preflight`: the inputs the configuration names exist, the outputs it would replace
  belong to align_rl (:mod:`align_rl.owned`) and the cached pretrained models of the work
  directory are sound (a damaged one is refused, never trained over), before a world is simulated
  or a model trained. It reads, never writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

from align_rl.config import Config
from align_rl.errors import CheckpointError, ConfigError, InputError
from align_rl.io.checkpoints import read_checkpoint, verify_checkpoint
from align_rl.owned import require_owned


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]]*=")


def _is_override(token: str) -> bool:
    """``section.key=value`` or a sweep key ``num_samples=2`` (never a path or an option)."""
    return bool(_OVERRIDE.match(token))


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_intermixed_args``: positionals may come before, between or after options.

    For a command with a required positional (``pretrain STAGE``, ``sweep SPEC``) the ``key=value``
    overrides may also come before it (``pretrain --force vae.steps=2 all``): they are moved after
    every other item, in their order, before parsing. A missing positional is named alone (the
    overrides are optional)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = [a for a in parser._actions if not a.option_strings and a.nargs is None]
    if chosen:
        takes_value = {o for a in parser._actions if a.option_strings and a.nargs != 0
                       for o in a.option_strings}
        rest, overrides, skip = [], [], False
        for tok in argv:
            if skip:
                rest.append(tok)
                skip = False
            elif tok in takes_value:
                rest.append(tok)
                skip = True
            elif _is_override(tok):
                overrides.append(tok)
            else:
                rest.append(tok)
        positionals = [t for i, t in enumerate(rest) if not t.startswith("-")
                       and not (i and rest[i - 1] in takes_value)]
        if not positionals and not any(t in ("-h", "--help") for t in rest):
            a = chosen[0]
            what = f" (one of {', '.join(map(str, a.choices))})" if a.choices else f" ({a.help})"
            parser.error(f"the following argument is required: {a.dest}{what}")
        argv = rest + overrides
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


def check_eval_models(cfg: Config, available: list[str]) -> None:
    """Every name of ``eval.models`` (and so ``eval.baseline``) is a model this command evaluates
    (``available``); else ConfigError naming the key and the models there are."""
    unknown = [m for m in cfg.eval.models if m not in available]
    if unknown:
        raise ConfigError(
            f"eval.models names {', '.join(map(repr, unknown))}, which this command does not evaluate; "
            f"the models are {', '.join(available)}"
            + (" (give another with --models NAME=CHECKPOINT)" if "reference" in available
               and len(available) == 1 else ""))


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


CACHED_MODELS = ("forecaster", "vae", "diffusion")
"""The pretrained models cached as ``<workdir>/checkpoints/<model>/final.pt``."""


def check_cached_models(workdir: str | Path, force: tuple[str, ...] = ()) -> None:
    """Every cached final checkpoint of ``workdir`` (except the models in ``force``, which are
    retrained) reads, passes its checksum and is of its model; else :class:`CheckpointError` naming
    the file and the way out (``--force`` or delete it)."""
    for model in CACHED_MODELS:
        p = Path(workdir) / "checkpoints" / model / "final.pt"
        if model in force or not (p.exists() or p.is_symlink()):
            continue
        verify_checkpoint(p, model, f"retrain it with python -m align_rl.pretrain {model} --force, "
                          f"or delete {p} (or restore it from a copy)")


def preflight(cfg: Config, outputs: tuple[str, ...] = (), eval_out: str | None = None,
              force: tuple[str, ...] = ()) -> None:
    """Fail before any work when an input the config names is missing, an output folder it
    would replace is not align_rl's or a cached pretrained model is damaged
    (:func:`check_cached_models`; ``force``: the models about to be retrained). ``outputs``:
    ``eval`` (the evaluation folder: ``eval_out``, else ``eval.out``, else ``<workdir>/eval``),
    ``pairs`` (``pairs.store``)."""

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
    check_cached_models(cfg.run.workdir, force)
