"""Pretraining of the forecaster, the VAE and the latent diffusion model on Ray Train.

``python -m align_rl.pretrain {forecaster|vae|diffusion|all} [--config FILE] [--force] [key=value ...]``

Order (``all``): the forecaster emulator (one 6 h step from two frames), the VAE, the per-channel
latent statistics (:func:`~align_rl.models.vae.fit_latent_stats` over the training split), the 48 h
backgrounds of the training and validation splits (:func:`align_rl.world.backgrounds.ensure_backgrounds`,
needed because the diffusion model learns ``p(z | z_b)`` with ``z_b = E(x_b)``), then the diffusion
model. Each training runs under a Ray Train ``TorchTrainer`` (:mod:`align_rl.training.harness`)
with checkpoints below ``ws.checkpoints(model)``; the final network is written with
:func:`~align_rl.io.checkpoints.save_model` to ``ws.final_checkpoint(model)`` with its *identity*
(config section, dataset key, seed and, for the diffusion model, the hashes of the VAE and of the
forecaster it was trained with) in ``extra["identity"]``. :func:`ensure_pretrained` reuses a final
checkpoint whose identity matches and trains what is missing. The summary (validation split,
normalised units) is printed and written to ``<workdir>/pretrain_summary.json``.
"""

from __future__ import annotations

import argparse
import sys

import actors
from align_rl import logs
from align_rl.cli import parse_args, preflight
from align_rl.config import load_config
from align_rl.errors import cli_errors
from align_rl.training import pretraining
from align_rl.training.pretraining import STAGES, SUMMARY_FILE  # noqa: F401 (documented names)
from align_rl.workspace import Workspace


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m align_rl.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=(*STAGES, "all"), help="what to pretrain (all: every model, in order)")
    p.add_argument("--config", default=None, help="YAML config file (sections as in align_rl.config)")
    p.add_argument("--force", action="store_true", help="retrain the named stage(s) even when cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. vae.steps=200")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    cfg = load_config(args.config, args.overrides)
    stages = STAGES if args.stage == "all" else (args.stage,)
    preflight(cfg, force=stages if args.force else ())
    actors.install()
    logs.setup(cfg.run.workdir)
    ws = Workspace.from_config(cfg)
    force = stages if args.force else ()
    with logs.stage(f"pretrain {args.stage}") as st:
        models = pretraining.ensure_pretrained(cfg, ws, stages, force=force,
                                               evaluate=args.stage in ("all", "diffusion"),
                                               progress=not args.no_progress)
    for s, pth in models.paths.items():
        print(f"{s}: {pth}")
    if models.summary and args.stage in ("all", "diffusion"):
        print(pretraining.format_summary(models.summary))
    print(f"pretrain {args.stage} finished in {st.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
