"""The observing-network experiment, the paper's Table 5 analogue (docs/method.md §10.1).

``python -m align_rl.network --models Align-DPS-M=CHECKPOINT [--obs FILE ...] [--out DIR]
[--window-hours 3] [--background-k 5] [--reference-k 0.1] [--sondes 60] [--surface 200]
[--dps-zeta 0.2]
[key=value ...]``

DPS analyses of the reference model and of each aligned model from point observations: the IODA-v2
files or CSV/Parquet tables given with ``--obs``, or, without it, the embedded world's synthetic
network of radiosondes and surface stations (written as IODA files into ``<out>/network`` and read
back). Quality control: the background check (``--background-k``, 0 turns it off) and the paper's
filter against the truth (``--reference-k``, 0 turns it off). Writes ``report.md`` and
``metrics.json`` into ``--out`` (default ``<workdir>/network``) with each aligned model's % change
against ``eval.baseline``, its *shrink* baseline and the evaluation report's verdict (Holm-corrected
over the aligned models, docs/method.md §10).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import actors
from align_rl import logs
from align_rl.cli import check_model_specs, parse_args, preflight, split_model_specs
from align_rl.config import load_config, with_values
from align_rl.errors import cli_errors
from align_rl.evaluation import runner
from align_rl.evaluation.network import NetworkSettings, load_records, run_network_experiment
from align_rl.owned import require_owned, staged
from align_rl.workspace import Workspace


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m align_rl.network", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config file (sections as in align_rl.config)")
    p.add_argument("--models", nargs="*", default=[], metavar="NAME=CHECKPOINT",
                   help="aligned score networks to compare with the reference")
    p.add_argument("--obs", nargs="*", default=[], metavar="FILE",
                   help="IODA-v2 files (.nc) or tables (.csv, .parquet); default: the synthetic network")
    p.add_argument("--out", help="output folder (default: <workdir>/network)")
    d = NetworkSettings()
    p.add_argument("--window-hours", type=float, default=d.window_hours)
    p.add_argument("--background-k", type=float, default=d.background_k)
    p.add_argument("--reference-k", type=float, default=d.reference_k)
    p.add_argument("--reference-scale", choices=("climate", "obs_error"), default=d.reference_scale)
    p.add_argument("--sondes", type=int, default=d.sondes)
    p.add_argument("--surface", type=int, default=d.surface)
    p.add_argument("--dps-zeta", type=float, default=d.dps_zeta,
                   help="DPS guidance strength for these observations (default %(default)s, chosen on "
                        "validation times; guidance.dps_zeta is tuned for gridded observations)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    specs, more = split_model_specs(args.models)
    cfg = load_config(args.config, list(args.overrides) + more)
    check_model_specs(specs)
    settings = NetworkSettings(args.window_hours, args.background_k, args.reference_k,
                               args.reference_scale, args.sondes, args.surface, cfg.run.seed,
                               args.dps_zeta)
    if args.obs:
        load_records(args.obs)  # bad files fail before the world and the models are built
    preflight(cfg)
    out = Path(args.out or Path(cfg.run.workdir) / "network")
    require_owned(out, "network experiment output (--out)")
    actors.install()
    logs.setup(cfg.run.workdir)
    ws = Workspace.from_config(cfg)
    # no Blend-val row here (docs/method.md §10): the validation split is not opened
    data, models = runner.data_and_models(with_values(cfg, {"eval.blend_times": 0}), ws, specs)
    with logs.stage("network experiment"), staged(out, "network") as new:
        doc = run_network_experiment(cfg, data, models, new, args.obs or None, settings)
    print(f"network experiment of {', '.join(models)} (DPS) on {len(doc['times'])} times, "
          f"{doc['observations']['n_used']} observations: {out / 'report.md'}")
    for name, v in doc["verdict"].items():
        print(f"  [{'gain' if v['gain'] else 'no gain'}] {name} against {doc['baseline']} and "
              f"{doc['shrink'][name]} (p Holm {v['p_holm']:.4f}): {'; '.join(v['why'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
