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


def _load_torch_module(path: Path, trust_pickle: bool = False) -> nn.Module:
    """A TorchScript file, or (only with ``trust_pickle``) a pickled module: unpickling a module
    runs code named in the file, so it is refused unless the file is trusted."""
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception:
        pass
    if not trust_pickle:
        raise CheckpointError(
            f"torch forecaster {path} is neither TorchScript nor an align_rl checkpoint; if it is a "
            "pickled module, loading it runs code from the file: export it with torch.jit.save, or, "
            "only for a file you trust, set checks.trust_pickle=true"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)  # trusted by checks.trust_pickle
    except Exception as exc:
        raise CheckpointError(f"cannot read torch forecaster {path}: {exc}") from None
    if not isinstance(obj, nn.Module):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a torch module; save the whole module "
            "(torch.save(module) or torch.jit.save) or an align_rl forecaster checkpoint"
        )
    return obj


def load_forecaster(cfg, ws, normalizer: Normalizer | None, device: str | torch.device = "cpu") -> Forecaster:
    """The forecaster named by ``cfg.forecaster.kind``: ``emulator`` loads
    ``cfg.forecaster.path`` or ``ws.final_checkpoint("forecaster")`` (checked against the config);
    ``onnx`` opens ``cfg.forecaster.path`` with the mean/std files (a model on a fixed grid other
    than ``cfg.data.grid``, e.g. FengWu's 721 × 1440, behind :func:`on_model_grid`); ``torch``
    loads an align_rl forecaster checkpoint, a TorchScript file or (with ``checks.trust_pickle``) a
    pickled module. Modules are put in eval mode."""
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
    checks = getattr(cfg, "checks", None)
    module = _load_torch_module(path, bool(getattr(checks, "trust_pickle", False))).to(device).eval()
    return TorchForecaster(module, normalizer, load_stats(fc.mean_path, "mean"),
                           load_stats(fc.std_path, "std"), fc.lat_north_to_south)
