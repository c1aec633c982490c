"""The observing-network experiment, the paper's Table 5 analogue (docs/method.md §10.1).

Point observations (IODA-v2 files or tables, or the embedded world's synthetic network of
radiosondes and surface stations, :mod:`align_rl.observations.network`, written as IODA files and
read back through the same reader a user's files take) at ``eval.times`` held-out analysis times:

1. selection by an assimilation window ``±window`` around each analysis time;
2. quality control: the background check against ``x_b`` (``σ_b`` per channel: the backgrounds'
   RMS error over these times) and the paper's filter against the reference state (the truth);
   rejected counts per variable in the report;
3. DPS analyses (``eval.members`` members, ``cfg.sampler``, ``cfg.guidance`` with the settings'
   ``dps_zeta``, chosen for point observations on validation times) of every model with the
   same observations and the same sampler noise (paired);
4. the *shrink* baseline of every aligned model (every model but ``eval.baseline``): the reference's
   members pulled towards their mean to the model's spread term per time
   (:func:`align_rl.evaluation.baselines.shrink`), row ``Shrink-<name without "Align-">``;
5. scores: Table 1's analysis metrics (single member, ensemble mean, CRPS, spread/skill,
   :func:`align_rl.evaluation.skill.analysis_scores`) of the background, every model and every
   shrink row, laid out as the evaluation's results Dataset (:mod:`align_rl.evaluation.results`,
   setting :data:`SETTING`, method ``dps``, kind ``analysis``), O−B and O−A per variable;
6. the evaluation report's verdict (docs/method.md §10): one MSE line per aligned model
   (:func:`align_rl.evaluation.verdict.mse_line`: ensemble-mean MSE and CRPS below the reference's,
   single-member MSE and CRPS below its shrink row's, spread/skill no further from 1, every seed
   lower, no NaN), Holm-corrected over the experiment's lines
   (:func:`align_rl.evaluation.verdict.decide`), with the split of the single-member MSE change into
   its ensemble-mean and spread parts.

A model given as one network per seed (``--models Align-M@seed0=… Align-M@seed1=…``) gets one row
per seed and the row of their per-time mean, as in the evaluation (:mod:`align_rl.evaluation.seeds`).

Writes ``report.md``, ``metrics.json`` (and ``network/*.nc``, the synthetic network) into the output
folder; the command stages the folder and renames it into place (:func:`align_rl.owned.staged`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from align_rl.config import Config
from align_rl.diffusion.analysis import analyse
from align_rl.errors import ConfigError, InputError
from align_rl.evaluation import baselines, sections
from align_rl.evaluation.report import compact_lines
from align_rl.evaluation.results import BACKGROUND, ScoreTable, clean, row_changes, row_scores, summarise
from align_rl.evaluation.runner import EvalData, select_times
from align_rl.evaluation.seeds import RowPlan, plan_rows
from align_rl.evaluation.skill import analysis_scores, deterministic_metrics
from align_rl.evaluation.verdict import ALPHA, cell_series, decide, mse_line
from align_rl.io.states import States
from align_rl.observations.network import write_network
from align_rl.observations.operator import point_observations
from align_rl.observations.qc import background_check, reference_filter
from align_rl.observations.records import ObsRecords
from align_rl.observations.scores import omb_oma
from align_rl.observations.table import read_observations


SETTING = "network"
"""The setting name of the experiment's results Dataset (its verdict lines carry it)."""
METHOD = "dps"
"""The only guidance of the experiment."""


@dataclass
class NetworkSettings:
    """The experiment's observation settings (command-line flags of ``python -m align_rl.network``)."""

    window_hours: float = 3.0  # assimilation window: ±window around each analysis time
    background_k: float = 5.0  # background check threshold k (0: off)
    reference_k: float = 0.1  # the paper's filter against the truth (0: off)
    reference_scale: str = "climate"  # climate | obs_error (align_rl.observations.qc)
    sondes: int = 60  # synthetic network: radiosonde stations
    surface: int = 200  # synthetic network: surface stations
    seed: int = 0  # synthetic network: stations and noise
    # DPS guidance strength ζ for these observations (None: guidance.dps_zeta). The default's 0.7
    # was chosen for 1 % gridded observations; with the station network it overshoots (analyses
    # worse than the background). 0.2 was the best of 0.1 / 0.2 / 0.35 / 0.7 on 24 VALIDATION times
    # of the default world (BENCHMARKS.md, observing-network experiment)
    dps_zeta: float | None = 0.2

    def __post_init__(self) -> None:
        if not self.window_hours > 0:
            raise ConfigError(f"window_hours={self.window_hours} must be > 0")
        if self.background_k < 0 or self.reference_k < 0:
            raise ConfigError("background_k and reference_k must be >= 0 (0 turns a check off)")
        if self.sondes < 0 or self.surface < 0 or self.sondes + self.surface == 0:
            raise ConfigError("the synthetic network needs at least one station (--sondes, --surface)")


def _normalised(data: EvalData, states: States, times: np.ndarray) -> torch.Tensor:
    idx = [states.time_index(t) for t in times]
    if any(i is None for i in idx):
        raise InputError("a selected time is missing from the states")
    return torch.as_tensor(data.normalizer.normalize(states.values[idx].astype(np.float64)),
                           dtype=torch.float32)


def load_records(paths: list[str | Path]) -> ObsRecords:
    """Every observation of the IODA files / tables ``paths`` (all checked before any is used)."""
    if not paths:
        raise InputError("no observation files given")
    return ObsRecords.concat([read_observations(p) for p in paths])


def shrink_row(model: str) -> str:
    """The *shrink* baseline row of an aligned model: ``Align-DPS-M`` → ``Shrink-DPS-M``."""
    return f"Shrink-{model.removeprefix('Align-')}"


def network_rows(models: dict[str, Any], baseline: str) -> RowPlan:
    """The experiment's rows (:class:`~align_rl.evaluation.seeds.RowPlan`): every model (one row per
    seed and the seed mean for several seeds) and a *shrink* row for every model but ``baseline``."""
    if BACKGROUND in models:
        raise ConfigError(f"a model may not be named {BACKGROUND!r} (the background's row); rename it")
    if isinstance(models[baseline], (list, tuple)):
        raise ConfigError(f"the baseline {baseline!r} must be one score network, not one per seed")
    plan = plan_rows(models, baseline, trivial=False)
    for name in models:
        if name == baseline:
            continue
        row = shrink_row(name)
        if row in models:
            raise ConfigError(f"model name {row!r} is the shrink baseline of {name}; rename it")
        plan.trivial[row] = ("shrink", name)
    return plan


def results_dataset(table: ScoreTable, plan: RowPlan, times: np.ndarray, baseline: str, members: int,
                    grid: str, seed: int) -> xr.Dataset:
    """The experiment's per-time scores as the evaluation's summarised results Dataset
    (:mod:`align_rl.evaluation.results`): one setting :data:`SETTING`, one method :data:`METHOD`, the
    ``model`` coordinates of ``plan`` (seed rows, ``trivial_for`` / ``trivial_kind`` of the shrink
    rows), time means and paired changes against ``baseline``."""
    settings = [{"name": SETTING, "density": float("nan"), "sigma_o": float("nan"), "ablation": SETTING,
                 "observed_fraction": float("nan")}]
    attrs = {"members": members, "grid": grid,
             "title": "Align-DA observing-network experiment: scores per analysis time and paired changes"}
    ds = table.to_dataset(settings, plan.names(), [METHOD], times, attrs)
    ds = ds.assign_coords(plan.coords([str(m) for m in ds["model"].values]))
    return summarise(ds, baseline, seed=seed)


def verdict_lines(ds: xr.Dataset, models: list[str], baseline: str, seed: int = 0) -> list[dict]:
    """The evaluation report's verdict (docs/method.md §10) of every aligned model of ``models``
    (all but ``baseline``) on the experiment's analyses: one :func:`~align_rl.evaluation.verdict.mse_line`
    each, Holm-corrected together (:func:`~align_rl.evaluation.verdict.decide`)."""
    lines = []
    for name in models:
        if name == baseline:
            continue
        ln = mse_line(ds, name, METHOD, "analysis", baseline, SETTING, seed)
        if ln is not None:
            lines.append(ln)
    return decide(lines)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_network_experiment(cfg: Config, data: EvalData, models: dict[str, Any], out: str | Path,
                           obs_files: list[str | Path] | None = None,
                           settings: NetworkSettings | None = None, progress: bool = True) -> dict:
    """The experiment (module docstring) for ``models`` (name → ε_θ); returns the metrics document
    also written to ``<out>/metrics.json``."""
    st = settings or NetworkSettings()
    guidance = cfg.guidance if st.dps_zeta is None else replace(cfg.guidance, dps_zeta=float(st.dps_zeta))
    if not models:
        raise ConfigError("the network experiment needs at least one model")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times = select_times(data.truth, data.backgrounds, cfg.data.test, int(cfg.eval.times), 6)
    truth = _normalised(data, data.truth, times)
    x_b = _normalised(data, data.backgrounds, times)
    lat, lon = data.truth.lat, data.truth.lon
    if not obs_files:  # the synthetic network, through the files a user would give
        phys = data.truth.values[[data.truth.time_index(t) for t in times]].astype(np.float64)
        paths = write_network(phys, times, lat, lon, out / "network", st.sondes, st.surface, st.seed)
        obs_files = paths
        source = [str(p.relative_to(out)) for p in paths]  # the output folder may be moved in place
    else:
        source = [str(p) for p in obs_files]
    records = load_records(list(obs_files))
    window = np.timedelta64(int(round(st.window_hours * 3600)), "s")
    obs = point_observations(records, times, window, lat, lon, data.normalizer)
    if obs.n_obs == 0:
        raise InputError(f"no observation of {', '.join(source)} lies within ±{st.window_hours} h of "
                         f"the {len(times)} analysis times ({times[0]} … {times[-1]})")
    qc = []
    if st.background_k > 0:
        sigma_b = (x_b - truth).double().square().mean(dim=(0, 2, 3)).sqrt().numpy()
        obs, rep = background_check(obs, x_b, st.background_k, sigma_b)
        qc.append(rep.as_dict())
    if st.reference_k > 0:
        obs, rep = reference_filter(obs, truth, st.reference_k, st.reference_scale)
        qc.append(rep.as_dict())
    if obs.n_obs == 0:
        raise InputError("quality control rejected every observation; loosen --reference-k or "
                         "--background-k")
    members = int(cfg.eval.members)
    if members < 2:
        raise ConfigError("eval.members must be >= 2 (ensemble mean, CRPS and spread/skill need it)")
    baseline = cfg.eval.baseline if cfg.eval.baseline in models else next(iter(models))
    plan = network_rows(models, baseline)
    table = ScoreTable()
    bg = deterministic_metrics(x_b, truth, data.normalizer, lat, lon)
    for stat in ("member", "ensmean"):
        table.add(SETTING, BACKGROUND, METHOD, "analysis", stat, bg)
    obs_stats = {"background": omb_oma(obs, x_b, x_b)["O-B"]}
    reference = None
    for row, eps in plan.sampled.items():
        if progress:
            print(f"network experiment: {row} (DPS, {len(times)} times × {members} members, "
                  f"{obs.n_obs} observations)", flush=True)
        an = analyse(data.codec, eps, x_b, obs, METHOD, cfg.sampler, guidance,
                     generator=torch.Generator().manual_seed(cfg.run.seed * 1000 + 7),
                     members=members, batch_size=int(cfg.eval.batch_size))
        fields = an.fields.float().cpu()
        for (kind, stat), metrics in analysis_scores(fields, truth, data.normalizer, lat, lon).items():
            table.add(SETTING, row, METHOD, kind, stat, metrics)
        obs_stats[row] = omb_oma(obs, x_b, fields.mean(dim=1))["O-A"]
        if row == baseline:
            reference = fields
    for group, seed_rows in plan.groups.items():
        table.add_mean(SETTING, group, seed_rows, METHOD)
    for row, (_, target) in plan.trivial.items():  # shrink: the reference to the model's spread term
        mem = table.series(SETTING, target, METHOD, "analysis", "member")["mse"]
        ens = table.series(SETTING, target, METHOD, "analysis", "ensmean")["mse"]
        for (kind, stat), metrics in analysis_scores(baselines.shrink(reference, mem - ens), truth,
                                                     data.normalizer, lat, lon).items():
            table.add(SETTING, row, METHOD, kind, stat, metrics)
    ds = results_dataset(table, plan, times, baseline, members, f"{len(lat)}x{len(lon)}", cfg.run.seed)
    lines = verdict_lines(ds, list(models), baseline, cfg.run.seed)
    rows = [str(m) for m in ds["model"].values]
    verdict = {ln["model"]: {**compact_lines([ln])[0], "conditions": ln["conditions"]} for ln in lines}
    doc = clean({
        "times": [str(t) for t in times], "models": list(models), "rows": rows, "baseline": baseline,
        "method": METHOD, "setting": SETTING,
        "observations": {"files": source, "n_used": obs.n_obs, "per_variable": _counts(obs)},
        "settings": asdict(st), "qc": qc,
        "scores": {r: row_scores(ds, r, METHOD, SETTING)["analysis"] for r in rows},
        "obs_space": obs_stats,
        "changes": {r: c["analysis"] for r in rows if (c := row_changes(ds, r, METHOD, SETTING))},
        "shrink": {target: row for row, (_, target) in plan.trivial.items()},
        "verdict": verdict,
        "decomposition": {r: sections.mse_decomposition(ds, r, METHOD, "analysis", SETTING)
                          for r in rows if r not in (BACKGROUND, baseline)},
        "per_time": {r: {stat: {m: cell_series(ds, SETTING, r, METHOD, "analysis", stat, m) for m in ms}
                         for stat, ms in row_scores(ds, r, METHOD, SETTING)["analysis"].items()} for r in rows},
    })
    _atomic_write(out / "metrics.json", json.dumps(doc, indent=1))
    _atomic_write(out / "report.md", _report(doc, ds, lines))
    return doc


def _counts(obs) -> dict[str, int]:
    from align_rl.observations.operator import STATE_VARS

    c = np.bincount(obs.var_code.cpu().numpy(), minlength=len(STATE_VARS))
    return {STATE_VARS[i]: int(n) for i, n in enumerate(c) if n}


def _report(doc: dict, ds: xr.Dataset, lines: list[dict]) -> str:
    """``report.md``: observations and QC, the scores of every row, the changes against the
    baseline, the verdict lines (the evaluation report's sections, docs/method.md §10), spread/skill,
    the single-member MSE decomposition and the observation-space statistics."""
    b = doc["baseline"]
    L = ["# Observing-network experiment (the paper's Table 5 analogue)", "",
         f"DPS analyses (ζ = {doc['settings'].get('dps_zeta')}) at {len(doc['times'])} times ({doc['times'][0]} … {doc['times'][-1]}) from "
         f"{doc['observations']['n_used']} point observations after quality control "
         f"({', '.join(f'{k} {v}' for k, v in doc['observations']['per_variable'].items())}); "
         f"files: {', '.join(doc['observations']['files'])}.", "", "## Quality control", ""]
    for rep in doc["qc"]:
        L.append(f"- {rep['check']}: " + ", ".join(f"{v} {rep['rejected'][v]}/{n}"
                                                   for v, n in sorted(rep["checked"].items())))
    shrunk = {row: target for target, row in doc["shrink"].items()}
    L += ["", "## Analysis accuracy", "",
          "Rows: the background, every model, and each aligned model's *shrink* baseline (the "
          f"{b} members pulled towards their mean to that model's spread term per time).", "",
          "| row | MSE (member) | MSE (ens. mean) | WRMSE z500 | WRMSE t850 | CRPS | spread/skill |",
          "|---|---|---|---|---|---|---|"]

    def num(v, f):
        return "–" if v is None else format(v, f)

    for n, s in doc["scores"].items():
        ens = s.get("ensemble", {})
        name = f"{n} (shrink of {shrunk[n]})" if n in shrunk else n
        L.append(f"| {name} | {num(s['member']['mse'], '.4f')} | {num(s['ensmean']['mse'], '.4f')} | "
                 f"{num(s['ensmean']['wrmse_z500'], '.1f')} | {num(s['ensmean']['wrmse_t850'], '.3f')} | "
                 f"{num(ens.get('crps'), '.4f')} | {num(ens.get('spread_skill'), '.3f')} |")
    if doc["changes"]:
        L += ["", f"## Change against {b} (%, 95 % block-bootstrap interval)", "",
              "| row | MSE (member) | MSE (ens. mean) | WRMSE z500 (member) | CRPS | spread/skill | verdict |",
              "|---|---|---|---|---|---|---|"]
        for n, ch in doc["changes"].items():
            def f(c):
                if c is None or c["pct"] is None:
                    return "–"
                return f"{c['pct']:+.2f} [{num(c['ci'][0], '+.2f')}, {num(c['ci'][1], '+.2f')}]"
            v = doc["verdict"].get(n)
            verdict = ("" if v is None else
                       f"{'**gain**' if v['gain'] else 'no gain'} (p Holm {v['p_holm']:.4f})")
            L.append(f"| {n} | {f(ch['member']['mse'])} | {f(ch['ensmean']['mse'])} | "
                     f"{f(ch['member']['wrmse_z500'])} | {f(ch['ensemble'].get('crps'))} | "
                     f"{f(ch['ensemble'].get('spread_skill'))} | {verdict} |")
    L += [""] + sections.verdict_section(
        lines, family=f"every aligned model's analysis MSE line of this experiment (DPS; one-sided level {ALPHA})")
    L += sections.spread_skill_section(ds, SETTING) + sections.decomposition_section(ds, SETTING)
    L += ["## Observation space (O−B of the background, O−A of each ensemble mean)", "",
          "| variable | " + " | ".join(f"{n} RMS / χ²" for n in doc["obs_space"]) + " |",
          "|---|" + "---|" * len(doc["obs_space"])]
    for v in doc["obs_space"]["background"]:
        L.append(f"| {v} | " + " | ".join(f"{d[v]['rms']:.4g} / {d[v]['chi2']:.2f}"
                                         for d in doc["obs_space"].values()) + " |")
    return "\n".join(L) + "\n"
