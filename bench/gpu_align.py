"""The alignment loop on a GPU: candidates per second with 1 and 2 sampler actors sharing one GPU
(and the GPU's utilisation meanwhile), Diffusion-DPO steps per second at demo and paper sizes.

``python bench/gpu_align.py [--out DIR] [--backgrounds 8] [--no-write]``
``python bench/gpu_align.py --smoke``   (tiny sizes on the CPU: checks that it runs)

1. Pair generation through :class:`actors.pool.CandidatePool` with ``run.device=cuda``: demo-size
   networks (32 × 64 grid, random weights, synthetic states), ``pairs.candidates`` candidates per
   background drawn with ``pairs.guidance`` (default ObsFree, the main job's) at the sampler
   defaults, rewards with 48 h forecasts; 1 then 2 sampler actors and one reward actor, each
   holding ``--gpu-share`` of the one GPU. Reported: candidates / s, backgrounds / s, and the
   GPU's utilisation sampled every 200 ms during the timed build (``nvidia-smi
   --query-gpu=utilization.gpu``), with the processes holding GPU memory (the actors' pids).
2. One Diffusion-DPO step (policy forward + backward on winners and losers, reference forward,
   AdamW; float32 as the learner runs it) of the demo and the paper DiT at ``dpo.batch_size``
   of each preset: steps / s (median of ``--repeats``).

Writes ``DIR/gpu_align.json`` and replaces the "GPU: alignment loop" table of ``--bench-file``.
Without CUDA it exits with status 2 (use ``--smoke``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import replace_section  # noqa: E402
from bench_align import demo_models, synthetic, timed_pool_builds  # noqa: E402

SECTION = "## GPU: alignment loop (bench/gpu_align.py)"
SMOKE_NETS = ["vae.embed_dim=16", "vae.depth=1", "vae.heads=2", "vae.latent_channels=4",
              "diffusion.embed_dim=16", "diffusion.depth=1", "diffusion.heads=2", "forecaster.hidden=8",
              "forecaster.depth=1"]


class GpuSampler:
    """Samples ``nvidia-smi --query-gpu=utilization.gpu,memory.used`` every 200 ms in a thread
    (nothing when nvidia-smi is absent); :meth:`stop` returns the summary."""

    def __init__(self):
        self.values: list[tuple[float, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                u, m = (float(v) for v in line.strip().split(",")[:2])
            except ValueError:
                continue
            self.values.append((u, m))

    def stop(self) -> dict:
        if self.proc is None:
            return {"samples": 0, "note": "nvidia-smi not found"}
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.thread.join(timeout=5)
        u = [v[0] for v in self.values]
        if not u:
            return {"samples": 0}
        return {"samples": len(u), "util_mean": statistics.fmean(u), "util_median": statistics.median(u),
                "util_max": max(u), "busy_fraction": sum(v > 0 for v in u) / len(u),
                "mem_max_mib": max(v[1] for v in self.values)}


def gpu_processes() -> list[int]:
    """Pids of the processes holding GPU memory (nvidia-smi), [] without it."""
    if not shutil.which("nvidia-smi"):
        return []
    r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                       capture_output=True, text=True)
    return [int(v) for v in r.stdout.split() if v.strip().isdigit()]


def bench_candidates(cfg, models, truth, bg, n_bg: int) -> dict:
    """Candidates / s with 1 and 2 sampler actors (one reward actor) on the configured device,
    with the GPU's utilisation during the timed build and the actors holding GPU memory."""
    import ray

    def before(pool):
        infos = ray.get([a.info.remote() for a in pool.samplers + pool.rewarders])
        return infos, GpuSampler()

    def after(pool, state):
        infos, mon = state
        return {"gpu": mon.stop(), "actors": infos, "on_gpu": gpu_processes()}

    out = {}
    for n, r in timed_pool_builds(cfg, models, truth, bg, n_bg, before, after).items():
        dt, infos, util = r["seconds"], r["actors"], r["gpu"]
        cands = r["result"]["backgrounds"] * int(cfg.pairs.candidates)
        out[n] = {"seconds": dt, "backgrounds": r["result"]["backgrounds"], "candidates": cands,
                  "candidates_per_s": cands / dt, "bg_per_s": r["result"]["backgrounds"] / dt,
                  "gpu": util, "actors": infos,
                  "actors_on_gpu": sum(i["pid"] in r["on_gpu"] for i in infos)}
        print(f"{n} sampler(s): {cands} candidates in {dt:.1f} s ({cands / dt:.2f} / s); "
              f"actor devices {[i['model_device'] for i in infos]}; GPU {util}", flush=True)
    return out


def dpo_steps(dit, batch: int, device: torch.device, repeats: int) -> dict:
    """Median seconds of one Diffusion-DPO step (float32) of ``dit`` with ``batch`` pairs."""
    import copy

    from align_rl.alignment.dpo import dpo_loss

    pol = dit.to(device).train()
    ref = copy.deepcopy(pol).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(pol.parameters(), lr=1e-5)
    g = torch.Generator(device=device).manual_seed(0)
    zw, zl, zb = (torch.randn(batch, *dit.latent_shape, generator=g, device=device) for _ in range(3))

    def step():
        loss, _ = dpo_loss(pol, ref, zw, zl, zb, 4000.0, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    med = statistics.median(ts)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del pol, ref, opt
    return {"batch": batch, "seconds": med, "steps_per_s": 1 / med, "peak_gib": peak,
            "params_m": sum(p.numel() for p in dit.parameters()) / 1e6}


def bench_dpo(device: torch.device, smoke: bool, repeats: int) -> dict:
    from align_rl.config import load_config
    from align_rl.models.dit import build_dit

    out = {}
    for preset, latent in (("demo", (69, 8, 16)), ("paper", (69, 32, 64))):
        ov = SMOKE_NETS if smoke else []
        cfg = load_config(overrides=ov, preset=preset)
        if smoke:
            latent = (69, 4, 8)
        with torch.device(device):
            dit = build_dit(cfg.diffusion, latent)
        torch.nn.init.normal_(dit.out.weight, std=0.02)
        batch = 4 if smoke else int(cfg.dpo.batch_size)
        while True:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                out[preset] = dpo_steps(dit, batch, device, repeats)
                break
            except torch.cuda.OutOfMemoryError:  # recorded with the batch that fits
                if batch == 1:
                    raise
                print(f"DPO step, {preset} DiT: out of memory at batch {batch}", flush=True)
                batch = max(1, batch // 2)
        print(f"DPO step, {preset} DiT ({out[preset]['params_m']:.1f} M), batch {batch}: "
              f"{out[preset]['seconds'] * 1e3:.0f} ms ({out[preset]['steps_per_s']:.2f} steps / s)", flush=True)
        del dit
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def table(res: dict, name: str, stamp: str) -> str:
    c, d = {int(k): v for k, v in res["candidates"].items()}, res["dpo"]

    def util(r):
        g = r["gpu"]
        if not g.get("samples"):
            return "n/a"
        return f"{g['util_mean']:.0f} % mean, {g['util_median']:.0f} % median, busy {100 * g['busy_fraction']:.0f} %"

    return f"""{SECTION}

Measured {stamp} on {name} (`python bench/gpu_align.py`). Demo-size networks, random weights,
{res['candidates_per_background']} candidates per background ({res['guidance']}, K = {res['steps']},
C = {res['corrections']}), rewards with 48 h forecasts; every actor holds {res['gpu_share']} of the GPU.

| measurement | 1 sampler actor | 2 sampler actors | ratio (2 / 1) |
|---|---|---|---|
| candidates / s ({res['backgrounds']} backgrounds) | {c[1]['candidates_per_s']:.2f} | {c[2]['candidates_per_s']:.2f} | {c[2]['candidates_per_s'] / c[1]['candidates_per_s']:.2f} |
| GPU utilisation during pair generation | {util(c[1])} | {util(c[2])} | |
| actors holding GPU memory | {c[1]['actors_on_gpu']} of {len(c[1]['actors'])} | {c[2]['actors_on_gpu']} of {len(c[2]['actors'])} | |

| Diffusion-DPO step (float32) | batch (pairs) | ms | steps / s | peak GPU memory (GiB) |
|---|---|---|---|---|
| demo DiT ({d['demo']['params_m']:.1f} M) | {d['demo']['batch']} | {d['demo']['seconds'] * 1e3:.0f} | {d['demo']['steps_per_s']:.2f} | {_gib(d['demo']['peak_gib'])} |
| paper DiT ({d['paper']['params_m']:.0f} M) | {d['paper']['batch']} | {d['paper']['seconds'] * 1e3:.0f} | {d['paper']['steps_per_s']:.2f} | {_gib(d['paper']['peak_gib'])} |
"""


def _gib(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the script runs)")
    p.add_argument("--backgrounds", type=int, default=8, help="timed backgrounds per pool run")
    p.add_argument("--gpu-share", type=float, default=0.3, help="actors.gpus_per_actor")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="folder for gpu_align.json")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--bench-file", default=str(ROOT / "BENCHMARKS.md"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    if not a.smoke and not torch.cuda.is_available():
        print("error: no CUDA device: this benchmark times the alignment loop on a GPU; pass "
              "--smoke for a tiny CPU check.", file=sys.stderr)
        return 2
    import ray

    from align_rl.config import load_config
    from align_rl.training.harness import init_ray

    device = torch.device("cpu" if a.smoke else "cuda")
    name = "CPU (smoke)" if a.smoke else torch.cuda.get_device_name(0)
    dev = ["run.device=cpu"] if a.smoke else ["run.device=cuda", f"actors.gpus_per_actor={a.gpu_share}"]
    small = SMOKE_NETS + ["pairs.candidates=4", "pairs.top_k_phys=2", "sampler.steps=2",
                          "data.grid=16x32"] if a.smoke else []
    cfg = load_config(overrides=[*dev, *small, "actors.batch_size=1", "run.wandb_mode=disabled"])
    n_bg = 1 if a.smoke else a.backgrounds
    codec, dit, fc = demo_models(cfg)
    truth, bg, norm = synthetic(cfg, 24 + 4 * n_bg + 16)
    models = SimpleNamespace(codec=codec, eps_model=dit, forecaster=fc, normalizer=norm)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res = {"device": name, "date": stamp, "torch": torch.__version__, "backgrounds": n_bg,
           "gpu_share": 0.0 if a.smoke else a.gpu_share,
           "candidates_per_background": cfg.pairs.candidates, "guidance": cfg.pairs.guidance,
           "steps": cfg.sampler.steps, "corrections": cfg.sampler.corrections}

    def save() -> None:  # after each part: a time limit keeps what was measured
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            (Path(a.out) / "gpu_align.json").write_text(json.dumps(res, indent=1, default=str))

    res["dpo"] = bench_dpo(device, a.smoke, 2 if a.smoke else a.repeats)  # before the actors hold the GPU
    save()
    started = not ray.is_initialized()
    init_ray(num_cpus=max(4, os.cpu_count() or 1), log_to_driver=False)
    try:
        res["candidates"] = bench_candidates(cfg, models, truth, bg, n_bg)
    finally:
        if started:
            ray.shutdown()
    save()
    text = table(res, name, stamp)
    print(text)
    if not a.smoke and not a.no_write:
        replace_section(SECTION, text, Path(a.bench_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
