"""Helpers shared by the benchmark scripts: the machine's CPU name, BENCHMARKS.md sections and an
evaluation split of the default world's caches."""

from __future__ import annotations

import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform reports."""
    cpu = platform.processor() or platform.machine() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def replace_section(section: str, text: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Put ``text`` (starting with the heading ``section``) in place of that section of ``path``."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if section in old:
        head, rest = old.split(section, 1)
        # the section ends at the next "## " heading or marked block (<!-- name:start -->)
        ends = [i for i in (rest.find("\n## "), rest.find("\n<!-- ")) if i >= 0]
        nxt = min(ends) if ends else -1
        new = head + text.rstrip("\n") + "\n" + (rest[nxt:] if nxt >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def split_setup(overrides: list[str], split: str):
    """The default world's caches for an evaluation on ``split`` (val | test): ``(cfg, ecfg, ws,
    store, pre, data)``, where ``ecfg`` takes its evaluation times from ``split`` and ``data`` holds
    that split's truth and backgrounds (the run's world and pretrained models, from ``run.workdir``)."""
    import copy

    import actors
    from align_rl import logs
    from align_rl.config import load_config
    from align_rl.world.dataset import ensure_world
    from align_rl.evaluation.runner import EvalData
    from align_rl.training.pretraining import ensure_pretrained
    from align_rl.world.splits import SplitData
    from align_rl.training.harness import init_ray
    from align_rl.workspace import Workspace

    cfg = load_config(overrides=overrides)
    ws = Workspace.from_config(cfg)
    logs.setup(cfg.run.workdir)  # Ray's own records to <workdir>/logs/align_rl.log, not the console
    actors.install()  # the Ray actors the stages use (align_rl.remote)
    init_ray()
    store = ensure_world(cfg, ws, progress=False)
    pre = ensure_pretrained(cfg, ws, progress=False)
    sd = SplitData(cfg, ws, store, pre, progress=False, split=split)
    data = EvalData(sd.truth, sd.backgrounds, sd.normalizer, pre.codec, pre.forecaster,
                    truth_store=Path(store))
    ecfg = copy.deepcopy(cfg)
    ecfg.data.test = list(getattr(cfg.data, split))  # the evaluation's times come from this split
    return cfg, ecfg, ws, store, pre, data


def demo_arrays(cfg, n_frames: int = 64):
    """Random normalised data of the demo shapes for throughput benches (the step cost does not
    depend on the values): ``(grid, frames (T, 69, H, W), times (T,) 6-hourly, latents (T, C, h, w))``."""
    import numpy as np

    from align_rl.io.grid import Grid
    from align_rl.models.vae import build_vae

    g = Grid.parse(cfg.data.grid)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_frames, 69, g.nlat, g.nlon)).astype(np.float32)
    times = np.datetime64("2000-01-01", "ns") + np.arange(n_frames) * np.timedelta64(6, "h")
    z = rng.standard_normal((n_frames, *build_vae(cfg.vae, g).latent_shape)).astype(np.float32)
    return g, x, times, z
