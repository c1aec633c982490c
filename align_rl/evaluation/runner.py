"""The evaluation that reproduces the paper's tables (docs/method.md §10).

``python -m align_rl.evaluate [--config FILE] [--models NAME=CHECKPOINT ...] [key=value ...]``

Every model given (name → score network ``ε_θ``; the pretrained reference, aligned models later)
× every guidance method of ``guidance.methods`` analyses the same ``eval.times`` held-out times of
the test split (backgrounds: 48 h forecasts from :mod:`align_rl.world.backgrounds`) from the same
observations (one seed per observation setting) and the same sampler noise (one generator seed per
setting and method), so model comparisons are paired. Per analysis time (then averaged, docs/method.md §10):

- Table 1, analysis: MSE and MAE over the 69 normalised channels, WRMSE in physical units of
  u10, v500, z500, t850, Geo-Score; for one member (the mean over members of each member's score,
  i.e. the expected score of a single analysis, as the paper's) and for the ensemble mean;
- Table 2, 48 h forecasts started from the analyses (the forecaster's 8 × 6 h rollout from
  ``(x_{t−6h}, x_a)``, with ``x_{t−6h}`` the truth 6 h before: the previous analysis of a cycling
  system **(choice)**) against the truth 48 h later;
- probabilistic scores: fair CRPS and spread/skill ratio;
- a background row (the 48 h forecast used as ``x_b``), and its forecast;
- ablations when ``eval.ablations`` lists ``density`` (Table 3) or ``error`` (Table 4);
- % change against ``eval.baseline`` with a 95 % paired bootstrap interval over times.

Writes into ``eval.out`` (default ``<workdir>/eval``), atomically (a temporary folder renamed into
place): ``report.md``, ``metrics.json``, ``metrics.csv``, ``maps/*.png`` (z500 error reduction
``|x_a^ref − x_GT| − |x_a^model − x_GT|`` averaged over ``eval.map_samples`` analyses) and
``analyses/<model>-<method>.zarr`` (ensemble means, physical units, WeatherBench2 layout; score them
with ``python -m align_rl.score --analysis … --truth <world store>``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.analysis import analyse_batch  # in the driver or a (GPU) actor: eval.sampling
from align_rl.config import Config
from align_rl.errors import CheckpointError, ConfigError, InputError
from align_rl.evaluation.geostrophic import geo_score
from align_rl.evaluation.metrics import crps_ensemble, mae, mse, spread_skill, wrmse
from align_rl.io.normalization import Normalizer
from align_rl.io.schema import channel_index
from align_rl.io.states import States
from align_rl.evaluation.verdict import paired_change
from align_rl.workspace import Workspace

TABLE_VARS: tuple[str, ...] = ("u10", "v500", "z500", "t850")
"""Channels whose physical WRMSE the paper's tables report."""
LEAD_STEPS = 8  # 48 h = 8 × 6 h
STEP_HOURS = 6


@dataclass
class EvalData:
    """Everything the evaluation reads, in physical units (``truth`` must hold ``t − 6 h`` and
    ``t + 48 h`` of every analysis time ``t``; ``backgrounds`` the 48 h forecast valid at ``t``)."""

    truth: States
    backgrounds: States
    normalizer: Normalizer
    codec: Any
    forecaster: Any
    truth_store: Path | None = None  # store holding the truth (for the align_rl.score hint)


@dataclass
class ObsSetting:
    name: str
    density: float
    sigma_o: float
    ablation: str = "main"  # main | density | error


@dataclass
class _Collector:
    """Per-time metric arrays: ``values[setting][row][table][stat][metric] -> list of (T,) arrays``."""

    values: dict = field(default_factory=dict)

    def add(self, setting: str, row: str, table: str, stat: str, metrics: dict[str, np.ndarray]):
        d = self.values.setdefault(setting, {}).setdefault(row, {}).setdefault(table, {}).setdefault(stat, {})
        for k, v in metrics.items():
            d.setdefault(k, []).append(np.asarray(v, dtype=np.float64).reshape(-1))

    def arrays(self) -> dict:
        def walk(d):
            if isinstance(d, dict):
                return {k: walk(v) for k, v in d.items()}
            return np.concatenate(d)
        return walk(self.values)


# ----------------------------------------------------------------------------- metrics
def _hours(h: int) -> np.timedelta64:
    return np.timedelta64(int(h), "h").astype("timedelta64[ns]")


def deterministic_metrics(x_norm: torch.Tensor, truth_norm: torch.Tensor, normalizer: Normalizer,
                          lat: np.ndarray, lon: np.ndarray, geo: bool = True) -> dict[str, np.ndarray]:
    """Scores of fields ``x_norm`` (T, [N,] 69, H, W) against ``truth_norm`` (T, 69, H, W), both
    normalised. With a member axis the scores are averaged over members. Returns (T,) arrays:
    ``mse``, ``mae`` (normalised), ``wrmse_<var>`` (physical units), ``geo_score``."""
    has_members = x_norm.ndim == 5
    t = truth_norm.unsqueeze(1) if has_members else truth_norm
    x64, t64 = x_norm.double(), t.double()
    xp, tp = normalizer.denormalize(x64), normalizer.denormalize(t64)
    out = {"mse": mse(x64, t64), "mae": mae(x64, t64)}
    w = wrmse(xp, tp, lat)
    for v in TABLE_VARS:
        out[f"wrmse_{v}"] = w[..., channel_index(v)]
    if geo:
        out["geo_score"] = geo_score(xp, tp, lat, lon)
    res = {}
    for k, v in out.items():
        v = v.detach().cpu().numpy()
        res[k] = v.mean(axis=1) if has_members else v
    return res


def probabilistic_metrics(ens_norm: torch.Tensor, truth_norm: torch.Tensor, normalizer: Normalizer,
                          lat: np.ndarray) -> dict[str, np.ndarray]:
    """Fair CRPS (mean over the 69 normalised channels; z500 in physical units) and the
    spread/skill ratio (mean over channels; z500) of an ensemble (T, N, 69, H, W). (T,) arrays."""
    e64, t64 = ens_norm.double(), truth_norm.double()
    crps = crps_ensemble(e64, t64, lat)
    ss = spread_skill(e64, t64, lat)
    iz = channel_index("z500")
    std = float(normalizer.std[iz])
    return {
        "crps": crps.mean(dim=-1).cpu().numpy(),
        "crps_z500": (crps[..., iz] * std).cpu().numpy(),
        "spread_skill": ss.mean(dim=-1).cpu().numpy(),
        "spread_skill_z500": ss[..., iz].cpu().numpy(),
    }


def forecast_48h(forecaster: Any, x_prev: torch.Tensor, x0: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The 48 h forecast (normalised) from ``(x_prev (T, 69, H, W), x0 (T, [N,] 69, H, W))``."""
    has_members = x0.ndim == 5
    if has_members:
        T, N = x0.shape[:2]
        prev = x_prev.unsqueeze(1).expand_as(x0).reshape(T * N, *x0.shape[2:])
        cur = x0.reshape(T * N, *x0.shape[2:])
    else:
        prev, cur = x_prev, x0
    out = []
    dev = _module_device(forecaster)
    with torch.no_grad():
        for i in range(0, cur.shape[0], batch):
            r = forecaster.rollout(prev[i:i + batch].to(dev), cur[i:i + batch].to(dev), LEAD_STEPS)
            out.append(r[:, -1].float().cpu())
    f = torch.cat(out)
    return f.reshape(x0.shape) if has_members else f


def _module_device(m: Any) -> torch.device:
    try:
        return next(m.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


# ----------------------------------------------------------------------------- set-up
def select_times(truth: States, backgrounds: States, test_range: list[str] | None, n: int) -> np.ndarray:
    """``n`` analysis times, evenly spread over the test range, whose background, ``t − 6 h`` and
    ``t + 48 h`` truth exist (datetime64[ns])."""
    cand = backgrounds.times
    if test_range:
        cand = backgrounds.select(test_range[0], test_range[-1]).times
    have = truth.times.astype("datetime64[ns]")
    cand = np.asarray(cand, dtype="datetime64[ns]")
    ok = cand[np.isin(cand, have) & np.isin(cand - _hours(STEP_HOURS), have)
              & np.isin(cand + _hours(STEP_HOURS * LEAD_STEPS), have)]
    if len(ok) == 0:
        raise InputError(
            f"no test time in {test_range} has a background and the truth 6 h before and 48 h after; "
            "check data.test and the backgrounds (python -m align_rl.pretrain all)"
        )
    if n >= len(ok):
        return ok
    idx = np.unique(np.round(np.linspace(0, len(ok) - 1, n)).astype(int))
    return ok[idx]


def observation_settings(cfg: Config) -> list[ObsSetting]:
    """The main setting (``obs.density``, ``obs.sigma_o``) and the requested ablations."""
    base = ObsSetting("main", cfg.obs.density, cfg.obs.sigma_o, "main")
    out = [base]
    for ab in cfg.eval.ablations:
        if ab == "density":
            out += [ObsSetting(f"density={d:g}", d, cfg.obs.sigma_o, "density") for d in cfg.eval.densities]
        elif ab == "error":
            out += [ObsSetting(f"sigma_o={e:g}", cfg.obs.density, e, "error") for e in cfg.eval.errors]
        else:
            raise ConfigError(f"eval.ablations entry {ab!r} is not one of density, error")
    return out


def load_eval_data(cfg: Config, ws: Workspace) -> tuple[EvalData, Any]:
    """Dataset, pretrained models and backgrounds from their caches (building them when absent).
    Returns ``(data, reference eps model)``."""
    from align_rl.io import era5
    from align_rl.world.backgrounds import ensure_backgrounds
    from align_rl.world.dataset import ensure_world
    from align_rl.training.pretraining import ensure_pretrained

    store = ensure_world(cfg, ws)
    pre = ensure_pretrained(cfg, ws)
    normalizer = getattr(pre, "normalizer", None) or era5.load_normalizer(store)
    test = cfg.data.test
    start = np.datetime64(test[0]) - _hours(2 * STEP_HOURS * LEAD_STEPS)
    end = np.datetime64(test[-1]) + np.timedelta64(1, "D") + _hours(STEP_HOURS * LEAD_STEPS)
    truth = era5.open_states(store, time_range=[start, end], coarsen=cfg.data.coarsen,
                             expect_grid=cfg.data.grid, check_units=cfg.checks.units)
    bgs = ensure_backgrounds(cfg, ws, truth, pre.forecaster)
    data = EvalData(truth, bgs, normalizer, pre.codec, pre.forecaster, truth_store=Path(store))
    return data, pre.eps_model


# ----------------------------------------------------------------------------- main loop
def _norm_t(normalizer: Normalizer, states: States, times: np.ndarray) -> torch.Tensor:
    idx = [states.time_index(t) for t in times]
    if any(i is None for i in idx):
        raise InputError("a selected time is missing from the states")
    return torch.as_tensor(normalizer.normalize(states.values[idx].astype(np.float64)), dtype=torch.float32)


def run_evaluation(
    cfg: Config,
    ws: Workspace,
    models: dict[str, Any] | None = None,
    data: EvalData | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate ``models`` (name → ε_θ) × ``cfg.guidance.methods``; write the report files.

    ``data``: the truth, backgrounds, normaliser, codec and forecaster (loaded from the workspace
    caches when None; then ``models`` defaults to ``{"reference": pretrained ε_θ}``). Returns the
    summary dict that is also written to ``metrics.json``.
    """
    t_start = time.time()
    if data is None:
        data, ref = load_eval_data(cfg, ws)
        models = dict(models or {})
        models.setdefault("reference", ref)
    if not models:
        raise ConfigError("run_evaluation needs at least one model (name -> score network)")
    baseline = cfg.eval.baseline if cfg.eval.baseline in models else next(iter(models))
    methods = list(cfg.guidance.methods)
    if not methods:
        raise ConfigError("guidance.methods is empty; name at least one of obsfree, repaint, dps")
    settings = observation_settings(cfg)
    times = select_times(data.truth, data.backgrounds, cfg.data.test, cfg.eval.times)
    T = len(times)
    norm = data.normalizer
    lat, lon = data.truth.lat, data.truth.lon
    x_true = _norm_t(norm, data.truth, times)
    x_prev = _norm_t(norm, data.truth, times - _hours(STEP_HOURS))
    x_true48 = _norm_t(norm, data.truth, times + _hours(STEP_HOURS * LEAD_STEPS))
    x_b = _norm_t(norm, data.backgrounds, times)
    for m in models.values():
        if hasattr(m, "eval"):
            m.eval()
    if hasattr(data.codec, "eval"):
        data.codec.eval()
    members = int(cfg.eval.members)
    if members < 2:
        raise ConfigError("eval.members must be >= 2 (ensemble mean, CRPS and spread/skill need it)")
    bs = max(1, int(cfg.eval.batch_size))
    map_n = min(int(cfg.eval.map_samples), T)
    iz = channel_index("z500")

    col = _Collector()
    z500_err: dict[tuple[str, str], np.ndarray] = {}  # (model, method) -> (map_n, H, W) |ens mean − GT|
    ens_means: dict[tuple[str, str], np.ndarray] = {}  # main setting, physical (T, 69, H, W)
    obs_fraction: dict[str, float] = {}
    failures: list[dict] = []
    # background rows (the same in every setting)
    f_bg = forecast_48h(data.forecaster, x_prev, x_b)
    bg_an = deterministic_metrics(x_b, x_true, norm, lat, lon)
    bg_fc = deterministic_metrics(f_bg, x_true48, norm, lat, lon, geo=False)
    bg_err = (norm.denormalize(x_b[:map_n].double()) - norm.denormalize(x_true[:map_n].double()))[:, iz].abs().numpy()

    jobs = [(s, meth, name) for s in settings for meth in methods for name in models
            if not (s.ablation != "main" and meth == "obsfree")]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="evaluate", unit="run")
    from align_rl.world.observations import make_observations

    for si, s in enumerate(settings):
        for stat in ("member", "ensmean"):
            col.add(s.name, "background", "analysis", stat, bg_an)
            col.add(s.name, "background", "forecast", stat, bg_fc)
        obs = make_observations(x_true, s.density, s.sigma_o, cfg.obs.mode, cfg.obs.r_floor,
                                generator=torch.Generator().manual_seed(cfg.run.seed * 1000 + 17 + si))
        obs_fraction[s.name] = obs.fraction
        for mi, meth in enumerate(methods):
            if s.ablation != "main" and meth == "obsfree":
                continue
            for name, eps_model in models.items():
                row = f"{name}/{meth}"
                gen = torch.Generator().manual_seed(cfg.run.seed * 1000 + 100 * si + mi)
                for i in range(0, T, bs):
                    sl = slice(i, min(T, i + bs))
                    try:
                        an = analyse_batch(cfg, data.codec, eps_model, x_b[sl], obs[sl], meth,
                                           cfg.sampler, cfg.guidance, generator=gen, members=members)
                        xa = an.fields.float().cpu()
                    except InputError as exc:  # diverged (NaN): score as NaN, report, go on
                        failures.append({"setting": s.name, "row": row, "times": [i, sl.stop],
                                         "error": str(exc)})
                        xa = torch.full((sl.stop - i, members, *x_b.shape[1:]), float("nan"))
                    ens = xa.mean(dim=1)
                    col.add(s.name, row, "analysis", "member",
                            deterministic_metrics(xa, x_true[sl], norm, lat, lon))
                    col.add(s.name, row, "analysis", "ensmean",
                            deterministic_metrics(ens, x_true[sl], norm, lat, lon))
                    col.add(s.name, row, "analysis", "ensemble",
                            probabilistic_metrics(xa, x_true[sl], norm, lat))
                    fm = forecast_48h(data.forecaster, x_prev[sl], xa)
                    col.add(s.name, row, "forecast", "member",
                            deterministic_metrics(fm, x_true48[sl], norm, lat, lon, geo=False))
                    col.add(s.name, row, "forecast", "ensmean",
                            deterministic_metrics(fm.mean(dim=1), x_true48[sl], norm, lat, lon, geo=False))
                    col.add(s.name, row, "forecast", "ensemble",
                            probabilistic_metrics(fm, x_true48[sl], norm, lat))
                    if s.ablation == "main":
                        phys = norm.denormalize(ens.double())
                        ens_means.setdefault((name, meth), []).append(phys.float().numpy())
                        k = max(0, min(map_n, sl.stop) - sl.start)
                        if k:
                            err = (phys[:k, iz] - norm.denormalize(x_true[sl][:k].double())[:, iz]).abs().numpy()
                            z500_err.setdefault((name, meth), []).append(err)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{s.name} {row}")
    if bar is not None:
        bar.close()
    per_time = col.arrays()
    ens_means = {k: np.concatenate(v) for k, v in ens_means.items()}
    ens_means = {k: v for k, v in ens_means.items() if np.all(np.isfinite(v))}  # no store of NaNs
    z500_err = {k: np.concatenate(v) for k, v in z500_err.items()}

    summary = summarise(per_time, baseline, list(models), methods, settings, seed=cfg.run.seed)
    summary.update({
        "times": [np.datetime_as_string(t, unit="h") for t in times],
        "n_times": T,
        "members": members,
        "models": list(models),
        "methods": methods,
        "baseline": baseline,
        "settings": [s.__dict__ | {"observed_fraction": obs_fraction[s.name]} for s in settings],
        "sampler": {k: getattr(cfg.sampler, k) for k in ("steps", "corrections", "tau")},
        "guidance": cfg.to_dict()["guidance"],
        "grid": f"{len(lat)}x{len(lon)}",
        "forecast_start": "(truth at t-6h, analysis at t), 8 x 6 h",
        "failures": failures,
    })
    summary["checks"] = paper_checks(summary, baseline)

    from align_rl.evaluation.report import write_outputs

    out_dir = Path(out or cfg.eval.out or ws.eval)
    summary["seconds"] = round(time.time() - t_start, 1)
    maps = {"background": bg_err, **{f"{m}/{k}": v for (m, k), v in z500_err.items()}}
    write_outputs(out_dir, summary, per_time, maps, ens_means, times, data, baseline,
                  list(models), methods)
    _log_wandb(cfg, summary)
    return summary


def summarise(per_time: dict, baseline: str, models: list[str], methods: list[str],
              settings: list[ObsSetting], seed: int = 0) -> dict:
    """Time means of every metric and the paired % changes against ``baseline``."""
    scores: dict = {}
    changes: dict = {}
    for s in settings:
        rows = per_time.get(s.name, {})
        scores[s.name] = {
            row: {tab: {st: {m: float(np.nanmean(v)) for m, v in mets.items()} for st, mets in stats.items()}
                  for tab, stats in tabs.items()}
            for row, tabs in rows.items()
        }
        ch: dict = {}
        for meth in methods:
            base_row = rows.get(f"{baseline}/{meth}")
            if base_row is None:
                continue
            for name in models:
                row = rows.get(f"{name}/{meth}")
                if name == baseline or row is None:
                    continue
                ch[f"{name}/{meth}"] = {
                    tab: {st: {m: paired_change(v, base_row[tab][st][m], seed=seed) for m, v in mets.items()}
                          for st, mets in stats.items()}
                    for tab, stats in row.items()
                }
        changes[s.name] = ch
    return {"scores": scores, "changes": changes}


def paper_checks(summary: dict, baseline: str) -> list[dict]:
    """The issue's acceptance checks on the main setting, with the numbers (passed or not)."""
    sc = summary["scores"].get("main", {})
    out = []
    bg = sc.get("background", {}).get("analysis", {}).get("ensmean", {}).get("mse")
    dps = sc.get(f"{baseline}/dps", {}).get("analysis", {})
    if bg is not None and dps:
        v = dps["ensmean"]["mse"]
        out.append({"check": "DPS ensemble-mean analysis MSE < background MSE",
                    "passed": bool(v < bg), "values": {"dps_ensmean": v, "background": bg}})
    single = {m: sc.get(f"{baseline}/{m}", {}).get("analysis", {}).get("member", {}).get("mse")
              for m in ("dps", "repaint", "obsfree")}
    if all(v is not None for v in single.values()):
        ok = single["dps"] <= single["repaint"] <= single["obsfree"]
        out.append({"check": "single-member MSE: DPS <= Repaint <= ObsFree", "passed": bool(ok),
                    "values": single})
    return out


def _log_wandb(cfg: Config, summary: dict) -> None:
    if cfg.run.wandb_mode == "disabled":
        return
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    flat = {}
    for row, tabs in summary["scores"].get("main", {}).items():
        for tab, stats in tabs.items():
            for st, mets in stats.items():
                for m, v in mets.items():
                    flat[f"eval/{row}/{tab}/{st}/{m}"] = v
    try:
        run = wandb.init(project=cfg.run.wandb_project, name=f"{cfg.run.name}-eval",
                         mode=cfg.run.wandb_mode, dir=str(Path(cfg.run.workdir)), config=cfg.to_dict())
        run.log(flat)
        run.finish()
    except Exception as exc:  # logging must never lose a finished evaluation
        print(f"warning: wandb logging of the evaluation failed: {exc}", file=sys.stderr)


# ----------------------------------------------------------------------------- CLI
def load_models(specs: list[str], cfg: Config, latent_shape: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """``["Align-M=path.pt", ...]`` -> ``{name: LatentDiT}`` from ``align_rl.io.checkpoints`` files."""
    from align_rl.io.checkpoints import load_model

    out = {}
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"--models entry {spec!r} must be NAME=CHECKPOINT")
        name, path = spec.split("=", 1)
        if not Path(path).exists():
            raise CheckpointError(f"checkpoint {path} of model {name!r} does not exist")
        shapes = {"latent_shape": latent_shape} if latent_shape else None
        model, _ = load_model(path, "diffusion", expect=cfg.diffusion, shapes=shapes)
        out[name] = model
    return out


