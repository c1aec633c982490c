"""Is an aligned model's ensemble-mean gain more than a move towards the background?

    python bench/blend_check.py EVAL_DIR [--workdir runs/default]

Reads the ensemble-mean analyses an evaluation stored (``EVAL_DIR/analyses/<model>-<method>.zarr``),
the truth (the run's world) and the 48 h backgrounds (the run's background cache) at the same
times, and for every method compares, in normalised MSE over the 69 channels:

- the reference's ensemble mean, the background, and every aligned model's ensemble mean;
- the reference blended towards the background, ``(1 − w) m_ref + w x_b``, with the ``w`` that is
  best **on these very times** (an oracle: the most this trivial baseline can do).

An aligned model that beats even the oracle blend has learnt more than "stay closer to the
background". Prints a Markdown table. This is a check on the test times themselves; the verdict
(docs/method.md §10) uses the honest version, the ``Blend-val`` row of the evaluation, whose
weight is fitted on validation times (``eval.blend_times``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from align_rl.io import era5  # noqa: E402


def _norm(states, normalizer, times):
    idx = [states.time_index(t) for t in times]
    return normalizer.normalize(states.values[idx].astype(np.float64))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("eval_dir")
    ap.add_argument("--workdir", default="runs/default")
    a = ap.parse_args()
    wd = Path(a.workdir)
    stores = sorted((Path(a.eval_dir) / "analyses").glob("*.zarr"))
    first = era5.open_states(stores[0], check_units=False)
    times = first.times
    normalizer = era5.load_normalizer(wd / "world.zarr")
    truth = _norm(era5.open_states(wd / "world.zarr", time_range=[times[0], times[-1]]), normalizer, times)
    bg = _norm(era5.open_states(wd / "backgrounds.zarr", time_range=[times[0], times[-1]],
                                check_units=False), normalizer, times)
    mse = lambda x: float(np.mean((x - truth) ** 2))  # noqa: E731
    methods = sorted({s.stem.split("-")[-1] for s in stores})
    print("| method | background | reference | oracle blend (w) | " + " | ".join(
        s.stem.rsplit("-", 1)[0] for s in stores if s.stem.endswith("obsfree") and not s.stem.startswith("reference")) + " |")
    print("|---" * (4 + sum(1 for s in stores if s.stem.endswith("obsfree") and not s.stem.startswith("reference"))) + "|")
    for m in methods:
        ref = _norm(era5.open_states(Path(a.eval_dir) / "analyses" / f"reference-{m}.zarr", check_units=False),
                    normalizer, times)
        ws = np.linspace(0, 1, 101)
        blend = [mse((1 - w) * ref + w * bg) for w in ws]
        k = int(np.argmin(blend))
        cells = []
        for s in stores:
            if s.stem.endswith(m) and not s.stem.startswith("reference"):
                cells.append(f"{mse(_norm(era5.open_states(s, check_units=False), normalizer, times)):.5f}")
        print(f"| {m} | {mse(bg):.5f} | {mse(ref):.5f} | {blend[k]:.5f} ({ws[k]:.2f}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
