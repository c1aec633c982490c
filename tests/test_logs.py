"""The console and the log file (align_rl.logs): stage lines, Ray's records and the workers'
output kept in the file and off the console, each worker bar drawn once."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from align_rl import logs, ray_compat

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def logged(tmp_path):
    """A log file in ``tmp_path`` (the workdir) for one test; set up inside the test's call (pytest
    sets its own capturing ``sys.stdout`` again between a fixture and the test)."""
    yield lambda: logs.setup(tmp_path, "test")
    logs.close()


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_stage_lines_with_their_duration(capsys):
    with logs.stage("world") as st:
        pass
    with pytest.raises(ValueError):
        with logs.stage("pairs"):
            raise ValueError("bad")
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(" [align_rl] world ...") and out[0][2] == ":" and out[0][5] == ":"
    assert "] world done in 0.0 s" in out[1] and st.seconds >= 0
    assert out[2].endswith("] pairs ...") and out[3].endswith("] pairs failed after 0.0 s: ValueError")
    assert logs._dur(75) == "1 min 15 s" and logs._dur(3725) == "1 h 02 min" and logs._dur(12.4) == "12 s"


def test_the_log_file_gets_everything_and_ray_stays_off_the_console(capsys, logged):
    logged = logged()
    assert logged == logs.log_path() and logged.parent.name == "logs"
    log = logging.getLogger("align_rl.train")
    with logs.stage("pretraining", log):
        log.info("pairs: 0 new")
        logging.getLogger("ray").warning("Failed to query Ray Train Controller actor state.")
        logging.getLogger("ray.train.v2").info("Reporting training result 1: TrainingReport(...)")
        logging.getLogger("ray").error("a Ray error")
        print("printed by a stage")
        sys.stderr.write("bar 1/2\rbar 2/2\n")
        warnings.warn("ZarrUserWarning: consolidated metadata", UserWarning)
    cap = capsys.readouterr()
    console = cap.out + cap.err
    text = _read(logged)
    for line in ("pretraining ...", "pretraining done in", "pairs: 0 new", "Failed to query Ray Train",
                 "Reporting training result 1", "a Ray error", "stdout: printed by a stage",
                 "stderr: bar 2/2", "consolidated metadata"):
        assert line in text, line
    assert "bar 1/2" not in text  # a line redrawn with \r: its last state
    assert "pairs: 0 new" in console and "pretraining done in" in console and "a Ray error" in console
    assert "printed by a stage" in console and "bar 2/2" in console
    for line in ("Failed to query", "Reporting training result", "consolidated metadata"):
        assert line not in console, line


def test_no_log_file_before_the_workdir_exists(tmp_path, capsys):
    work = tmp_path / "work"
    logs.setup(work, "test")
    try:
        logging.getLogger("align_rl").info("early line")
        assert not work.exists()
        work.mkdir()
        logging.getLogger("align_rl").info("later line")
        text = _read(work / logs.LOG_FILE)
        assert "==== test" in text and "early line" in text and "later line" in text
    finally:
        logs.close()
    assert not isinstance(sys.stdout, logs._Tee) and logs.log_path() is None


def test_worker_output_goes_to_the_file_and_each_bar_is_drawn_once(capsys, logged, monkeypatch):
    logged = logged()
    from ray.experimental import tqdm_ray

    drawn = []

    class Manager:
        def process_state_update(self, state):
            drawn.append((state["x"], state["closed"]))

    monkeypatch.setattr(tqdm_ray, "instance", lambda: Manager())
    monkeypatch.setattr(logs, "_closed_bars", set())

    def bar(x, closed):
        return json.dumps({"__magic_token__": ray_compat.TQDM_MAGIC, "x": x, "pos": 0, "desc": "DPO v1",
                           "total": 10, "unit": "it", "ip": "127.0.0.1", "pid": 7, "uuid": "u1",
                           "closed": closed})

    batch = {"ip": "127.0.0.1", "localhost": "127.0.0.1", "pid": 7, "actor_name": "RayTrainWorker",
             "is_err": True, "lines": [bar(0, False), "Failed to query Ray Train Controller actor state.",
                                       bar(10, True)]}
    logs._worker_output(batch)
    logs._worker_output(dict(batch, is_err=False))  # the same states again (stdout and stderr)
    assert drawn == [(0, False), (10, True)]
    cap = capsys.readouterr()
    assert "Failed to query" not in cap.out + cap.err
    assert "(RayTrainWorker pid=7) Failed to query Ray Train Controller" in _read(logged)


@pytest.mark.slow
def test_a_driver_under_ray_keeps_the_workers_output_in_the_file(tmp_path):
    """A driver with its own local Ray: a worker's prints and a Ray warning reach the log file,
    not the console."""
    script = tmp_path / "driver.py"
    script.write_text(
        "import logging, ray, sys\n"
        "from align_rl import logs\n"
        "from align_rl.training.harness import init_ray\n"
        f"logs.setup({str(tmp_path)!r}, 'driver')\n"
        "init_ray(num_cpus=1)\n"
        "@ray.remote\n"
        "def work():\n"
        "    print('worker says hello', flush=True)\n"
        "    return 1\n"
        "assert ray.get(work.remote()) == 1\n"
        "import time; time.sleep(3)\n"
        "logging.getLogger('ray').warning('an internal Ray warning')\n"
        "with logs.stage('done'):\n"
        "    pass\n"
        "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled")
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    console = p.stdout + p.stderr
    assert p.returncode == 0, console[-3000:]
    text = _read(tmp_path / logs.LOG_FILE)
    assert "worker says hello" in text and "an internal Ray warning" in text, text[-3000:]
    assert "worker says hello" not in console and "an internal Ray warning" not in console
    assert "Started a local Ray instance" not in console and "done done in" in console
