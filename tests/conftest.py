"""Shared test fixtures: one Ray instance per test session, fixed seeds, small grids."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

import tempfile

import numpy as np
import pytest
import torch

import actors

actors.install()  # the Ray actors of the library's stages, as the commands supply them

if not (os.environ.get("RAY_AUTH_MODE") or os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")):
    # Ray's token authentication stays on in the tests; the session's token lives in a private
    # temporary folder instead of ~/.ray/auth_token (align_rl.training.harness.ensure_auth_token
    # creates it, readable by the user only)
    os.environ["RAY_AUTH_TOKEN_PATH"] = os.path.join(tempfile.mkdtemp(prefix="align_rl_token_"), "auth_token")


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def ray_session():
    """The one local Ray instance of the test session, started as the commands start theirs
    (``init_ray``: loopback only, token authentication; 4 CPUs, no dashboard)."""
    import ray

    from align_rl.training.harness import init_ray

    init_ray(num_cpus=4, log_to_driver=False)
    yield ray
    ray.shutdown()
