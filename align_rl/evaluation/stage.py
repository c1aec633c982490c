"""The main job's evaluation stage (docs/method.md §10): the reference and the aligned models
``Align-<variant>`` × ``guidance.methods`` on held-out ``data.test`` times, with the "Alignment
against the paper" section appended to ``report.md``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align_rl.config import Config
from align_rl.evaluation.paper import append_report, alignment_section
from align_rl.evaluation.results import changes_doc
from align_rl.evaluation.runner import run_evaluation
from align_rl.io.checkpoints import load_model
from align_rl.workspace import Workspace


def evaluate_aligned(cfg: Config, ws: Workspace, reference: Any, checkpoints: dict[str, Path],
                     variants: list[str], info: dict, progress: bool = True) -> dict:
    """Evaluate ``reference`` (ε_θ) and the DPO ``checkpoints`` (variant → file, evaluated as
    ``Align-<variant>``); append the alignment section (``info``: the pairs and DPO settings) to
    the report and print it. Returns the main job's summary entries: ``report`` (path) and
    ``changes`` (``{"<model>/<method>": {kind: {stat: {metric: change}}}}`` of the main setting)."""
    models = {"reference": reference}
    for v, ckpt in checkpoints.items():
        models[f"Align-{v}"], _ = load_model(ckpt, "diffusion", expect=cfg.diffusion)
    ev = run_evaluation(cfg, ws, models, progress=progress)
    out = Path(cfg.eval.out or ws.eval)
    section = alignment_section(ev, variants, list(cfg.guidance.methods), info)
    append_report(out / "report.md", section)
    print(section)
    return {"report": str(out / "report.md"), "changes": changes_doc(ev.ds, "main")}
