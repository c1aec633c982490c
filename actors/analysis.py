"""AnalysisActor: the evaluation's sampling in a Ray actor, on a GPU share when there is one.

:func:`analyse_batch` takes the arguments of :func:`align_rl.diffusion.analysis.analyse` (after the
config) and returns its :class:`~align_rl.diffusion.analysis.Analysis`; ``eval.sampling`` decides
where it runs (:func:`sampling_place`): in the driver, as before, or in one :class:`AnalysisActor`
that holds the codec and the score networks on its device (``run.device``,
:func:`align_rl.devices.actor_device`) with ``actors.cpus_per_actor`` CPUs and
``actors.gpus_per_actor`` of a GPU. The driver's generator state travels with each call and comes
back, so the actor draws exactly the noise the driver would (the same numbers on the CPU).

What crosses the boundary: backgrounds and observations as float32 numpy arrays, each network as
an object ref put once (re-put only when its weights changed in place), the analyses as float32
numpy arrays. The actor lives until :func:`release`, until the codec it holds is garbage
collected, or until a call brings another codec; it is not detached (it ends with the driver).
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np
import ray
import torch

from actors.sampler import actor_options
from align_rl.config import config_from_dict
from align_rl.cpu import configure_worker
from align_rl.devices import (
    actor_device,
    compile_module,
    cpu_numpy,
    from_numpy,
    module_device,
    place,
    sampling_place,
)
from align_rl.diffusion.analysis import Analysis, analyse
from align_rl.diffusion.guidance import needs_obs
from align_rl.errors import InputError
from align_rl.training.harness import init_ray
from align_rl.world.observations import Observations

_KEEP_MODELS = 4  # score networks an actor keeps (an evaluation compares up to ~3 models)


class AnalysisActor:
    """Holds ``codec`` on its device; score networks arrive by object ref and are kept by key."""

    def __init__(self, codec: Any, cfg: dict, threads: int = 1):
        configure_worker(threads)
        self.cfg = config_from_dict(cfg)
        self.device = actor_device(self.cfg.run.device)
        self.codec = place(codec, self.device)
        self.models: OrderedDict[str, Any] = OrderedDict()

    def _model(self, key: str, ref: list) -> Any:
        if key not in self.models:
            m = place(ray.get(ref[0]), self.device)
            if self.cfg.sampler.compile:
                compile_module(m)
            self.models[key] = m
            while len(self.models) > _KEEP_MODELS:
                self.models.popitem(last=False)
        self.models.move_to_end(key)
        return self.models[key]

    def analyse(self, key: str, ref: list, x_b: np.ndarray, obs: dict | None, method: str,
                sampler: dict, guidance: dict, gen: tuple | None, members: int | None) -> dict:
        """:func:`~align_rl.diffusion.analysis.analyse` of ``x_b`` (B, 69, H, W) normalised;
        ``ref``: ``[object ref of the score network]`` (fetched only for a new ``key``); ``gen``:
        ``(device type, state)`` of the driver's generator. Returns ``{"latents", "fields",
        "gen"}`` (float32 numpy, the generator's new state), or ``{"error", "gen"}`` when the
        analyses diverged (InputError)."""

        model = self._model(key, ref)
        generator = None
        if gen is not None:
            generator = torch.Generator(device=gen[0])
            generator.set_state(torch.from_numpy(np.array(gen[1])))
        o = obs
        if isinstance(obs, dict):
            o = Observations(from_numpy(obs["values"]), from_numpy(obs["mask"]),
                             obs["sigma_o"], obs["r_floor"])
        out: dict[str, Any] = {}
        try:
            an = analyse(self.codec, model, from_numpy(x_b), o, method, sampler, guidance,
                         generator=generator, members=members)
            out = {"latents": cpu_numpy(an.latents), "fields": cpu_numpy(an.fields)}
        except InputError as exc:  # diverged: the driver reports it like its own
            out = {"error": str(exc)}
        out["gen"] = None if generator is None else generator.get_state().numpy()
        return out

    def info(self) -> dict:
        held = next(reversed(self.models.values())) if self.models else self.codec
        return {"pid": os.getpid(), "device": str(self.device), "models": list(self.models),
                "model_device": str(module_device(held))}


def _fingerprint(module: Any) -> tuple:
    """Identity and in-place version of a module's tensors (changes when weights are loaded)."""
    ts = list(module.parameters()) + list(module.buffers()) if hasattr(module, "parameters") else []
    return (id(module), sum(int(t._version) for t in ts), len(ts))


class _Session:
    """The driver's handle on one AnalysisActor and the networks it was sent."""

    def __init__(self, cfg: Any, codec: Any):
        init_ray()
        opts = actor_options(cfg)
        threads = max(1, int(cfg.actors.cpus_per_actor))
        self.codec_ref = ray.put(codec)  # kept: a restarted actor is built from it again
        self.actor = ray.remote(AnalysisActor).options(**opts).remote(self.codec_ref, cfg.to_dict(), threads)
        self.codec = weakref.ref(codec)
        self.codec_print = _fingerprint(codec)
        self.job = ray.get_runtime_context().get_job_id()
        self.key = (cfg.run.device, cfg.sampler.compile, dataclasses.astuple(cfg.actors))
        self.models: dict[int, tuple[weakref.ref, tuple, str, Any]] = {}
        self.sent = 0
        weakref.finalize(codec, _kill, self.actor)

    def fits(self, cfg: Any, codec: Any) -> bool:
        return (self.codec() is codec and _fingerprint(codec) == self.codec_print
                and ray.is_initialized() and ray.get_runtime_context().get_job_id() == self.job
                and self.key == (cfg.run.device, cfg.sampler.compile, dataclasses.astuple(cfg.actors)))

    def model_ref(self, model: Any) -> tuple[str, Any]:
        """``(key, object ref)`` of ``model``: put once, again only when its weights changed."""
        fp = _fingerprint(model)
        held = self.models.get(id(model))
        if held is None or held[0]() is not model or held[1] != fp:
            self.sent += 1
            held = (weakref.ref(model), fp, f"model-{self.sent}", ray.put(model))
            self.models[id(model)] = held
        return held[2], held[3]


_SESSION: _Session | None = None


def _kill(actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:
        pass


def release() -> None:
    """Stop the analysis actor (frees its GPU share); the next actor call starts a new one."""
    global _SESSION
    if _SESSION is not None:
        _kill(_SESSION.actor)
        _SESSION = None


def _as_dict(c: Any) -> Any:
    return dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c


def _obs_payload(obs: Any) -> Any:
    if isinstance(obs, Observations):
        return {"values": cpu_numpy(obs.values), "mask": cpu_numpy(obs.mask),
                "sigma_o": float(obs.sigma_o), "r_floor": float(obs.r_floor)}
    return obs


def analyse_batch(cfg: Any, codec: Any, eps_model: Any, x_b: torch.Tensor, obs: Any, method: str,
                  sampler_cfg: Any, guidance_cfg: Any = None, generator: torch.Generator | None = None,
                  members: int | None = None) -> Analysis:
    """:func:`~align_rl.diffusion.analysis.analyse` of the backgrounds ``x_b`` (B, 69, H, W)
    normalised, in the driver or in the analysis actor (:func:`sampling_place`); the result is on
    the CPU in the actor case. ``generator`` advances as if the driver had drawn."""
    global _SESSION
    if sampling_place(cfg) == "driver":
        return analyse(codec, eps_model, x_b, obs, method, sampler_cfg, guidance_cfg,
                       generator=generator, members=members)
    if _SESSION is None or not _SESSION.fits(cfg, codec):
        release()
        _SESSION = _Session(cfg, codec)
    key, ref = _SESSION.model_ref(eps_model)
    gen = None if generator is None else (generator.device.type, generator.get_state().numpy())
    out = ray.get(_SESSION.actor.analyse.remote(
        key, [ref], cpu_numpy(x_b), _obs_payload(obs) if needs_obs(method) else None, method, _as_dict(sampler_cfg),
        _as_dict(guidance_cfg), gen, members))
    if generator is not None:
        generator.set_state(torch.from_numpy(np.array(out["gen"])))
    if "error" in out:
        raise InputError(out["error"])
    return Analysis(from_numpy(out["latents"]), from_numpy(out["fields"]))
