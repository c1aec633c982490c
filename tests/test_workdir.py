"""Where a run's workdir lands: a relative run.workdir under run.root, $ALIGN_RL_ROOT, ~/align_rl
in the driver of a `ray job submit` (whose working directory is a temporary copy), else the
current directory; always absolute after loading the config."""

from __future__ import annotations

from pathlib import Path

import pytest

from align_rl.config import ConfigError, config_from_dict, load_config
from align_rl.workspace import Workspace


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for k in ("ALIGN_RL_ROOT", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_local_run_resolves_against_the_current_directory(clean_env):
    cfg = load_config()
    assert cfg.run.workdir == str(clean_env / "runs" / "default")
    assert Workspace.from_config(cfg).root == Path(cfg.run.workdir)
    # an absolute workdir is kept; the resolved config round-trips (actors, checkpoints)
    cfg2 = load_config(overrides=[f"run.workdir={clean_env / 'elsewhere'}"])
    assert cfg2.run.workdir == str(clean_env / "elsewhere")
    assert config_from_dict(cfg.to_dict()).run.workdir == cfg.run.workdir


def test_ray_job_driver_gets_a_persistent_workdir(clean_env, monkeypatch):
    job_dir = clean_env / "ray" / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_x"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}}')
    cfg = load_config()
    assert cfg.run.workdir == str(clean_env / "home" / "align_rl" / "runs" / "default")
    monkeypatch.setenv("ALIGN_RL_ROOT", str(clean_env / "shared"))
    assert load_config(overrides=["run.workdir=runs/x"]).run.workdir == str(clean_env / "shared" / "runs" / "x")
    cfg3 = load_config(overrides=[f"run.root={clean_env / 'efs'}"])  # the config key wins
    assert cfg3.run.workdir == str(clean_env / "efs" / "runs" / "default")
    with pytest.raises(ConfigError, match="run.root"):
        load_config(overrides=["run.root=' '"])


def test_a_ray_train_snapshot_cut_by_a_kill_is_moved_aside(tmp_path):
    """Ray Train writes its checkpoint-manager snapshot in place: `ray job stop` during DPO left it
    empty and the resubmitted job failed to start (measured with test_job_submit.py)."""
    from align_rl.training.harness import SNAPSHOT_FILE, repair_run_storage

    run = tmp_path / "ray" / "dpo-v1"
    run.mkdir(parents=True)
    assert repair_run_storage(tmp_path / "ray", "dpo-v1") is None  # nothing there
    (run / SNAPSHOT_FILE).write_text('{"checkpoints": []}')
    assert repair_run_storage(tmp_path / "ray", "dpo-v1") is None  # valid: kept
    (run / SNAPSHOT_FILE).write_text("")
    aside = repair_run_storage(tmp_path / "ray", "dpo-v1")
    assert aside is not None and aside.exists() and not (run / SNAPSHOT_FILE).exists()
