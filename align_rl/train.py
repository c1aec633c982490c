"""The main job: ``python -m align_rl.train [--config FILE] [key=value ...]``.

End to end, each step reused from its cache when present:

1. the dataset (``ensure_world``), the pretrained forecaster, VAE and diffusion prior
   (``ensure_pretrained``) and the 48 h backgrounds of the preference split (``ensure_backgrounds``);
2. preference candidates of ``pairs.backgrounds`` backgrounds of ``data.pref`` drawn by the
   reference with ``pairs.guidance``, scored with every reward of ``rewards.names`` by sampler and
   reward actors (``actors.*``), paired for every mode of ``pairs.variants`` and committed to the
   preference store (``pairs.store``, default ``<workdir>/pairs.zarr``);
3. Diffusion-DPO per variant (``dpo.mode``: ``offline`` on the stored pairs, ``sync`` / ``online``
   with refreshes by the policy in rounds, or ``async`` with samplers and learner at once), for
   each alignment seed (``dpo.seeds``), checkpoints in ``<workdir>/dpo/<variant>-<mode>-<hash>/``;
4. the evaluation (:func:`align_rl.evaluation.runner.run_evaluation`) of the reference and the aligned models
   (``Align-M``, ``Align-P``) × ``guidance.methods`` on held-out ``data.test`` times, never used for
   pairs, with an "Alignment against the paper" section appended to ``report.md``.

Ray: connects to ``RAY_ADDRESS`` when set (e.g. under ``ray job submit``), otherwise starts a
local instance. Killing the driver and rerunning the same command resumes from the committed
pairs and the last DPO checkpoint. The modules of ``run.plugins`` (rewards, guidance methods,
forecaster kinds of the user's own) are imported here and in every actor and Train worker.
"""

from __future__ import annotations

import argparse
import sys

import actors
from align_rl import logs, pipeline
from align_rl.cli import check_eval_models, parse_args, preflight
from align_rl.config import load_config
from align_rl.errors import cli_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m align_rl.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config file (sections as in align_rl.config)")
    p.add_argument("--no-eval", action="store_true", help="stop after DPO (skip the evaluation)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. dpo.beta=8000")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    cfg = load_config(args.config, args.overrides)
    preflight(cfg, outputs=("pairs",) + (() if args.no_eval else ("eval",)))
    if not args.no_eval:
        check_eval_models(cfg, ["reference"] + [f"Align-{v}" for v in dict.fromkeys(cfg.pairs.variants)])
    actors.install()
    logs.setup(cfg.run.workdir)
    s = pipeline.run(cfg, evaluate=not args.no_eval)
    if "report" in s:
        pipeline.LOG.info(f"report: {s['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
