"""Point observations (docs/method.md §3.1): IODA-v2 files and CSV tables with stations between
grid points, at pressures between levels and next to the poles, through reading, quality control,
the interpolating operator and a DPS analysis, against hand-computed values."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from align_rl.diffusion.analysis import analyse
from align_rl.diffusion.guidance import LatentDPS
from align_rl.diffusion.sampler import StepContext
from align_rl.errors import InputError
from align_rl.io.grid import Grid
from align_rl.io.normalization import Normalizer
from align_rl.io.schema import N_CHANNELS, channel_index
from align_rl.observations.ioda import read_ioda, write_ioda
from align_rl.observations.operator import point_observations
from align_rl.observations.qc import background_check, reference_filter
from align_rl.observations.records import ObsRecords
from align_rl.observations.scores import departure_stats, omb_oma
from align_rl.observations.table import read_observations, read_table, write_table
from align_rl.observations.variables import G0
from align_rl.world.observations import Observations
from tests.analytic_models import GaussianPrior

GRID = Grid(8, 16)  # d = 22.5°: lat −78.75 … 78.75, lon 0 … 337.5
D = 22.5
T0 = np.datetime64("2005-01-01T00:00:00", "s")
TIMES = np.array([T0, T0 + np.timedelta64(6, "h")])
WINDOW = np.timedelta64(3, "h")


def _normalizer() -> Normalizer:
    """Plausible channel statistics, varying a little with the level."""
    mean = {"u10": 0.0, "v10": 0.0, "t2m": 280.0, "msl": 101000.0, "z": 5e4, "q": 5e-3, "u": 5.0,
            "v": 0.0, "t": 250.0}
    std = {"u10": 5.0, "v10": 5.0, "t2m": 15.0, "msl": 1000.0, "z": 1500.0, "q": 3e-3, "u": 10.0,
           "v": 10.0, "t": 10.0}
    from align_rl.io.schema import CHANNEL_INFO
    m = np.array([mean[c.var] for c in CHANNEL_INFO])
    s = np.array([std[c.var] * (1 + 0.02 * c.index) for c in CHANNEL_INFO])
    return Normalizer(m, s)


def _truth(norm: Normalizer) -> np.ndarray:
    """Physical states (2, 69, 8, 16) at TIMES."""
    x = np.random.default_rng(3).normal(size=(2, N_CHANNELS, *GRID.shape))
    return norm.denormalize(x)


class Identity:
    """Codec whose latent is the normalised field itself."""

    def encode(self, x):
        return x

    def decode(self, z):
        return z


# --------------------------------------------------------------------------- the hand computation
def _hand_nodes() -> list[dict[tuple[int, int, int], float]]:
    """The physical weights {(channel, i, j): w} of each observation of :func:`_records`, written out."""
    out = []
    # 1. airTemperature at 20°N 50°E, 550 hPa: rows 4 (11.25°) and 5, a = 8.75/22.5; columns 2 (45°)
    #    and 3, b = 5/22.5; levels 500 and 600 hPa, a_v = ln(550/500) / ln(600/500)
    a, b, av = 8.75 / D, 5 / D, math.log(550 / 500) / math.log(600 / 500)
    hz = {(4, 2): (1 - a) * (1 - b), (4, 3): (1 - a) * b, (5, 2): a * (1 - b), (5, 3): a * b}
    n1 = {}
    for lev, wv in (("t500", 1 - av), ("t600", av)):
        for (i, j), w in hz.items():
            n1[(channel_index(lev), i, j)] = wv * w
    out.append(n1)
    # 2. windEastward at the same place, 700 hPa (a level): one level, weight 1
    out.append({(channel_index("u700"), i, j): w for (i, j), w in hz.items()})
    # 3. geopotentialHeight at 85°S 100°E, 350 hPa: between row 0 (−78.75°) and the same row across
    #    the pole (280°E); c = 6.25 / 22.5; columns 4 (90°), 5 and 12 (270°), 13; b = 10/22.5;
    #    levels 300 and 400 hPa
    c, b, av = 6.25 / D, 10 / D, math.log(350 / 300) / math.log(400 / 300)
    hs = {(0, 4): (1 - c) * (1 - b), (0, 5): (1 - c) * b, (0, 12): c * (1 - b), (0, 13): c * b}
    n3 = {}
    for lev, wv in (("z300", 1 - av), ("z400", av)):
        for (i, j), w in hs.items():
            n3[(channel_index(lev), i, j)] = wv * w
    out.append(n3)
    # 4. airTemperature at 20°N 50°E, 850 hPa (a level) – the gross error of the QC test
    out.append({(channel_index("t850"), i, j): w for (i, j), w in hz.items()})
    # 5. surface airTemperature (t2m) at 85°N 10°E: row 7 (78.75°) at 10°E (columns 0, 1) and across
    #    the pole at 190°E (columns 8, 9); c = 6.25/22.5, b = 10/22.5
    c, b = 6.25 / D, 10 / D
    hn = {(7, 0): (1 - c) * (1 - b), (7, 1): (1 - c) * b, (7, 8): c * (1 - b), (7, 9): c * b}
    out.append({(channel_index("t2m"), i, j): w for (i, j), w in hn.items()})
    # 6. windNorthward (v10) at the same place: the across-pole nodes change sign
    out.append({(channel_index("v10"), i, j): (-w if j >= 8 else w) for (i, j), w in hn.items()})
    # 7. mean sea-level pressure at 40°S 350°E: rows 1 (−56.25°), 2, a = 16.25/22.5; columns 15
    #    (337.5°) and 0 (wrapping), b = 12.5/22.5
    a, b = 16.25 / D, 12.5 / D
    out.append({(channel_index("msl"), 1, 15): (1 - a) * (1 - b), (channel_index("msl"), 1, 0): (1 - a) * b,
                (channel_index("msl"), 2, 15): a * (1 - b), (channel_index("msl"), 2, 0): a * b})
    return out


def _hand_value(nodes: dict, x: np.ndarray) -> float:
    return float(sum(w * x[c, i, j] for (c, i, j), w in nodes.items()))


# observation: (file, time offset h, lat, lon, pressure Pa, IODA name, offset from H(truth), error)
SPEC = [
    ("ioda", 0.0, 20.0, 50.0, 55000.0, "airTemperature", 0.4, 1.0),
    ("ioda", 0.0, 20.0, 50.0, 70000.0, "windEastward", -1.0, 2.0),
    ("ioda", 0.0, -85.0, 100.0, 35000.0, "geopotentialHeight", 15.0 * G0, 12.0 * G0),
    ("ioda", 0.0, 20.0, 50.0, 85000.0, "airTemperature", 30.0, 1.0),  # gross error
    ("csv", 1.0, 85.0, 10.0, np.nan, "airTemperature", -0.5, 1.5),
    ("csv", 7.0, 85.0, 10.0, np.nan, "windNorthward", 0.8, 2.5),  # in the 06 UTC window
    ("csv", -2.5, -40.0, 350.0, np.nan, "pressureReducedToMeanSeaLevel", 60.0, 100.0),
]
ROW = [0, 0, 0, 0, 0, 1, 0]


def _records(truth: np.ndarray) -> tuple[ObsRecords, ObsRecords, list[float]]:
    """Upper-air (IODA) and surface (CSV) records: hand value at the truth + offset; plus one
    observation at 12 UTC outside both windows. Returns the hand values H(truth) too."""
    nodes = _hand_nodes()
    parts = {"ioda": [], "csv": []}
    hand = []
    for k, (f, dt, la, lo, p, name, off, err) in enumerate(SPEC):
        h = _hand_value(nodes[k], truth[ROW[k]])
        hand.append(h)
        parts[f].append((T0 + np.timedelta64(int(dt * 3600), "s"), la, lo, p, name, h + off, err, f"st{k}"))
    parts["csv"].append((T0 + np.timedelta64(12, "h"), 0.0, 0.0, np.nan, "airTemperature", 280.0, 1.0, "late"))

    def rec(rows):
        t, la, lo, p, v, y, e, s = map(np.array, zip(*rows))
        return ObsRecords(t, la, lo, p, v, y, e, s).check()

    return rec(parts["ioda"]), rec(parts["csv"]), hand


@pytest.fixture
def files(tmp_path):
    norm = _normalizer()
    truth = _truth(norm)
    up, sf, hand = _records(truth)
    nc = write_ioda(up, tmp_path / "sondes.nc")
    csv = write_table(sf, tmp_path / "surface.csv")
    return norm, truth, nc, csv, hand


def _read_all(nc, csv) -> ObsRecords:
    return ObsRecords.concat([read_ioda(nc), read_table(csv)])


def _spec_order(rec: ObsRecords) -> list[int]:
    """The SPEC index of each record (files and windows reorder them)."""
    out = []
    for la, lo, p, v in zip(rec.lat, rec.lon, rec.pressure, rec.variable):
        out.append(next(k for k, s in enumerate(SPEC) if np.isclose(s[2], la) and np.isclose(s[3], lo)
                        and s[5] == v and (np.isnan(s[4]) and np.isnan(p) or np.isclose(s[4], p))))
    return out


def test_files_read_back_in_state_units(files):
    norm, truth, nc, csv, hand = files
    with h5py.File(nc) as f:  # the IODA-v2 layout
        assert {"MetaData", "ObsValue", "ObsError", "PreQC"} <= set(f)
        assert f["ObsValue/geopotentialHeight"].attrs["units"] in (b"m", "m")
        assert f["MetaData/pressure"].attrs["units"] in (b"Pa", "Pa")
    up = read_ioda(nc)
    assert sorted(up.counts().items()) == [("airTemperature", 2), ("geopotentialHeight", 1),
                                           ("windEastward", 1)]
    z = up.variable == "geopotentialHeight"
    assert up.value[z][0] == pytest.approx(hand[2] + 15 * G0, rel=1e-6)  # height × g0
    assert up.error[z][0] == pytest.approx(12 * G0, rel=1e-6)
    sf = read_observations(csv)
    assert len(sf) == 4 and np.isnan(sf.pressure).all()
    assert set(sf.state_var) == {"t2m", "v10", "msl"}


def test_operator_matches_the_hand_computation(files):
    norm, truth, nc, csv, hand = files
    obs = point_observations(_read_all(nc, csv), TIMES, WINDOW, GRID.lat, GRID.lon, norm)
    k = _spec_order(obs.records)
    assert obs.n_obs == 7 and sorted(k) == list(range(7))  # the 12 UTC one is in no window
    assert obs.row.tolist() == [ROW[i] for i in k]
    xn = torch.as_tensor(norm.normalize(truth), dtype=torch.float64)
    hx = obs.physical(obs.apply(xn).double()).numpy()
    np.testing.assert_allclose(hx, np.array(hand)[k], rtol=1e-5, atol=1e-3)
    y = obs.physical(obs.values.double()).numpy()
    np.testing.assert_allclose(y - hx, [SPEC[i][6] for i in k], rtol=1e-4, atol=2e-3)
    # normalised σ_o: σ_o / Σ_j |w_j| s_j
    s_o = np.array([sum(abs(w) * norm.std[c] for (c, _, _), w in nd.items()) for nd in _hand_nodes()])
    np.testing.assert_allclose(obs.variance.numpy(), (np.array([SPEC[i][7] for i in k]) / s_o[k]) ** 2,
                               rtol=1e-5)


def test_the_pole_is_continuous_and_wind_turns_over():
    """At the pole a scalar is the mean of the two opposite points; approaching it from both
    longitudes gives the same value; a wind component changes sign across."""
    norm = Normalizer(np.zeros(N_CHANNELS), np.ones(N_CHANNELS))
    x = torch.randn(1, N_CHANNELS, *GRID.shape, dtype=torch.float64)
    t = np.full(3, T0)
    rec = ObsRecords(t, [90.0, 90.0, 90.0], [0.0, 180.0, 0.0], [np.nan] * 3,
                     ["airTemperature", "airTemperature", "windEastward"], [0.0] * 3, [1.0] * 3)
    obs = point_observations(rec, T0, WINDOW, GRID.lat, GRID.lon, norm)
    hx = obs.apply(x)
    it, iu = channel_index("t2m"), channel_index("u10")
    assert hx[0].item() == pytest.approx(0.5 * (x[0, it, 7, 0] + x[0, it, 7, 8]).item())
    assert hx[1].item() == pytest.approx(hx[0].item())
    assert hx[2].item() == pytest.approx(0.5 * (x[0, iu, 7, 0] - x[0, iu, 7, 8]).item())


def test_adjoint_matches_autograd(files):
    norm, truth, nc, csv, _ = files
    obs = point_observations(_read_all(nc, csv), TIMES, WINDOW, GRID.lat, GRID.lon, norm)
    g = torch.Generator().manual_seed(0)
    for shape in ((2, N_CHANNELS, 8, 16), (2, 3, N_CHANNELS, 8, 16)):
        x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
        hx = obs.apply(x)
        r = torch.randn(hx.shape, generator=g, dtype=torch.float64)
        (grad,) = torch.autograd.grad((hx * r).sum(), x)
        adj = obs.adjoint(r)
        torch.testing.assert_close(adj, grad)
        # dot-product test <H x, r> = <x, Hᵀ r>
        assert (hx * r).sum().item() == pytest.approx((x * adj).sum().item(), rel=1e-10)


def test_on_grid_points_it_is_the_mask_operator():
    """Observations at grid points and levels: H̃ picks the normalised values, and DPS's
    likelihood equals the one of the gridded mask observations with the same σ."""
    norm = _normalizer()
    x = torch.randn(2, N_CHANNELS, *GRID.shape, generator=torch.Generator().manual_seed(4))
    pts = [(0, "t", 500, 3, 5), (0, "z", 850, 0, 15), (1, "u", 50, 7, 0), (1, "t2m", None, 2, 9)]
    mask = torch.zeros_like(x)
    t, la, lo, p, v, y, e = [], [], [], [], [], [], []
    for b, var, lev, i, j in pts:
        c = channel_index(f"{var}{lev}" if lev else var)
        mask[b, c, i, j] = 1
        yn = x[b, c, i, j].item() + 0.3
        t.append(TIMES[b]); la.append(GRID.lat[i]); lo.append(GRID.lon[j])
        p.append(lev * 100.0 if lev else np.nan)
        name = {"t": "airTemperature", "z": "geopotentialHeight", "u": "windEastward", "t2m": "airTemperature"}[var]
        phys = yn * norm.std[c] + norm.mean[c]
        err = 0.2 * norm.std[c]  # σ̃ = 0.2 everywhere
        if var == "z":
            phys, err = phys / G0, err / G0
        y.append(phys); e.append(err); v.append(name)
    rec = ObsRecords(t, la, lo, p, v, y, e)
    from align_rl.observations.variables import VARIABLES, to_state_units
    for k in range(len(rec)):  # the records hold state units
        rec.value[k], rec.error[k] = to_state_units(VARIABLES[rec.variable[k]], rec.value[k], rec.error[k])
    obs = point_observations(rec.check(), TIMES, WINDOW, GRID.lat, GRID.lon, norm)
    hx = obs.apply(x)
    picked = torch.stack([x[b, channel_index(f"{var}{lev}" if lev else var), i, j] for b, var, lev, i, j in pts])
    torch.testing.assert_close(hx, picked)
    torch.testing.assert_close(obs.residual(x), torch.full((4,), 0.3), atol=1e-4, rtol=0)
    grid_obs = Observations(mask * (x + 0.3), mask, sigma_o=0.2, r_floor=1e-6)
    prior = GaussianPrior(a=1.0, s=0.5)
    z = torch.randn(4, N_CHANNELS, *GRID.shape, generator=torch.Generator().manual_seed(5))
    z_b = x.repeat_interleave(2, 0)
    ctx = StepContext(eps_fn=prior, z_b=z_b, members=2, t=0.5, s=0.45, step=0, steps=10,
                      z0_hat=torch.zeros_like(z))
    for lik in ("norm", "gaussian"):
        lp = LatentDPS(Identity(), obs, zeta=1.0, likelihood=lik).per_sample_loss(z, ctx)
        lg = LatentDPS(Identity(), grid_obs, zeta=1.0, likelihood=lik).per_sample_loss(z, ctx)
        torch.testing.assert_close(lp, lg, rtol=1e-4, atol=1e-4)


def test_qc_rejects_the_gross_error_and_counts_per_variable(files):
    norm, truth, nc, csv, _ = files
    obs = point_observations(_read_all(nc, csv), TIMES, WINDOW, GRID.lat, GRID.lon, norm)
    xb = torch.as_tensor(norm.normalize(truth), dtype=torch.float32)
    kept, rep = background_check(obs, xb, k=4.0, sigma_b=0.1)
    assert kept.n_obs == 6
    assert rep.rejected == {"t": 1, "u": 0, "z": 0, "t2m": 0, "v10": 0, "msl": 0}
    assert rep.checked == {"t": 2, "u": 1, "z": 1, "t2m": 1, "v10": 1, "msl": 1}
    assert "background t: rejected 1 of 2" in rep.lines()
    # the 30 K departure is > k·sqrt(σ̃_o² + σ̃_b²); the 0.4 K one is not (hand: normalised by s_o)
    # the paper's filter against the truth: |d| / s_o > k; s_o of the 550 hPa temperature is the
    # interpolated std of t500/t600, 0.4 K / s_o ≈ 0.018 < 0.05 (kept), the 60 Pa msl: 60 / 2 = 30 > 0.05
    s_t = sum(abs(w) * norm.std[c] for (c, _, _), w in _hand_nodes()[0].items())
    assert 0.4 / s_t < 0.05
    kept2, rep2 = reference_filter(kept, xb, k=0.05)
    assert rep2.rejected["msl"] == 1 and rep2.rejected["t"] == 0
    assert kept2.n_obs == kept.n_obs - rep2.total_rejected


def test_dps_analysis_matches_the_kalman_posterior_at_the_observations(files):
    """Linear-Gaussian case: prior z | z_b ~ N(z_b, s²) in normalised field space (identity codec),
    observations through the hand-built H̃ (n × 8832 dense, only here): the DPS ensemble mean at the
    observations lies within 15 % of the prior→posterior distance of the exact Kalman mean."""
    norm, truth, nc, csv, _ = files
    obs = point_observations(_read_all(nc, csv), TIMES, WINDOW, GRID.lat, GRID.lon, norm)
    obs, _ = background_check(obs, torch.as_tensor(norm.normalize(truth), dtype=torch.float32), k=4.0,
                              sigma_b=0.1)
    xb_all = torch.as_tensor(norm.normalize(truth), dtype=torch.float32) + 0.5 * torch.randn(
        2, N_CHANNELS, *GRID.shape, generator=torch.Generator().manual_seed(6))
    s = 0.5
    prior = GaussianPrior(a=1.0, s=s)
    an = analyse(Identity(), prior, xb_all[:1], obs[0], "dps",
                 {"steps": 48, "corrections": 1, "tau": 0.01, "members": 300},
                 {"dps_zeta": 0.005, "dps_likelihood": "gaussian", "dps_gamma": 0.0},
                 generator=torch.Generator().manual_seed(7))
    o = obs[0]
    # the hand-built normalised operator of the row-0 observations that passed QC, in their order
    nodes = [_hand_nodes()[k] for k in _spec_order(o.records)]
    assert len(nodes) == 5 and 3 not in _spec_order(o.records)
    Hn = np.zeros((len(nodes), N_CHANNELS * GRID.nlat * GRID.nlon))
    for k, nd in enumerate(nodes):
        so = sum(abs(w) * norm.std[c] for (c, _, _), w in nd.items())
        for (c, i, j), w in nd.items():
            Hn[k, (c * GRID.nlat + i) * GRID.nlon + j] += w * norm.std[c] / so
    xb = xb_all[0].double().numpy().reshape(-1)
    y, R = o.values.double().numpy(), np.diag(o.variance.double().numpy())
    gain = s**2 * Hn.T @ np.linalg.inv(s**2 * Hn @ Hn.T + R)
    pm = xb + gain @ (y - Hn @ xb)
    h_mean = Hn @ an.mean[0].double().numpy().reshape(-1)
    dist = np.linalg.norm(Hn @ pm - Hn @ xb)
    assert np.linalg.norm(h_mean - Hn @ pm) < 0.15 * dist
    st = omb_oma(o, xb_all[:1], an.mean)
    for v in st["O-B"]:
        assert st["O-A"][v]["chi2"] < st["O-B"][v]["chi2"]


def test_repaint_projects_to_the_nearest_node_with_representativeness_error(files):
    norm, truth, nc, csv, _ = files
    obs = point_observations(_read_all(nc, csv), TIMES, WINDOW, GRID.lat, GRID.lon, norm)[0]
    xb = torch.as_tensor(norm.normalize(truth[:1]), dtype=torch.float64)
    g = obs.to_grid(xb)
    # observation 2 (u at 20°N 50°E, 700 hPa): nearest node (4, 2) (weight (1 − a)(1 − b) the largest)
    c = channel_index("u700")
    assert g.mask[0, c, 4, 2] == 1 and g.mask[0, c].sum() == 1
    hx = _hand_value(_hand_nodes()[1], truth[0])
    node = truth[0, c, 4, 2]
    v_phys = node + (hx - 1.0 - hx)  # x_b[node] + (y − H(x_b)), y = H(truth) − 1 and x_b = truth
    assert g.values[0, c, 4, 2].item() == pytest.approx((v_phys - norm.mean[c]) / norm.std[c], rel=1e-5)
    var = (2.0**2 + (hx - node) ** 2) / norm.std[c] ** 2
    assert g.variance[0, c, 4, 2].item() == pytest.approx(var, rel=1e-4)
    an = analyse(Identity(), GaussianPrior(a=1.0, s=0.5), xb.float(), obs, "repaint",
                 {"steps": 4, "corrections": 0, "tau": 0.01, "members": 2},
                 generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(an.fields).all()


def test_departure_stats_by_hand(files):
    norm, truth, nc, csv, _ = files
    obs = point_observations(_read_all(nc, csv), TIMES, WINDOW, GRID.lat, GRID.lon, norm)
    xt = torch.as_tensor(norm.normalize(truth), dtype=torch.float64)
    st = departure_stats(obs, xt)
    assert st["t"]["n"] == 2
    assert st["t"]["bias"] == pytest.approx((0.4 + 30.0) / 2, rel=1e-4)
    assert st["t"]["rms"] == pytest.approx(math.sqrt((0.4**2 + 30.0**2) / 2), rel=1e-4)
    assert st["msl"]["chi2"] == pytest.approx((60.0 / 100.0) ** 2, rel=1e-3)


# --------------------------------------------------------------------------- bad files
def _good_ioda(tmp_path):
    norm = _normalizer()
    up, _, _ = _records(_truth(norm))
    return write_ioda(up, tmp_path / "good.nc")


def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)
    return path


def _set(name, k, value):
    def fn(f):
        d = f[name][...]
        d[k] = value
        f[name][...] = d
    return fn


BAD_IODA = [
    ("missing group", lambda f: f.__delitem__("ObsError"), ["ObsError", "missing"]),
    ("unknown variable", lambda f: f.move("ObsValue/windEastward", "ObsValue/brightnessTemperature"),
     ["ObsValue/brightnessTemperature", "unknown"]),
    ("station pressure", lambda f: f.move("ObsValue/windEastward", "ObsValue/stationPressure"),
     ["stationPressure", "pressureReducedToMeanSeaLevel"]),
    ("NaN value", _set("ObsValue/airTemperature", 0, np.nan), ["ObsValue/airTemperature", "NaN"]),
    ("latitude beyond 90", _set("MetaData/latitude", 0, 95.0), ["MetaData/latitude", "±90"]),
    ("pressure above the top level", _set("MetaData/pressure", 0, 2000.0), ["MetaData/pressure", "outside"]),
    ("pressure below the bottom level", _set("MetaData/pressure", 0, 110000.0), ["MetaData/pressure", "outside"]),
    ("wrong unit", lambda f: f["ObsValue/airTemperature"].attrs.__setitem__("units", "m"),
     ["ObsValue/airTemperature", "'m'", "K"]),
    ("missing unit", lambda f: f["ObsError/windEastward"].attrs.__delitem__("units"),
     ["ObsError/windEastward", "units"]),
    ("missing error variable", lambda f: f.__delitem__("ObsError/geopotentialHeight"),
     ["ObsError/geopotentialHeight"]),
]
"""The bad IODA files of the bad-input table: (case, edit, words the error names)."""


@pytest.mark.parametrize("case,edit,words", BAD_IODA, ids=[c[0] for c in BAD_IODA])
def test_bad_ioda_files_are_refused_by_name(tmp_path, case, edit, words):
    path = _edit(_good_ioda(tmp_path), edit)
    with pytest.raises(InputError) as exc:
        read_ioda(path)
    for w in words:
        assert w in str(exc.value), (case, str(exc.value))


BAD_CSV = [
    ("missing column", lambda t: t.replace("error,", "err,"), ["error"]),
    ("NaN value", lambda t: t.replace(",-0.5", ",nan").replace(",281.", ",nan"), ["value", "NaN"]),
    ("unknown variable", lambda t: t.replace("windNorthward", "windSpeed"), ["windSpeed", "unknown"]),
    ("wrong unit", lambda t: t.replace(",Pa", ",K"), ["units", "pressureReducedToMeanSeaLevel", "'K'"]),
    ("latitude beyond 90", lambda t: t.replace(",85.0,", ",-91.0,", 1), ["latitude", "±90"]),
]
"""The bad tables of the bad-input table."""


@pytest.mark.parametrize("case,edit,words", BAD_CSV, ids=[c[0] for c in BAD_CSV])
def test_bad_tables_are_refused_by_name(tmp_path, case, edit, words):
    norm = _normalizer()
    _, sf, _ = _records(_truth(norm))
    sf.value[0] = -0.5  # a value the edit can find
    path = write_table(sf, tmp_path / "t.csv")
    text = path.read_text()
    new = edit(text)
    assert new != text, case
    path.write_text(new)
    with pytest.raises(InputError) as exc:
        read_table(path)
    for w in words:
        assert w in str(exc.value), (case, str(exc.value))


def test_surface_humidity_and_upper_air_msl_are_refused():
    t = np.full(1, T0)
    with pytest.raises(InputError, match="needs a pressure"):
        ObsRecords(t, [0.0], [0.0], [np.nan], ["specificHumidity"], [1e-3], [1e-4]).check()
    with pytest.raises(InputError, match="surface variable"):
        ObsRecords(t, [0.0], [0.0], [50000.0], ["pressureReducedToMeanSeaLevel"], [1e5], [100.0]).check()


def test_assim_obs_reward_ranks_candidates_by_their_fit_to_the_observations(files):
    """Candidates x_n = truth + n·δ: the misfit grows with n, so the reward falls with n; it is the
    pairwise sigmoid of the hand-computed per-variable normalised RMS."""
    from align_rl.alignment.rewards import REWARDS, RewardContext, pairwise_sigmoid

    norm, truth, nc, csv, _ = files
    obs = point_observations(_read_all(nc, csv), TIMES, WINDOW, GRID.lat, GRID.lon, norm)[0]
    xt = torch.as_tensor(norm.normalize(truth[0]), dtype=torch.float32)
    delta = 0.2 * torch.randn(xt.shape, generator=torch.Generator().manual_seed(2))
    cands = torch.stack([xt + n * delta for n in range(3)])
    ctx = RewardContext(cands, xt, norm, GRID.lat, GRID.lon, observations=obs)
    r = REWARDS["assim_obs"](ctx)
    assert r[0] > r[1] > r[2]
    codes = sorted(set(obs.var_code.tolist()))
    err = np.zeros((3, len(codes)))
    for n in range(3):
        d = (obs.values - obs.apply(cands[n][None])).double() ** 2 / obs.variance.double()
        for k, c in enumerate(codes):
            err[n, k] = math.sqrt(d[obs.var_code == c].mean().item())
    np.testing.assert_allclose(r, pairwise_sigmoid(err), rtol=1e-6)


def test_grids_with_pole_rows_interpolate_inside():
    """ERA5-style grid with rows on the poles (lat −90 … 90 in 45° steps, lon 45° steps): a point at
    89°N lies between rows 3 (45°) and 4 (90°), a = 44/45, no across-pole nodes."""
    lat, lon = np.linspace(-90, 90, 5), np.arange(8) * 45.0
    norm = Normalizer(np.zeros(N_CHANNELS), np.ones(N_CHANNELS))
    rec = ObsRecords(np.full(1, T0), [89.0], [100.0], [np.nan], ["windEastward"], [0.0], [1.0])
    obs = point_observations(rec, T0, WINDOW, lat, lon, norm)
    x = torch.randn(1, N_CHANNELS, 5, 8, dtype=torch.float64)
    iu, a, b = channel_index("u10"), 44 / 45, 10 / 45
    hand = ((1 - a) * ((1 - b) * x[0, iu, 3, 2] + b * x[0, iu, 3, 3])
            + a * ((1 - b) * x[0, iu, 4, 2] + b * x[0, iu, 4, 3]))
    assert obs.apply(x).item() == pytest.approx(hand.item())
    assert (obs.weight >= 0).all()


def test_repaint_guidance_refuses_unprojected_point_observations(files):
    from align_rl.diffusion.guidance import make_guidance
    from align_rl.errors import ConfigError

    norm, truth, nc, csv, _ = files
    obs = point_observations(_read_all(nc, csv), TIMES, WINDOW, GRID.lat, GRID.lon, norm)
    with pytest.raises(ConfigError, match="to_grid"):
        make_guidance("repaint", Identity(), obs)


def test_units_are_converted_and_parquet_reads_like_csv(tmp_path):
    """°C, hPa and g/kg in a table become K, Pa and kg/kg; the same table as Parquet reads the same."""
    import pandas as pd

    pytest.importorskip("pyarrow")
    df = pd.DataFrame({
        "time": ["2005-01-01T00:00:00Z"] * 3, "latitude": [10.0, 10.0, -30.0],
        "longitude": [20.0, 20.0, 200.0], "pressure": [85000.0, 70000.0, np.nan],
        "variable": ["airTemperature", "specificHumidity", "pressureReducedToMeanSeaLevel"],
        "value": [15.0, 6.0, 1012.5], "error": [1.0, 0.5, 1.2], "units": ["degC", "g kg-1", "hPa"]})
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet", index=False)
    for f in ("t.csv", "t.parquet"):
        rec = read_observations(tmp_path / f)
        np.testing.assert_allclose(rec.value, [288.15, 6e-3, 101250.0])
        np.testing.assert_allclose(rec.error, [1.0, 5e-4, 120.0])  # an error has no offset
        assert list(rec.state_var) == ["t", "q", "msl"]


def test_preqc_flags_drop_observations(tmp_path):
    path = _good_ioda(tmp_path)
    n = len(read_ioda(path))

    def flag(f):
        q = f["PreQC/airTemperature"][...]
        k = int(np.flatnonzero(q == 0)[0])
        q[k] = 12
        f["PreQC/airTemperature"][...] = q

    rec = read_ioda(_edit(path, flag))
    assert len(rec) == n - 1 and rec.preqc_dropped == 1
    assert rec.counts()["airTemperature"] == 1
