"""Users' forecasters and code through the actors: the tiny main job with a FengWu-like ONNX model
on its own pole-row grid (each actor opens its own session from the forecaster's spec), with a
TorchScript file and an exported program, with ``eval.sampling=actor``; and a plugin module from
outside the package (``run.plugins``) whose reward and guidance method are used by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from align_rl.io.grid import LatLonGrid
from align_rl.io.normalization import Normalizer
from align_rl.io.schema import N_CHANNELS

from .tiny_align import OVERRIDES, TRAIN_OVERRIDES, write_tiny_world

REPO = Path(__file__).resolve().parents[1]
NATIVE = LatLonGrid(9, 16, poles=True)  # rows on the poles, latitude 90 → −90 (FengWu's layout)
A, B = 0.7, 0.3  # the model's step in its own normalisation: next = A · x_curr + B · x_prev


def write_fengwu_onnx(path: Path, batch: int | None = 1) -> Path:
    """A FengWu-like ONNX graph written with the onnx package: input ``input`` (batch, 138, 9, 16)
    = the two frames stacked, output ``output`` (batch, 138, 9, 16) whose first 69 channels are
    ``A · x_curr + B · x_prev`` and the rest ``x_curr`` (FengWu returns more than the state)."""
    import onnx
    from onnx import TensorProto, helper

    H, W = NATIVE.shape
    b = batch if batch is not None else "batch"

    def const(name, values, dtype=TensorProto.INT64):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name + "_v", dtype, [len(values)], values))

    nodes = [
        const("s0", [0]), const("s1", [N_CHANNELS]), const("s2", [2 * N_CHANNELS]), const("ax", [1]),
        const("a", [A], TensorProto.FLOAT), const("b", [B], TensorProto.FLOAT),
        helper.make_node("Slice", ["input", "s0", "s1", "ax"], ["prev"]),
        helper.make_node("Slice", ["input", "s1", "s2", "ax"], ["curr"]),
        helper.make_node("Mul", ["curr", "a"], ["ac"]),
        helper.make_node("Mul", ["prev", "b"], ["bp"]),
        helper.make_node("Add", ["ac", "bp"], ["nxt"]),
        helper.make_node("Concat", ["nxt", "curr"], ["output"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "fengwu_like",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [b, 2 * N_CHANNELS, H, W])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [b, 2 * N_CHANNELS, H, W])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


class FengWuLike(torch.nn.Module):
    """The same step as a torch module (for the TorchScript file and the exported program)."""

    def __init__(self):
        super().__init__()
        self.n, self.a, self.b = N_CHANNELS, A, B

    def forward(self, x):
        prev, curr = x[:, :self.n], x[:, self.n:]
        return torch.cat([self.a * curr + self.b * prev, curr], dim=1)


def write_statistics(tmp: Path) -> list[str]:
    """The model's own statistics (69,), physical units, as FengWu ships them (npy files)."""
    rng = np.random.default_rng(3)
    np.save(tmp / "fc_mean.npy", rng.normal(1000.0, 50.0, N_CHANNELS))
    np.save(tmp / "fc_std.npy", rng.uniform(20.0, 80.0, N_CHANNELS))
    return [f"forecaster.mean_path={tmp / 'fc_mean.npy'}", f"forecaster.std_path={tmp / 'fc_std.npy'}"]


def test_onnx_spec_opens_in_each_process_and_matches_the_step_by_hand(tmp_path):
    """The spec pickles (no session inside), opens anew, and the opened forecaster is the model's
    step by hand: up to the pole-row grid, the model's normalisation north → south, the step, and
    back (the checks of tests/test_forecaster.py, here through the spec)."""
    import pickle

    from align_rl.config import load_config
    from align_rl.io.regrid import regrid
    from align_rl.models.forecaster import RegriddedForecaster
    from align_rl.models.loading import ForecasterSpec, forecaster_spec, spec_of

    onnx_path = write_fengwu_onnx(tmp_path / "fc.onnx")
    cfg = load_config(overrides=OVERRIDES + ["forecaster.kind=onnx", f"forecaster.path={onnx_path}",
                                             *write_statistics(tmp_path), f"run.workdir={tmp_path}"])
    rng = np.random.default_rng(0)
    norm = Normalizer(rng.normal(1000, 40, N_CHANNELS), rng.uniform(10, 60, N_CHANNELS))
    spec = forecaster_spec(cfg, None, norm)
    again = pickle.loads(pickle.dumps(spec))
    assert isinstance(again, ForecasterSpec) and again.module is None
    fc = again.open("cpu")
    assert isinstance(fc, RegriddedForecaster) and fc.native == NATIVE
    assert spec_of(fc) is again  # sent on as its spec, never as the session
    model = LatLonGrid.of(cfg.data.grid)
    prev = rng.normal(size=(2, N_CHANNELS, 8, 16)).astype(np.float32)
    curr = rng.normal(size=(2, N_CHANNELS, 8, 16)).astype(np.float32)
    out = fc.rollout(torch.from_numpy(prev), torch.from_numpy(curr), 2).numpy()
    m_mean, m_std = np.load(tmp_path / "fc_mean.npy"), np.load(tmp_path / "fc_std.npy")
    c = lambda a: a[:, None, None]  # noqa: E731

    def to_m(x):
        x = regrid(x.astype(np.float64), model, NATIVE, "linear")
        return ((x * c(norm.std) + c(norm.mean) - c(m_mean)) / c(m_std))[..., ::-1, :]

    def from_m(y):
        y = y[..., ::-1, :] * c(m_std) + c(m_mean)
        return regrid((y - c(norm.mean)) / c(norm.std), NATIVE, model, "conservative")

    p_, c_ = to_m(prev), to_m(curr)
    want = []
    for _ in range(2):
        p_, c_ = c_, A * c_ + B * p_
        want.append(from_m(c_))
    np.testing.assert_allclose(out, np.stack(want, axis=1), rtol=1e-4, atol=1e-4)


@pytest.mark.ray
def test_onnx_forecaster_through_the_reward_and_forecast_actors(tmp_path, ray_session):
    """The reward actors and the forecast actors receive the ONNX forecaster's spec (its session
    cannot be pickled), open their own, and score / forecast exactly as the forecaster opened in
    this process."""
    import ray

    from actors.forecast import run_forecasts
    from actors.pool import CandidatePool
    from align_rl.alignment.candidates import score_candidates
    from align_rl.models.loading import forecaster_spec

    from .test_actors import _tasks
    from .tiny_align import LAT, LON, tiny_world

    onnx_path = write_fengwu_onnx(tmp_path / "fc.onnx")
    cfg, ws, models, truth, bg, _ = tiny_world(tmp_path, [
        "forecaster.kind=onnx", f"forecaster.path={onnx_path}", *write_statistics(tmp_path)])
    models.forecaster = forecaster_spec(cfg, ws, models.normalizer).open("cpu")
    tasks = _tasks(cfg, truth, bg, models, 2)
    pool = CandidatePool(cfg, models, LAT, LON)
    try:
        drawn = ray.get(pool.samplers[0].draw.remote(tasks, 0))
        scores = ray.get(pool.rewarders[0].score.remote(tasks, drawn))
    finally:
        pool.shutdown()
    here = score_candidates(models.forecaster, models.normalizer, LAT, LON, tasks, drawn, cfg.rewards)
    for got, want in zip(scores, here):
        assert set(got) == {"assim", "forecast", "phys"}
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    x = np.stack([d.fields[:2] for d in drawn])  # (2 tasks, 2 members, 69, 8, 16)
    batches = [(x[0], x[1]), (x[1], x[0])]
    out = {}
    run_forecasts(cfg, models.forecaster, batches, 3, on_result=out.__setitem__)
    for i, (p, c) in enumerate(batches):
        want = models.forecaster.rollout(torch.from_numpy(p), torch.from_numpy(c), 3)[:, -1].numpy()
        # another process's session: float32 sums in another order, over 3 steps
        np.testing.assert_allclose(out[i], want, rtol=1e-4, atol=1e-4)


def test_each_actor_s_session_runs_on_its_own_device(tmp_path):
    """A process holding a GPU asks onnxruntime for the CUDA execution provider on that GPU, then
    the CPU; a build of onnxruntime without CUDA runs the session on the CPU."""
    import onnxruntime as ort

    from align_rl.models.forecaster import OnnxForecaster
    from align_rl.models.loading import _onnx_providers

    cuda = _onnx_providers(torch.device("cuda", 1))
    assert cuda == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert _onnx_providers(torch.device("cpu")) == ["CPUExecutionProvider"]
    fc = OnnxForecaster(write_fengwu_onnx(tmp_path / "fc.onnx"), None, providers=cuda)
    want = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers() else []
    assert fc.session.get_providers() == want + ["CPUExecutionProvider"]


# ----------------------------------------------------------------------------- the main job


PLUGIN = '''
"""A user's module outside align_rl: a reward and a guidance method, registered by name."""
import numpy as np
import torch

from align_rl.alignment.rewards import register_reward
from align_rl.diffusion.guidance import GuidanceMethod, register_guidance


@register_reward("smooth")
def smooth_reward(ctx):
    """Minus the mean squared zonal difference of each candidate (normalised fields)."""
    d = ctx.analyses.double() - torch.roll(ctx.analyses.double(), 1, dims=-1)
    return -(d ** 2).mean(dim=(1, 2, 3)).numpy()


class HalfRepaint:
    """Repaint's increment, halved: z <- z + 0.5 mu(s) [E(m*y + (1-m)*x0) - E(x0)]."""

    def __init__(self, codec, obs):
        from align_rl.diffusion.guidance import LatentRepaint

        self.inner = LatentRepaint(codec, obs)

    def __call__(self, z, ctx):
        return z + 0.5 * (self.inner(z, ctx) - z)


register_guidance(GuidanceMethod("halfrepaint", "HalfRepaint",
                                 lambda codec, obs, cfg, **kw: HalfRepaint(codec, obs)))
'''


def _run_job(tmp_path: Path, extra: list[str], env_extra: dict | None = None) -> tuple[Path, str]:
    world = write_tiny_world(tmp_path / "world.zarr")
    run = tmp_path / "run"
    args = OVERRIDES + TRAIN_OVERRIDES + [f"data.path={world}", f"run.workdir={run}", "pairs.variants=[M]",
                                          *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", WANDB_MODE="offline", PYTHONUNBUFFERED="1", **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "align_rl.train", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    log = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, log[-4000:]
    return run, log


def _check_report(run: Path, methods: tuple[str, ...]) -> dict:
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["pairs_total"] > 0 and summary["variants"]["M"]["step"] == 4
    report = (run / "eval" / "report.md").read_text()
    assert "Alignment against the paper" in report
    for m in methods:
        assert m in report
    return summary


@pytest.mark.slow  # a few minutes; .ci/run runs it with the cluster tests
def test_main_job_with_a_fengwu_onnx_forecaster_and_a_plugin_reaches_its_report(tmp_path):
    """The reward and forecast actors and the learner's validation open the ONNX model from its
    spec (a session cannot be pickled); the plugin, imported by the driver, the actors and the
    Train workers, adds the reward ``smooth`` (a pairs column, ranking) and the guidance method
    ``halfrepaint`` (drawn candidates and an evaluated row)."""
    onnx_path = write_fengwu_onnx(tmp_path / "fc.onnx")
    plug = tmp_path / "plugins"
    plug.mkdir()
    (plug / "my_align_plugin.py").write_text(textwrap.dedent(PLUGIN))
    pythonpath = os.pathsep.join([str(plug), os.environ.get("PYTHONPATH", "")])
    run, log = _run_job(tmp_path, [
        "forecaster.kind=onnx", f"forecaster.path={onnx_path}", *write_statistics(tmp_path),
        "run.plugins=[my_align_plugin]", "rewards.names=[assim, forecast, phys, smooth]",
        "rewards.weights={assim: 1, forecast: 1, phys: 1, smooth: 1}",
        "pairs.guidance=halfrepaint", "guidance.methods=[obsfree, halfrepaint]",
        "dpo.val_every=2", "dpo.val_backgrounds=1", "dpo.val_members=2"],
        {"PYTHONPATH": pythonpath})
    _check_report(run, ("Align-HalfRepaint-M",))
    from align_rl.io.pair_store import PairStore

    st = PairStore.open(run / "pairs.zarr", mode="r")
    assert "smooth" in st.reward_names
    metrics = [json.loads(x) for x in next((run / "dpo").glob("M-*/metrics.jsonl")).read_text().splitlines()]
    assert any("val/reward_gain" in m for m in metrics)  # the Train worker opened the ONNX model


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_main_job_with_a_torch_file_forecaster_reaches_its_report(tmp_path, fmt):
    path = tmp_path / ("fc.pt" if fmt == "torchscript" else "fc.pt2")
    # a torch file has no grid of its own here: it runs on the model grid (8 × 16)
    example = torch.zeros(2, 2 * N_CHANNELS, 8, 16)
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(FengWuLike()), str(path))
    else:
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.export.save(torch.export.export(FengWuLike(), (example,), dynamic_shapes=({0: batch},)), str(path))
    # latitude flipped as FengWu's, with its own statistics
    run, _ = _run_job(tmp_path, ["forecaster.kind=torch", f"forecaster.path={path}",
                                 "forecaster.lat_north_to_south=true", *write_statistics(tmp_path),
                                 "dpo.val_every=2", "dpo.val_backgrounds=1", "dpo.val_members=2"])
    _check_report(run, ("Align-DPS-M",))


@pytest.mark.slow
def test_main_job_with_onnx_and_sampling_in_the_analysis_actor(tmp_path):
    onnx_path = write_fengwu_onnx(tmp_path / "fc.onnx", batch=None)
    run, _ = _run_job(tmp_path, ["forecaster.kind=onnx", f"forecaster.path={onnx_path}",
                                 *write_statistics(tmp_path), "eval.sampling=actor"])
    _check_report(run, ("Align-DPS-M",))


# ----------------------------------------------------------------------------- registries and plugins


def test_a_guidance_method_is_one_registration(monkeypatch):
    """A method registered once is accepted by the config, built by make_guidance, labelled in the
    report and asked for observations only when it reads them."""
    from align_rl.config import load_config
    from align_rl.diffusion import guidance
    from align_rl.errors import ConfigError, InputError

    built = []
    m = guidance.GuidanceMethod("nudge", "Nudge", lambda codec, obs, g, **kw: built.append((obs, g)) or "g")
    monkeypatch.setitem(guidance.METHODS, "nudge", m)
    cfg = load_config(overrides=["guidance.methods=[obsfree, nudge]", "pairs.guidance=nudge"])
    assert guidance.make_guidance("nudge", None, "obs", cfg.guidance) == "g"
    assert built == [("obs", cfg.guidance)]
    with pytest.raises(InputError, match="needs observations"):
        guidance.make_guidance("nudge", None, None)
    assert guidance.label("nudge") == "Nudge" and guidance.label("dps") == "DPS"
    assert guidance.needs_obs("nudge") and not guidance.needs_obs("obsfree")
    with pytest.raises(ConfigError, match="run.plugins"):
        guidance.make_guidance("ensrf", None, "obs")


def test_plugins_are_imported_once_and_bad_ones_name_the_fix(tmp_path, monkeypatch):
    from align_rl import plugins
    from align_rl.alignment import rewards
    from align_rl.config import load_config
    from align_rl.errors import ConfigError

    (tmp_path / "my_rewards_plugin.py").write_text(
        "from align_rl.alignment.rewards import register_reward\n"
        "COUNT = globals().get('COUNT', 0) + 1\n"
        "register_reward('ones')(lambda ctx: [1.0] * ctx.analyses.shape[0])\n")
    (tmp_path / "broken_plugin.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_loaded", [])
    try:
        with pytest.raises(ConfigError, match="unknown reward"):  # unknown until the plugin is named
            rewards.check_names(["assim", "ones"])
        cfg = load_config(overrides=["run.plugins=[my_rewards_plugin]", "rewards.names=[assim, ones]",
                                     "rewards.weights={assim: 1, ones: 1}", "pairs.variants=[M]"])
        assert cfg.rewards.names == ["assim", "ones"] and plugins.loaded() == ["my_rewards_plugin"]
        rewards.check_names(cfg.rewards.names, cfg.rewards.weights)
        import my_rewards_plugin

        plugins.load(["my_rewards_plugin"])
        assert my_rewards_plugin.COUNT == 1
        with pytest.raises(ConfigError, match="PYTHONPATH"):
            plugins.load(["no_such_plugin_module"])
        with pytest.raises(ConfigError, match="not a module name"):
            plugins.load([str(tmp_path / "my_rewards_plugin.py")])
        with pytest.raises(ModuleNotFoundError, match="not_a_module_anywhere"):  # the plugin's own error
            plugins.load(["broken_plugin"])
    finally:
        rewards.REWARDS.pop("ones", None)
