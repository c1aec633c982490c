"""Security: the local Ray instance listens on loopback only with token authentication on, and no
file of a workdir is unpickled in a way that could run code."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from align_rl.io.checkpoints import load_state, read_checkpoint, save_model, save_state
from align_rl.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]

_PROBE = textwrap.dedent("""
    import ipaddress, json, sys
    import psutil, ray
    from align_rl.training.harness import init_ray

    init_ray(num_cpus=1, log_to_driver=False)

    @ray.remote
    def f():
        return 1

    assert ray.get(f.remote()) == 1
    from ray._raylet import AuthenticationMode, get_authentication_mode

    procs = [psutil.Process()] + psutil.Process().children(recursive=True)
    listening = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                listening.append([c.laddr.ip, c.laddr.port, p.name()])
    out = {"listening": listening, "node_ip": ray.util.get_node_ip_address(),
           "token_auth": get_authentication_mode() == AuthenticationMode.TOKEN}
    ray.shutdown()
    print("PROBE " + json.dumps(out))
""")


def _loopback(ip: str) -> bool:
    import ipaddress

    a = ipaddress.ip_address(ip)
    if getattr(a, "ipv4_mapped", None) is not None:
        a = a.ipv4_mapped
    return a.is_loopback


def test_local_ray_listens_on_loopback_only_with_token_auth(tmp_path):
    """The project's local Ray (``init_ray``): every listening socket of the driver, the GCS, the
    raylet, the agents and the workers is on a loopback address; token authentication is on and
    the token file is readable by the user only."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    token = tmp_path / "auth_token"
    rt = tempfile.mkdtemp(prefix="arlsec", dir="/tmp")  # short: Ray's socket paths
    env.update(RAY_AUTH_TOKEN_PATH=str(token), RAY_TMPDIR=rt, RAY_USAGE_STATS_ENABLED="0")
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    finally:
        shutil.rmtree(rt, ignore_errors=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("PROBE ")]
    assert p.returncode == 0 and lines, p.stdout[-2000:] + p.stderr[-4000:]
    out = json.loads(lines[-1][6:])
    assert out["listening"], "no listening socket found: the probe sees no Ray process"
    exposed = [entry for entry in out["listening"] if not _loopback(entry[0])]
    assert not exposed, f"Ray listens beyond loopback: {exposed}"
    assert _loopback(out["node_ip"])
    assert out["token_auth"]
    assert token.exists() and stat.S_IMODE(token.stat().st_mode) == 0o600


class _Evil:
    """Unpickling this runs ``os.system`` (what a crafted state.pt would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path, wrap: dict | None = None) -> None:
    obj = _Evil(marker) if wrap is None else dict(wrap, payload=_Evil(marker))
    with open(path, "wb") as f:
        torch.save(obj, f, pickle_module=pickle)


def test_malicious_state_and_checkpoint_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    state = tmp_path / "dpo" / "state.pt"
    state.parent.mkdir()
    _plant(state, marker, {"model": {}, "step": 3})
    with pytest.raises(CheckpointError, match="not a readable training state"):
        load_state(state)
    from align_rl.alignment.learner import read_state

    with pytest.raises(CheckpointError, match="delete"):
        read_state(state.parent)  # what a resumed run reads
    ck = tmp_path / "final.pt"
    _plant(ck, marker, {"format": "align_rl.checkpoint"})
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint(ck)
    assert not marker.exists()


def test_pickled_forecaster_is_refused(tmp_path):
    from align_rl.config import load_config
    from align_rl.models.loading import load_forecaster
    from align_rl.workspace import Workspace

    marker = tmp_path / "pwned"
    _plant(tmp_path / "fc.pt", marker)
    cfg = load_config(overrides={"forecaster": {"kind": "torch", "path": str(tmp_path / "fc.pt")},
                                 "run": {"workdir": str(tmp_path / "w")}})
    with pytest.raises(CheckpointError, match="pickled module is not loaded"):
        load_forecaster(cfg, Workspace.from_config(cfg), None)
    assert not marker.exists()


def test_checkpoint_and_state_checksums_catch_flipped_bytes(tmp_path):
    from align_rl.config import load_config
    from align_rl.models.forecaster import build_emulator

    net = torch.nn.Linear(64, 64)

    fc = load_config(overrides=["forecaster.hidden=4", "forecaster.depth=1"]).forecaster
    model = build_emulator(fc, (8, 16))
    ck = save_model(tmp_path / "m.pt", model, "forecaster", fc)
    assert read_checkpoint(ck)["checksum"]
    _flip_in_largest_tensor(ck)
    with pytest.raises(CheckpointError, match="damaged.*checksum"):
        read_checkpoint(ck)
    st = save_state({"model": net.state_dict(), "step": 5, "history": [{"loss": 0.5}]}, tmp_path / "s.pt")
    assert load_state(st)["step"] == 5
    _flip_in_largest_tensor(st)
    with pytest.raises(CheckpointError, match="damaged"):
        load_state(st)


def _flip_in_largest_tensor(path: Path) -> None:
    """Flip one byte inside the largest stored tensor of a torch zip file (the zip stays valid)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        offset = info.header_offset
    raw = bytearray(path.read_bytes())
    name_len = int.from_bytes(raw[offset + 26:offset + 28], "little")
    extra_len = int.from_bytes(raw[offset + 28:offset + 30], "little")
    pos = offset + 30 + name_len + extra_len + info.file_size // 2
    raw[pos] ^= 0x40
    path.write_bytes(bytes(raw))
