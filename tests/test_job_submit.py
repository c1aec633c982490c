"""``ray job submit`` of the main job to a local head node started by this test.

The head runs in its own process group with its own ``--temp-dir`` (so its address file never
reaches ``/tmp/ray`` and no other Ray instance on the machine sees it), on free ports, with the
dashboard on 127.0.0.1 only, every other server on the loopback address too
(``align_rl.training.harness.LOOPBACK_ENV``) and ``RAY_AUTH_MODE=disabled``. The job uploads the repository as its
working directory (without ``.venv``, ``runs``, ``.git``) and runs ``python -m align_rl.train``
with a tiny configuration; the test waits for ``SUCCEEDED`` and checks the job's outputs. At the
end only the processes of this head are stopped: its process group, then any process whose
command line names its temp dir (never ``ray stop``, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", "wandb", "*.zarr"]

pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _pids_mentioning(text: str) -> list[int]:
    """PIDs of this user's processes whose command line contains ``text`` (our temp dir)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if d.stat().st_uid != os.getuid():
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append(int(d.name))
    return out


def _kill_pids_mentioning(text: str) -> None:
    """SIGTERM, then SIGKILL, every process of ours whose command line contains ``text``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_mentioning(text)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if pids:
            time.sleep(2.0)


class LocalHead:
    """A Ray head node in its own process group (``ray start --head --block``)."""

    def __init__(self, num_cpus: int = 2):
        self.temp_dir = tempfile.mkdtemp(prefix="arljs", dir="/tmp")  # short: socket paths
        (gcs, dash, client, agent, agent_grpc, metrics, rt_agent) = free_ports(7)
        self.gcs_port, self.dashboard_port = gcs, dash
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        from align_rl.training.harness import LOOPBACK_ENV

        self.env.update(LOOPBACK_ENV)  # a test head: nothing listens beyond loopback
        self.env.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=self.temp_dir,
                        RAY_USAGE_STATS_ENABLED="0", WANDB_MODE="offline")
        cmd = [_ray_bin(), "start", "--head", "--block", f"--port={gcs}", f"--num-cpus={num_cpus}",
               "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_agent}",
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        self.log = open(Path(self.temp_dir) / "head.log", "wb")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        from ray.job_submission import JobSubmissionClient

        t0, err = time.time(), None
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {self.read_log()}")
            try:
                JobSubmissionClient(self.address).list_jobs()
                return
            except Exception as exc:  # not up yet
                err = exc
                time.sleep(1.0)
        raise TimeoutError(f"head node not ready after {timeout} s ({err}): {self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        return (Path(self.temp_dir) / "head.log").read_text(errors="replace")[-4000:]

    def stop(self) -> list[int]:
        """Stop this head only; returns the PIDs still alive afterwards (should be none)."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        _kill_pids_mentioning(self.temp_dir)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()
        left = _pids_mentioning(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


TRANSIENT = ("No available agent", "Connection aborted", "RemoteDisconnected", "Connection refused")


def submit(head: LocalHead, entrypoint: list[str], submission_id: str, env_vars: dict[str, str]) -> None:
    """``ray job submit --no-wait``, retried while the head's job agent or dashboard is still
    starting (seen on a loaded 2-core machine)."""
    runtime_env = {"excludes": EXCLUDES, "env_vars": env_vars}
    cmd = [_ray_bin(), "job", "submit", "--address", head.address, "--submission-id", submission_id,
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--no-wait",
           "--", *entrypoint]
    for _ in range(30):
        sub = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=180)
        if sub.returncode == 0 or not any(m in sub.stderr for m in TRANSIENT):
            break
        time.sleep(2.0)
    assert sub.returncode == 0, f"ray job submit failed:\n{sub.stdout}\n{sub.stderr}"


def submit_and_wait(head: LocalHead, entrypoint: list[str], submission_id: str,
                    env_vars: dict[str, str], timeout: float) -> tuple[str, str]:
    """``ray job submit --no-wait`` then poll until the job ends; returns ``(status, logs)``."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    submit(head, entrypoint, submission_id, env_vars)
    client = JobSubmissionClient(head.address)
    t0 = time.time()
    status = client.get_job_status(submission_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.time() - t0 > timeout:
            client.stop_job(submission_id)
            break
        time.sleep(2.0)
        status = client.get_job_status(submission_id)
    return str(status), client.get_job_logs(submission_id)


def tiny_train_config(tmp: Path) -> tuple[Path, Path]:
    """A tiny world store and a ``--config`` YAML of the main job on it (8 × 16 grid, tiny
    networks, a few steps of everything); returns ``(config path, run workdir)``."""
    from align_rl.config import load_config, parse_overrides

    from .tiny_align import OVERRIDES, TRAIN_OVERRIDES, write_tiny_world

    world = write_tiny_world(tmp / "world.zarr")
    run = tmp / "run"
    nested = parse_overrides(OVERRIDES + TRAIN_OVERRIDES + [
        f"data.path={world}", f"run.workdir={run}", "run.name=jobsubmit", "run.wandb_mode=offline",
        "dpo.steps=4", "dpo.checkpoint_every=2", "guidance.methods=[obsfree]"])
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(nested, sort_keys=False))
    cfg = load_config(path)  # a valid config file
    assert cfg.data.grid == "8x16" and cfg.run.workdir == str(run)
    return path, run


def test_ray_job_submit_main_job_succeeds(tmp_path):
    cfg_path, run = tiny_train_config(tmp_path)
    head = LocalHead(num_cpus=2)
    try:
        head.wait_ready()
        status, logs = submit_and_wait(
            head, ["python", "-m", "align_rl.train", "--config", str(cfg_path), "dpo.seeds=2",
                   "pairs.variants=[M]"], "align-rl-test-train",
            {"RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}, timeout=1500)
        assert status == "SUCCEEDED", f"job ended {status}; logs:\n{logs[-6000:]}"
        summary = json.loads((run / "train_summary.json").read_text())
        assert summary["variants"]["M"]["step"] == 4
        assert Path(summary["variants"]["M"]["checkpoint"]).exists()
        # two alignment seeds: two learner folders, each evaluated, the report gives their spread
        seeds = summary["variants"]["M"]["seeds"]
        assert [s["seed"] for s in seeds] == [0, 1]
        assert len({s["checkpoint"] for s in seeds}) == 2 and all(Path(s["checkpoint"]).exists() for s in seeds)
        report = (run / "eval" / "report.md").read_text()
        assert "Align-M@seed0" in report and "Align-M@seed1" in report
        # the driver ran from the uploaded working dir (not the checkout) and used our head
        assert "[align_rl.train]" in logs
        jobs = [j for j in _list_jobs(head) if j.submission_id == "align-rl-test-train"]
        assert len(jobs) == 1 and jobs[0].entrypoint.startswith("python -m align_rl.train")
        assert jobs[0].runtime_env["working_dir"].startswith("gcs://")
    finally:
        left = head.stop()
    assert left == [], f"processes of the test head still alive: {left}"


def _list_jobs(head: LocalHead):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.address).list_jobs()


def test_ray_job_submit_relative_workdir_persists_and_resumes_after_a_kill(tmp_path):
    """The README's job example with a relative run.workdir: it resolves below $ALIGN_RL_ROOT,
    not below the job's temporary working directory; a job stopped during DPO and submitted again
    reuses the pretrained models and pairs and continues from the last DPO checkpoint."""
    cfg_path, _ = tiny_train_config(tmp_path)
    root = tmp_path / "root"
    run = root / "runs" / "resume"
    env = {"RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1",
           "ALIGN_RL_ROOT": str(root)}
    entry = ["python", "-m", "align_rl.train", "--config", str(cfg_path), "run.workdir=runs/resume",
             "dpo.steps=200", "dpo.checkpoint_every=2"]
    head = LocalHead(num_cpus=2)
    try:
        head.wait_ready()
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(head.address)
        submit(head, entry, "resume-1", env)
        t0 = time.time()
        while not list((run / "dpo").rglob("state.pt")):
            status = str(client.get_job_status("resume-1"))
            assert status not in ("SUCCEEDED", "FAILED", "STOPPED"), \
                f"job ended {status} before DPO checkpointed:\n{client.get_job_logs('resume-1')[-4000:]}"
            assert time.time() - t0 < 1500, "no DPO checkpoint after 1500 s"
            time.sleep(1.0)
        client.stop_job("resume-1")
        while str(client.get_job_status("resume-1")) not in ("STOPPED", "FAILED", "SUCCEEDED"):
            time.sleep(1.0)
        assert str(client.get_job_status("resume-1")) == "STOPPED"
        finals = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("final.pt")}
        assert len(finals) == 3  # forecaster, vae, diffusion: in the persistent workdir
        status, logs = submit_and_wait(head, entry, "resume-2", env, timeout=1500)
        assert status == "SUCCEEDED", f"job ended {status}; logs:\n{logs[-6000:]}"
        assert {p: p.stat().st_mtime_ns for p in finals} == finals  # reused, not retrained
        assert "reusing" in logs
        summary = json.loads((run / "train_summary.json").read_text())
        assert summary["variants"]["M"]["step"] == 200
    finally:
        left = head.stop()
    assert left == [], f"processes of the test head still alive: {left}"
