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


def evaluate_aligned(cfg: Config, ws: Workspace, reference: Any,
                     checkpoints: dict[str, Path | list[Path]], variants: list[str], info: dict,
                     progress: bool = True) -> dict:
    """Evaluate ``reference`` (ε_θ) and the DPO ``checkpoints`` (variant → one file per seed, index
    = seed, or one file for one seed; evaluated as ``Align-<variant>``, several seeds as
    ``Align-<variant>@seed<k>`` and their mean ``Align-<variant>``, :mod:`align_rl.evaluation.seeds`);
    append the alignment section (``info``: the pairs and DPO settings) to the report and print it.
    Returns the main job's summary entries: ``report`` (path), ``changes``
    (``{"<model>/<method>": {kind: {stat: {metric: change}}}}`` of the main setting) and
    ``verdict`` (the Holm-corrected lines of :mod:`align_rl.evaluation.verdict`)."""
    models: dict[str, Any] = {"reference": reference}
    for v, ckpts in checkpoints.items():
        paths = [ckpts] if isinstance(ckpts, (str, Path)) else list(ckpts)
        nets = [load_model(p, "diffusion", expect=cfg.diffusion)[0] for p in paths]
        models[f"Align-{v}"] = nets[0] if len(nets) == 1 else nets
    ev = run_evaluation(cfg, ws, models, progress=progress)
    out = Path(cfg.eval.out or ws.eval)
    section, lines = alignment_section(ev, variants, list(cfg.guidance.methods), info, with_lines=True)
    append_report(out / "report.md", section)
    print(section)
    return {"report": str(out / "report.md"), "changes": changes_doc(ev.ds, "main"),
            "verdict": [{k: ln[k] for k in ("model", "method", "kind", "what", "gain", "p", "p_holm", "why")}
                        for ln in lines]}
