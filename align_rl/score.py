"""Score an analysis store against a truth store (docs/method.md §7, §10).

``python -m align_rl.score --analysis A.zarr --truth T.zarr [--out metrics.json]
[--normalization STORE] [--chunk 16] [--no-unit-check]``

For the time steps the two stores share, computes per time step and then averages over them:
``mse`` and ``mae`` over the 69 normalised channels (statistics from the truth store's attribute
``normalization``, or from ``--normalization STORE``), ``wrmse`` per channel in physical units
(a mapping from every short name to its value) and the Geo-Score at 500 hPa (100 when the
analysis is balanced exactly as the truth). Prints the JSON; ``--out`` is written atomically.
Values implausible in SI units (temperature in °C, geopotential height in m, ...) are refused
unless ``--no-unit-check`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from . import era5
from .errors import InputError, cli_errors
from .geostrophic import geo_score
from .metrics import mae, mse, wrmse
from .schema import CHANNELS


def score_stores(
    analysis: str | Path,
    truth: str | Path,
    normalization: str | Path | None = None,
    chunk: int = 16,
    progress: bool = True,
    check_units: bool = True,
) -> dict[str, Any]:
    """The metrics of ``analysis`` against ``truth`` over their shared times (see module doc);
    ``check_units``: refuse values implausible in SI units (:mod:`align_rl.plausibility`)."""
    t_a = era5.store_times(analysis)
    t_t = era5.store_times(truth)
    shared = np.intersect1d(t_a, t_t)
    if len(shared) == 0:
        raise InputError(
            f"{analysis} and {truth} share no time steps (analysis holds "
            f"{_span(t_a)}, truth {_span(t_t)}); score an analysis of the truth's period"
        )
    norm = era5.load_normalizer(normalization if normalization is not None else truth)
    sums: dict[str, Any] = {"mse": 0.0, "mae": 0.0, "geo_score": 0.0, "wrmse": np.zeros(len(CHANNELS))}
    steps = range(0, len(shared), max(1, int(chunk)))
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="score", unit="chunk", file=sys.stderr, leave=False)
    for s in steps:
        times = shared[s:s + chunk]
        a = era5.open_states(analysis, times=times, check_units=check_units)
        t = era5.open_states(truth, times=times, check_units=check_units)
        if a.grid != t.grid:
            raise InputError(
                f"the analysis grid {a.grid} differs from the truth grid {t.grid}; regrid one "
                "(e.g. open_states(..., coarsen=k)) before scoring"
            )
        xa = a.values.astype(np.float64)
        xt = t.values.astype(np.float64)
        na, nt = norm.normalize(xa), norm.normalize(xt)
        sums["mse"] += float(mse(na, nt).sum())
        sums["mae"] += float(mae(na, nt).sum())
        sums["wrmse"] += wrmse(xa, xt, t.lat).sum(axis=0)
        sums["geo_score"] += float(geo_score(xa, xt, t.lat, t.lon).sum())
    n = len(shared)
    return {
        "mse": sums["mse"] / n,
        "mae": sums["mae"] / n,
        "wrmse": {name: float(v) for name, v in zip(CHANNELS, sums["wrmse"] / n)},
        "geo_score": sums["geo_score"] / n,
        "n_times": int(n),
        "first_time": np.datetime_as_string(shared[0], unit="s"),
        "last_time": np.datetime_as_string(shared[-1], unit="s"),
        "analysis": str(analysis),
        "truth": str(truth),
        "normalization": str(normalization if normalization is not None else truth),
    }


def _span(t: np.ndarray) -> str:
    if len(t) == 0:
        return "no times"
    return f"{np.datetime_as_string(t[0], unit='h')} … {np.datetime_as_string(t[-1], unit='h')}"


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` via a temporary file and a rename."""
    from .owned import temp_file

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; give the path of the JSON file to write")
    tmp = temp_file(path)  # stale temporaries of dead processes are cleaned here
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m align_rl.score", description=__doc__.split("\n\n")[0])
    p.add_argument("--analysis", required=True, help="WeatherBench2-layout zarr of analyses")
    p.add_argument("--truth", required=True, help="WeatherBench2-layout zarr of the truth")
    p.add_argument("--out", help="write the metrics JSON here as well (atomically)")
    p.add_argument("--normalization", help="store whose attrs hold the normalisation (default: truth)")
    p.add_argument("--chunk", type=int, default=16, help="time steps read at once (memory)")
    p.add_argument("--no-unit-check", action="store_true",
                   help="score values outside the plausible ranges of SI units (unusual data)")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out and Path(args.out).is_dir():
        raise InputError(f"--out {args.out} is a folder; give the path of the JSON file to write "
                         f"(e.g. {Path(args.out) / 'metrics.json'})")
    if args.out and not Path(args.out).parent.exists():
        raise InputError(f"the folder of --out {args.out} does not exist; create it first")
    if args.chunk < 1:
        raise InputError(f"--chunk {args.chunk} must be >= 1")
    for name in ("analysis", "truth", "normalization"):
        v = getattr(args, name)
        if v and "://" not in v and not Path(v).exists():
            raise InputError(f"--{name} {v} does not exist; check the path")
    result = score_stores(args.analysis, args.truth, args.normalization, args.chunk,
                          check_units=not args.no_unit_check)
    print(json.dumps(result, indent=2))
    if args.out:
        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
