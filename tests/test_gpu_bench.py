"""The GPU benches run here in their --smoke modes (tiny sizes on the CPU) and write what the GPU
check collects; without CUDA their real modes refuse with status 2."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paper_scale_smoke_records_time_per_analysis_and_member(tmp_path):
    ps = _bench("gpu_paper_scale")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert ps.main(["--smoke", "--out", str(tmp_path), "--also-autocast", "bf16"]) == 0
    finally:
        torch.set_num_threads(threads)
    info = json.loads((tmp_path / "gpu_paper_scale.json").read_text())
    runs = info["runs"]
    assert [(r["method"], r["members"]) for r in runs] == [("dps", 1), ("dps", 4), ("dps", 1), ("dps", 4),
                                                           ("obsfree", 1), ("dps", 1)]
    assert [r["autocast"] for r in runs] == ["bf16_dps"] * 5 + ["bf16"]
    assert {(r["steps"], r["corrections"]) for r in runs} == {(2, 1), (1, 0)}  # paper K, and K_rec
    for r in runs:
        assert r["seconds"] > 0 and abs(r["per_member"] * r["members"] - r["seconds"]) < 1e-9
    assert info["autocast"] == "bf16_dps"
    if not torch.cuda.is_available():
        assert ps.main(["--no-write"]) == 2


def test_paper_scale_rows_go_under_the_gpu_table(tmp_path):
    ps = _bench("gpu_paper_scale")
    bench = tmp_path / "B.md"
    bench.write_text("# Benchmarks\n\n" + ps.SECTION_HEAD + "\n\nolder runs:\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
                     "## Next section\n\ntext\n")
    ps.append_rows(["| row 1 |"], bench)
    ps.append_rows(["| row 2 |", "| row 3 |"], bench)
    text = bench.read_text()
    sec = text.split(ps.SECTION_HEAD)[1].split("## Next section")[0]
    assert sec.count(ps.TABLE_HEAD) == 1 and "| 1 | 2 |" in sec
    assert sec.index("| 1 | 2 |") < sec.index(ps.TABLE_HEAD) < sec.index("| row 1 |") < sec.index("| row 3 |")
    assert text.endswith("## Next section\n\ntext\n")
    fresh = tmp_path / "C.md"
    ps.append_rows(["| r |"], fresh)
    assert ps.TABLE_HEAD in fresh.read_text() and fresh.read_text().rstrip().endswith("| r |")


def test_align_bench_smoke(tmp_path, ray_session):
    ga = _bench("gpu_align")
    threads = torch.get_num_threads()
    try:
        assert ga.main(["--smoke", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads((tmp_path / "gpu_align.json").read_text())
    for n in ("1", "2"):
        c = res["candidates"][n]
        assert c["candidates"] == res["candidates_per_background"] * res["backgrounds"] > 0
        assert c["candidates_per_s"] > 0 and len(c["actors"]) == int(n) + 1
        assert all(i["model_device"] == "cpu" for i in c["actors"])
    for size in ("demo", "paper"):
        assert res["dpo"][size]["steps_per_s"] > 0
    text = ga.table(res, "CPU (smoke)", res["date"])
    assert text.startswith(ga.SECTION) and "candidates / s" in text and "paper DiT" in text
    if not torch.cuda.is_available():
        assert ga.main([]) == 2


def test_tiny_job_overrides():
    tj = _bench("gpu_tiny_job")
    args = tj.job_args(Path("/o"), Path("/o/world.zarr"), "cuda", 0.2, True)
    assert "run.device=cuda" in args and "actors.gpus_per_actor=0.2" in args
    assert "dpo.use_gpu=true" in args and "data.path=/o/world.zarr" in args
    from align_rl.config import load_config

    cfg = load_config(overrides=[a for a in args if not a.startswith(("data.path", "data.source"))])
    assert cfg.run.device == "cuda" and cfg.actors.gpus_per_actor == 0.2
    cpu = tj.job_args(Path("/o"), Path("/o/w.zarr"), "cpu", 0.2, True)
    assert not any("gpu" in a for a in cpu)


@pytest.mark.slow
def test_gpu_check_script_smoke(tmp_path):
    """bench/gpu_check.sh --smoke: every step on the CPU, the tiny main job included."""
    import os

    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smoke"], env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (tmp_path / "summary.txt").read_text()
    for step in ("paper_scale rc=0", "align rc=0", "tiny rc=0"):
        assert step in summary, summary
    assert (tmp_path / "gpu_paper_scale.json").is_file() and (tmp_path / "gpu_align.json").is_file()
    job = json.loads((tmp_path / "tiny" / "tiny_job.json").read_text())
    assert job["rc"] == 0 and job["report"]
