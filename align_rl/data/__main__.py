"""``python -m align_rl.data {simulate,spinup,stats,independence}`` — see :mod:`align_rl.data`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from align_rl.config import load_config
from align_rl.errors import InputError, cli_errors


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m align_rl.data",
                                 description="The embedded Held–Suarez world (dinosaur-torch).")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("simulate", help="simulate the world and write a WeatherBench2-layout zarr")
    s.add_argument("--out", required=True, help="output zarr path")
    s.add_argument("--grid", help="target grid NLATxNLON (32x64, 64x128, 128x256; default: config)")
    s.add_argument("--days", type=int, help="simulated days per member (default: config data.days)")
    s.add_argument("--members", type=int, help="members, run as one batch (default: config)")
    s.add_argument("--seed", type=int, help="seed of the member perturbations (default: config)")
    s.add_argument("--burn-in", type=float, dest="burn_in",
                   help="days discarded after perturbing the restart (default: config)")
    s.add_argument("--gap", type=float, dest="gap",
                   help="days skipped between members of the one run (default: config)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing store written by align_rl (never another folder)")
    s.add_argument("--config", help="YAML config file (its data section is used)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    p = sub.add_parser("spinup", help="recreate the spun-up restart from rest")
    p.add_argument("--days", type=int, default=None, help="days from rest (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="restart file (default: the committed one)")
    p.add_argument("--quiet", action="store_true")
    t = sub.add_parser("stats", help="print a store's normalisation statistics; compute them over "
                       "the training range into --out FILE (the store is not written), or into the "
                       "store's own attributes with --write-store")
    t.add_argument("path")
    t.add_argument("--train", nargs=2, metavar=("START", "END"),
                   help="training time range (default: config data.train)")
    t.add_argument("--out", help="write the statistics here as JSON (data.normalization=FILE, "
                   "score --normalization FILE)")
    t.add_argument("--grid", help="model grid NLATxNLON the statistics are computed on "
                   "(default: config data.grid; the store is regridded to it)")
    t.add_argument("--max-times", type=int, default=None, dest="max_times",
                   help="at most this many evenly spaced training times (default: data.stats_times)")
    t.add_argument("--write-store", action="store_true", dest="write_store",
                   help="store them in the store's attributes (your own local store only)")
    t.add_argument("--recompute", action="store_true", help="with --write-store: replace them")
    t.add_argument("--config")
    i = sub.add_parser("independence", help="check that the val, pref and test splits of a store "
                       "hold weather no training state holds (z500 eddy correlations)")
    i.add_argument("path")
    for name in ("train", "val", "pref", "test"):
        i.add_argument(f"--{name}", nargs=2, metavar=("START", "END"),
                       help=f"the {name} time range (default: the store's splits attribute)")
    i.add_argument("--min-days", type=float, default=10.0, dest="min_days",
                   help="states at least this many days apart share no weather (default 10)")
    i.add_argument("--margin", type=float, default=0.1)
    i.add_argument("--json", help="also write the result as JSON to this file")
    return ap


@cli_errors
def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args, rest = ap.parse_known_args(argv)
    # overrides may come between options (`simulate --out w.zarr data.days=2 --overwrite data.seed=1`)
    extra = [r for r in rest if "=" in r and not r.startswith("-")]
    if len(extra) != len(rest) or (extra and args.command != "simulate"):
        ap.error(f"unrecognized arguments: {' '.join(r for r in rest if r not in extra or args.command != 'simulate')}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.command == "simulate":
        from align_rl.world.simulate import build_world, check_request

        ov = list(args.overrides)
        for key, val in (("grid", args.grid), ("days", args.days), ("members", args.members),
                         ("seed", args.seed), ("burn_in_days", args.burn_in),
                         ("gap_days", args.gap)):
            if val is not None:
                ov.append(f"data.{key}={val}")
        cfg = load_config(args.config, ov)
        d = cfg.data
        check_request(d.grid, d.days, d.members, d.burn_in_days, d.gap_days)
        t0 = time.perf_counter()
        out = build_world(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
        n = d.members * d.days * 4
        dt = time.perf_counter() - t0
        print(f"wrote {out}: {n} states ({d.members} members × {d.days} days, 6-hourly) on "
              f"{d.grid} in {dt:.1f} s ({n / dt:.1f} states/s)")
        return 0
    if args.command == "spinup":
        from align_rl.world.spinup import DEFAULT_RESTART, DEFAULT_SPINUP_DAYS, run_spinup

        days = DEFAULT_SPINUP_DAYS if args.days is None else args.days
        if days <= 0:
            raise InputError(f"--days={days} must be positive")
        out = run_spinup(args.out or DEFAULT_RESTART, days, args.seed, progress=not args.quiet)
        print(f"wrote restart {out} ({days} days from rest, seed {args.seed})")
        return 0
    if args.command == "independence":
        from pathlib import Path

        from align_rl.evaluation.scoring import write_json_atomic
        from align_rl.world.independence import check_store

        if "://" not in args.path and not Path(args.path).exists():
            raise InputError(f"store {args.path} does not exist")
        given = {k: getattr(args, k) for k in ("train", "val", "pref", "test") if getattr(args, k)}
        if given and "train" not in given:
            raise InputError("give --train with the other ranges (or none: the store's own splits)")
        rep = check_store(args.path, given or None, args.min_days, args.margin)
        print(rep.table())
        if args.json:
            write_json_atomic(args.json, rep.to_dict())
        return 0 if rep.passed else 1
    if args.command == "stats":
        from pathlib import Path

        from align_rl.io import era5
        from align_rl.evaluation.scoring import write_json_atomic
        from align_rl.world.dataset import stored_attrs
        from align_rl.world.simulate import store_normalization

        if "://" not in args.path and not Path(args.path).exists():
            raise InputError(f"store {args.path} does not exist")
        cfg = load_config(args.config)
        train = list(args.train or cfg.data.train)
        if args.out:
            if not Path(args.out).resolve().parent.exists():
                raise InputError(f"the folder of --out {args.out} does not exist; create it first")
            grid = args.grid or cfg.data.grid
            n_max = cfg.data.stats_times if args.max_times is None else args.max_times
            norm, how = era5.stream_normalizer(args.path, train, grid, 1, n_max)
            write_json_atomic(args.out, {**norm.to_dict(), "computed_over": how, "grid": grid,
                                         "store": args.path, "train": train})
            print(f"wrote normalisation statistics over {how['times']} times of {train} on {grid} "
                  f"to {args.out} (data.normalization={args.out})")
            attrs = {}
        else:
            attrs = stored_attrs(args.path)
            if "normalization" not in attrs or args.recompute:
                if not args.write_store:
                    raise InputError(
                        f"{args.path} holds no normalisation statistics; compute them with --out "
                        "FILE (the store is not written), or with --write-store into the store's "
                        "own attributes (a local store of your own)")
                how = store_normalization(args.path, train)
                print(f"stored normalisation statistics over {how} in {args.path}")
                attrs = stored_attrs(args.path)
            norm = era5.Normalizer.from_dict(attrs.pop("normalization"))
        print(json.dumps(attrs, indent=1, default=str))
        for name, m, s in zip(norm.to_dict()["channels"], norm.mean, norm.std):
            print(f"{name:>6s} mean {m:14.6g} std {s:12.6g}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
