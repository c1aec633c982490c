"""A forecaster from the config (``forecaster.kind``), as a specification that any process opens on
its own device: :class:`ForecasterSpec`, the registry of kinds :data:`KINDS`, and
:func:`load_forecaster`.

Forecasters reach the Ray actors (samplers' reward actors, forecast actors, the learner's
validation on the Train workers) as a :class:`ForecasterSpec`, never as an opened object: an ONNX
session cannot be pickled, and each actor should run its model on its own device (the CUDA
execution provider when it holds a GPU share). The spec holds the kind, the file, the model's own
statistics (read and checked in the driver), the project's normaliser and the model grid; the
emulator's network travels in it (put once in the object store by the caller, so its weights
move by object reference).

Kinds (:func:`register_forecaster_kind`, docs/method.md §2): ``emulator`` (the network trained
here, or any picklable forecaster object, in ``spec.module``), ``onnx`` (FengWu's interface,
:class:`~align_rl.models.forecaster.OnnxForecaster`, behind
:func:`~align_rl.models.forecaster.on_model_grid`), ``torch`` (an align_rl checkpoint, a
TorchScript file or an exported program; never a pickled module). A plugin module
(``run.plugins``) registers more; ``forecaster.kind`` accepts every registered name.

Apart from :mod:`align_rl.models.forecaster` because it reads checkpoints
(:mod:`align_rl.io.checkpoints`), which rebuild the networks of the models package: the
dependency runs one way, loading → checkpoints → models.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from align_rl.devices import place
from align_rl.errors import CheckpointError, ConfigError
from align_rl.io.checkpoints import is_checkpoint, load_model
from align_rl.io.normalization import Normalizer
from align_rl.models.forecaster import (EmulatorForecaster, Forecaster, OnnxForecaster, TorchForecaster,
                                        load_stats, on_model_grid)


@dataclass(frozen=True)
class ForecasterSpec:
    """What a process needs to open a forecaster (picklable; no open session, no file handle).

    ``kind``: a name of :data:`KINDS`; ``path``: the model file (kinds that read one);
    ``grid``: the model grid (``data.grid``, e.g. ``"32x64"``); ``normalizer``: the project's
    statistics (:meth:`Normalizer.to_dict`, physical units); ``mean``/``std``: the model's own
    statistics, (69,) physical units, or None (the model uses the project's normalisation);
    ``lat_north_to_south``: the model expects latitude descending; ``module``: the forecaster
    object of the ``emulator`` kind (its weights travel with the spec); ``mean_path``/``std_path``:
    the files ``mean``/``std`` were read from (the forecaster's fingerprint reads them)."""

    kind: str
    path: str | None = None
    grid: str | None = None
    normalizer: dict | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    lat_north_to_south: bool = True
    module: Any = None
    mean_path: str | None = None
    std_path: str | None = None

    def project_normalizer(self) -> Normalizer | None:
        return Normalizer.from_dict(self.normalizer) if self.normalizer is not None else None

    def statistics(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The model's ``(mean, std)`` as float64 arrays (69,), or ``(None, None)``."""
        if self.mean is None:
            return None, None
        return np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)

    def open(self, device: str | torch.device = "cpu") -> Forecaster:
        """The forecaster, opened in this process on ``device`` (eval mode, frozen weights)."""
        fc = forecaster_kind(self.kind).open(self, torch.device(device))
        if self.kind != "emulator":
            fc.spec = self  # shipped again as itself (spec_of), never as the open object
        return fc


@dataclass(frozen=True)
class ForecasterKind:
    """A registered forecaster kind: ``open(spec, device) -> Forecaster``; ``needs_path``: the
    kind reads ``forecaster.path``."""

    name: str
    open: Callable[[ForecasterSpec, torch.device], Forecaster]
    needs_path: bool = True


KINDS: dict[str, ForecasterKind] = {}
"""The forecaster kinds by name (``forecaster.kind`` accepts these, :mod:`align_rl.config`)."""


def register_forecaster_kind(name: str, needs_path: bool = True):
    """Decorator: register ``open(spec, device) -> Forecaster`` as forecaster kind ``name``
    (e.g. in a ``run.plugins`` module). The forecaster takes and returns normalised
    ``(B, 69, H, W)`` fields, latitude ascending (:class:`~align_rl.models.forecaster.Forecaster`)."""

    def deco(fn: Callable[[ForecasterSpec, torch.device], Forecaster]):
        KINDS[name] = ForecasterKind(name, fn, needs_path)
        return fn

    return deco


def forecaster_kind(name: str) -> ForecasterKind:
    if name not in KINDS:
        raise ConfigError(f"forecaster.kind={name!r} is not one of {', '.join(KINDS)}; a plugin "
                          "module (run.plugins) can register more")
    return KINDS[name]


def spec_of(forecaster: Any) -> ForecasterSpec:
    """The specification to send ``forecaster`` to another process: the one it was opened from,
    or, for an object opened here (the emulator, a test's analytic model), an ``emulator`` spec
    that carries the object itself (pickled; put the spec in the object store once)."""
    if isinstance(forecaster, ForecasterSpec):
        return forecaster
    spec = getattr(forecaster, "spec", None)
    if isinstance(spec, ForecasterSpec):
        return spec
    return ForecasterSpec("emulator", module=forecaster)


def open_forecaster(spec_or_forecaster: Any, device: str | torch.device = "cpu") -> Forecaster:
    """:meth:`ForecasterSpec.open` of a spec; a forecaster object is opened through its spec."""
    return spec_of(spec_or_forecaster).open(device)


# ----------------------------------------------------------------------------- built-in kinds


@register_forecaster_kind("emulator", needs_path=False)
def _open_emulator(spec: ForecasterSpec, device: torch.device) -> Forecaster:
    if spec.module is None:
        raise ConfigError("an emulator forecaster spec carries its network (spec_of(forecaster))")
    return place(spec.module, device)


def _onnx_providers(device: torch.device) -> list:
    """The CUDA execution provider on the GPU this process holds, else the CPU one."""
    if device.type == "cuda":
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@register_forecaster_kind("onnx")
def _open_onnx(spec: ForecasterSpec, device: torch.device) -> Forecaster:
    mean, std = spec.statistics()
    fc = OnnxForecaster(spec.path, spec.project_normalizer(), spec.mean_path, spec.std_path,
                        lat_north_to_south=spec.lat_north_to_south, providers=_onnx_providers(device),
                        mean=mean, std=std)
    return on_model_grid(fc, spec.grid) if spec.grid else fc


def _load_torch_module(path: Path) -> nn.Module:
    """A TorchScript file (``torch.jit.save``) or an exported program (``torch.export.save``):
    formats that hold a graph and tensors, not code. A pickled module is refused: unpickling runs
    code named in the file, and a file in a shared workdir can be replaced."""
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception:
        pass
    try:
        return torch.export.load(str(path)).module()
    except Exception:
        pass
    raise CheckpointError(
        f"torch forecaster {path} is neither TorchScript, an exported program nor an align_rl "
        "checkpoint; a pickled module is not loaded (unpickling runs code from the file): save it "
        "with torch.jit.save(torch.jit.script(module), path) or torch.export.save(torch.export."
        "export(module, example_inputs), path)")


@register_forecaster_kind("torch")
def _open_torch(spec: ForecasterSpec, device: torch.device) -> Forecaster:
    path = Path(spec.path)
    if not path.exists():
        raise CheckpointError(f"torch forecaster {path} does not exist; set forecaster.path")
    if is_checkpoint(path):
        net, _ = load_model(path, "forecaster", device=device)
        return place(EmulatorForecaster(net), device)
    module = _load_torch_module(path).to(device)
    try:
        module = module.eval()
    except NotImplementedError:  # an exported program's module is already a fixed inference graph
        pass
    mean, std = spec.statistics()
    return TorchForecaster(module, spec.project_normalizer(), mean, std, spec.lat_north_to_south)


# ----------------------------------------------------------------------------- from the config


def forecaster_spec(cfg, ws, normalizer: Normalizer | None, device: str | torch.device = "cpu") -> ForecasterSpec:
    """The spec of ``cfg.forecaster``: the model's statistics files are read and checked here;
    ``emulator`` loads ``cfg.forecaster.path`` or ``ws.final_checkpoint("forecaster")`` (checked
    against the config) into the spec, on ``device``."""
    fc = cfg.forecaster
    kind = forecaster_kind(fc.kind)
    if kind.needs_path and not fc.path:
        raise ConfigError(f"forecaster.kind={fc.kind} needs forecaster.path=FILE")
    mean, std = load_stats(fc.mean_path, "mean"), load_stats(fc.std_path, "std")
    spec = ForecasterSpec(
        kind=fc.kind, path=str(fc.path) if fc.path else None, grid=str(cfg.data.grid),
        normalizer=normalizer.to_dict() if normalizer is not None else None,
        mean=None if mean is None else tuple(float(v) for v in mean),
        std=None if std is None else tuple(float(v) for v in std),
        lat_north_to_south=bool(fc.lat_north_to_south),
        mean_path=str(fc.mean_path) if fc.mean_path else None, std_path=str(fc.std_path) if fc.std_path else None)
    if fc.kind == "emulator":
        path = Path(fc.path) if fc.path else ws.final_checkpoint("forecaster")
        net, _ = load_model(path, "forecaster", expect=fc, device=device)
        spec = replace(spec, module=EmulatorForecaster(net).eval())
    return spec


def load_forecaster(cfg, ws, normalizer: Normalizer | None, device: str | torch.device = "cpu") -> Forecaster:
    """The forecaster named by ``cfg.forecaster.kind``, opened in this process
    (:func:`forecaster_spec` then :meth:`ForecasterSpec.open`): ``emulator`` loads
    ``cfg.forecaster.path`` or the workspace's trained one; ``onnx`` opens ``cfg.forecaster.path``
    with the mean/std files (a model on a fixed grid other than ``cfg.data.grid``, e.g. FengWu's
    721 × 1440, behind :func:`on_model_grid`); ``torch`` loads an align_rl forecaster checkpoint,
    a TorchScript file or an exported program (never a pickled module). In eval mode. Send it to
    other processes as :func:`spec_of` (the spec it came from)."""
    return forecaster_spec(cfg, ws, normalizer, device).open(device)
