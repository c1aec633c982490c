"""The one training loop without Ray: devices, schedule, resume rule, metrics, commit."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from torch import nn

from align_rl.errors import ConfigError
from align_rl.io.checkpoints import save_state
from align_rl import devices
from align_rl.training.loop import (
    METRICS_FILE,
    STATE_FILE,
    Loop,
    Task,
    Worker,
    lr_at,
    resume_state,
    to_cpu,
)

# ----------------------------------------------------------------------------- devices


@pytest.fixture
def cluster(monkeypatch):
    """A fake connected Ray cluster whose GPU count the test sets."""
    import ray

    res = {"CPU": 4.0}
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(res))
    return res


def test_cpu_never_takes_a_gpu(cluster):
    cluster["GPU"] = 2.0
    assert devices.resolve_use_gpu("cpu") is False
    assert devices.resolve_use_gpu("cpu", requested=True) is False


def test_auto_takes_gpus_only_when_the_cluster_has_them(cluster):
    assert devices.resolve_use_gpu("auto") is False
    cluster["GPU"] = 1.0
    assert devices.resolve_use_gpu("auto") is True


def test_cuda_without_a_gpu_names_the_fix(cluster):
    with pytest.raises(ConfigError, match="run.device=cuda.*no GPU.*run.device=cpu"):
        devices.resolve_use_gpu("cuda")
    with pytest.raises(ConfigError, match="dpo.use_gpu=true.*no GPU"):
        devices.resolve_use_gpu("auto", requested=True, key="dpo.use_gpu")
    cluster["GPU"] = 8.0
    assert devices.resolve_use_gpu("cuda") is True


def test_without_ray_there_is_no_gpu(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert devices.cluster_gpus() == 0.0
    assert devices.resolve_use_gpu("auto") is False
    with pytest.raises(ConfigError):
        devices.resolve_use_gpu("bogus")


def test_worker_scaling_asks_one_gpu_per_worker():
    from align_rl.training.harness import worker_scaling

    sc = worker_scaling(3, 2, True)
    assert sc.num_workers == 3 and sc.use_gpu and sc.resources_per_worker == {"CPU": 2.0, "GPU": 1.0}
    assert worker_scaling(1, 1, False).resources_per_worker == {"CPU": 1.0}


def test_pretraining_resolves_run_device(cluster, monkeypatch, tmp_path):
    import align_rl.training.pretraining as pt
    from align_rl.config import load_config

    monkeypatch.setattr(pt, "init_ray", lambda *a, **k: None)
    cfg = load_config(overrides=[f"run.workdir={tmp_path}", "run.device=cpu", "pretrain.use_gpu=true"])
    assert pt._resources(cfg, "vae").use_gpu is False
    cfg = load_config(overrides=[f"run.workdir={tmp_path}", "run.device=auto", "diffusion.cpus_per_worker=64"])
    assert pt._resources(cfg, "diffusion").use_gpu is False
    assert pt._resources(cfg, "diffusion").cpus_per_worker == 4  # capped by the cluster's CPUs
    cluster["GPU"] = 1.0
    assert pt._resources(cfg, "forecaster").use_gpu is True
    cluster.pop("GPU")
    with pytest.raises(ConfigError, match="no GPU"):
        pt._resources(load_config(overrides=[f"run.workdir={tmp_path}", "run.device=cuda",
                                             "actors.gpus_per_actor=0.5"]), "vae")


def test_run_dpo_refuses_cuda_on_a_cluster_without_gpus(cluster, monkeypatch, tmp_path):
    from align_rl.alignment import learner

    from .test_learner import _setup

    cfg, ws, ref, _ = _setup(tmp_path, ["run.device=cuda", "actors.gpus_per_actor=0.5"])
    monkeypatch.setattr(learner, "init_ray", lambda *a, **k: None)

    def reached(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(learner, "fit_loop", reached)
    with pytest.raises(ConfigError, match="run.device=cuda but the Ray cluster has no GPU"):
        learner.run_dpo(cfg, ws, ws.pairs, ref, steps=2, progress=False)


# ----------------------------------------------------------------------------- the loop


def test_dpo_schedule_warms_up_then_stays():
    assert lr_at(0, 10, 1e-3, warmup=4, decay="constant") == pytest.approx(2.5e-4)
    assert lr_at(3, 10, 1e-3, warmup=4, decay="constant") == 1e-3
    assert lr_at(9, 10, 1e-3, warmup=4, decay="constant") == 1e-3
    assert lr_at(0, 10, 1e-3, warmup=0, decay="constant") == 1e-3


class _Line(Task):
    """y = w·x on fixed data; metrics ``part`` = step index, to check the window mean."""

    name = "line"

    def __init__(self, config, worker):
        self.x = torch.linspace(-1, 1, 16)[:, None]

    def build(self, device):
        return nn.Linear(1, 1)

    def batch(self, step, rank, size):
        return (self.x[:size],)

    def loss(self, model, batch, gen):
        (x,) = batch
        self.k = getattr(self, "k", -1) + 1
        return torch.mean((model(x) - 3 * x) ** 2), {"part": float(self.k)}

    def constants(self):
        return {"version": 7}


def _config(tmp_path, **kw):
    return {"make_task": _Line, "steps": 6, "seed": 0, "lr": 0.1, "batch_size": 8, "warmup": 0,
            "decay": "constant", "out_dir": str(tmp_path / "out"), **kw}


def test_loop_logs_window_means_and_commits_state_and_metrics(tmp_path):
    loop = Loop(_config(tmp_path), Worker())
    loop.prepare(lambda m: m)
    for _ in range(3):
        loop.train_step()
    m = loop.metrics()
    assert m["part"] == pytest.approx(1.0)  # the mean of 0, 1, 2
    assert m["step"] == 3 and m["learning_rate"] == 0.1 and m["version"] == 7 and m["attempt"] == 1
    assert {"loss", "grad_norm", "samples_per_s", "step_time_s"} <= set(m)
    loop.history.append(m)
    loop.commit(tmp_path / "ray")
    for d in (tmp_path / "ray", tmp_path / "out"):
        assert (d / STATE_FILE).exists()
    lines = [json.loads(x) for x in (tmp_path / "out" / METRICS_FILE).read_text().splitlines()]
    assert [x["step"] for x in lines] == [3]
    st = loop.state()
    assert st["step"] == 3 and st["target"] == 6 and st["version"] == 7 and st["starts"] == [0]
    assert all(v.device.type == "cpu" for v in st["model"].values())


class _FakeCkpt:
    def __init__(self, d):
        self.d = d

    @contextlib.contextmanager
    def as_directory(self):
        yield str(self.d)


def test_resume_takes_the_later_of_the_ray_checkpoint_and_out_dir(tmp_path):
    (tmp_path / "ray").mkdir()
    save_state({"step": 4, "history": []}, tmp_path / "ray" / STATE_FILE)
    save_state({"step": 6, "history": []}, tmp_path / "out" / STATE_FILE)
    ck = _FakeCkpt(tmp_path / "ray")
    assert resume_state(ck, _config(tmp_path))["step"] == 4  # out_dir only when resuming
    assert resume_state(ck, _config(tmp_path, resume=True))["step"] == 6
    assert resume_state(None, _config(tmp_path, resume=True))["step"] == 6
    save_state({"step": 8, "history": []}, tmp_path / "ray" / STATE_FILE)
    assert resume_state(ck, _config(tmp_path, resume=True))["step"] == 8
    assert resume_state(None, _config(tmp_path)) is None


def test_a_resumed_loop_continues_the_same_optimisation(tmp_path):
    """Three steps, commit, a new Loop resumed from the state, three more: the weights of six
    uninterrupted steps."""
    a = Loop(_config(tmp_path), Worker())
    for _ in range(3):
        a.train_step()
    a.commit(tmp_path / "ray")
    b = Loop(_config(tmp_path, resume=True), Worker())
    assert b.step == 3 and b.starts == [0, 3]
    for _ in range(3):
        b.train_step()
    c = Loop(_config(tmp_path / "c"), Worker())
    for _ in range(6):
        c.train_step()
    for k, v in c.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v)


def test_to_cpu_walks_containers():
    obj = {"a": [torch.ones(2, requires_grad=True)], "b": (torch.zeros(1), 3), "c": "x"}
    out = to_cpu(obj)
    assert out["a"][0].device.type == "cpu" and not out["a"][0].requires_grad
    assert isinstance(out["b"], tuple) and out["b"][1] == 3 and out["c"] == "x"


class _Scored(_Line):
    """Validation scores 0.5, 0.2, 0.9 in turn (higher is better); the start scores 0.3."""

    best_key = "val/score"

    def __init__(self, config, worker):
        super().__init__(config, worker)
        self.scores, self.kept = [0.5, 0.2, 0.9], []

    def initial_score(self, model):
        return 0.3

    def validate(self, model):
        assert not model.training
        return {"val/score": self.scores.pop(0)}

    def keep_best(self, out_dir, model, step, best):
        self.kept.append((step, best["val/score"]))


def test_validation_keeps_the_best_model(tmp_path):
    loop = Loop(_config(tmp_path, val_every=1, make_task=_Scored), Worker())
    loop.prepare(lambda m: m)
    assert loop.best == {"step": 0, "val/score": 0.3}
    seen = []
    for _ in range(3):
        loop.train_step()
        m = loop.metrics()
        loop.validate(m)
        seen.append(m["val/best_step"])
    assert seen == [1.0, 1.0, 3.0] and loop.task.kept == [(0, 0.3), (1, 0.5), (3, 0.9)]
    assert loop.model.training and loop.state()["best"] == {"step": 3, "val/score": 0.9}


class _Falling(_Line):
    """Validation losses 0.5, 0.4, 0.45, 0.46, 0.3 in turn (lower is better); the start 0.6."""

    best_key, best_mode = "val/loss", "min"

    def __init__(self, config, worker):
        super().__init__(config, worker)
        self.losses = [0.5, 0.4, 0.45, 0.46, 0.3]

    def initial_score(self, model):
        return 0.6

    def validate(self, model):
        return {"val/loss": self.losses.pop(0)}


def test_patience_stops_after_validations_without_a_lower_loss_and_keeps_the_best(tmp_path):
    """val_every 1, patience 2: the best is step 2 (0.4); steps 3 and 4 do not beat it, so the
    loop is out of patience after step 4 and hands on the weights it had at step 2."""
    loop = Loop(_config(tmp_path, val_every=1, patience=2, steps=5, make_task=_Falling), Worker())
    loop.prepare(lambda m: m)
    out, at_step2 = [], None
    for _ in range(4):
        loop.train_step()
        m = loop.metrics()
        loop.validate(m)
        out.append(loop.out_of_patience())
        if loop.step == 2:
            at_step2 = {k: v.clone() for k, v in loop.raw.state_dict().items()}
    assert out == [False, False, False, True]
    assert loop.best == {"step": 2, "val/loss": 0.4}
    st = loop.state()
    assert all(torch.equal(st["best_model"][k], v) for k, v in at_step2.items())
    assert not all(torch.equal(st["model"][k], v) for k, v in at_step2.items())


def test_without_patience_the_loop_keeps_no_copy_and_never_stops(tmp_path):
    loop = Loop(_config(tmp_path, val_every=1, steps=5, make_task=_Falling), Worker())
    loop.prepare(lambda m: m)
    for _ in range(4):
        loop.train_step()
        loop.validate(loop.metrics())
        assert not loop.out_of_patience()
    assert loop.state()["best_model"] is None and loop.best["val/loss"] == 0.4


def test_auto_workers_follow_the_cluster_not_the_free_cpus(monkeypatch):
    """pretrain.num_workers=0 counts the cluster's CPUs: CPUs still held by a previous stage's
    actors must not change the data-parallel batches (and so the trained model)."""
    import ray

    from align_rl.config import load_config
    from align_rl.training.harness import auto_workers

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 1.0})
    pre = load_config(overrides=["pretrain.cpus_per_worker=1"]).pretrain
    assert auto_workers(pre) == 2
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0})
    assert auto_workers(pre) == 2  # capped
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert auto_workers(pre) == 1


# ----------------------------------------------------------------------------- precision


def test_native_bf16_reads_the_cpu_flags():
    from align_rl.cpu import has_bf16_flags

    assert has_bf16_flags("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert has_bf16_flags("flags : sse amx_bf16 amx_tile\n")
    assert not has_bf16_flags("flags\t\t: fpu avx2 avx512f avx512bw\n")
    assert not has_bf16_flags("no flags line here\n")


def test_auto_precision_is_bf16_only_on_a_cpu_with_bf16_arithmetic(monkeypatch):
    import align_rl.training.loop as loop_mod

    cpu = torch.device("cpu")
    monkeypatch.setattr(loop_mod, "native_bf16", lambda: True)
    assert loop_mod.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(loop_mod, "native_bf16", lambda: False)
    assert loop_mod.resolve_precision("auto", cpu) == "fp32"
    assert loop_mod.resolve_precision("bf16", cpu) == "bf16"  # forced
    assert loop_mod.resolve_precision(None, cpu) == "fp32"
    with pytest.raises(ValueError, match="fp16.*auto, fp32, bf16"):
        loop_mod.resolve_precision("fp16", cpu)


class _Dtype(_Line):
    """The line task, recording the dtype of the network's output."""

    def loss(self, model, batch, gen):
        (x,) = batch
        y = model(x)
        self.dtype = y.dtype
        return torch.mean((y.float() - 3 * x) ** 2), {}


def test_bf16_runs_the_forward_pass_in_bf16_and_learns_as_float32_does(tmp_path):
    """Under bf16 the linear layer's output is bf16 while the weights stay float32, and 60 steps
    end where float32's do (to bf16's 3 significant digits)."""
    w = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        loop = Loop(_config(tmp_path / precision, make_task=_Dtype, steps=60, precision=precision), Worker())
        for _ in range(60):
            loop.train_step()
        assert loop.task.dtype == dtype and loop.raw.weight.dtype == torch.float32
        w[precision] = float(loop.raw.weight)
    assert 2.5 < w["fp32"] < 3.0  # on its way to y = 3x
    assert w["bf16"] == pytest.approx(w["fp32"], abs=0.01)
