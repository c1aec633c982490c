"""The side paths of every command: nothing that is not the project's is deleted, Ray listens on
loopback only whichever command starts it, and a store's pressure levels in Pa are read as hPa.

- A user's files named like the project's temporaries (``.<name>.tmp-<host>-<pid>`` of a dead
  process), and a user's folder named like a staging folder, are planted in every place a command
  cleans (the work directory and its subfolders, beside a store or a checkpoint being written);
  each command and each writer runs, and every planted file survives.
- Each command runs in its own process with ``ray.init`` wrapped: when Ray has started (by the
  command's own call or by an implicit start such as a ``ray.put``), every listening socket of
  the process and its children is listed (psutil); all must be on loopback, with token
  authentication on. ``score`` and ``data`` start no Ray at all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _plant(workdir: Path) -> dict[Path, str]:
    """User files named like the project's temporaries (of a dead process of this host) in every
    place the opening of a work directory looks, and a user's folder with a staging name."""
    from align_rl.owned import _HOST

    dead = _dead_pid()
    files = {
        workdir / f".world.zarr.tmp-{_HOST}-{dead}": "my world notes",
        workdir / f".train_summary.json.tmp-{_HOST}-{dead}": "my summary",
        workdir / "checkpoints" / "vae" / f".final.pt.tmp-{_HOST}-{dead}": "my weights",
        workdir / "dpo" / f".state.pt.tmp-{_HOST}-{dead}": "my state",
        workdir / "notes" / f".draft.tex.tmp-{_HOST}-{dead}": "my draft",
        workdir / f".eval.tmp-{_HOST}-{dead}" / "thesis.tex": "my thesis",  # an unmarked folder
    }
    for p, text in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return files


class _Stop(BaseException):
    """Raised where a command would start its expensive work (after it opened the workdir)."""


def _stop(*a, **k):
    raise _Stop()


@pytest.mark.parametrize("command", ["train", "pretrain", "evaluate"])
def test_user_files_named_like_temporaries_survive_every_command(command, tmp_path, monkeypatch):
    """The work directory is opened (and cleaned of dead processes' staging folders) by every
    command; the planted user files all survive. ``pretrain all --force`` included."""
    import align_rl.evaluation.runner as runner
    import align_rl.pipeline as pipeline
    import align_rl.training.pretraining as pretraining

    work = tmp_path / "work"
    files = _plant(work)
    monkeypatch.setattr(pipeline, "init_ray", _stop)  # train: right after Workspace.from_config
    monkeypatch.setattr(pretraining, "ensure_pretrained", _stop)
    monkeypatch.setattr(runner, "load_eval_data", _stop)
    import importlib

    main = importlib.import_module(f"align_rl.{command}").main
    argv = {"train": [], "pretrain": ["all", "--force"], "evaluate": []}[command]
    with pytest.raises(_Stop):
        main([*argv, f"run.workdir={work}", "run.wandb_mode=disabled"])
    for p, text in files.items():
        assert p.read_text() == text, f"{p} was removed or changed"


def test_writers_leave_user_files_beside_their_target(tmp_path):
    """A store (write_states) and a checkpoint (save_model) written beside user files named like
    their temporaries, one with this very process's id: the files survive; the writer whose own
    staging name is taken by a user's file refuses instead of deleting it."""
    from align_rl.errors import OwnershipError
    from align_rl.io.checkpoints import load_model, save_model
    from align_rl.io.store import write_states
    from align_rl.owned import _HOST
    from tests.test_era5 import make_states
    from tests.tiny_align import tiny_config, tiny_models

    dead = _dead_pid()
    planted = {tmp_path / f".w.zarr.tmp-{_HOST}-{dead}": "a",
               tmp_path / f".final.pt.tmp-{_HOST}-{dead}": "b",
               tmp_path / f".w.zarr.tmp-otherhost-{dead}": "c"}
    for p, text in planted.items():
        p.write_text(text)
    s = make_states(T=2)
    write_states(tmp_path / "w.zarr", s)
    write_states(tmp_path / "w.zarr", s, overwrite=True)
    cfg = tiny_config(tmp_path / "unused")
    _, dit, _ = tiny_models(cfg)
    save_model(tmp_path / "final.pt", dit, "diffusion", cfg.diffusion)
    save_model(tmp_path / "final.pt", dit, "diffusion", cfg.diffusion)  # replaced
    load_model(tmp_path / "final.pt", "diffusion")
    for p, text in planted.items():
        assert p.read_text() == text
    mine = tmp_path / f".x.pt.tmp-{_HOST}-{os.getpid()}"
    mine.write_text("a user's file that happens to carry this process's staging name")
    with pytest.raises(OwnershipError, match="not a staging folder of align_rl"):
        save_model(tmp_path / "x.pt", dit, "diffusion", cfg.diffusion)
    assert mine.read_text().startswith("a user's file") and not (tmp_path / "x.pt").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name and p not in planted and p != mine]
    assert not leftovers, leftovers


def test_pretrain_force_replaces_only_its_own_checkpoint(tmp_path):
    """``--force`` retrains over a checkpoint; a folder at the checkpoint's path (a user's) is
    never replaced by one."""
    from align_rl.errors import OwnershipError
    from align_rl.io.checkpoints import save_model
    from tests.tiny_align import tiny_config, tiny_models

    cfg = tiny_config(tmp_path / "unused")
    _, dit, _ = tiny_models(cfg)
    folder = tmp_path / "final.pt"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    with pytest.raises(OwnershipError):
        save_model(folder, dit, "diffusion", cfg.diffusion)
    assert (folder / "mine.txt").read_text() == "keep"


# ----------------------------------------------------------------------------- level units


def test_store_with_levels_in_pa_is_read_in_hpa(tmp_path):
    """ERA5 copies sometimes carry the level coordinate in Pa: read as hPa, every channel is
    scored (not only the surface ones)."""
    import xarray as xr

    from align_rl.io.era5 import open_states
    from align_rl.io.normalization import Normalizer
    from align_rl.io.store import write_states
    from align_rl.score import main
    from tests.test_era5 import make_states

    s = make_states(T=3, seed=2)
    s.attrs["normalization"] = Normalizer.fit(s.values).to_dict()
    write_states(tmp_path / "t.zarr", s)
    ds = xr.open_zarr(tmp_path / "t.zarr")
    pa = ds.assign_coords(level=ds["level"].values * 100)
    pa["level"].attrs["units"] = "Pa"
    pa.to_zarr(tmp_path / "pa.zarr", mode="w")
    bare = ds.assign_coords(level=ds["level"].values * 100)  # no units attribute, Pa values
    bare["level"].attrs.clear()
    bare.to_zarr(tmp_path / "bare.zarr", mode="w")
    for name in ("pa.zarr", "bare.zarr"):
        np.testing.assert_array_equal(open_states(tmp_path / name).values, s.values)
    out = tmp_path / "m.json"
    assert main(["--analysis", str(tmp_path / "pa.zarr"), "--truth", str(tmp_path / "t.zarr"),
                 "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    from align_rl.io.schema import CHANNELS

    assert m["mse"] == 0.0 and list(m["channels"]) == list(CHANNELS)
    assert not m["not_scored"]["analysis_only"] and not m["not_scored"]["truth_only"]


# ----------------------------------------------------------------------------- Ray listeners


_PROBE = textwrap.dedent("""
    import json, os, runpy, sys
    import psutil, ray

    real = ray.init

    def probe(*a, **k):
        out = real(*a, **k)
        procs = [psutil.Process()] + psutil.Process().children(recursive=True)
        listening = []
        for p in procs:
            try:
                conns = p.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            listening += [[c.laddr.ip, c.laddr.port, p.name()] for c in conns
                          if c.status == psutil.CONN_LISTEN]
        from ray._raylet import AuthenticationMode, get_authentication_mode

        print("PROBE " + json.dumps({"listening": listening,
                                     "token_auth": get_authentication_mode() == AuthenticationMode.TOKEN}),
              flush=True)
        ray.shutdown()
        os._exit(0)

    ray.init = probe
    sys.argv = [sys.argv[1]] + sys.argv[2:]
    try:
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    finally:
        print("PROBE-NONE " + json.dumps(ray.is_initialized()), flush=True)
""")


def _loopback(ip: str) -> bool:
    import ipaddress

    a = ipaddress.ip_address(ip)
    if getattr(a, "ipv4_mapped", None) is not None:
        a = a.ipv4_mapped
    return a.is_loopback


@pytest.fixture(scope="module")
def zarr_store(tmp_path_factory):
    """A 69-channel WeatherBench2-layout store on 8x16, 6-hourly over four days."""
    from align_rl.io.store import write_states
    from tests.test_era5 import make_states

    d = tmp_path_factory.mktemp("store")
    return write_states(d / "era5.zarr", make_states(T=16, seed=3))


_TINY_ZARR = ["data.grid=8x16", "data.train=[2000-01-01, 2000-01-02T12]",
              "data.val=[2000-01-02T18, 2000-01-03T12]", "data.pref=[2000-01-03T18, 2000-01-04T18]",
              "data.test=[2000-01-03T18, 2000-01-04T18]", "run.wandb_mode=disabled",
              "vae.latent_channels=4", "vae.embed_dim=16", "vae.depth=1", "vae.heads=2", "vae.window=2",
              "diffusion.embed_dim=16", "diffusion.depth=1", "diffusion.heads=2",
              "forecaster.hidden=8", "forecaster.depth=1"]


COMMANDS = {
    "train": lambda w, z: ["align_rl.train", f"run.workdir={w}", "run.wandb_mode=disabled"],
    "pretrain-zarr": lambda w, z: ["align_rl.pretrain", "forecaster", "data.source=zarr", f"data.path={z}",
                                   f"run.workdir={w}", *_TINY_ZARR],
    "evaluate-retrains": lambda w, z: ["align_rl.evaluate", "data.source=zarr", f"data.path={z}",
                                       f"run.workdir={w}", *_TINY_ZARR],
    "sweep": lambda w, z: ["align_rl.sweep", str(REPO / "tune_configs" / "smoke.yaml"), f"run.workdir={w}",
                           "run.wandb_mode=disabled"],
    "score": lambda w, z: ["align_rl.score", "--analysis", str(z), "--truth", str(z), "--out", f"{w}.json"],
    "data": lambda w, z: ["align_rl.data", "stats", str(z), "--out", f"{w}.json"],
}
"""Each command on inputs that reach the point where it starts Ray (evaluate: a missing model
retrained, its data read from a zarr store, as the forecaster's data is put into Ray)."""


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_listens_on_loopback_only(command, tmp_path, zarr_store):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    rt = tempfile.mkdtemp(prefix="arlcmd", dir="/tmp")  # short: Ray's socket paths
    env.update(RAY_AUTH_TOKEN_PATH=str(tmp_path / "auth_token"), RAY_TMPDIR=rt,
               RAY_USAGE_STATS_ENABLED="0", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    argv = COMMANDS[command](tmp_path / "work", zarr_store)
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=400)
    finally:
        shutil.rmtree(rt, ignore_errors=True)
    log = p.stdout[-3000:] + p.stderr[-3000:]
    probes = [ln for ln in p.stdout.splitlines() if ln.startswith("PROBE ")]
    if command in ("score", "data"):
        assert not probes and "PROBE-NONE false" in p.stdout and p.returncode == 0, log
        return
    assert probes, f"{command} never started Ray: {log}"
    out = json.loads(probes[-1][6:])
    assert out["listening"], log
    exposed = [e for e in out["listening"] if not _loopback(e[0])]
    assert not exposed, f"{command}: Ray listens beyond loopback: {exposed}"
    assert out["token_auth"]
