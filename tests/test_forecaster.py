"""Forecasters: the emulator's residual periodic step, ONNX (FengWu interface) and torch modules
checked against a known linear map computed by hand in physical units."""

import numpy as np
import pytest
import torch
from torch import nn

from align_rl.io.checkpoints import save_model
from align_rl.config import load_config
from align_rl.errors import CheckpointError, ConfigError, InputError
from align_rl.models.forecaster import (EmulatorForecaster, OnnxForecaster, TorchForecaster,
                                        build_emulator)
from align_rl.models.loading import load_forecaster
from align_rl.io.normalization import Normalizer
from align_rl.workspace import Workspace

H, W = 8, 16


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class LinearStep(nn.Module):
    """Known map on the model's normalised, north-to-south fields:
    ``out[:69] = 0.5 x_curr + 0.25 x_prev + 0.1 · row``, plus 3 extra channels (ignored)."""

    def forward(self, x):
        prev, curr = x[:, :69], x[:, 69:]
        row = torch.arange(x.shape[-2], dtype=x.dtype).reshape(1, 1, -1, 1)
        nxt = 0.5 * curr + 0.25 * prev + 0.1 * row
        return torch.cat([nxt, prev[:, :3]], dim=1)


def _expected(prev_p, curr_p, norm, m_mean, m_std):
    """The same map by hand: project-normalised, latitude ascending, numpy."""
    phys = lambda x: x * norm.std[:, None, None] + norm.mean[:, None, None]
    to_m = lambda x: ((phys(x) - m_mean[:, None, None]) / m_std[:, None, None])[..., ::-1, :]
    row = np.arange(H, dtype=np.float64)[:, None]
    nxt_m = 0.5 * to_m(curr_p) + 0.25 * to_m(prev_p) + 0.1 * row
    nxt_phys = nxt_m[..., ::-1, :] * m_std[:, None, None] + m_mean[:, None, None]
    return (nxt_phys - norm.mean[:, None, None]) / norm.std[:, None, None]


@pytest.fixture()
def setup(tmp_path):
    rng = np.random.default_rng(0)
    norm = Normalizer(rng.normal(0, 5, 69), rng.uniform(0.5, 2, 69))
    m_mean = norm.mean + rng.normal(0, 1, 69)
    m_std = norm.std * rng.uniform(0.7, 1.4, 69)
    np.save(tmp_path / "mean.npy", m_mean)
    np.save(tmp_path / "std.npy", m_std)
    prev = rng.normal(size=(2, 69, H, W)).astype(np.float32)
    curr = rng.normal(size=(2, 69, H, W)).astype(np.float32)
    return tmp_path, norm, m_mean, m_std, prev, curr


def _export(path, dynamic: bool):
    kwargs = dict(input_names=["input"], output_names=["output"], opset_version=17, dynamo=False)
    if dynamic:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    torch.onnx.export(LinearStep(), (torch.zeros(1, 138, H, W),), str(path), **kwargs)


@pytest.mark.parametrize("dynamic", [True, False])
def test_onnx_forecaster_matches_hand_computation(setup, dynamic):
    tmp, norm, m_mean, m_std, prev, curr = setup
    onnx_path = tmp / "m.onnx"
    _export(onnx_path, dynamic)
    fc = OnnxForecaster(onnx_path, norm, tmp / "mean.npy", tmp / "std.npy", lat_north_to_south=True)
    out = fc.step(torch.from_numpy(prev), torch.from_numpy(curr)).numpy()
    ref = _expected(prev.astype(np.float64), curr.astype(np.float64), norm, m_mean, m_std)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # the rollout feeds (x_curr, x_next) back in
    roll = fc.rollout(torch.from_numpy(prev), torch.from_numpy(curr), 3).numpy()
    assert roll.shape == (2, 3, 69, H, W)
    r2 = _expected(curr.astype(np.float64), ref, norm, m_mean, m_std)
    np.testing.assert_allclose(roll[:, 1], r2, rtol=1e-4, atol=1e-4)


def test_torch_forecaster_same_map_and_differentiable(setup):
    tmp, norm, m_mean, m_std, prev, curr = setup
    fc = TorchForecaster(LinearStep(), norm, m_mean, m_std, lat_north_to_south=True)
    x = torch.from_numpy(curr).requires_grad_(True)
    out = fc.step(torch.from_numpy(prev), x)
    ref = _expected(prev.astype(np.float64), curr.astype(np.float64), norm, m_mean, m_std)
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    # d out / d x_curr = 0.5 (channel-wise factors cancel between the two conversions)
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.5))
    # without model statistics nor flip: the module sees project-normalised fields directly
    plain = TorchForecaster(LinearStep(), lat_north_to_south=False)
    got = plain.step(torch.from_numpy(prev), torch.from_numpy(curr))
    row = torch.arange(H, dtype=torch.float32).reshape(1, 1, -1, 1)
    torch.testing.assert_close(got, 0.5 * torch.from_numpy(curr) + 0.25 * torch.from_numpy(prev) + 0.1 * row)


def test_emulator_is_residual_periodic_and_rolls_out():
    net = build_emulator({"hidden": 8, "depth": 2}, (H, W))
    fc = EmulatorForecaster(net)
    prev, curr = torch.randn(2, 69, H, W), torch.randn(2, 69, H, W)
    torch.testing.assert_close(fc.step(prev, curr), curr)  # zero-initialised head: persistence
    torch.manual_seed(1)
    nn.init.normal_(net.head.weight, std=0.05)
    out = fc.step(prev, curr)
    assert (out - curr).abs().mean() > 1e-3
    # circular in longitude: rolling the inputs by 2 columns rolls the output
    rolled = fc.step(torch.roll(prev, 2, -1), torch.roll(curr, 2, -1))
    torch.testing.assert_close(rolled, torch.roll(out, 2, -1), atol=1e-5, rtol=1e-5)
    roll = fc.rollout(prev, curr, 3)
    assert roll.shape == (2, 3, 69, H, W)
    s1 = fc.step(prev, curr)
    s2 = fc.step(curr, s1)
    torch.testing.assert_close(roll[:, 1], s2)
    torch.testing.assert_close(roll[:, 2], fc.step(s1, s2))
    with pytest.raises(InputError):
        fc.step(prev, curr[:, :10])


def test_emulator_learns_advection():
    """A field moving one column east per step: the trained emulator beats persistence."""
    torch.manual_seed(0)
    net = build_emulator({"hidden": 16, "depth": 1}, (H, W))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    lon = torch.arange(W) * 2 * torch.pi / W

    def batch(n):
        ph = torch.rand(n, 1, 1, 1) * 2 * torch.pi  # one phase for all channels
        f = lambda k: torch.sin(lon - (k * 2 * torch.pi / W) + ph).expand(n, 69, H, W)
        return f(0), f(1), f(2)

    for _ in range(150):
        a, b, c = batch(16)
        loss = ((net(a, b) - c) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    a, b, c = batch(8)
    with torch.no_grad():
        err = ((net(a, b) - c) ** 2).mean()
    assert err < 0.1 * ((b - c) ** 2).mean()


def test_load_forecaster_by_kind(setup, tmp_path):
    tmp, norm, m_mean, m_std, prev, curr = setup
    cfg = load_config(overrides={"forecaster": {"hidden": 8, "depth": 1}, "run": {"workdir": str(tmp / "run")}})
    ws = Workspace.from_config(cfg)
    with pytest.raises(CheckpointError, match="pretrain"):
        load_forecaster(cfg, ws, norm)
    net = build_emulator(cfg.forecaster, (H, W))
    nn.init.normal_(net.head.weight, std=0.05)
    save_model(ws.final_checkpoint("forecaster"), net, "forecaster", cfg.forecaster)
    fc = load_forecaster(cfg, ws, norm)
    p, c = torch.from_numpy(prev), torch.from_numpy(curr)
    torch.testing.assert_close(fc.step(p, c), net(p, c))
    # a checkpoint of another architecture is refused
    cfg2 = load_config(overrides={"forecaster": {"hidden": 16, "depth": 1}, "run": {"workdir": str(tmp / "run")}})
    with pytest.raises(CheckpointError, match="hidden"):
        load_forecaster(cfg2, ws, norm)
    # onnx
    _export(tmp / "m.onnx", True)
    cfg3 = load_config(overrides={"data": {"grid": f"{H}x{W}"}, "vae": {"window": 2},
                                  "forecaster": {"kind": "onnx", "path": str(tmp / "m.onnx"),
                                                 "mean_path": str(tmp / "mean.npy"),
                                                 "std_path": str(tmp / "std.npy")}})
    out = load_forecaster(cfg3, ws, norm).step(p, c).numpy()
    np.testing.assert_allclose(out, _expected(prev.astype(np.float64), curr.astype(np.float64), norm, m_mean, m_std),
                               rtol=1e-4, atol=1e-4)
    # torch: an exported program (torch.export; a pickled module is refused, tests/test_security.py)
    example = torch.zeros(2, 138, H, W)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(LinearStep(), (example,), dynamic_shapes=({0: batch},)),
                      tmp / "m.pt2")
    cfg4 = load_config(overrides={"forecaster": {"kind": "torch", "path": str(tmp / "m.pt2"),
                                                 "mean_path": str(tmp / "mean.npy"),
                                                 "std_path": str(tmp / "std.npy")}})
    np.testing.assert_allclose(load_forecaster(cfg4, ws, norm).step(p, c).numpy(), out, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="forecaster.path"):
        load_forecaster(load_config(overrides={"forecaster": {"kind": "onnx"}}), ws, norm)


def test_bad_statistics_files(setup):
    tmp, norm, *_ = setup
    _export(tmp / "m.onnx", True)
    np.save(tmp / "short.npy", np.ones(5))
    with pytest.raises(InputError, match="69"):
        OnnxForecaster(tmp / "m.onnx", norm, tmp / "mean.npy", tmp / "short.npy")
    with pytest.raises(InputError, match="both"):
        OnnxForecaster(tmp / "m.onnx", norm, tmp / "mean.npy", None)
    with pytest.raises(CheckpointError, match="does not exist"):
        OnnxForecaster(tmp / "nope.onnx", norm)


# ------------------------------------------------------------------ FengWu on its own grid


class FengWuLike(nn.Module):
    """FengWu's interface on its own grid, rows north → south: ``(1, 138, H', W') → (1, 138, …)``,
    the first 69 channels ``0.6 x_curr + 0.3 x_prev + 0.02 · row`` (row 0 = the north pole), the
    rest copies (FengWu also returns more than the next state)."""

    def forward(self, x):
        prev, curr = x[:, :69], x[:, 69:]
        row = torch.arange(x.shape[-2], dtype=x.dtype).reshape(1, 1, -1, 1)
        return torch.cat([0.6 * curr + 0.3 * prev + 0.02 * row, curr], dim=1)


def _smooth(grid, B=2, seed=0):
    """Smooth normalised fields (B, 69, H, W) on a grid (latitude ascending)."""
    rng = np.random.default_rng(seed)
    la, lo = np.meshgrid(np.deg2rad(grid.lat), np.deg2rad(grid.lon), indexing="ij")
    a = rng.normal(size=(B, 69, 1, 1))
    b = rng.normal(size=(B, 69, 1, 1))
    return (a * np.sin(la) + b * np.cos(la) * np.sin(2 * lo + 0.3) + 0.2 * a * b).astype(np.float32)


def test_fengwu_onnx_on_its_own_pole_row_grid(tmp_path):
    """A tiny FengWu-like ONNX model on a 31 × 64 grid with pole rows (latitude 90 → −90), fixed
    batch 1, its own statistics, behind the 32 × 64 model grid."""
    from align_rl.io.grid import Grid, LatLonGrid
    from align_rl.models.forecaster import RegriddedForecaster
    from align_rl.io.regrid import regrid

    native, model = LatLonGrid(31, 64, poles=True), Grid(32, 64)
    torch.onnx.export(FengWuLike(), (torch.zeros(1, 138, 31, 64),), str(tmp_path / "fengwu.onnx"),
                      input_names=["input"], output_names=["output"], opset_version=17, dynamo=False)
    rng = np.random.default_rng(2)
    norm = Normalizer(rng.normal(0, 5, 69), rng.uniform(0.5, 2, 69))
    m_mean, m_std = norm.mean + rng.normal(0, 1, 69), norm.std * rng.uniform(0.7, 1.4, 69)
    np.save(tmp_path / "data_mean.npy", m_mean.reshape(69, 1, 1))  # FengWu ships (69, 1, 1)-like files
    np.save(tmp_path / "data_std.npy", m_std)
    cfg = load_config(overrides={"data": {"grid": "32x64"},
                                 "forecaster": {"kind": "onnx", "path": str(tmp_path / "fengwu.onnx"),
                                                "mean_path": str(tmp_path / "data_mean.npy"),
                                                "std_path": str(tmp_path / "data_std.npy")}})
    fc = load_forecaster(cfg, None, norm)
    assert isinstance(fc, RegriddedForecaster) and fc.native == native and fc.model == LatLonGrid.of(model)
    prev, curr = _smooth(model, seed=0), _smooth(model, seed=1)
    out = fc.rollout(torch.from_numpy(prev), torch.from_numpy(curr), 3).numpy()
    assert out.shape == (2, 3, 69, 32, 64)

    # by hand: up (bilinear), FengWu's normalisation, north → south, the map, and back down
    def up(x):
        return regrid(x.astype(np.float64), model, native, "linear")

    def to_m(x):  # project-normalised, ascending → model-normalised, north → south
        phys = x * norm.std[:, None, None] + norm.mean[:, None, None]
        return ((phys - m_mean[:, None, None]) / m_std[:, None, None])[..., ::-1, :]

    def from_m(y):
        phys = y[..., ::-1, :] * m_std[:, None, None] + m_mean[:, None, None]
        return (phys - norm.mean[:, None, None]) / norm.std[:, None, None]

    row = np.arange(31, dtype=np.float64)[:, None]
    p_, c_ = to_m(up(prev)), to_m(up(curr))
    want = []
    for _ in range(3):
        p_, c_ = c_, 0.6 * c_ + 0.3 * p_ + 0.02 * row
        want.append(regrid(from_m(c_), native, model, "conservative"))
    np.testing.assert_allclose(out, np.stack(want, axis=1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fc.step(torch.from_numpy(prev), torch.from_numpy(curr)),
                               torch.from_numpy(out[:, 0]), rtol=1e-5, atol=1e-5)
    # without the mapping the model refuses the model grid's fields
    inner = fc.inner
    with pytest.raises(InputError, match="runs on a"):
        inner.step(torch.from_numpy(prev), torch.from_numpy(curr))


def test_model_to_fengwu_grid_round_trip():
    """model grid → FengWu-like grid (bilinear) → model grid (conservative): constants exactly,
    smooth fields to 3 % of their range on 31 × 64 (2.2 % measured), closer on a finer native grid."""
    from align_rl.io.grid import Grid, LatLonGrid
    from align_rl.models.forecaster import RegriddedForecaster

    model = Grid(32, 64)
    errs = []
    for native in (LatLonGrid(31, 64, poles=True), LatLonGrid(121, 240, poles=True)):
        fc = RegriddedForecaster(None, model, native)
        const = torch.full((1, 69, 32, 64), 3.25)
        torch.testing.assert_close(fc.from_native(fc.to_native(const)), const)
        x = torch.from_numpy(_smooth(model, B=1, seed=4))
        up = fc.to_native(x)
        assert up.shape == (1, 69, *native.shape) and torch.isfinite(up).all()
        back = fc.from_native(up)
        errs.append(float((back - x).abs().max() / (x.amax() - x.amin())))
    assert errs[0] < 0.03 and errs[1] < errs[0] / 2.5, errs


class _Extrapolate:
    """A linear two-frame forecaster: ``x_next = 2 x_curr − x_prev`` (constant 6 h tendency)."""

    def rollout(self, x_prev, x_curr, steps):
        out = []
        for _ in range(steps):
            x_prev, x_curr = x_curr, 2 * x_curr - x_prev
            out.append(x_curr)
        return torch.stack(out, dim=1)


def test_first_frames_keep_the_background_tendency_for_every_member():
    """The shifted first frame x_b(t−6h) + (x_a − x_b) makes the forecast of an analysis the
    background's forecast plus the increment for a linear forecaster (hand result: x_a + n·(x_b −
    x_b(t−6h))); the unshifted frame x_b(t−6h) would add n·(x_a − x_b) on top."""
    from align_rl.evaluation.skill import forecast_from
    from align_rl.models.forecaster import first_frames

    g = torch.Generator().manual_seed(0)
    T, N, shape = 3, 4, (69, 4, 8)
    prev_b, x_b = torch.randn(T, *shape, generator=g), torch.randn(T, *shape, generator=g)
    x_a = x_b.unsqueeze(1) + 0.1 * torch.randn(T, N, *shape, generator=g)
    prev = first_frames(prev_b, x_b, x_a)
    assert prev.shape == x_a.shape
    f = forecast_from(_Extrapolate(), prev, x_a, 8)
    expected = x_a + 8 * (x_b - prev_b).unsqueeze(1)
    assert torch.allclose(f, expected, atol=1e-5)
    unshifted = forecast_from(_Extrapolate(), prev_b, x_a, 8)
    assert torch.allclose(unshifted, expected + 8 * (x_a - x_b.unsqueeze(1)), atol=1e-4)
    # no increment: the background's own frames; one background with a member axis in front
    assert torch.equal(first_frames(prev_b[0], x_b[0], x_b[0]), prev_b[0])
    assert first_frames(prev_b[0], x_b[0], x_a[0]).shape == (N, *shape)
    with pytest.raises(ValueError, match="do not match"):
        first_frames(prev_b, x_b, x_a[None])
