"""The tiny main job (tests/tiny_align.py: 8 × 16 grid, tiny networks) with ``run.device=cuda``.

``python bench/gpu_tiny_job.py OUT [--device cuda|cpu] [--gpu-share 0.2] [--learner-gpu]``

Writes the tiny WeatherBench2-layout world into ``OUT/world.zarr``, runs ``python -m
align_rl.train`` on it with ``OUT/run`` as the work folder (world, pretraining, backgrounds by
forecast actors, pairs by sampler and reward actors, DPO for -M and -P, the evaluation in the
analysis actor), its console in ``OUT/console.txt``, and a summary in ``OUT/tiny_job.json``
(exit status, seconds, the stage timings, whether the report exists). ``--learner-gpu`` also sets
``pretrain.use_gpu`` and ``dpo.use_gpu`` (Ray Train workers on the GPU). Exit status: the job's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny_align import OVERRIDES, TRAIN_OVERRIDES, write_tiny_world  # noqa: E402


def job_args(out: Path, world: Path, device: str, share: float, learner_gpu: bool) -> list[str]:
    """The main job's overrides: the tiny world and networks, the device settings."""
    dev = [f"run.device={device}"]
    if device != "cpu":
        dev.append(f"actors.gpus_per_actor={share}")
        dev += ["pretrain.use_gpu=true", "pretrain.num_workers=1", "dpo.use_gpu=true",
                "dpo.num_workers=1"] if learner_gpu else []
    return [*OVERRIDES, *TRAIN_OVERRIDES, f"data.path={world}", f"run.workdir={out / 'run'}",
            "dpo.steps=10", "pairs.variants=[M, P]", "rewards.names=[assim, phys, forecast]", *dev]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--device", default="cuda", choices=["auto", "cpu", "cuda"])
    p.add_argument("--gpu-share", type=float, default=0.2, help="actors.gpus_per_actor")
    p.add_argument("--learner-gpu", action="store_true", help="pretrain.use_gpu and dpo.use_gpu")
    p.add_argument("--timeout", type=float, default=None, help="seconds before the job is stopped")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    world = out / "world.zarr"
    if not world.exists():
        write_tiny_world(world)
    args = job_args(out, world, a.device, a.gpu_share, a.learner_gpu)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    with open(out / "console.txt", "w") as f:
        try:
            rc = subprocess.run([sys.executable, "-m", "align_rl.train", *args], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT, timeout=a.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    seconds = time.perf_counter() - t0
    summary = out / "run" / "train_summary.json"
    timings = json.loads(summary.read_text()).get("timings") if summary.exists() else None
    report = out / "run" / "eval" / "report.md"
    info = {"rc": rc, "seconds": round(seconds, 1), "device": a.device, "gpu_share": a.gpu_share,
            "learner_gpu": a.learner_gpu, "timings": timings, "report": report.exists(), "args": args}
    (out / "tiny_job.json").write_text(json.dumps(info, indent=1))
    print(json.dumps({k: info[k] for k in ("rc", "seconds", "device", "learner_gpu", "report")}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
