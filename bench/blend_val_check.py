"""The Blend-val baseline on a finished evaluation (one made before the evaluation had the row).

    python bench/blend_val_check.py EVAL_DIR [--workdir runs/default] [key=value ...]

Fits the Blend-val weight of every method exactly as the evaluation does
(:func:`align_rl.evaluation.runner.validation_inputs`, the reference's analyses of
``eval.blend_times`` validation times, the least-squares weight of their ensemble mean towards the
background, docs/method.md §10), then applies it to the reference's stored test ensemble means
(``EVAL_DIR/analyses/reference-<method>.zarr``) and prints, in ensemble-mean normalised MSE over
the 69 channels on the evaluation's test times: the background, the reference, the oracle blend
(the best ``w`` on the test times, as ``bench/blend_check.py``), the val-fitted blend and every
stored aligned model. Reads the run's world, background cache and pretrained checkpoints; writes
nothing. ``key=value``: config overrides (the run's own, if it was not run with the defaults);
``guidance.methods=[dps]`` fits one method only (its sampler noise is then seeded by its index in
that shorter list, so ``w`` may differ a little from the evaluation's). Slow on CPU: the reference
analyses ``eval.blend_times`` × ``eval.members`` fields per method (ObsFree: 6.5 min on two shared
cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from align_rl.config import load_config  # noqa: E402
from align_rl.evaluation import runner  # noqa: E402
from align_rl.evaluation.skill import STEP_HOURS, forecast_steps  # noqa: E402
from align_rl.io import era5  # noqa: E402
from align_rl.io.checkpoints import load_codec, load_model  # noqa: E402
from align_rl.world.splits import truth_window  # noqa: E402


def _norm(states, normalizer, times):
    idx = [states.time_index(t) for t in times]
    return normalizer.normalize(states.values[idx].astype(np.float64))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("eval_dir")
    ap.add_argument("--workdir", default="runs/default")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    wd = Path(a.workdir)
    cfg = load_config(None, [f"run.workdir={wd}", "run.wandb_mode=disabled", "eval.sampling=driver", *a.overrides])
    t0 = time.time()
    normalizer = era5.load_normalizer(wd / "world.zarr")
    codec, _ = load_codec(wd / "checkpoints" / "vae" / "final.pt", expect=cfg.vae)
    codec.eval()
    eps, _ = load_model(wd / "checkpoints" / "diffusion" / "final.pt", "diffusion", expect=cfg.diffusion,
                        shapes={"latent_shape": tuple(codec.latent_shape)})
    eps.eval()
    start, end = truth_window(cfg.data.val, cfg.rewards.forecast_hours)
    val_truth = era5.open_states(wd / "world.zarr", time_range=[start, end], check_units=False)
    val_bg = era5.open_states(wd / "backgrounds.zarr", time_range=[start, end], check_units=False)
    data = runner.EvalData(val_truth, val_bg, normalizer, codec, None, val_truth=val_truth, val_backgrounds=val_bg)
    val = runner.validation_inputs(cfg, data, forecast_steps(cfg.rewards.forecast_hours))
    if val is None:
        sys.exit("eval.blend_times is 0: nothing to fit")
    stores = sorted((Path(a.eval_dir) / "analyses").glob("*.zarr"))
    times = era5.open_states(stores[0], check_units=False).times
    truth = _norm(era5.open_states(wd / "world.zarr", time_range=[times[0], times[-1]], check_units=False),
                  normalizer, times)
    bg = _norm(era5.open_states(wd / "backgrounds.zarr", time_range=[times[0], times[-1]], check_units=False),
               normalizer, times)
    mse = lambda x: float(np.mean((x - truth) ** 2))  # noqa: E731
    methods = [m for m in cfg.guidance.methods if (Path(a.eval_dir) / "analyses" / f"reference-{m}.zarr").exists()]
    plan = runner._Plan([runner.ObsSetting("main", cfg.obs.density, cfg.obs.sigma_o)], methods, "reference",
                        int(cfg.eval.members), max(1, int(cfg.eval.batch_size)), 0)
    run = runner._Run(cfg, data, None, plan, val=val)
    others = sorted({s.stem.rsplit("-", 1)[0] for s in stores if not s.stem.startswith("reference")})
    print(f"{len(val.times)} validation times {val.times[0]} … {val.times[-1]}; {len(times)} test times")
    print("| method | background | reference | oracle blend (w) | val blend (w) | " + " | ".join(others) + " |")
    print("|---" * (5 + len(others)) + "|")
    for mi, m in enumerate(methods):
        with torch.no_grad():
            w_val = runner._fit_blend_val(run, plan.settings[0], 0, cfg.guidance.methods.index(m), m, eps)
        ref = _norm(era5.open_states(Path(a.eval_dir) / "analyses" / f"reference-{m}.zarr", check_units=False),
                    normalizer, times)
        ws = np.linspace(0, 1, 101)
        blend = [mse((1 - w) * ref + w * bg) for w in ws]
        k = int(np.argmin(blend))
        cells = []
        for o in others:
            p = Path(a.eval_dir) / "analyses" / f"{o}-{m}.zarr"
            cells.append(f"{mse(_norm(era5.open_states(p, check_units=False), normalizer, times)):.5f}"
                         if p.exists() else "–")
        print(f"| {m} | {mse(bg):.5f} | {mse(ref):.5f} | {blend[k]:.5f} ({ws[k]:.2f}) | "
              f"{mse((1 - w_val) * ref + w_val * bg):.5f} ({w_val:.2f}) | " + " | ".join(cells) + " |", flush=True)
    if run.prod.failures:
        print("diverged on validation:", run.prod.failures)
    print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
