"""A forecaster from the config (``forecaster.kind``): the emulator's checkpoint, an ONNX model or
a torch module, as a :class:`~align_rl.models.forecaster.Forecaster` on normalised fields
``(B, 69, H, W)``.

Apart from :mod:`align_rl.models.forecaster` because it reads checkpoints
(:mod:`align_rl.io.checkpoints`), which rebuild the networks of the models package: the
dependency runs one way, loading → checkpoints → models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from align_rl.errors import CheckpointError, ConfigError
from align_rl.io.checkpoints import is_checkpoint, load_model
from align_rl.io.normalization import Normalizer
from align_rl.models.forecaster import (EmulatorForecaster, Forecaster, OnnxForecaster, TorchForecaster,
                                        load_stats, on_model_grid)


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


def load_forecaster(cfg, ws, normalizer: Normalizer | None, device: str | torch.device = "cpu") -> Forecaster:
    """The forecaster named by ``cfg.forecaster.kind``: ``emulator`` loads
    ``cfg.forecaster.path`` or ``ws.final_checkpoint("forecaster")`` (checked against the config);
    ``onnx`` opens ``cfg.forecaster.path`` with the mean/std files (a model on a fixed grid other
    than ``cfg.data.grid``, e.g. FengWu's 721 × 1440, behind :func:`on_model_grid`); ``torch``
    loads an align_rl forecaster checkpoint, a TorchScript file or an exported program (never a
    pickled module). Modules are put in eval mode."""
    fc = cfg.forecaster
    if fc.kind == "emulator":
        path = Path(fc.path) if fc.path else ws.final_checkpoint("forecaster")
        net, _ = load_model(path, "forecaster", expect=fc, device=device)
        return EmulatorForecaster(net).eval()
    if not fc.path:
        raise ConfigError(f"forecaster.kind={fc.kind} needs forecaster.path=FILE")
    if fc.kind == "onnx":
        onnx_fc = OnnxForecaster(fc.path, normalizer, fc.mean_path, fc.std_path, fc.lat_north_to_south)
        return on_model_grid(onnx_fc, cfg.data.grid)
    path = Path(fc.path)
    if not path.exists():
        raise CheckpointError(f"torch forecaster {path} does not exist; set forecaster.path")
    if is_checkpoint(path):
        net, _ = load_model(path, "forecaster", device=device)
        return EmulatorForecaster(net).eval()
    module = _load_torch_module(path).to(device)
    try:
        module = module.eval()
    except NotImplementedError:  # an exported program's module is already a fixed inference graph
        pass
    return TorchForecaster(module, normalizer, load_stats(fc.mean_path, "mean"),
                           load_stats(fc.std_path, "std"), fc.lat_north_to_south)
