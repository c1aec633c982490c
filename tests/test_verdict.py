"""The verdict's statistics on hand-made arrays with known answers (docs/method.md §10): block
length and effective sample size of correlated test times, paired changes and their p-values,
the Holm correction, the trivial baselines, the across-seed spread and verdict lines that a
narrower ensemble cannot pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from align_rl.errors import ConfigError
from align_rl.evaluation import baselines
from align_rl.evaluation.bootstrap import (block_length, closer_to_one, effective_sample_size, holm,
                                           paired_change, paired_stat)
from align_rl.evaluation.metrics import mse
from align_rl.evaluation.results import ScoreTable, open_results, row_changes, summarise, write_netcdf
from align_rl.evaluation.seeds import across_seeds, plan_rows
from align_rl.evaluation.sections import main_lines, observation_tables, verdict_section
from align_rl.evaluation.verdict import decide, mse_line


def ar1(n: int, rho: float, rng: np.random.Generator) -> np.ndarray:
    """A stationary AR(1) series of unit innovation variance."""
    e = rng.standard_normal(n)
    x = np.empty(n)
    x[0] = e[0] / np.sqrt(1 - rho ** 2)
    for t in range(1, n):
        x[t] = rho * x[t - 1] + e[t]
    return x


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.8])
def test_effective_sample_size_of_ar1(rho):
    """ESS = n (1 − ρ) / (1 + ρ) for AR(1), within 8 % on a long series."""
    n = 20000
    x = ar1(n, rho, np.random.default_rng(1))
    assert effective_sample_size(x) == pytest.approx(n * (1 - rho) / (1 + rho), rel=0.08)


def test_block_length_and_intervals_widen_for_correlated_series():
    """Paired differences of the same marginal variance: AR(1) ρ = 0.8 gets a longer block, a
    smaller ESS and a wider interval than independent ones (ratio ≈ √((1+ρ)/(1−ρ)) = 3)."""
    rng = np.random.default_rng(3)
    T = 200
    widths, blocks, ess = {}, {}, {}
    for name, d in (("iid", rng.standard_normal(T)), ("ar", ar1(T, 0.8, rng) * np.sqrt(1 - 0.64))):
        base = np.full(T, 10.0)
        c = paired_change(base + 0.1 * d, base)
        widths[name], blocks[name], ess[name] = c["ci"][1] - c["ci"][0], c["block"], c["ess"]
        assert c["ci"][0] <= c["pct"] <= c["ci"][1]
    assert blocks["iid"] <= 2 < blocks["ar"]
    assert ess["ar"] < 0.4 * ess["iid"]
    assert widths["ar"] > 1.8 * widths["iid"]
    assert block_length(np.zeros(48)) == 1 and block_length(np.arange(5.0)) == 1


def test_paired_change_known_answers_and_p_values():
    base = np.array([1.0, 2.0, 3.0, 4.0] * 12)
    c = paired_change(base * 0.9, base)
    assert c["pct"] == pytest.approx(-10.0) and c["ci"] == pytest.approx([-10.0, -10.0])
    assert c["p_lo"] == pytest.approx(1 / 2001) and c["p_hi"] == 1.0  # every draw below 0
    rng = np.random.default_rng(0)
    noise = paired_change(base + 0.5 * rng.standard_normal(48), base)
    assert 0.01 < noise["p_lo"] < 0.99 and noise["p_lo"] + noise["p_hi"] == pytest.approx(1 + 1 / 2001, abs=0.01)
    c = paired_change(np.array([0.9, np.nan, 2.7, 3.6]), base[:4])
    assert c["n_nan"] == 1 and c["n"] == 3
    # |a − 1| − |b − 1|: spread/skill 0.8 is closer to 1 than 0.5, 1.6 is further
    assert paired_stat(np.full(10, 0.8), np.full(10, 0.5), closer_to_one)["value"] == pytest.approx(-0.3)
    assert paired_stat(np.full(10, 1.6), np.full(10, 0.5), closer_to_one)["value"] == pytest.approx(0.1)


def test_holm_adjusted_p_values():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4·0.005, 3·0.01, max(.., 2·0.03), max(.., 0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.2, float("nan")]) == pytest.approx([0.4, 1.0])


def test_shrink_keeps_the_mean_and_sets_the_spread_term():
    """single-member MSE = ensemble-mean MSE + spread term; shrink leaves the first alone."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 2, 3, generator=g, dtype=torch.float64)
    y = torch.randn(3, 5, 2, 3, generator=g, dtype=torch.float64)
    single = mse(x, y.unsqueeze(1)).mean(dim=1)
    ens = mse(x.mean(dim=1), y)
    torch.testing.assert_close(single, ens + baselines.spread_term(x))
    target = baselines.spread_term(x).numpy() * np.array([0.25, 1.0, 0.0])
    s = baselines.shrink(x, target)
    torch.testing.assert_close(s.mean(dim=1), x.mean(dim=1))
    np.testing.assert_allclose(baselines.spread_term(s).numpy(), target, atol=1e-12)
    torch.testing.assert_close(s[:, 0] - s.mean(dim=1), 0.5 * (x[:, 0] - x.mean(dim=1))[:] * torch.tensor(
        [1.0, 2.0, 0.0], dtype=torch.float64).reshape(3, 1, 1, 1))


def test_blend_weight_reaches_the_target_cost():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(4, 3, 2, 5, generator=g, dtype=torch.float64)
    x = y.unsqueeze(1) + 0.3 * torch.randn(4, 2, 3, 2, 5, generator=g, dtype=torch.float64)
    xb = y + 1.0 * torch.randn(4, 3, 2, 5, generator=g, dtype=torch.float64)

    def cost(w):
        return float(mse(baselines.blend(x, xb, w), y.unsqueeze(1)).mean())

    a, c = cost(0.0), cost(1.0)
    target = a + 0.4 * (c - a)
    w = baselines.blend_weight(x, xb, y, target)
    assert 0 < w < 1 and cost(w) == pytest.approx(target, rel=1e-9)
    assert baselines.blend_weight(x, xb, y, a * 0.5) == 0.0
    assert baselines.blend_weight(x, xb, y, c * 10) == 1.0


def test_least_squares_blend_weight_matches_a_grid_search():
    """The closed-form weight of the ensemble mean towards the background against a brute-force
    search over 100,001 weights, on hand-built fields (truth, a biased background, members whose
    mean errs differently), and its clipped cases."""
    lat = torch.linspace(-1.4, 1.4, 6, dtype=torch.float64)
    lon = torch.linspace(0, 6.0, 8, dtype=torch.float64)
    la, lo = torch.meshgrid(lat, lon, indexing="ij")
    c = torch.arange(3, dtype=torch.float64).reshape(1, 3, 1, 1)
    t = torch.arange(4, dtype=torch.float64).reshape(4, 1, 1, 1)
    y = torch.cos(la) * torch.sin(lo + 0.3 * t) + 0.2 * c                      # truth (T, C, H, W)
    xb = y + 0.5 * torch.sin(2 * la) + 0.1 * c * torch.cos(lo)                 # background
    err = 0.4 * torch.cos(3 * lo) * torch.cos(la) - 0.3 * torch.sin(2 * la)    # the mean's own error
    n = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).reshape(1, 3, 1, 1, 1)
    x = (y + err).unsqueeze(1) + 0.2 * n * torch.sin(la + lo)                  # members (T, N, C, H, W)
    m = x.mean(dim=1)

    def sse(w):
        return float((((1 - w) * m + w * xb - y) ** 2).sum())

    grid = np.linspace(0, 1, 100_001)
    best = grid[int(np.argmin([sse(w) for w in grid]))]
    w = baselines.least_squares_weight(x, xb, y)
    assert 0.05 < w < 0.95 and w == pytest.approx(best, abs=2e-5)
    blended = baselines.blend(x, xb, w)
    torch.testing.assert_close(blended.mean(dim=1), (1 - w) * m + w * xb)
    assert baselines.least_squares_weight(x, y, y) == pytest.approx(1.0)     # the background is the truth
    assert baselines.least_squares_weight(x, y + 2 * err, y) == 0.0          # the optimum −1 is clipped
    assert baselines.least_squares_weight(x, m, y) == 0.0                    # nothing to blend
    bad = x.clone()
    bad[0, 0, 0, 0, 0] = float("nan")                                        # a diverged time is left out
    assert baselines.least_squares_weight(bad, xb, y) == pytest.approx(
        baselines.least_squares_weight(x[1:], xb[1:], y[1:]))
    assert np.isnan(baselines.least_squares_weight(torch.full_like(x, float("nan")), xb, y))


# ----------------------------------------------------------------------------- verdict lines
T = 48


def _dataset(models: dict[str, dict], trivial=True) -> xr.Dataset:
    """A results Dataset from hand-made per-time series ``{row: {(kind, stat, metric): (T,)}}``
    (rows named as the runner names them), summarised against ``reference``."""
    groups: dict[str, list] = {}
    for row in models:
        if "@seed" in row:
            groups.setdefault(row.split("@seed")[0], []).append(None)
    nets = {"reference": None}
    for row in models:
        name = row.split("@seed")[0]
        if name not in nets and not row.startswith(("Shrink-", "Blend-")) and row != "reference":
            nets[name] = groups.get(name, None)
    plan = plan_rows({k: (v if v else object()) for k, v in nets.items()}, trivial=trivial,
                     blend_val="Blend-val" in models)
    table = ScoreTable()
    for row, cells in models.items():
        for (kind, stat, metric), v in cells.items():
            table.add("main", row, "dps", kind, stat, {metric: v})
    for g, rows in plan.groups.items():
        table.add_mean("main", g, rows, "dps")
    names = plan.names()
    settings = [{"name": "main", "density": 0.01, "sigma_o": 0.0, "ablation": "main", "observed_fraction": 0.01}]
    times = np.datetime64("2005-01-01T00", "ns") + np.arange(T) * np.timedelta64(6, "h")
    ds = table.to_dataset(settings, names, ["dps"], times, {"members": 4, "grid": "4x8", "forecast_hours": 48})
    ds = ds.assign_coords(plan.coords([str(m) for m in ds["model"].values]))
    return summarise(ds, "reference")


def _row(ens, member, crps, ss):
    return {("analysis", "ensmean", "mse"): ens, ("analysis", "member", "mse"): member,
            ("analysis", "ensemble", "crps"): crps, ("analysis", "ensemble", "spread_skill"): ss}


def _ref(rng):
    ens = 0.05 + 0.005 * rng.standard_normal(T)
    spread = 0.02 + 0.001 * rng.standard_normal(T)
    return ens, spread


def test_a_narrower_ensemble_is_not_a_gain():
    """Align-M = the reference with a narrower spread only: its single-member MSE falls (as
    much as the shrink baseline's), its ensemble-mean MSE does not, and it is not a gain; a
    model whose ensemble mean and CRPS are really lower, and beats shrink, is a gain."""
    rng = np.random.default_rng(0)
    ens, spread = _ref(rng)
    crps = 0.1 + 0.005 * rng.standard_normal(T)
    ref = _row(ens, ens + spread, crps, np.full(T, 0.5))
    narrow = _row(ens, ens + 0.8 * spread, crps * 1.01, np.full(T, 0.45))
    shrink = _row(ens, ens + 0.8 * spread, crps * 1.005, np.full(T, 0.45))
    ds = _dataset({"reference": ref, "Align-M": narrow, "Shrink-M": shrink})
    assert row_changes(ds, "Align-M", "dps")["analysis"]["member"]["mse"]["ci"][1] < 0  # single-member "gain"
    ln = decide([mse_line(ds, "Align-M", "dps", "analysis")])[0]
    assert not ln["gain"] and "not significant" in ln["why"][0]
    assert not ln["conditions"]["spread/skill no further from 1"]

    good = _row(ens * 0.95, ens * 0.95 + 0.8 * spread, crps * 0.97, np.full(T, 0.52))
    ds = _dataset({"reference": ref, "Align-M": good, "Shrink-M": shrink})
    ln = decide([mse_line(ds, "Align-M", "dps", "analysis")])[0]
    assert ln["gain"], ln["why"]
    assert {t["name"] for t in ln["tests"]} == {"ensemble-mean MSE vs reference", "CRPS vs reference",
                                                "single-member MSE vs shrink", "CRPS vs shrink"}


def test_a_gain_must_beat_the_validation_fitted_blend():
    """With the Blend-val row, an MSE line is a gain only when its ensemble-mean MSE is below that
    row's too: an aligned row that beats the reference and shrink but is no better than Blend-val
    is not a gain (the blend-val test is the failing one); one clearly better is a gain. The row
    gets no verdict line of its own."""
    rng = np.random.default_rng(5)
    ens, spread = _ref(rng)
    crps = 0.1 + 0.005 * rng.standard_normal(T)
    ref = _row(ens, ens + spread, crps, np.full(T, 0.5))
    shrink = _row(ens, ens + 0.8 * spread, crps * 1.005, np.full(T, 0.45))
    good = _row(ens * 0.95, ens * 0.95 + 0.8 * spread, crps * 0.97, np.full(T, 0.52))

    def line(blend_factor):
        ds = _dataset({"reference": ref, "Align-M": good, "Shrink-M": shrink,
                       "Blend-val": _row(ens * blend_factor, ens * blend_factor + spread, crps, np.full(T, 0.5))})
        lines = main_lines(ds)
        assert [ln["model"] for ln in lines] == ["Align-M"]
        return lines[0]

    same = line(0.95)  # the blend is as good as Align-M
    assert not same["gain"]
    assert same["why"][0].startswith("ensemble-mean MSE vs blend-val")
    worse = line(0.93)  # the blend is better
    assert not worse["gain"]
    bv = next(t for t in worse["tests"] if t["name"] == "ensemble-mean MSE vs blend-val")
    assert bv["value"] == pytest.approx(100 * (0.95 / 0.93 - 1)) and bv["ci"][0] > 0
    better = line(1.0)  # Align-M 5 % below the blend
    assert better["gain"], better["why"]
    assert "ensemble-mean MSE vs blend-val" in {t["name"] for t in better["tests"]}
    assert "blend-val" in "\n".join(verdict_section([better]))


def test_the_blended_aligned_row_gets_no_verdict_line_and_is_reported_against_blend_val():
    """``Blend-val-Align-M`` (Align-M's members blended with its own val-fitted w) is a trivial row:
    even when it beats everything it gets no verdict line, Align-M's line does not test against it,
    and it is no verdict row; the *Both blended* table gives its ensemble-mean MSE % change against
    Blend-val (hand-computed: 0.90 / 0.95 − 1) with both weights."""
    from align_rl.evaluation.sections import both_blended_section, verdict_rows

    rng = np.random.default_rng(6)
    ens, spread = _ref(rng)
    crps = 0.1 + 0.005 * rng.standard_normal(T)
    ref = _row(ens, ens + spread, crps, np.full(T, 0.5))
    ds = _dataset({"reference": ref, "Align-M": _row(ens * 0.97, ens * 0.97 + spread, crps * 0.98, np.full(T, 0.5)),
                   "Shrink-M": _row(ens, ens + 0.9 * spread, crps, np.full(T, 0.5)),
                   "Blend-val": _row(ens * 0.95, ens * 0.95 + spread, crps, np.full(T, 0.5)),
                   "Blend-val-Align-M": _row(ens * 0.90, ens * 0.90 + spread, crps * 0.9, np.full(T, 0.5))})
    assert str(ds.trivial_for.sel(model="Blend-val-Align-M").values) == "Align-M"
    assert str(ds.trivial_kind.sel(model="Blend-val-Align-M").values) == "blend-val-aligned"
    assert verdict_rows(ds) == ["Align-M"]
    lines = main_lines(ds)
    assert [ln["model"] for ln in lines] == ["Align-M"]
    assert {t["name"] for t in lines[0]["tests"]} == {
        "ensemble-mean MSE vs reference", "CRPS vs reference", "single-member MSE vs shrink", "CRPS vs shrink",
        "ensemble-mean MSE vs blend-val"}
    assert not lines[0]["gain"]  # Align-M itself does not beat Blend-val
    fits = {"main dps": {"w": 0.25, "setting": "main", "method": "dps", "row": "reference"},
            "main Align-M/dps": {"w": 0.125, "setting": "main", "method": "dps", "row": "Align-M"}}
    table = "\n".join(both_blended_section(ds, fits))
    assert "#### Both blended" in table
    want = 100 * (0.90 / 0.95 - 1)
    assert f"| Blend-val-Align-M-DPS | 0.250 | 0.125 | analysis | {np.mean(ens * 0.95):.5f} | " \
           f"{np.mean(ens * 0.90):.5f} | {want:+.2f} [" in table


def test_holm_turns_a_borderline_line_into_no_gain():
    """A line with p just below 0.025 is a gain alone, not in a family of 10 such lines."""
    line = {"p": 0.02, "tests": [{"name": "x", "p": 0.02, "value": -1.0, "ci": [-2.0, -0.1]}],
            "conditions": {"tests": True}, "why": []}
    assert decide([dict(line, conditions=dict(line["conditions"]), why=[])])[0]["gain"]
    fam = decide([dict(line, conditions=dict(line["conditions"]), why=[]) for _ in range(10)])
    assert not any(ln["gain"] for ln in fam) and fam[0]["p_holm"] == pytest.approx(0.2)


def test_seeds_mean_row_spread_and_every_seed_rule():
    """Three seeds: the model's row is their per-time mean, the report's spread is the seeds'
    changes (mean, std, min, max), and one seed with a higher ensemble-mean MSE blocks the gain
    although the mean's interval is below 0."""
    rng = np.random.default_rng(2)
    ens, spread = _ref(rng)
    crps = 0.1 + 0.002 * rng.standard_normal(T)
    ref = _row(ens, ens + spread, crps, np.full(T, 0.5))
    factors = [0.90, 0.92, 1.01]
    rows = {"reference": ref}
    for k, f in enumerate(factors):
        rows[f"Align-M@seed{k}"] = _row(ens * f, ens * f + spread, crps * 0.97, np.full(T, 0.5))
    rows["Shrink-M"] = _row(ens, ens + spread, crps, np.full(T, 0.5))
    ds = _dataset(rows)
    assert list(ds.model.values) == ["background", "reference", "Align-M", "Align-M@seed0", "Align-M@seed1",
                                     "Align-M@seed2", "Shrink-M"]
    assert list(ds.seed.values) == [-1, -1, -1, 0, 1, 2, -1] and int(ds.n_seeds.sel(model="Align-M")) == 3
    cell = {"setting": "main", "method": "dps", "kind": "analysis", "stat": "ensmean", "metric": "mse"}
    np.testing.assert_allclose(ds.score.sel({**cell, "model": "Align-M"}).values, ens * np.mean(factors))
    a = across_seeds(ds, "Align-M", "dps", "analysis", "ensmean", "mse")
    pct = [100 * (f - 1) for f in factors]
    assert a["seeds"] == pytest.approx(pct) and a["std"] == pytest.approx(np.std(pct, ddof=1))
    assert a["min"] == pytest.approx(-10) and a["max"] == pytest.approx(1)
    ln = decide([mse_line(ds, "Align-M", "dps", "analysis")])[0]
    assert ln["tests"][0]["ci"][1] < 0  # the seed mean's interval is below 0 …
    assert not ln["conditions"]["every seed lower"] and not ln["gain"]  # … but one seed is not lower
    text = "\n".join(verdict_section([ln], family="test"))
    assert "NOT a gain" in text and "not every seed" in text and "Holm family: test (1 lines)" in text


def test_plan_rows_blend_val_rows_of_the_aligned_m_rows():
    """With ``blend_val``: one ``Blend-val-<row>`` per -M row (each seed row, the seed mean as
    their mean; ``Align-<x>-M`` too), none for -P or other models; a clash is refused."""
    p = plan_rows({"reference": 1, "Align-M": [1, 2], "Align-P": 3, "Align-rl-M": 4, "other": 5},
                  blend_val=True)
    assert {r: v for r, v in p.trivial.items() if v[0] == "blend-val-aligned"} == {
        "Blend-val-Align-M@seed0": ("blend-val-aligned", "Align-M@seed0"),
        "Blend-val-Align-M@seed1": ("blend-val-aligned", "Align-M@seed1"),
        "Blend-val-Align-M": ("blend-val-aligned", "Align-M"),
        "Blend-val-Align-rl-M": ("blend-val-aligned", "Align-rl-M")}
    assert p.trivial_means == {"Blend-val-Align-M": ["Blend-val-Align-M@seed0", "Blend-val-Align-M@seed1"]}
    names = p.names()
    c = p.coords(names)
    assert c["n_seeds"][1][names.index("Blend-val-Align-M")] == 2
    assert c["seed_of"][1][names.index("Blend-val-Align-M@seed0")] == ""
    assert "Blend-val-Align-M" not in plan_rows({"reference": 1, "Align-M": 2}).trivial
    with pytest.raises(ConfigError, match="Blend-val-Align-M"):
        plan_rows({"reference": 1, "Align-M": 2, "Blend-val-Align-M": 3}, blend_val=True)


def test_plan_rows_names_and_refusals():
    p = plan_rows({"reference": 1, "Align-M": [1, 2], "Align-P": 3, "other": 4})
    assert p.groups == {"Align-M": ["Align-M@seed0", "Align-M@seed1"]}
    assert p.trivial == {"Shrink-M": ("shrink", "Align-M"), "Blend-P": ("blend", "Align-P")}
    assert p.names() == ["reference", "Align-M", "Align-M@seed0", "Align-M@seed1", "Align-P", "other",
                         "Shrink-M", "Blend-P"]
    with pytest.raises(ConfigError, match="@seed"):
        plan_rows({"reference": 1, "A@seed0": 2})
    with pytest.raises(ConfigError, match="empty list"):
        plan_rows({"reference": 1, "Align-M": []})


def test_old_results_without_new_variables_still_read(tmp_path):
    """metrics.nc of an older version (no p-values, ESS, seed coordinates) is read as before."""
    rng = np.random.default_rng(4)
    ens, spread = _ref(rng)
    ds = _dataset({"reference": _row(ens, ens + spread, ens, np.full(T, 0.5)),
                   "other": _row(ens * 0.9, ens * 0.9 + spread, ens, np.full(T, 0.5))}, trivial=False)
    old = ds.drop_vars(["p_lo", "p_hi", "ess", "seed_of", "seed", "n_seeds", "trivial_for", "trivial_kind"])
    write_netcdf(old, tmp_path / "m.nc")
    back = open_results(tmp_path / "m.nc")
    c = row_changes(back, "other", "dps")["analysis"]["ensmean"]["mse"]
    assert c["pct"] == pytest.approx(-10) and np.isnan(c["p_lo"])
    assert main_lines(back)[0]["model"] == "other"
    assert observation_tables(back) == []


def test_load_models_groups_seed_checkpoints(tmp_path, monkeypatch):
    """``--models Align-M@seed0=a.pt Align-M@seed1=b.pt`` -> one model with two seeds."""
    from align_rl.config import load_config
    from align_rl.evaluation import runner

    for f in ("a.pt", "b.pt", "c.pt"):
        (tmp_path / f).write_bytes(b"")
    monkeypatch.setattr(runner, "load_model", lambda path, kind, expect=None, shapes=None: (str(path), {}))
    cfg = load_config(None, [])
    a, b, c = (str(tmp_path / f) for f in ("a.pt", "b.pt", "c.pt"))
    out = runner.load_models([f"Align-M@seed1={b}", f"Align-M@seed0={a}", f"Align-P={c}"], cfg)
    assert out == {"Align-M": [a, b], "Align-P": c}
    with pytest.raises(ConfigError, match="0 … 1"):
        runner.load_models([f"Align-M@seed0={a}", f"Align-M@seed2={b}"], cfg)
    with pytest.raises(ConfigError, match="both alone"):
        runner.load_models([f"Align-M={a}", f"Align-M@seed0={b}"], cfg)
    with pytest.raises(ConfigError, match="NAME@seed<k>"):
        runner.load_models([f"Align-M@seedx={a}"], cfg)
