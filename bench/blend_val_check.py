"""The Blend-val baseline on a finished evaluation (one made before the evaluation had the row).

    python bench/blend_val_check.py EVAL_DIR [--workdir runs/default] [key=value ...]

Fits the Blend-val weight of every method exactly as the evaluation does
(:func:`align_rl.evaluation.runner.validation_inputs`, the reference's analyses of
``eval.blend_times`` validation times, the least-squares weight of their ensemble mean towards the
background, docs/method.md §10), then applies it to the reference's stored test ensemble means
(``EVAL_DIR/analyses/reference-<method>.zarr``) and prints, in ensemble-mean normalised MSE over
the 69 channels on the evaluation's test times: the background, the reference, the oracle blend
(the best ``w`` on the test times, as ``bench/blend_check.py``), the val-fitted blend and every
stored aligned model. Reads the run's world, background cache and pretrained checkpoints through the evaluation's own
loader (:func:`align_rl.evaluation.runner.load_eval_data`: the codec with its fitted anchor
weights); writes nothing. ``key=value``: config overrides (the run's own, if it was not run with the defaults);
``--aligned NAME=CHECKPOINT`` (repeatable) also fits a weight for an aligned model on the same
validation times (the same observations and sampler noise) and blends its stored test ensemble
means ``NAME-<method>.zarr`` with it: the second table compares *both blended*, so it answers
whether alignment adds anything beyond a move towards the background (per-time ensemble-mean MSE,
% change of the blended aligned model against the blended reference, 95 % circular-block
interval of :func:`align_rl.evaluation.bootstrap.paired_change`).
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
from align_rl.evaluation.bootstrap import paired_change  # noqa: E402
from align_rl.evaluation.skill import forecast_steps  # noqa: E402
from align_rl.io import era5  # noqa: E402
from align_rl.io.checkpoints import load_model  # noqa: E402


def _norm(states, normalizer, times):
    idx = [states.time_index(t) for t in times]
    return normalizer.normalize(states.values[idx].astype(np.float64))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("eval_dir")
    ap.add_argument("--workdir", default="runs/default")
    ap.add_argument("--aligned", action="append", default=[], metavar="NAME=CHECKPOINT")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    wd = Path(a.workdir)
    cfg = load_config(None, [f"run.workdir={wd}", "run.wandb_mode=disabled", "eval.sampling=driver", *a.overrides])
    t0 = time.time()
    import actors
    from align_rl.training.harness import init_ray
    from align_rl.workspace import Workspace

    actors.install()
    init_ray()
    # the evaluation's own loading: the codec with its fitted anchor weights (docs/method.md §4.2)
    data, eps = runner.load_eval_data(cfg, Workspace.from_config(cfg))
    eps.eval()
    normalizer, codec = data.normalizer, data.codec
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
    per_time = lambda x: np.mean((x - truth) ** 2, axis=tuple(range(1, truth.ndim)))  # noqa: E731
    aligned = {}
    for spec in a.aligned:
        name, _, path = spec.partition("=")
        aligned[name], _ = load_model(path, "diffusion", expect=cfg.diffusion,
                                      shapes={"latent_shape": tuple(codec.latent_shape)})
        aligned[name].eval()
    both = []
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
        base = per_time((1 - w_val) * ref + w_val * bg)
        for name, model in aligned.items():
            with torch.no_grad():
                w_a = runner._fit_blend_val(run, plan.settings[0], 0, cfg.guidance.methods.index(m), m, model)
            x = _norm(era5.open_states(Path(a.eval_dir) / "analyses" / f"{name}-{m}.zarr", check_units=False),
                      normalizer, times)
            c = paired_change(per_time((1 - w_a) * x + w_a * bg), base, seed=int(cfg.run.seed))
            both.append(f"| {m} | {name} | {w_val:.2f} | {w_a:.2f} | {float(np.mean(base)):.5f} | "
                        f"{mse((1 - w_a) * x + w_a * bg):.5f} | {c['pct']:+.2f} [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}] |")
    if both:
        print("\nBoth blended towards the background with their own validation weights (ensemble-mean MSE):")
        print("| method | aligned | w reference | w aligned | reference blended | aligned blended | % change [95 % CI] |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(both))
    if run.prod.failures:
        print("diverged on validation:", run.prod.failures)
    print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
