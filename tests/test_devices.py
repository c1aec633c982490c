"""run.device end to end (docs/method.md §5.3): the resolution rules, models on the resolved device
inside every actor (a fake device where a GPU would be needed), CPU numpy across actor
boundaries, and the evaluation's actor path giving the driver path's numbers."""

from __future__ import annotations

import dataclasses
import numpy as np
import pytest
import torch

from align_rl import devices
from align_rl.config import load_config
from align_rl.errors import ConfigError
from align_rl.models.loading import spec_of

from .tiny_align import LAT, LON, tiny_world


# ----------------------------------------------------------------------------- resolution rules
def test_resolution_rules():
    r = devices.resolve_device
    assert r("cpu", available=True) == torch.device("cpu")
    assert r("auto", available=False) == torch.device("cpu")
    assert r("auto", available=True) == torch.device("cuda")
    assert r("cuda", available=True) == torch.device("cuda")
    with pytest.raises(ConfigError, match="run.device=cuda.*run.device=auto"):
        r("cuda", available=False)
    with pytest.raises(ConfigError, match="not one of auto, cpu, cuda"):
        r("tpu")
    cfg = load_config(overrides=["run.device=cpu"])
    assert r(cfg, available=True) == torch.device("cpu")
    if not torch.cuda.is_available():  # this process: the default availability
        assert r("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA"):
            r("cuda")


def test_gpu_reservations_follow_run_device():
    from actors.sampler import actor_options as forecast_actor_options
    from actors.sampler import actor_options

    auto = load_config(overrides=["actors.gpus_per_actor=0.25"])
    assert devices.actor_gpus(auto) == 0.25 and actor_options(auto)["num_gpus"] == 0.25
    assert forecast_actor_options(auto)["num_gpus"] == 0.25
    cpu = load_config(overrides=["run.device=cpu", "actors.gpus_per_actor=0.25"])
    assert devices.actor_gpus(cpu) == 0 and "num_gpus" not in actor_options(cpu)
    assert "num_gpus" not in forecast_actor_options(cpu)
    cuda = load_config(overrides=["run.device=cuda", "actors.gpus_per_actor=0.5"])
    assert actor_options(cuda)["num_gpus"] == 0.5
    with pytest.raises(ConfigError, match="actors.gpus_per_actor > 0"):
        load_config(overrides=["run.device=cuda"])
    cuda.actors.gpus_per_actor = 0.0  # past validation
    with pytest.raises(ConfigError, match="actors.gpus_per_actor"):
        devices.actor_gpus(cuda)


def test_actor_device_needs_a_gpu_from_ray(monkeypatch):
    import ray

    class Ctx:
        def __init__(self, gpus):
            self.gpus = gpus

        def get_assigned_resources(self):
            return {"CPU": 1.0, "GPU": self.gpus}

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Ctx(0.5))
    assert devices.actor_device("auto") == torch.device("cuda")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Ctx(0.0))
    assert devices.actor_device("auto") == torch.device("cpu")  # no share: not the GPU
    with pytest.raises(ConfigError, match="given no GPU: set actors.gpus_per_actor"):
        devices.actor_device("cuda")


def test_place_module_device_and_numpy_helpers():
    from align_rl.models.forecaster import EmulatorForecaster, EmulatorNet, RegriddedForecaster

    net = torch.nn.Linear(3, 2).train()
    assert devices.place(net, "meta") is net and not net.training
    assert devices.module_device(net) == torch.device("meta")
    wrapped = RegriddedForecaster(EmulatorForecaster(EmulatorNet(hidden=4, depth=1)), "8x16", "8x16")
    devices.place(wrapped, "meta")
    assert devices.module_device(wrapped) == torch.device("meta")  # looked up through .inner
    assert devices.module_device(object()) == torch.device("cpu")
    t = torch.arange(6.0).reshape(2, 3)
    a = devices.cpu_numpy(t)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and np.shares_memory(a, t.numpy())
    ro = np.arange(4, dtype=np.float32)
    ro.flags.writeable = False
    x = devices.from_numpy(ro)
    x += 1  # a writable copy: the read-only buffer is untouched
    assert ro[0] == 0 and x[0] == 1


# ----------------------------------------------------------------------------- inside the actors
def _fake_device(monkeypatch, *modules):
    """Make the actors' device resolution answer the meta device (no GPU here)."""
    for m in modules:
        monkeypatch.setattr(m, "actor_device", lambda requested="auto": torch.device("meta"))


def test_actors_move_their_networks_to_the_resolved_device(tmp_path, monkeypatch):
    """The actor classes themselves (in this process): every network ends on the device that
    run.device resolved to."""
    import actors.analysis as aa
    import actors.forecast as af
    import actors.reward as ar
    import actors.sampler as asm

    cfg, _, models, *_ = tiny_world(tmp_path)
    _fake_device(monkeypatch, asm, ar, af, aa)
    s = asm.SamplerActor(models.codec, models.eps_model, 0, cfg.to_dict())
    assert next(s.eps_model.parameters()).device.type == "meta"
    assert next(s.codec.parameters()).device.type == "meta"
    assert s.info()["model_device"] == "meta"
    r = ar.RewardActor(spec_of(models.forecaster), models.normalizer, LAT, LON, cfg.to_dict())
    assert r.info()["model_device"] == "meta"
    f = af.ForecastActor(spec_of(models.forecaster))
    assert f.info()["model_device"] == "meta"
    a = aa.AnalysisActor(models.codec, cfg.to_dict())
    assert next(a.codec.parameters()).device.type == "meta"


def test_actor_outputs_are_cpu_numpy_and_models_on_cpu(tmp_path, ray_session):
    """With run.device=cpu the real Ray actors hold their networks on the CPU, reserve no GPU and
    answer float32 numpy arrays."""
    import ray

    from actors.forecast import make_forecasters
    from actors.pool import CandidatePool

    from .test_actors import _tasks

    cfg, _, models, truth, bg, _ = tiny_world(tmp_path, ["run.device=cpu", "actors.gpus_per_actor=0.5"])
    tasks = _tasks(cfg, truth, bg, models, 1)
    pool = CandidatePool(cfg, models, LAT, LON)
    try:
        for a in pool.samplers + pool.rewarders:
            info = ray.get(a.info.remote())
            assert info["device"] == "cpu" and info["model_device"] == "cpu"
        drawn = ray.get(pool.samplers[0].draw.remote(tasks, 0))
        d = drawn[0]
        for arr in (d.z_b, d.latents, d.fields):
            assert isinstance(arr, np.ndarray) and arr.dtype == np.float32
        assert d.fields.shape == (cfg.pairs.candidates, 69, 8, 16)
        scores = ray.get(pool.rewarders[0].score.remote(tasks, drawn))
        assert all(isinstance(v, np.ndarray) for v in scores[0].values())
    finally:
        pool.shutdown()
    fc = make_forecasters(cfg, ray.put(spec_of(models.forecaster)), n=1)[0]
    x = np.zeros((2, 69, 8, 16), np.float32)
    out = ray.get(fc.rollout.remote(x, x, 2, True))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (2, 69, 8, 16)
    assert ray.get(fc.info.remote())["model_device"] == "cpu"
    ray.kill(fc)


# ----------------------------------------------------------------------------- evaluation sampling
def test_sampling_place():
    from align_rl.devices import sampling_place

    assert sampling_place(load_config()) == "driver"  # CPU: as before
    assert sampling_place(load_config(overrides=["actors.gpus_per_actor=0.5"])) == "actor"
    assert sampling_place(load_config(overrides=["run.device=cpu", "actors.gpus_per_actor=0.5"])) == "driver"
    assert sampling_place(load_config(overrides=["eval.sampling=actor"])) == "actor"
    assert sampling_place(load_config(overrides=["eval.sampling=driver", "actors.gpus_per_actor=1"])) == "driver"
    with pytest.raises(ConfigError, match="eval.sampling"):
        load_config(overrides=["eval.sampling=gpu"])


def test_analysis_actor_gives_the_driver_numbers(tmp_path, ray_session):
    """analyse_batch in the actor (eval.sampling=actor) against the driver: the same analyses for
    the same generator, the generator advanced alike, networks sent once, and a divergence
    reported as the driver's InputError."""
    import ray

    import actors.analysis as aa
    from align_rl.errors import InputError
    from align_rl.world.observations import make_observations

    cfg, _, models, truth, bg, _ = tiny_world(tmp_path, ["sampler.corrections=1"])
    act = load_config(overrides=[*_tiny_overrides(cfg), "eval.sampling=actor"])
    x_b = torch.randn(2, 69, 8, 16)
    obs = make_observations(torch.randn(2, 69, 8, 16), 0.1, generator=torch.Generator().manual_seed(3))
    try:
        for method in ("obsfree", "dps"):
            g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
            runs = []
            for c, g in ((cfg, g1), (act, g2)):
                a = aa.analyse_batch(c, models.codec, models.eps_model, x_b, obs, method, c.sampler,
                                     c.guidance, generator=g, members=3)
                b = aa.analyse_batch(c, models.codec, models.eps_model, x_b, obs, method, c.sampler,
                                     c.guidance, generator=g, members=3)  # the generator moved on
                runs.append((a, b))
            (d1, d2), (a1, a2) = runs
            for d, a in ((d1, a1), (d2, a2)):
                assert a.fields.device.type == "cpu" and a.fields.shape == (2, 3, 69, 8, 16)
                torch.testing.assert_close(a.fields, d.fields, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(a.latents, d.latents, rtol=1e-4, atol=1e-5)
            assert not torch.allclose(d1.fields, d2.fields)
            assert torch.equal(g1.get_state(), g2.get_state())
        s = aa._SESSION
        assert s is not None and len(s.models) == 1  # one network, put once
        info = ray.get(s.actor.info.remote())
        assert info["model_device"] == "cpu" and len(info["models"]) == 1
        ray.kill(s.actor, no_restart=False)  # a restarted actor fetches the network again
        again = aa.analyse_batch(act, models.codec, models.eps_model, x_b, obs, "dps", act.sampler,
                                 act.guidance, generator=torch.Generator().manual_seed(7), members=3)
        torch.testing.assert_close(again.fields, d1.fields, rtol=1e-4, atol=1e-5)
        assert ray.get(s.actor.info.remote())["pid"] != info["pid"]
        with torch.no_grad():  # new weights in place: sent again
            next(models.eps_model.parameters()).add_(0.0)
        aa.analyse_batch(act, models.codec, models.eps_model, x_b, obs, "obsfree", act.sampler,
                         generator=torch.Generator().manual_seed(1), members=2)
        assert len(ray.get(s.actor.info.remote())["models"]) == 2

        class Diverging(torch.nn.Module):
            def forward(self, z, t, z_b):
                return torch.full_like(z, float("nan"))

        g = torch.Generator().manual_seed(1)
        with pytest.raises(InputError, match="NaN"):
            aa.analyse_batch(act, models.codec, Diverging(), x_b, obs, "obsfree", act.sampler,
                             generator=g, members=2)
        assert not torch.equal(g.get_state(), torch.Generator().manual_seed(1).get_state())
    finally:
        aa.release()
    assert aa._SESSION is None


def _tiny_overrides(cfg) -> list[str]:
    from .tiny_align import OVERRIDES

    return [*OVERRIDES, f"run.workdir={cfg.run.workdir}", "sampler.corrections=1"]


def test_evaluation_actor_path_equals_driver_path(tmp_path, ray_session, monkeypatch):
    """run_evaluation with eval.sampling=actor (analyses in the analysis actor, the members'
    forecasts on forecast actors) reports the driver path's numbers."""
    import dataclasses

    from align_rl import remote
    from align_rl.evaluation.runner import EvalData, run_evaluation
    from align_rl.workspace import Workspace

    import actors.analysis as aa

    jobs = []
    real = remote.workers()

    def counted(*a, **k):
        jobs.append(len(a[2]))
        return real.forecast(*a, **k)

    monkeypatch.setattr(remote, "_current", dataclasses.replace(real, forecast=counted))

    cfg, _, models, truth, bg, _ = tiny_world(tmp_path, n_times=48)
    ov = [*_tiny_overrides(cfg), "guidance.methods=[obsfree, dps]", "guidance.dps_zeta=0.01",
          "data.test=[2004-01-01, 2004-12-31]", "eval.times=2", "eval.members=2",
          "eval.map_samples=1", "eval.batch_size=1", "checks.units=false"]
    data = EvalData(truth, bg, models.normalizer, models.codec, models.forecaster)
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for place in ("driver", "actor"):
            c = load_config(overrides=[*ov, f"eval.sampling={place}"])
            out[place] = run_evaluation(c, Workspace.from_config(c), {"reference": models.eps_model},
                                        data=data, out=tmp_path / place, progress=False)
            assert (aa._SESSION is not None) == (place == "actor")
            assert bool(jobs) == (place == "actor")  # one forecast job per row on the actors
    finally:
        torch.set_num_threads(threads)
        aa.release()
    d, a = out["driver"].ds, out["actor"].ds
    for method in ("obsfree", "dps"):
        sel = {"model": "reference", "method": method}
        dv, av = d.score.sel(sel).values, a.score.sel(sel).values
        assert np.isfinite(dv).any()
        np.testing.assert_allclose(av, dv, rtol=1e-4, atol=1e-7, err_msg=method)


# ----------------------------------------------------------------------------- precision
def test_autocast_policy():
    from align_rl.diffusion.precision import autocast_policy

    assert autocast_policy("none", "cuda") == (None, False)
    assert autocast_policy("bf16", "cpu") == (None, False)  # CPU runs stay float32
    assert autocast_policy("bf16", "cuda") == ({"device_type": "cuda", "dtype": torch.bfloat16}, False)
    assert autocast_policy("bf16_dps", torch.device("cuda")) == (
        {"device_type": "cuda", "dtype": torch.bfloat16}, True)
    with pytest.raises(ConfigError, match="sampler.autocast"):
        autocast_policy("fp8", "cuda")


def test_autocast_off_by_default_changes_nothing(tmp_path):
    """The default (sampler.autocast=none) and bf16 on the CPU give the float32 numbers of an
    analysis that never heard of autocast."""
    from align_rl.diffusion.analysis import analyse
    from align_rl.world.observations import make_observations

    cfg, _, models, *_ = tiny_world(tmp_path)
    x_b = torch.randn(1, 69, 8, 16)
    obs = make_observations(torch.randn(1, 69, 8, 16), 0.1, generator=torch.Generator().manual_seed(3))
    base = {k: getattr(cfg.sampler, k) for k in ("steps", "corrections", "tau", "decode")}
    res = []
    for sc in (base, cfg.sampler, dataclasses.replace(cfg.sampler, autocast="bf16_dps")):
        an = analyse(models.codec, models.eps_model, x_b, obs, "dps", sc, cfg.guidance,
                     generator=torch.Generator().manual_seed(0), members=2)
        res.append(an.fields)
    assert torch.equal(res[0], res[1]) and torch.equal(res[0], res[2])
    assert cfg.sampler.autocast == "none" and not cfg.sampler.compile
    bf16 = load_config(overrides=[f"run.workdir={tmp_path}", "sampler.autocast=bf16"])
    assert load_config(overrides=[f"run.workdir={tmp_path}"]).section_hash("sampler") != bf16.section_hash("sampler")


@pytest.mark.parametrize("guided", [False, True])
def test_autocast_covers_the_sampler_passes_and_dps_only_when_asked(tmp_path, guided):
    """With autocast kwargs (bf16 on the CPU here, as on CUDA), the sampler's passes and the final
    decode run autocast, DPS's gradient pass in float32 unless autocast_guidance."""
    from align_rl.diffusion.analysis import analyse
    from align_rl.world.observations import make_observations

    cfg, _, models, *_ = tiny_world(tmp_path)
    calls = []

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z, t, z_b):
            calls.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
            return self.inner(z, t, z_b)

    x_b = torch.randn(1, 69, 8, 16)
    obs = make_observations(torch.randn(1, 69, 8, 16), 0.1, generator=torch.Generator().manual_seed(3))
    ac = {"device_type": "cpu", "dtype": torch.bfloat16}
    an = analyse(models.codec, Spy(models.eps_model), x_b, obs, "dps", cfg.sampler, cfg.guidance,
                 generator=torch.Generator().manual_seed(0), members=2, autocast=ac,
                 autocast_guidance=guided)
    assert an.fields.dtype == torch.float32 and an.latents.dtype == torch.float32
    assert torch.isfinite(an.fields).all()
    sampler_calls = [a for g, a in calls if not g]
    grad_calls = [a for g, a in calls if g]
    assert len(sampler_calls) == cfg.sampler.steps and all(sampler_calls)
    assert len(grad_calls) == cfg.sampler.steps and all(a == guided for a in grad_calls)


# ----------------------------------------------------------------------------- compile
def _cxx() -> str | None:
    import shutil

    try:
        from torch._inductor import config as ind

        name = ind.cpp.cxx[0] if isinstance(ind.cpp.cxx, (tuple, list)) else ind.cpp.cxx
    except Exception:
        name = None
    return shutil.which(name or "g++") or shutil.which("c++")


@pytest.mark.skipif(_cxx() is None, reason="torch.compile on the CPU needs a C++ compiler (none found)")
def test_compiled_score_network_matches_eager(tmp_path):
    """sampler.compile: the compiled network (in place, static shapes) gives the eager numbers
    and keeps its state-dict keys (weight syncs load into it)."""
    cfg, _, models, *_ = tiny_world(tmp_path)
    import copy

    eager = models.eps_model
    comp = devices.compile_module(copy.deepcopy(eager))
    assert comp.state_dict().keys() == eager.state_dict().keys()
    z, zb = torch.randn(4, *eager.latent_shape), torch.randn(4, *eager.latent_shape)
    t = torch.full((4,), 0.5)
    with torch.no_grad():
        torch.testing.assert_close(comp(z, t, zb), eager(z, t, zb), rtol=1e-4, atol=1e-5)
        comp.load_state_dict({k: v * 1.01 for k, v in eager.state_dict().items()})
        eager.load_state_dict(comp.state_dict())
        torch.testing.assert_close(comp(z, t, zb), eager(z, t, zb), rtol=1e-4, atol=1e-5)


def test_sampler_actor_compiles_when_asked(tmp_path, monkeypatch):
    import actors.sampler as asm

    cfg, _, models, *_ = tiny_world(tmp_path, ["sampler.compile=true"])
    seen = []
    monkeypatch.setattr(asm, "compile_module", lambda m: seen.append(m) or m)
    s = asm.SamplerActor(models.codec, models.eps_model, 0, cfg.to_dict())
    assert seen == [s.eps_model]

