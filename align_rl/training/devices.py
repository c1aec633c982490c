"""Where the Ray Train workers run: ``run.device`` → ``ScalingConfig(use_gpu=...)``.

``run.device`` (``auto`` | ``cpu`` | ``cuda``) decides for the pretraining workers and the DPO
learner alike:

- ``cpu``: no GPU, whatever the cluster holds;
- ``cuda``: one GPU per worker; a :class:`~align_rl.errors.ConfigError` when the Ray cluster has
  no GPU (Ray would wait for one forever);
- ``auto``: one GPU per worker when the Ray cluster has GPUs, else the CPU. A section's
  ``use_gpu: true`` (``pretrain.use_gpu``, ``dpo.use_gpu``) asks for GPUs as ``cuda`` does.

Inside a worker the models and batches go to ``ray.train.torch.get_device()``; checkpoints hold
CPU tensors, so they load on any machine.
"""

from __future__ import annotations

from align_rl.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


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
    device = str(device).lower()
    if device not in DEVICES:
        raise ConfigError(f"run.device={device!r} is not one of {', '.join(DEVICES)}")
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
