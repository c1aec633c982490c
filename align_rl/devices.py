"""Where models run: ``run.device`` (auto | cpu | cuda) resolved in each process.

Rules (docs/usage.md, "GPUs"):

- ``cpu``: every model stays on the CPU; actors reserve no GPU (``actors.gpus_per_actor`` is not
  requested).
- ``cuda``: every actor reserves ``actors.gpus_per_actor`` (a fraction > 0, several actors share a
  GPU) and moves its networks there; a process without a CUDA device raises :class:`ConfigError`.
- ``auto`` (default): each process decides for itself: CUDA when it can use one, else the CPU.
  Inside a Ray actor "can use" means Ray assigned it a GPU share (its assigned resources), so
  an actor declared without GPUs stays on the CPU even on a GPU node (Ray no longer hides the
  GPUs from such actors) and the reservations stay honest.

:func:`resolve_device` is the rule; :func:`actor_device` applies it inside a Ray actor and
:func:`actor_gpus` gives the GPUs an actor asks Ray for. Tensors leave actors as CPU numpy arrays.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from align_rl.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def _requested(device: Any) -> str:
    """``run.device`` of a config (or a plain string / torch.device)."""
    if hasattr(device, "run"):
        device = device.run.device
    d = str(getattr(device, "type", device))
    if d not in DEVICES:
        raise ConfigError(f"run.device={d!r} is not one of {', '.join(DEVICES)}")
    return d


def resolve_device(device: Any = "auto", available: bool | None = None,
                   where: str = "this process") -> torch.device:
    """The torch device of ``device`` (``"auto"`` | ``"cpu"`` | ``"cuda"`` or a config with
    ``run.device``). ``available``: whether CUDA may be used here (default
    ``torch.cuda.is_available()``); ``where`` names the process in the error message."""
    d = _requested(device)
    ok = torch.cuda.is_available() if available is None else bool(available)
    if d == "cpu" or (d == "auto" and not ok):
        return torch.device("cpu")
    if not ok:
        built = torch.version.cuda or "none (a CPU-only build)"
        raise ConfigError(
            f"run.device=cuda but {where} has no usable CUDA device (torch {torch.__version__}, "
            f"CUDA {built}); install a CUDA build of torch on a GPU machine, or set "
            "run.device=auto (CUDA where there is one) or run.device=cpu")
    return torch.device("cuda")


def actor_device(device: Any = "auto") -> torch.device:
    """:func:`resolve_device` inside a Ray actor or task: CUDA only when Ray assigned it GPUs
    (``actors.gpus_per_actor`` > 0); in a driver, the process's own CUDA availability."""
    import ray

    assigned = True
    if ray.is_initialized():
        try:
            assigned = ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0) > 0
        except AssertionError:  # the driver: no worker context
            assigned = True
    ok = assigned and torch.cuda.is_available()
    where = "this Ray actor" if assigned else \
        "this Ray actor (it was given no GPU: set actors.gpus_per_actor, e.g. 0.25)"
    return resolve_device(device, available=ok, where=where)


def actor_gpus(cfg: Any) -> float:
    """GPUs each sampler / forecast / reward / analysis actor reserves: 0 with ``run.device=cpu``,
    else ``actors.gpus_per_actor``; :class:`ConfigError` for ``run.device=cuda`` without one."""
    d = _requested(cfg)
    g = float(cfg.actors.gpus_per_actor)
    if d == "cpu":
        return 0.0
    if d == "cuda" and g <= 0:
        raise ConfigError("run.device=cuda needs actors.gpus_per_actor > 0 so that Ray gives each "
                          "actor a share of a GPU (e.g. actors.gpus_per_actor=0.25: four actors "
                          "per GPU); or set run.device=auto")
    return g


def module_device(module: Any) -> torch.device:
    """Device of a module's first parameter, looking through wrappers that hold the network as
    ``inner`` / ``module`` / ``net`` (a regridded or TorchScript forecaster); CPU for objects
    without parameters (an ONNX session moves its own data)."""
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        pass
    for name in ("inner", "module", "net"):
        if getattr(module, name, None) is not None:
            return module_device(getattr(module, name))
    return torch.device("cpu")


def place(module: Any, device: torch.device | str, frozen: bool = True) -> Any:
    """``module`` moved to ``device`` (in place for nn.Modules), in eval mode and, when
    ``frozen``, with ``requires_grad`` off on its parameters (inference only: DPS then
    differentiates with respect to the latents alone and keeps no activations for weight
    gradients; ``load_state_dict`` still loads new weights). Objects without ``to``/``eval`` (an
    ONNX session) are returned as they are."""
    if hasattr(module, "to"):
        module = module.to(device) or module
    if hasattr(module, "eval"):
        module.eval()
    if frozen and hasattr(module, "parameters"):
        for p in module.parameters():
            p.requires_grad_(False)
    return module


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    """Compile ``module`` in place (``nn.Module.compile``, static shapes: the sampler loop calls
    the score network with one shape throughout); its state dict keeps its keys, so weight syncs
    (``load_state_dict``) keep working. Needs a C++ compiler on the CPU (Inductor)."""
    module.compile(dynamic=False)
    return module


def cpu_numpy(x: torch.Tensor):
    """``x`` as a float32 numpy array on the CPU (what crosses actor boundaries); no copy for a
    float32 CPU tensor."""
    return x.detach().to("cpu", torch.float32).numpy()


def from_numpy(a, device: torch.device | str = "cpu") -> torch.Tensor:
    """A numpy array that came through Ray's object store (read-only when large) as a tensor on
    ``device``, copied once: to the device, or (read-only on the CPU) into writable memory."""
    a = np.asarray(a)
    if a.flags.writeable:
        return torch.from_numpy(a).to(device)
    if torch.device(device).type == "cpu":
        return torch.from_numpy(a.copy())
    with warnings.catch_warnings():  # only read, by the copy to the device
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a).to(device)


def sampling_place(cfg: Any) -> str:
    """Where the evaluation's analyses run: ``"actor"`` or ``"driver"`` (``eval.sampling``;
    ``auto``: the actor when actors reserve GPUs, :func:`align_rl.devices.actor_gpus` > 0)."""
    mode = str(getattr(cfg.eval, "sampling", "auto"))
    if mode == "auto":
        return "actor" if actor_gpus(cfg) > 0 else "driver"
    return mode


# ----------------------------------------------------------------------------- Ray Train workers
# ``run.device`` → ``ScalingConfig(use_gpu=...)`` for the pretraining workers and the DPO learner:
# ``cpu``: no GPU, whatever the cluster holds; ``cuda``: one GPU per worker, a ConfigError when the
# Ray cluster has none (Ray would wait forever); ``auto``: one GPU per worker when the Ray cluster
# has GPUs. A section's ``use_gpu: true`` (``pretrain.use_gpu``, ``dpo.use_gpu``) asks as ``cuda``
# does. Inside a worker, models and batches go to ``ray.train.torch.get_device()``; checkpoints
# hold CPU tensors, so they load on any machine.


def cluster_gpus() -> float:
    """GPUs of the connected Ray cluster (0 when Ray is not initialised)."""
    import ray

    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def resolve_use_gpu(device: str, requested: bool = False, key: str = "run.device") -> bool:
    """Whether the Ray Train workers take a GPU each (see the module docstring).

    ``device``: ``cfg.run.device``; ``requested``: the section's ``use_gpu``; ``key``: the name of
    that key, for the error message."""
    device = _requested(str(device).lower())
    if device == "cpu":
        return False
    gpus = cluster_gpus()
    if device == "cuda" or requested:
        if gpus <= 0:
            why = "run.device=cuda" if device == "cuda" else f"{key}=true"
            raise ConfigError(f"{why} but the Ray cluster has no GPU; set run.device=cpu (or auto "
                              f"and {key}=false), or connect to a cluster with GPUs (RAY_ADDRESS)")
        return True
    return gpus > 0
