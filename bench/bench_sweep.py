"""Time the 2-trial smoke sweep (``tune_configs/smoke.yaml``) and write its section of BENCHMARKS.md.

    python bench/bench_sweep.py [--config FILE] [--tiny] [--no-write] [key=value ...]

Two phases, timed separately: (1) the shared inputs (dataset, pretraining, backgrounds, the
reference's scored candidates, the reference's validation; each reused from its cache when
present), (2) the sweep itself with those inputs cached (the issue's target: <= 15 min for the
embedded default once pretraining is cached). ``--tiny`` runs on the tests' tiny world (8 x 16,
tiny networks) in a temporary folder; otherwise on the config given (default: the embedded
default in ``run.workdir``). The section names the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import replace_section  # noqa: E402

MARK = "## Sweep: tune_configs/smoke.yaml (bench/bench_sweep.py)"


def _machine() -> str:
    load = os.getloadavg()
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, load average {load[0]:.1f} "
            f"(shared with other jobs), Python {platform.python_version()}")


def write_section(text: str, path: Path = REPO / "BENCHMARKS.md") -> None:
    """Put ``text`` under the sweep heading of BENCHMARKS.md (the shared section writer)."""
    replace_section(MARK, f"{MARK}\n\n{text.strip()}\n", path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny world (8 x 16) in a temp dir")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("WANDB_MODE", "offline")

    from align_rl.tune.inputs import prepare_shared
    from align_rl.tune.run import run_sweep, sweep_dir
    from align_rl.tune.spec import build_base_config, load_spec, split_overrides

    config = a.config
    label = "embedded default" if not a.config else f"--config {a.config}"
    if a.tiny:
        from tests.test_job_submit import tiny_train_config

        tmp = Path(tempfile.mkdtemp(prefix="benchsweep"))
        config, _ = tiny_train_config(tmp)
        label = "tests' tiny world (8 x 16, tiny networks)"
    cfg_items, spec_ov = split_overrides(list(a.overrides))
    spec = load_spec(REPO / "tune_configs" / "smoke.yaml", spec_ov)
    cfg = build_base_config(spec, config, cfg_items)
    out = sweep_dir(cfg, spec)
    out.mkdir(parents=True, exist_ok=True)
    from align_rl.training.harness import init_ray

    init_ray()
    t0 = time.perf_counter()
    prepare_shared(cfg, spec, out, progress=False)
    t_prep = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = run_sweep(spec, cfg, progress=False)
    t_sweep = time.perf_counter() - t1
    stage_s = [r.metrics.get("stage_seconds") for r in res.rows if r.metrics.get("stage_seconds")]
    lines = [
        f"Machine: {_machine()}. Data: {label}; {len(res.rows)} trials x {spec.stages} stages of "
        f"{int(res.rows[0].metrics.get('dpo_steps', 0)) // max(1, spec.stages) if res.rows else '?'} DPO steps, "
        f"validation {spec.validation.times} val times x {spec.validation.members} members "
        f"({spec.validation.method}); one trial at a time.",
        "",
        "| phase | wall time |",
        "|---|---|",
        f"| shared inputs (world, pretraining, backgrounds, pairs, reference validation; from cache when present) | {t_prep / 60:.1f} min |",
        f"| sweep with the shared inputs cached (2 trials, results table, best config) | {t_sweep / 60:.1f} min |",
        f"| of which the sweep's own cache checks | {res.prepare_seconds:.0f} s |",
        f"| median DPO stage + validation | {sorted(stage_s)[len(stage_s) // 2]:.0f} s |" if stage_s else "",
        "",
        f"Trials: " + "; ".join(f"{r.trial_id} {r.status} val_mse={r.metrics.get('val_mse', float('nan')):.4g}"
                               for r in res.rows) + ".",
        "Target (issue 6): <= 15 min for the 2-trial sweep on the embedded default once pretraining is "
        "cached. Most of a stage is Ray Train start-up (a TorchTrainer per DPO stage: worker process, "
        "torch import, process group) and the validation sampling, not the DPO steps themselves.",
    ]
    text = "\n".join(x for x in lines if x is not None)
    print(text)
    if not a.no_write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
