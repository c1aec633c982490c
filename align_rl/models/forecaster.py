"""6-hourly forecasters on normalised fields: ``step(x_prev, x_curr) -> x_next`` and ``rollout``.

All take and return the project's normalised fields ``(B, 69, H, W)``, latitude ascending:
- :class:`EmulatorForecaster` wraps :class:`EmulatorNet`, a small residual convnet trained here.
- :class:`OnnxForecaster` runs an ONNX file with FengWu's interface.
- :class:`TorchForecaster` runs any torch module with the same stacked-frames interface.
- :class:`RegriddedForecaster` runs a forecaster on its own grid (the public FengWu ONNX: 721 × 1440,
  rows on the poles, latitude 90 → −90) behind the model grid: each rollout maps the two input
  frames model grid → its grid (bilinear, :mod:`align_rl.io.regrid`), steps there, and maps every
  output state back (conservative). :func:`on_model_grid` wraps an ONNX model whose fixed input
  grid is not ``data.grid``.

Loading one from the config: :func:`align_rl.models.loading.load_forecaster`.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from align_rl import identity
from align_rl.errors import CheckpointError, ConfigError, InputError
from align_rl.io.grid import Grid, LatLonGrid
from align_rl.io.normalization import Normalizer
from align_rl.io.regrid import regrid
from align_rl.io.schema import N_CHANNELS
from align_rl.models.vae import grid_shape


class PeriodicConv2d(nn.Conv2d):
    """``k × k`` convolution, circular padding in longitude (last axis), replicate in latitude."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3):
        super().__init__(cin, cout, kernel_size, padding=0)
        self.pad = kernel_size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad
        if p:
            x = F.pad(x, (p, p, 0, 0), mode="circular")
            x = F.pad(x, (0, 0, p, p), mode="replicate")
        return super().forward(x)


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = PeriodicConv2d(dim, dim, 3)
        self.conv2 = PeriodicConv2d(dim, dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.conv1(F.gelu(x))))


class EmulatorNet(nn.Module):
    """Residual 6 h step ``x_next = x_curr + f(x_prev, x_curr)`` on normalised ``(B, 69, H, W)``.

    ``f``: the two frames stacked (138 channels, like FengWu) → pixel-unshuffle by 2 → 1 × 1
    conv to ``hidden`` → ``depth`` residual blocks of two periodic 3 × 3 convs at half resolution
    → 1 × 1 conv → pixel-shuffle back to full resolution (zero-initialised, so the untrained
    network is persistence). Needs even H and W.
    """

    def __init__(self, hidden: int = 96, depth: int = 4, channels: int = N_CHANNELS):
        super().__init__()
        self.channels = channels
        self.stem = nn.Conv2d(2 * channels * 4, hidden, 1)
        self.blocks = nn.Sequential(*(ResBlock(hidden) for _ in range(depth)))
        self.head = nn.Conv2d(hidden, channels * 4, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x_prev: torch.Tensor, x_curr: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x_prev, x_curr], dim=1)
        h = self.stem(F.pixel_unshuffle(x, 2))
        h = self.head(F.gelu(self.blocks(h)))
        return x_curr + F.pixel_shuffle(h, 2)


def build_emulator(fc_cfg: Any, grid: Any = None) -> EmulatorNet:
    """The emulator of a ``forecaster`` config section (dataclass or dict); ``grid`` (Grid, "32x64"
    or (H, W)) is recorded on the network (``net.grid``) so that checkpoints can check it."""
    c = asdict(fc_cfg) if is_dataclass(fc_cfg) else dict(fc_cfg)
    hidden, depth = int(c["hidden"]), int(c["depth"])
    if hidden < 1 or depth < 0:
        raise ConfigError(f"forecaster.hidden={hidden} must be >= 1 and forecaster.depth={depth} >= 0")
    net = EmulatorNet(hidden=hidden, depth=depth)
    if grid is not None:
        H, W = grid_shape(grid)
        if H % 2 or W % 2:
            raise ConfigError(f"the emulator needs an even grid, got {H}x{W}")
        net.grid = (H, W)
    return net


def first_frames(prev_b: torch.Tensor, x_b: torch.Tensor, x_a: torch.Tensor) -> torch.Tensor:
    """The first input frame of a forecast from the analysis ``x_a``: the background's own state
    6 h before analysis time shifted by the analysis increment, ``x_b(t − 6 h) + (x_a − x_b(t))``
    (docs/method.md §7.3). The two frames then keep the background's 6 h tendency, which a
    two-frame forecaster (FengWu's interface) reads; an analysis with no increment gets the
    background's own frames. Normalised; ``prev_b`` and ``x_b`` (…, 69, H, W), ``x_a`` of the same
    shape or with a member axis before the channels (…, N, 69, H, W); returns the shape of ``x_a``."""
    if x_a.ndim == x_b.ndim + 1:  # members: insert their axis before the channels
        axis = x_b.ndim - 3
        prev_b, x_b = prev_b.unsqueeze(axis), x_b.unsqueeze(axis)
    elif x_a.ndim != x_b.ndim:
        raise ValueError(f"analysis {tuple(x_a.shape)} and background {tuple(x_b.shape)} do not match")
    prev_b, x_b = prev_b.to(x_a.dtype), x_b.to(x_a.dtype)
    return (prev_b + (x_a - x_b)).expand_as(x_a).contiguous()


def _check_pair(x_prev: torch.Tensor, x_curr: torch.Tensor) -> None:
    if x_prev.shape != x_curr.shape or x_curr.ndim != 4 or x_curr.shape[1] != N_CHANNELS:
        raise InputError(
            f"forecasters take two frames (B, {N_CHANNELS}, H, W) of one shape, got "
            f"{tuple(x_prev.shape)} and {tuple(x_curr.shape)}"
        )


class Forecaster:
    """Interface: ``step(x_prev, x_curr) -> x_next`` on normalised ``(B, 69, H, W)`` (6 h apart)."""

    def step(self, x_prev: torch.Tensor, x_curr: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def rollout(self, x_prev: torch.Tensor, x_curr: torch.Tensor, n_steps: int) -> torch.Tensor:
        """``n_steps`` 6 h steps from ``(x_{t−6h}, x_t)`` -> ``(B, n_steps, 69, H, W)``, the states
        at ``t + 6h, …, t + 6h · n_steps`` (gradients flow unless called under no_grad)."""
        _check_pair(x_prev, x_curr)
        if n_steps < 1:
            raise InputError(f"rollout needs n_steps >= 1, got {n_steps}")
        out = []
        for _ in range(n_steps):
            x_prev, x_curr = x_curr, self.step(x_prev, x_curr)
            out.append(x_curr)
        return torch.stack(out, dim=1)

    def fingerprint(self) -> str:
        """The forecaster's identity in the keys of the caches built with it (the backgrounds, the
        diffusion model: :mod:`align_rl.identity`), a hex digest: equal for the same model, another
        for a model that computes otherwise. By default a torch module's class and weights
        (:func:`~align_rl.identity.module_digest`); a forecaster that is not a torch module (a
        plugin's kind) overrides it with a digest of its files, weights and statistics."""
        if isinstance(self, nn.Module):
            return identity.digest({"type": type(self).__name__, "state": identity.module_digest(self)})
        raise InputError(f"a forecaster of type {type(self).__name__} has no fingerprint for the caches; "
                         "give it a fingerprint() method returning a digest of its files, weights and "
                         "statistics (align_rl.identity.digest)")


class EmulatorForecaster(nn.Module, Forecaster):
    """The trained :class:`EmulatorNet` as a forecaster (differentiable)."""

    def __init__(self, net: EmulatorNet):
        super().__init__()
        self.net = net

    def step(self, x_prev: torch.Tensor, x_curr: torch.Tensor) -> torch.Tensor:
        _check_pair(x_prev, x_curr)
        return self.net(x_prev, x_curr)

    def forward(self, x_prev: torch.Tensor, x_curr: torch.Tensor) -> torch.Tensor:
        return self.step(x_prev, x_curr)


def load_stats(path: str | Path | None, what: str) -> np.ndarray | None:
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise InputError(f"forecaster {what} file {p} does not exist; set forecaster.{what}_path")
    a = np.asarray(np.load(p), dtype=np.float64).reshape(-1)
    if a.shape != (N_CHANNELS,):
        raise InputError(f"forecaster {what} file {p} must hold {N_CHANNELS} values, has {a.size}")
    if not np.all(np.isfinite(a)) or (what == "std" and np.any(a <= 0)):
        raise InputError(f"forecaster {what} file {p} holds NaN/inf or non-positive std values")
    return a


class _StackedForecaster(Forecaster):
    """Shared conversion for models with FengWu's interface: input ``(B, 138, H, W)`` = the two
    frames stacked, normalised with the model's own mean/std (physical units, (69,)) and in the
    model's latitude order; output ``(B, ≥69, H, W)`` whose first 69 channels are the next state.

    Project-normalised ``x`` → model-normalised ``x · s_p / s_m + (m_p − m_m) / s_m``, and back.
    Without model statistics, the model is assumed to use the project's normalisation.
    """

    def __init__(self, normalizer: Normalizer | None, mean=None, std=None,
                 lat_north_to_south: bool = True):
        if (mean is None) != (std is None):
            raise InputError("give both the model's mean and std files, or neither")
        if mean is not None and normalizer is None:
            raise InputError("model statistics need the project's normalizer to convert fields")
        if mean is not None:
            sp, mp = normalizer.std, normalizer.mean
            self._a = torch.as_tensor(sp / std, dtype=torch.float32).reshape(-1, 1, 1)
            self._b = torch.as_tensor((mp - mean) / std, dtype=torch.float32).reshape(-1, 1, 1)
        else:
            self._a = self._b = None
        self.flip = bool(lat_north_to_south)

    def _conversion(self) -> dict[str, Any]:
        """The conversion's part of a fingerprint: the statistics (or None) and the latitude order."""
        stats = identity.array_digest(self._a, self._b) if self._a is not None else None
        return {"stats": stats, "flip": self.flip}

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        if self._a is not None:
            x = x * self._a.to(x) + self._b.to(x)
        return torch.flip(x, dims=(-2,)) if self.flip else x

    def _from_model(self, y: torch.Tensor) -> torch.Tensor:
        if self.flip:
            y = torch.flip(y, dims=(-2,))
        if self._a is not None:
            y = (y - self._b.to(y)) / self._a.to(y)
        return y

    def _run(self, stacked: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def step(self, x_prev: torch.Tensor, x_curr: torch.Tensor) -> torch.Tensor:
        _check_pair(x_prev, x_curr)
        stacked = torch.cat([self._to_model(x_prev), self._to_model(x_curr)], dim=1)
        out = self._run(stacked)
        if out.ndim != 4 or out.shape[1] < N_CHANNELS or out.shape[-2:] != x_curr.shape[-2:]:
            raise InputError(
                f"the forecast model returned {tuple(out.shape)}; expected (B, >= {N_CHANNELS}, "
                f"{x_curr.shape[-2]}, {x_curr.shape[-1]}) with the next state first"
            )
        return self._from_model(out[:, :N_CHANNELS])


class OnnxForecaster(_StackedForecaster):
    """An ONNX model with FengWu's interface (input ``input`` ``(B, 138, H, W)``, output ``output``).

    ``path``: the .onnx file; ``normalizer``: the project's; ``mean_path``/``std_path``: the model's
    statistics (``.npy``, (69,), physical units; default: the project's normalisation);
    ``lat_north_to_south``: the model expects latitude descending (FengWu: True); ``providers``:
    onnxruntime's execution providers (default: CUDA when available, then the CPU); ``mean``/``std``:
    the model's statistics as arrays (with ``mean_path``/``std_path`` too, the files they were read
    from: the fingerprint reads the files). Models with a fixed batch of 1 are run one
    sample at a time. Not differentiable. The session does not pickle: processes exchange
    :class:`~align_rl.models.loading.ForecasterSpec` and open their own.
    """

    def __init__(self, path: str | Path, normalizer: Normalizer | None, mean_path=None,
                 std_path=None, lat_north_to_south: bool = True, providers: list | None = None,
                 mean=None, std=None):
        p = Path(path)
        if not p.exists():
            raise CheckpointError(f"ONNX forecaster {p} does not exist; set forecaster.path=FILE.onnx")
        if mean is None and std is None:
            mean, std = load_stats(mean_path, "mean"), load_stats(std_path, "std")
        super().__init__(normalizer, mean, std, lat_north_to_south)
        self.stat_paths = tuple(str(v) if v else None for v in (mean_path, std_path))
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover
            raise ConfigError("forecaster.kind=onnx needs onnxruntime: pip install 'align_rl[onnx]'") from None
        avail = ort.get_available_providers()
        if providers is None:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        # those this onnxruntime build has (onnxruntime without CUDA runs on the CPU)
        providers = [pv for pv in providers if (pv[0] if isinstance(pv, tuple) else pv) in avail]
        try:
            self.session = ort.InferenceSession(str(p), providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise CheckpointError(f"cannot open ONNX model {p}: {exc}") from None
        inputs = self.session.get_inputs()
        names = [i.name for i in inputs]
        self.input_name = "input" if "input" in names else names[0]
        outs = [o.name for o in self.session.get_outputs()]
        self.output_name = "output" if "output" in outs else outs[0]
        shape = next(i.shape for i in inputs if i.name == self.input_name)
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 2 * N_CHANNELS):
            raise CheckpointError(
                f"ONNX model {p} takes {shape}; expected (B, {2 * N_CHANNELS}, H, W) (two frames)"
            )
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.grid = tuple(shape[2:]) if all(isinstance(s, int) for s in shape[2:]) else None
        self.path = str(p)

    def fingerprint(self) -> str:
        """The model file and the statistics files by content, and the latitude order (statistics
        given as arrays only: their values)."""
        parts: dict[str, Any] = {
            "type": type(self).__name__, "lat_north_to_south": self.flip,
            "files": [identity.file_digest(f) if f else None for f in (self.path, *self.stat_paths)]}
        if self._a is not None and not any(self.stat_paths):
            parts["stats"] = self._conversion()["stats"]
        return identity.digest(parts)

    def _run(self, stacked: torch.Tensor) -> torch.Tensor:
        if self.grid is not None and tuple(stacked.shape[-2:]) != self.grid:
            raise InputError(f"the ONNX model runs on a {self.grid} grid; fields are {tuple(stacked.shape[-2:])}")
        arr = stacked.detach().to("cpu", torch.float32).numpy()
        if self.fixed_batch:
            parts = [
                self.session.run([self.output_name], {self.input_name: arr[i : i + self.fixed_batch]})[0]
                for i in range(0, arr.shape[0], self.fixed_batch)
            ]
            out = np.concatenate(parts, axis=0)
        else:
            out = self.session.run([self.output_name], {self.input_name: arr})[0]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(stacked.device)


class RegriddedForecaster(Forecaster):
    """``inner``, a forecaster on its own grid ``native`` (a :class:`~align_rl.io.grid.LatLonGrid`,
    latitude ascending as every project field; ``inner`` flips it if it needs to), behind the model
    grid ``model``. :meth:`rollout` maps the two normalised input frames ``(B, 69, H, W)`` to the
    native grid with bilinear interpolation (the refinement onto pole rows that a conservative
    scheme cannot fill), runs every step there, and maps each output state back conservatively;
    the mapping is linear with weights summing to 1, so it commutes with the per-channel
    normalisation. Not differentiable (the regridding goes through numpy)."""

    def __init__(self, inner: Forecaster, model: Any, native: Any):
        self.inner = inner
        self.model = LatLonGrid.of(model)
        self.native = LatLonGrid.of(native)

    def to_native(self, x: torch.Tensor) -> torch.Tensor:
        """Fields ``(..., H, W)`` on the model grid → ``(..., H', W')`` on the native grid."""
        return regrid(x, self.model, self.native, "linear")

    def from_native(self, y: torch.Tensor) -> torch.Tensor:
        """Fields ``(..., H', W')`` on the native grid → ``(..., H, W)`` on the model grid."""
        return regrid(y, self.native, self.model, "conservative")

    def rollout(self, x_prev: torch.Tensor, x_curr: torch.Tensor, n_steps: int) -> torch.Tensor:
        _check_pair(x_prev, x_curr)
        if tuple(x_curr.shape[-2:]) != self.model.shape:
            raise InputError(f"fields of {tuple(x_curr.shape[-2:])} are not on the model grid {self.model}")
        out = self.inner.rollout(self.to_native(x_prev), self.to_native(x_curr), n_steps)
        return self.from_native(out)

    def step(self, x_prev: torch.Tensor, x_curr: torch.Tensor) -> torch.Tensor:
        return self.rollout(x_prev, x_curr, 1)[:, 0]

    def fingerprint(self) -> str:
        """The inner forecaster's fingerprint and both grids."""
        return identity.digest({"type": type(self).__name__, "inner": identity.forecaster_digest(self.inner),
                                "grids": [str(self.model), str(self.native)]})

    def to(self, device) -> "RegriddedForecaster":
        if hasattr(self.inner, "to"):
            self.inner.to(device)
        return self

    def eval(self) -> "RegriddedForecaster":
        if hasattr(self.inner, "eval"):
            self.inner.eval()
        return self


class TorchForecaster(_StackedForecaster):
    """Any torch module with the stacked-frames interface ``(B, 138, H, W) -> (B, ≥69, H, W)``
    (``stacked=True``) or ``module(x_prev, x_curr) -> (B, ≥69, H, W)`` (``stacked=False``);
    normalisation and latitude order as :class:`OnnxForecaster` (default: the project's,
    latitude ascending). Differentiable."""

    def __init__(self, module: nn.Module, normalizer: Normalizer | None = None, mean=None, std=None,
                 lat_north_to_south: bool = False, stacked: bool = True):
        super().__init__(normalizer, mean, std, lat_north_to_south)
        self.module = module
        self.stacked = stacked

    def fingerprint(self) -> str:
        """The module's weights (:func:`~align_rl.identity.module_digest`), the statistics and the
        latitude order."""
        return identity.digest({"type": type(self).__name__, "state": identity.module_digest(self.module),
                                **self._conversion()})

    def _run(self, stacked: torch.Tensor) -> torch.Tensor:
        if self.stacked:
            return self.module(stacked)
        return self.module(stacked[:, :N_CHANNELS], stacked[:, N_CHANNELS:])

    def to(self, device) -> "TorchForecaster":
        self.module.to(device)
        return self


def on_model_grid(forecaster: "OnnxForecaster", model_grid: Any) -> Forecaster:
    """``forecaster`` itself when it runs on any grid or on ``model_grid``; else wrapped in a
    :class:`RegriddedForecaster` for its fixed grid (an odd number of rows: rows on the poles, as
    FengWu's 721 × 1440; even: cell-centred)."""
    model = Grid.parse(model_grid) if isinstance(model_grid, str) else model_grid
    if forecaster.grid is None or tuple(forecaster.grid) == model.shape:
        return forecaster
    H, W = forecaster.grid
    try:
        native = LatLonGrid.parse(f"{H}x{W}")
    except InputError as exc:
        raise CheckpointError(f"the forecast model runs on a {H}x{W} grid that cannot be mapped "
                              f"to the model grid {model}: {exc}") from None
    return RegriddedForecaster(forecaster, model, native)
