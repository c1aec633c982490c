"""Drawing and scoring preference candidates: sample → decode → forecast → rewards → pairs.

The unit of work is one background (a :class:`BackgroundTask`, keyed by ``bg_id``): its N candidates
come from generators seeded by ``(run seed, bg_id)`` (observations) and ``(run seed, bg_id,
policy version)`` (sampling), so a task redone after an actor failure reproduces the same candidates
and the store's dedup keeps them once. The Ray actors (``actors/sampler.py``, ``actors/reward.py``)
only hold models and call :func:`draw_candidates` / :func:`score_candidates`; :func:`make_group`
turns the result into a :class:`~align_rl.io.pair_store.CandidateGroup` on the driver.

Fields are normalised ``(69, H, W)``; latents standardised ``(C, h, w)``.

48 h forecasts from an analysis (the ``forecast`` reward): the forecaster's two-frame step needs the
state 6 h before the analysis. A data-assimilation system has no truth there, so the first frame
is the 48 h background valid at ``t − 6 h`` shifted by the candidate's analysis increment
(docs/method.md §7.3: the two frames keep the background's tendency), so
only the analysis differs between candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from align_rl.alignment.pairs import background_pairs, pair_rng, seed_of
from align_rl.alignment.rewards import RewardContext, score_all
from align_rl.devices import cpu_numpy, module_device
from align_rl.diffusion.analysis import analyse
from align_rl.diffusion.guidance import needs_obs
from align_rl.errors import InputError
from align_rl.io.pair_store import CandidateGroup
from align_rl.models.forecaster import first_frames
from align_rl.world.observations import make_observations


@dataclass
class BackgroundTask:
    """One preference background: ``x_b``, ``truth`` (69, H, W) normalised at ``time`` (ns);
    ``x_prev``, the background valid at ``t − 6 h`` (the forecasts' first frame, shifted by each
    candidate's increment: :func:`align_rl.models.forecaster.first_frames`; never the truth), and ``truth_fc`` at ``t + forecast_hours`` (normalised, None when the forecast reward
    is not computed)."""

    bg_id: int
    time: int
    x_b: np.ndarray
    truth: np.ndarray
    x_prev: np.ndarray | None = None
    truth_fc: np.ndarray | None = None


@dataclass
class Drawn:
    """The candidates of one background: ``z_b`` (C, h, w), ``latents`` (N, C, h, w), ``fields``
    (N, 69, H, W) normalised, drawn by policy ``version``."""

    bg_id: int
    version: int
    z_b: np.ndarray
    latents: np.ndarray
    fields: np.ndarray


def valid_times(truth_times: np.ndarray, bg_times: np.ndarray, start: str, end: str,
                forecast_hours: int | None) -> np.ndarray:
    """Analysis times in ``[start, end]`` with a background, the truth, and (when
    ``forecast_hours``) the background at ``t − 6 h`` (the forecasts' first frame) and the truth at
    ``t + forecast_hours``; datetime64[ns] sorted."""
    tt = np.asarray(truth_times, dtype="datetime64[ns]")
    bt = np.asarray(bg_times, dtype="datetime64[ns]")
    e = np.datetime64(end)
    if e.dtype == np.dtype("datetime64[D]"):
        e = e + np.timedelta64(1, "D") - np.timedelta64(1, "ns")
    cand = bt[(bt >= np.datetime64(start, "ns")) & (bt <= np.datetime64(e, "ns"))]
    ok = np.isin(cand, tt)
    if forecast_hours:
        ok &= np.isin(cand - np.timedelta64(6, "h"), bt)
        ok &= np.isin(cand + np.timedelta64(int(forecast_hours), "h"), tt)
    return np.sort(cand[ok])


def background_order(n: int, seed: int) -> np.ndarray:
    """The order in which backgrounds ``0 … n−1`` are used (a seeded permutation): offline takes
    the first ``pairs.backgrounds``, online refreshes take the following ones."""
    return np.random.default_rng(seed_of(seed, 7)).permutation(n)


def first_backgrounds(order: Sequence[int], n: int) -> list[int]:
    """The preference backgrounds an offline run uses: the first ``n`` (``pairs.backgrounds``)
    ids of the seeded ``order`` (:func:`background_order`; all of them when ``n`` is larger)."""
    return [int(i) for i in order[:int(n)]]


def make_tasks(ids: Sequence[int], times: np.ndarray, truth: Any, backgrounds: Any, normalizer: Any,
               forecast_hours: int | None) -> list[BackgroundTask]:
    """Tasks of background ids (positions in ``times``) from ``States`` of the truth and the
    backgrounds (physical units)."""
    out = []
    for i in ids:
        t = np.datetime64(times[int(i)], "ns")
        it, ib = truth.time_index(t), backgrounds.time_index(t)
        if it is None or ib is None:
            raise InputError(f"no truth or background at {t}")

        def norm(states, k):
            return np.asarray(normalizer.normalize(states.values[k].astype(np.float64)), np.float32)

        prev = fc = None
        if forecast_hours:
            ip = backgrounds.time_index(t - np.timedelta64(6, "h"))
            if ip is None:
                raise InputError(f"no background at {t} − 6 h, the forecasts' first frame")
            prev = norm(backgrounds, ip)
            fc = norm(truth, truth.time_index(t + np.timedelta64(int(forecast_hours), "h")))
        xb = norm(backgrounds, ib)
        out.append(BackgroundTask(int(i), int(t.astype(np.int64)), xb, norm(truth, it), prev, fc))
    return out


def draw_candidates(codec: Any, eps_model: Any, tasks: Sequence[BackgroundTask], version: int,
                    method: str, sampler_cfg: Any, guidance_cfg: Any, obs_cfg: Any, members: int,
                    seed: int) -> list[Drawn]:
    """N candidate analyses per task with :func:`align_rl.diffusion.analysis.analyse` (one call per
    background, generators seeded per background and version)."""

    out = []
    for task in tasks:
        x_b = torch.from_numpy(np.array(task.x_b, np.float32))[None]
        truth = torch.from_numpy(np.array(task.truth, np.float32))[None]
        g_obs = torch.Generator().manual_seed(seed_of(seed, task.bg_id))
        obs = make_observations(truth, obs_cfg.density, obs_cfg.sigma_o, obs_cfg.mode,
                                obs_cfg.r_floor, generator=g_obs)
        g = torch.Generator().manual_seed(seed_of(seed, task.bg_id, version))
        an = analyse(codec, eps_model, x_b, obs if needs_obs(method) else None, method,
                     sampler_cfg, guidance_cfg, generator=g, members=members)
        with torch.no_grad():
            dev = next(codec.parameters()).device if hasattr(codec, "parameters") else "cpu"
            z_b = codec.encode(x_b.to(dev))[0]
        out.append(Drawn(task.bg_id, int(version), cpu_numpy(z_b), cpu_numpy(an.latents[0]),
                         cpu_numpy(an.fields[0])))  # float32 CPU arrays, no extra copy
    return out


def forecast_from(forecaster: Any, x_prev: torch.Tensor, x_a: torch.Tensor, hours: int) -> torch.Tensor:
    """``hours``-hour forecasts (B, 69, H, W) normalised from analyses ``x_a`` (B, 69, H, W) with
    first frame ``x_prev`` (B, 69, H, W) (6 h earlier); run on the forecaster's device, returned
    on ``x_a``'s (only the last state moves)."""
    if hours % 6:
        raise InputError(f"rewards.forecast_hours={hours} must be a multiple of 6")
    dev = module_device(forecaster)
    with torch.no_grad():
        return forecaster.rollout(x_prev.to(dev), x_a.to(dev), hours // 6)[:, -1].to(x_a.device)


def score_candidates(forecaster: Any, normalizer: Any, lat: np.ndarray, lon: np.ndarray,
                     tasks: Sequence[BackgroundTask], drawn: Sequence[Drawn], reward_cfg: Any
                     ) -> list[dict[str, np.ndarray]]:
    """Every reward of ``reward_cfg.names`` for each task's candidates → ``[{name: (N,)}]``."""

    by_id = {d.bg_id: d for d in drawn}
    out = []
    for task in tasks:
        d = by_id[task.bg_id]
        fields = torch.tensor(d.fields)  # a copy: fields from the object store are read-only
        fc = tfc = None
        if "forecast" in reward_cfg.names:
            if task.x_prev is None or task.truth_fc is None:
                raise InputError(f"background {task.bg_id} has no first frame or truth for the "
                                 "forecast reward")
            prev = first_frames(torch.from_numpy(task.x_prev), torch.from_numpy(task.x_b), fields)
            fc = forecast_from(forecaster, prev, fields, int(reward_cfg.forecast_hours))
            tfc = torch.from_numpy(task.truth_fc)
        ctx = RewardContext(fields, torch.from_numpy(task.truth), normalizer, lat, lon, fc, tfc,
                            int(reward_cfg.geo_level), float(reward_cfg.geo_equator_band))
        out.append(score_all(ctx, list(reward_cfg.names)))
    return out


def make_group(task: BackgroundTask, drawn: Drawn, scores: dict[str, np.ndarray], guidance: str,
               modes: Sequence[str], pairs_cfg: Any, weights: dict[str, float], seed: int,
               normalize: str = "zscore") -> CandidateGroup:
    """The store group of one background with its pairs for every mode in ``modes``
    (``normalize``: how the composite's components are put on one scale, ``rewards.normalize``)."""
    pairs = {}
    for m in modes:
        rng = pair_rng(seed, task.bg_id, drawn.version, m)
        pairs[m] = background_pairs(scores, m, weights, int(pairs_cfg.pairs_per_background), rng,
                                    int(pairs_cfg.top_k_phys), float(pairs_cfg.decile), normalize)
    return CandidateGroup(task.bg_id, task.time, drawn.version, guidance, drawn.z_b, drawn.latents,
                          scores, pairs)
