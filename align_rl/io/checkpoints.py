"""Model checkpoints that know how to rebuild their model and refuse a mismatched one.

A checkpoint (``torch.save`` of a dict, written atomically: :func:`align_rl.owned.staged`) holds
``format``, ``version``, ``kind`` (``vae`` | ``diffusion`` | ``forecaster``), ``config`` (the
model's config section as a dict), ``shapes`` (``grid`` ``(H, W)`` and/or ``latent_shape``
``(C, h, w)``), ``state_dict`` and ``extra`` (e.g. the VAE's latent statistics, training step).
:func:`load_model` rebuilds the network from the stored section and raises :class:`CheckpointError`
naming the mismatch and the fix when the kind, the architecture keys of the section or the shapes
differ from what the caller expects.

Integrity: every file is read with ``torch.load(weights_only=True)`` (tensors and plain data only;
a pickled object that would run code is refused), and a checkpoint carries ``checksum``, the
SHA-256 of its content (:func:`content_digest`), which :func:`read_checkpoint` verifies, so flipped
bytes in the weights raise :class:`CheckpointError` instead of loading silently; a checkpoint or
state without its checksum is refused too (its content cannot be verified). Training states
(``state.pt`` of the pretraining loops and the DPO learner) are written and read the same way by
:func:`save_state` and :func:`load_state`.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from align_rl import __version__ as _pkg_version
from align_rl.errors import CheckpointError, ConfigError
from align_rl.models.dit import build_dit
from align_rl.models.forecaster import build_emulator
from align_rl.models.vae import LatentCodec, build_vae
from align_rl.owned import staged

FORMAT = "align_rl.checkpoint"
VERSION = "1"
KINDS = ("vae", "diffusion", "forecaster")

ARCH_KEYS: dict[str, tuple[str, ...]] = {
    "vae": ("patch", "latent_channels", "embed_dim", "depth", "heads", "window", "mlp_ratio"),
    "diffusion": ("patch", "embed_dim", "depth", "heads", "mlp_ratio", "background_skip", "eps_skip"),
    "forecaster": ("hidden", "depth"),
}
"""Config keys that change the network; the others (steps, lr, ...) may differ freely."""


def _section(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if is_dataclass(cfg):
        return asdict(cfg)
    return dict(cfg)


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "EmulatorForecaster":
            model = model.net
        else:
            return model


def _shapes_of(model: nn.Module) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    if getattr(model, "grid", None) is not None:
        out["grid"] = [int(v) for v in model.grid]
    if getattr(model, "latent_shape", None) is not None:
        out["latent_shape"] = [int(v) for v in model.latent_shape]
    return out


def _feed(h, obj: Any) -> None:
    """Feed a canonical byte form of ``obj`` (tensors, containers, scalars) into the hash."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for k in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def _plain(obj: Any) -> Any:
    """numpy scalars and arrays as Python numbers and tensors (``weights_only`` loads them)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    return obj


def content_digest(obj: dict) -> str:
    """SHA-256 (hex) of a checkpoint or state dict without its ``checksum`` entry."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in obj.items() if k != "checksum"})
    return h.hexdigest()


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    lines = str(exc).splitlines()
    return lines[0] if lines and lines[0].strip() else type(exc).__name__


def _torch_load(p: Path) -> Any:
    """``torch.load`` of tensors and plain data only (never a pickled object that runs code)."""
    return torch.load(p, map_location="cpu", weights_only=True)


def _verify(obj: Any, p: Path, fix: str) -> None:
    if isinstance(obj, dict) and "checksum" not in obj:
        raise CheckpointError(f"{p} has no checksum, so its content cannot be verified (edited, or "
                              f"written by another program); {fix}")
    if isinstance(obj, dict) and obj["checksum"] != content_digest(obj):
        raise CheckpointError(
            f"{p} is damaged: its content does not match its stored checksum (flipped or "
            f"truncated bytes); {fix}"
        )


def save_state(obj: dict, path: str | Path) -> Path:
    """Write a training state dict (tensors, numbers, strings, lists, dicts) atomically, with its
    checksum. Read it with :func:`load_state`."""
    obj = _plain(dict(obj))
    obj["checksum"] = content_digest(obj)
    return _save_atomic(obj, path)


def _save_atomic(obj: dict, path: str | Path) -> Path:
    """``torch.save`` into a marked staging folder beside ``path``, then rename it into place
    (:func:`align_rl.owned.staged`)."""
    path = Path(path)
    with staged(path, "checkpoint") as tmp:
        torch.save(obj, tmp)
    return path


def load_state(path: str | Path, fix: str = "delete it to start that run again") -> dict:
    """A state dict written by :func:`save_state`, read with ``weights_only=True`` and verified
    (checksum present and matching); :class:`CheckpointError` naming the file and ``fix``."""
    p = Path(path)
    try:
        obj = _torch_load(p)
    except Exception as exc:  # noqa: BLE001 - unpickling refused, truncated file, ...
        raise CheckpointError(f"{p} is not a readable training state ({_first_line(exc)}); "
                              f"{fix}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a training state; {fix}")
    _verify(obj, p, fix)
    obj.pop("checksum", None)
    return obj


def save_model(path: str | Path, model: nn.Module, kind: str, section_cfg: Any,
               extra: dict | None = None, shapes: dict | None = None) -> Path:
    """Write ``model`` (unwrapped from DDP / compile) as a ``kind`` checkpoint atomically.

    ``section_cfg``: the model's config section (dataclass or dict). A :class:`LatentCodec` saved
    as ``vae`` stores its latent statistics in ``extra`` (``latent_mean``, ``latent_std``).
    ``shapes`` overrides the shapes read from the model (``grid``, ``latent_shape``).
    """
    if kind not in KINDS:
        raise ConfigError(f"checkpoint kind {kind!r} is not one of {', '.join(KINDS)}")
    model = _unwrap(model)
    extra = dict(extra or {})
    if type(model).__name__ == "LatentCodec":
        extra.setdefault("latent_mean", model.latent_mean.detach().cpu().tolist())
        extra.setdefault("latent_std", model.latent_std.detach().cpu().tolist())
        model = model.vae
    sh = _shapes_of(model)
    sh.update({k: [int(x) for x in v] for k, v in (shapes or {}).items()})
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "package_version": _pkg_version,
        "kind": kind,
        "config": _section(section_cfg),
        "shapes": sh,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra,
    }
    obj["checksum"] = content_digest(obj)
    return _save_atomic(obj, path)


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint written by :func:`save_model`."""
    try:
        obj = _torch_load(Path(path))
    except Exception:
        return False
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict; CheckpointError when missing or not an align_rl checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"no checkpoint at {p}; train it first (python -m align_rl.pretrain MODEL) or fix the path"
        )
    try:
        obj = _torch_load(p)
    except Exception as exc:
        raise CheckpointError(f"{p} is not a readable checkpoint ({_first_line(exc)}); "
                              "retrain or fix the path") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not an align_rl checkpoint (written by save_model)")
    _verify(obj, p, "retrain it or restore it from a copy")
    if str(obj.get("version")) != VERSION:
        raise CheckpointError(
            f"{p} has checkpoint format version {obj.get('version')}, this code reads {VERSION}; "
            "retrain the model with this version"
        )
    return obj


def verify_checkpoint(path: str | Path, kind: str, fix: str) -> dict[str, Any]:
    """The checkpoint at ``path`` (which exists) read and verified as a ``kind`` checkpoint:
    readable with ``weights_only``, its checksum present and matching, of the ``kind`` asked for;
    else :class:`CheckpointError` naming the file, what is wrong and ``fix`` (the way out)."""
    p = Path(path)
    try:
        obj = read_checkpoint(p)
    except CheckpointError as exc:
        raise CheckpointError(f"{str(exc).split('; ')[0]}; it is not used or trained over: {fix}") from None
    if obj.get("kind") != kind:
        raise CheckpointError(f"{p} is a {obj.get('kind')} checkpoint, not a {kind} one; it is not "
                              f"used or trained over: {fix}")
    return obj


def _build(kind: str, cfg: dict[str, Any], shapes: dict[str, Any]) -> nn.Module:
    if kind == "vae":
        return build_vae(cfg, tuple(shapes["grid"]))
    if kind == "diffusion":
        return build_dit(cfg, tuple(shapes["latent_shape"]))
    return build_emulator(cfg, tuple(shapes["grid"]) if "grid" in shapes else None)


def load_model(path: str | Path, kind: str, expect: Any = None, device: str | torch.device = "cpu",
               shapes: dict | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a ``kind`` model from its checkpoint -> ``(model in eval mode, meta)``.

    ``expect``: the config section the caller runs with (dataclass or dict); its architecture keys
    (:data:`ARCH_KEYS`) must equal the stored ones. ``shapes``: expected ``grid`` / ``latent_shape``
    (may also be given inside ``expect`` under those keys). ``meta``: ``kind``, ``config``,
    ``shapes``, ``extra``, ``version``, ``path``.
    """
    obj = read_checkpoint(path)
    p = Path(path)
    if obj["kind"] != kind:
        raise CheckpointError(
            f"{p} is a {obj['kind']} checkpoint, not a {kind} one; point to the {kind} checkpoint"
        )
    stored = obj["config"]
    exp = _section(expect)
    want_shapes = {k: exp.pop(k) for k in ("grid", "latent_shape") if k in exp}
    want_shapes.update(shapes or {})
    diffs = [
        f"{k}: checkpoint {stored[k]!r} vs config {exp[k]!r}"
        for k in ARCH_KEYS[kind]
        if k in stored and k in exp and stored[k] != exp[k]
    ]
    if diffs:
        raise CheckpointError(
            f"{kind} checkpoint {p} was trained with another architecture ({'; '.join(diffs)}); "
            f"set the {kind} config to the checkpoint's values or retrain "
            f"(python -m align_rl.pretrain {kind})"
        )
    for k, v in want_shapes.items():
        got = obj["shapes"].get(k)
        if v is not None and got is not None and list(got) != [int(x) for x in v]:
            raise CheckpointError(
                f"{kind} checkpoint {p} is for {k} {tuple(got)}, but this run needs {tuple(v)}; "
                f"retrain the {kind} for this grid (python -m align_rl.pretrain {kind})"
            )
    try:
        model = _build(kind, stored, obj["shapes"])
    except (ConfigError, KeyError) as exc:
        raise CheckpointError(f"cannot rebuild the {kind} of {p}: {exc}") from None
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{p} does not match the {kind} network of this code version ({_first_line(exc)}); "
            "retrain it"
        ) from None
    model.to(device).eval()
    meta = {k: obj[k] for k in ("kind", "config", "shapes", "extra", "version")}
    meta["path"] = str(p)
    return model, meta


def load_codec(path: str | Path, expect: Any = None, device: str | torch.device = "cpu",
               shapes: dict | None = None):
    """A :class:`~align_rl.models.vae.LatentCodec` from a ``vae`` checkpoint holding latent
    statistics (``extra["latent_mean"]``, ``extra["latent_std"]``)."""
    vae, meta = load_model(path, "vae", expect=expect, device=device, shapes=shapes)
    ex = meta["extra"]
    if "latent_mean" not in ex or "latent_std" not in ex:
        raise CheckpointError(
            f"VAE checkpoint {path} has no latent statistics; fit them (fit_latent_stats) and save "
            "the LatentCodec, or rerun python -m align_rl.pretrain vae"
        )
    return LatentCodec(vae, ex["latent_mean"], ex["latent_std"]).to(device).eval(), meta
