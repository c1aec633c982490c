"""Score an analysis (or forecast) store against a truth store, WeatherBench2 style (docs/method.md §7, §10).

``python -m align_rl.score --analysis A.zarr --truth T.zarr [--out metrics.json] [--csv FILE]
[--regions global,tropics,extratropics,band:30:60] [--rmse both|per-time|wb2]
[--variables z500,t850,...] [--regrid none|truth-to-analysis|analysis-to-truth]
[--normalization STATS] [--chunk 16] [--no-unit-check]``

What is scored: the channels (short names ``z500``, ``t850``, ``u10`` …; variables by their
WeatherBench2 long names, levels by value) that **both** stores hold, at the time steps both hold,
on their common grid (any accepted grid of :mod:`align_rl.io.era5`, rows on the poles included). The
input stores are only read.

- ``wrmse`` per channel and region, in the variables' physical units (no statistics needed),
  weighted by **cell area** from the actual latitude coordinate (:func:`align_rl.io.grid.
  cell_area_weights`: edges midway between rows, pole rows half cells, as WeatherBench2; on a
  cell-centred grid this is ``cos φ / mean cos φ``, the paper's weights). Two conventions, stated
  in the output's ``conventions``: ``wrmse`` = the mean over time steps of the per-step RMSE (the
  paper's annual scores, docs/method.md §7) and ``wrmse_wb2`` = the square root of the time-mean MSE
  (WeatherBench2's headline RMSE); ``--rmse`` chooses one or both (default both).
- Regions: ``global``, ``tropics`` (|lat| ≤ 20°), ``extratropics`` (|lat| ≥ 20°),
  ``nh-extratropics`` (20° … 90°), ``sh-extratropics`` (−90° … −20°), ``band:LO:HI`` (LO ≤ lat ≤ HI,
  degrees); the rows of the region keep their cell areas.
- ``mse``/``mae``: over the scored channels in normalised units, unweighted, per step then averaged
  (the paper's Table 1), only when statistics are given (``--normalization`` JSON file or store) or
  stored in the truth store.
- ``geo_score``: the Geo-Score of the 500 hPa geostrophic balance (100 when the analysis is as
  balanced as the truth), when both stores hold z500, u500 and v500.

Values implausible in SI units (temperature in °C, geopotential height in m, …;
:mod:`align_rl.io.plausibility`) are refused unless ``--no-unit-check`` is given.

Prints the JSON; ``--out`` writes it and a CSV beside it (``--csv`` elsewhere; one row per region,
metric and channel), both atomically and only after every score is computed. Bad input: one line
``error: …`` naming the problem and the fix, exit status 2, nothing written.
Python: :func:`score_stores`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from align_rl.errors import InputError, cli_errors
from align_rl.evaluation import scoring
from align_rl.evaluation.scoring import DEFAULT_REGIONS, REGRID_CHOICES, RMSE_CHOICES


def _check_output(path: str | None, stores: Sequence[str], flag: str) -> None:
    if not path:
        return
    p = Path(path).resolve()
    if p.is_dir():
        raise InputError(f"{flag} {path} is a folder; give the path of the file to write "
                         f"(e.g. {Path(path) / 'metrics.json'})")
    if not p.parent.exists():
        raise InputError(f"the folder of {flag} {path} does not exist; create it first")
    for s in stores:
        if "://" in str(s):
            continue
        root = Path(s).resolve()
        if p == root or root in p.parents:
            raise InputError(f"{flag} {path} lies inside the input store {s}; the scorer never "
                             "writes into its inputs: choose a path outside it")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m align_rl.score", description=__doc__.split("\n\n")[0])
    p.add_argument("--analysis", required=True, help="WeatherBench2-layout zarr of analyses or forecasts")
    p.add_argument("--truth", required=True, help="WeatherBench2-layout zarr of the truth (e.g. ERA5)")
    p.add_argument("--out", help="write the metrics JSON here, and the CSV beside it (atomically)")
    p.add_argument("--csv", help="write the CSV here instead of beside --out")
    p.add_argument("--regions", default=",".join(DEFAULT_REGIONS),
                   help="comma-separated: global, tropics, extratropics, nh-extratropics, "
                        "sh-extratropics, band:LO:HI (default: %(default)s)")
    p.add_argument("--rmse", choices=RMSE_CHOICES, default="both",
                   help="per-time: mean of per-step RMSEs (the paper); wb2: sqrt of the time-mean "
                        "MSE (WeatherBench2); both (default)")
    p.add_argument("--variables", help="comma-separated channels or variables to score (z500,t850 "
                   "or z,t); default: every channel both stores hold")
    p.add_argument("--regrid", choices=REGRID_CHOICES, default="none",
                   help="when the grids differ, regrid one store conservatively (default: refuse)")
    p.add_argument("--normalization", help="statistics for mse/mae: a JSON file (python -m "
                   "align_rl.data stats STORE --out FILE) or a store holding them (default: the "
                   "truth store's, if any; without statistics mse/mae are left out)")
    p.add_argument("--chunk", type=int, default=16, help="time steps read at once (memory)")
    p.add_argument("--no-unit-check", action="store_true",
                   help="score values outside the plausible SI ranges (unusual data) without refusing")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.chunk < 1:
        raise InputError(f"--chunk {args.chunk} must be >= 1")
    for name in ("analysis", "truth", "normalization"):
        v = getattr(args, name)
        if v and "://" not in v and not Path(v).exists():
            raise InputError(f"--{name} {v} does not exist; check the path")
    stores = [args.analysis, args.truth]
    _check_output(args.out, stores, "--out")
    _check_output(args.csv, stores, "--csv")
    if args.out and args.csv is None:
        _check_output(str(Path(args.out).with_suffix(".csv")), stores, "--out")
    regions = [r.strip() for r in args.regions.split(",") if r.strip()]
    variables = [v.strip() for v in args.variables.split(",") if v.strip()] if args.variables else None
    result = scoring.score_stores(args.analysis, args.truth, args.normalization, args.chunk,
                          regions=regions, rmse=args.rmse, variables=variables, regrid=args.regrid,
                          check_units=not args.no_unit_check)
    print(json.dumps(result, indent=2))
    if args.out or args.csv:
        scoring.write_results(result, args.out, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
