"""Quality of the pretrained models on the validation split (normalised units).

:func:`evaluate_models` gives the numbers of ``<workdir>/pretrain_summary.json`` (the forecaster
against persistence, the 48 h backgrounds against climatology, the VAE's reconstruction, plain
and anchored on the background (:func:`codec_quality`), and the score model's validation loss);
:func:`format_summary` prints them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from align_rl.config import Config
from align_rl.evaluation.geostrophic import geo_score
from align_rl.io.normalization import Normalizer
from align_rl.io.states import States
from align_rl.models.anchored import AnchoredCodec
from align_rl.models.dit import dsm_loss
from align_rl.training.datasets import consecutive_starts, fixed_subset, latent_pairs
from align_rl.workspace import Workspace
from align_rl.world.backgrounds import ensure_backgrounds


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


@torch.no_grad()
def evaluate_models(cfg: Config, ws: Workspace, data: Any, models: Any,
                    max_samples: int = 256, progress: bool = True) -> dict[str, Any]:
    """Quality on the validation split, normalised units (RMSE over all 69 channels and points):

    ``forecaster_rmse_6h`` vs ``persistence_rmse_6h`` (one step from the truth);
    ``background_rmse_48h`` (the cached 48 h backgrounds) vs ``climatology_rmse`` (the training
    split's mean field at each grid point, against the same truth); ``vae_recon_mse``
    (``D(E(x))`` with the posterior mean); ``diffusion_val_loss`` (denoising score matching,
    fixed seed, four draws of ``(t, ε)`` per pair). ``data``: the run's
    :class:`~align_rl.training.pretraining.PretrainData`; ``models``: its
    :class:`~align_rl.training.pretraining.PretrainedModels`."""
    out: dict[str, Any] = {}
    v = data.val_norm
    starts = consecutive_starts(data.val.times, 3)
    sel = starts[fixed_subset(len(starts), max_samples)]
    se_f, se_p = [], []
    for c in np.array_split(sel, max(1, len(sel) // 32)):
        x0, x1, x2 = (torch.from_numpy(v[c + k]) for k in range(3))
        pred = models.forecaster.step(x0, x1)
        se_f.append(((pred - x2) ** 2).double().mean(dim=(1, 2, 3)).numpy())
        se_p.append(((x1 - x2) ** 2).double().mean(dim=(1, 2, 3)).numpy())
    out["forecaster_rmse_6h"] = float(np.sqrt(np.mean(np.concatenate(se_f))))
    out["persistence_rmse_6h"] = float(np.sqrt(np.mean(np.concatenate(se_p))))

    bg = ensure_backgrounds(cfg, ws, data.val, models.forecaster, progress=progress)
    idx = np.searchsorted(data.val.times, bg.times)
    bgn = data.normalizer.normalize(bg.values).astype(np.float32)
    clim = data.train_norm.mean(axis=0, dtype=np.float64)
    out["background_rmse_48h"] = _rmse(bgn, v[idx])
    out["climatology_rmse"] = float(np.sqrt(np.mean((v[idx] - clim[None]) ** 2)))
    out["persistence_rmse_48h"] = _rmse(v[np.searchsorted(data.val.times, bg.times - np.timedelta64(48, "h"))], v[idx])

    codec = models.codec
    fsel = fixed_subset(len(v), max_samples)
    se = 0.0
    for c in np.array_split(fsel, max(1, len(fsel) // 32)):
        x = torch.from_numpy(v[c])
        mean, _ = codec.vae.encode(x)
        se += float(((codec.vae.decode(mean) - x) ** 2).double().sum())
    out["vae_recon_mse"] = se / (len(fsel) * v[0].size)
    out.update(codec_quality(codec, v[idx], bgn, data.normalizer, data.val.lat, data.val.lon,
                             fixed_subset(len(idx), min(max_samples, 64))))

    bsel = fixed_subset(len(idx), max_samples)
    z, zb = latent_pairs(codec, data.val, v, States(bg.values[bsel], bg.times[bsel], bg.lat, bg.lon,
                                                    bg.attrs), data.normalizer)
    gen = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(4):
        for c in np.array_split(np.arange(len(z)), max(1, len(z) // 64)):
            losses.append(float(dsm_loss(models.eps_model, torch.from_numpy(z[c]),
                                         torch.from_numpy(zb[c]), generator=gen)) * len(c))
    out["diffusion_val_loss"] = float(np.sum(losses) / (4 * len(z)))
    out["val_times"] = int(len(v))
    out["background_times"] = int(len(idx))
    return out


def codec_quality(codec: Any, truth: np.ndarray, bg: np.ndarray, normalizer: Normalizer,
                  lat: np.ndarray, lon: np.ndarray, sel: np.ndarray) -> dict[str, float]:
    """How well the codec passes the truth ``truth`` (T, 69, H, W) normalised, at the times
    ``sel``, plain ``D(E(x))`` and anchored on the background ``bg`` (T, 69, H, W)
    ``x_b + D(E(x)) − D(E(x_b))`` (:mod:`align_rl.models.anchored`): reconstruction MSE
    (normalised) and the Geo-Score of the reconstructed truth (100 = the truth's balance), beside
    the background's own MSE and Geo-Score."""
    se = {"plain": 0.0, "anchored": 0.0, "background": 0.0}
    geo: dict[str, list] = {k: [] for k in se}
    with torch.no_grad():
        for c in np.array_split(sel, max(1, len(sel) // 16)):
            x, xb = torch.from_numpy(truth[c]), torch.from_numpy(bg[c])
            z = codec.encode(x)
            rec = {"plain": codec.decode(z), "anchored": AnchoredCodec(codec, xb).decode(z),
                   "background": xb}
            xp = normalizer.denormalize(x.double().numpy())
            for k, r in rec.items():
                se[k] += float(((r - x) ** 2).double().sum())
                geo[k].append(np.asarray(geo_score(normalizer.denormalize(r.double().numpy()), xp, lat, lon)))
    n = len(sel) * truth[0].size
    a = getattr(codec, "anchor_weights", None)
    return {"anchor_weights_mean": float(a.mean()) if a is not None else 1.0,
            "vae_recon_mse_anchored": se["anchored"] / n, "vae_recon_mse_same_times": se["plain"] / n,
            "background_mse_same_times": se["background"] / n,
            "vae_recon_geo_score": float(np.mean(np.concatenate(geo["plain"]))),
            "vae_recon_geo_score_anchored": float(np.mean(np.concatenate(geo["anchored"]))),
            "background_geo_score": float(np.mean(np.concatenate(geo["background"])))}


def format_summary(s: dict[str, Any]) -> str:
    """The summary as aligned lines (normalised units)."""
    def f(k: str) -> str:
        return f"{s[k]:.4f}" if isinstance(s.get(k), (int, float)) and not math.isnan(s[k]) else "n/a"

    lines = [
        "pretraining summary (validation split, normalised units)",
        f"  forecaster 6 h RMSE        {f('forecaster_rmse_6h')}   persistence {f('persistence_rmse_6h')}",
        f"  48 h background RMSE       {f('background_rmse_48h')}   climatology {f('climatology_rmse')}"
        f"   persistence {f('persistence_rmse_48h')}",
        f"  VAE reconstruction MSE     {f('vae_recon_mse')}   anchored on the background "
        f"{f('vae_recon_mse_anchored')}   (background MSE {f('background_mse_same_times')})",
        f"  Geo-Score of reconstructed truth  {f('vae_recon_geo_score')}   anchored "
        f"{f('vae_recon_geo_score_anchored')}   (background {f('background_geo_score')})",
        f"  diffusion validation loss  {f('diffusion_val_loss')}   (denoising score matching)",
    ]
    if "seconds" in s:
        lines.append(f"  wall time                  {s['seconds']:.0f} s")
    return "\n".join(lines)
