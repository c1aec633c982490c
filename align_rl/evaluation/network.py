"""The observing-network experiment, the paper's Table 5 analogue (docs/method.md §10.1).

Point observations (IODA-v2 files or tables, or the embedded world's synthetic network of
radiosondes and surface stations, :mod:`align_rl.observations.network`, written as IODA files and
read back through the same reader a user's files take) at ``eval.times`` held-out analysis times:

1. selection by an assimilation window ``±window`` around each analysis time;
2. quality control: the background check against ``x_b`` (``σ_b`` per channel: the backgrounds'
   RMS error over these times) and the paper's filter against the reference state (the truth);
   rejected counts per variable in the report;
3. DPS analyses (``eval.members`` members, ``cfg.sampler``, ``cfg.guidance``) of every model with the
   same observations and the same sampler noise (paired);
4. scores: Table 1's analysis metrics (single member, ensemble mean, CRPS), O−B and O−A per variable,
   and each other model's % change against ``eval.baseline`` with its 95 % block-bootstrap interval
   and the same gain verdict as the evaluation report (:func:`align_rl.evaluation.verdict.gain_verdict`).

Writes ``report.md``, ``metrics.json`` (and ``network/*.nc``, the synthetic network) into the output
folder; the command stages the folder and renames it into place (:func:`align_rl.owned.staged`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from align_rl.config import Config
from align_rl.diffusion.analysis import analyse
from align_rl.errors import ConfigError, InputError
from align_rl.evaluation.runner import EvalData, select_times
from align_rl.evaluation.skill import deterministic_metrics, probabilistic_metrics
from align_rl.evaluation.verdict import gain_verdict, paired_change
from align_rl.io.states import States
from align_rl.observations.network import write_network
from align_rl.observations.operator import point_observations
from align_rl.observations.qc import background_check, reference_filter
from align_rl.observations.records import ObsRecords
from align_rl.observations.scores import omb_oma
from align_rl.observations.table import read_observations


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


def _scores(fields: torch.Tensor, truth: torch.Tensor, data: EvalData) -> dict[str, dict]:
    lat, lon, norm = data.truth.lat, data.truth.lon, data.normalizer
    ens = probabilistic_metrics(fields, truth, norm, lat)
    return {"member": deterministic_metrics(fields, truth, norm, lat, lon),
            "ensmean": deterministic_metrics(fields.mean(dim=1), truth, norm, lat, lon),
            "ensemble": {"crps": ens["crps"], "crps_z500": ens["crps_z500"]}}


def _mean(d: dict) -> dict:
    return {st: {m: float(np.mean(v)) for m, v in ms.items()} for st, ms in d.items()}


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
        raise ConfigError("eval.members must be >= 2 (ensemble mean and CRPS need it)")
    baseline = cfg.eval.baseline if cfg.eval.baseline in models else next(iter(models))
    per_time, scores, obs_stats = {}, {}, {"background": omb_oma(obs, x_b, x_b)["O-B"]}
    for k, (name, eps) in enumerate(models.items()):
        if progress:
            print(f"network experiment: {name} (DPS, {len(times)} times × {members} members, "
                  f"{obs.n_obs} observations)", flush=True)
        an = analyse(data.codec, eps, x_b, obs, "dps", cfg.sampler, cfg.guidance,
                     generator=torch.Generator().manual_seed(cfg.run.seed * 1000 + 7),
                     members=members, batch_size=int(cfg.eval.batch_size))
        fields = an.fields.float().cpu()
        per_time[name] = _scores(fields, truth, data)
        scores[name] = _mean(per_time[name])
        obs_stats[name] = omb_oma(obs, x_b, fields.mean(dim=1))["O-A"]
    changes, verdicts = {}, {}
    for name in models:
        if name == baseline:
            continue
        ch = {st_: {m: paired_change(per_time[name][st_][m], per_time[baseline][st_][m],
                                     seed=cfg.run.seed)
                    for m in per_time[name][st_]} for st_ in per_time[name]}
        changes[name] = ch
        verdicts[name] = gain_verdict({"analysis": ch})
    doc = {"times": [str(t) for t in times], "models": list(models), "baseline": baseline,
           "method": "dps", "observations": {"files": source, "n_used": obs.n_obs,
                                             "per_variable": _counts(obs)},
           "settings": asdict(st), "qc": qc, "scores": scores, "obs_space": obs_stats,
           "changes": changes, "verdict": verdicts,
           "per_time": {n: {s: {m: np.asarray(v).tolist() for m, v in ms.items()}
                            for s, ms in d.items()} for n, d in per_time.items()}}
    _atomic_write(out / "metrics.json", json.dumps(doc, indent=1))
    _atomic_write(out / "report.md", _report(doc))
    return doc


def _counts(obs) -> dict[str, int]:
    from align_rl.observations.operator import STATE_VARS

    c = np.bincount(obs.var_code.cpu().numpy(), minlength=len(STATE_VARS))
    return {STATE_VARS[i]: int(n) for i, n in enumerate(c) if n}


def _report(doc: dict) -> str:
    b = doc["baseline"]
    L = ["# Observing-network experiment (the paper's Table 5 analogue)", "",
         f"DPS analyses at {len(doc['times'])} times ({doc['times'][0]} … {doc['times'][-1]}) from "
         f"{doc['observations']['n_used']} point observations after quality control "
         f"({', '.join(f'{k} {v}' for k, v in doc['observations']['per_variable'].items())}); "
         f"files: {', '.join(doc['observations']['files'])}.", "", "## Quality control", ""]
    for rep in doc["qc"]:
        L.append(f"- {rep['check']}: " + ", ".join(f"{v} {rep['rejected'][v]}/{n}"
                                                   for v, n in sorted(rep["checked"].items())))
    L += ["", "## Analysis accuracy", "",
          "| model | MSE (member) | MSE (ens. mean) | WRMSE z500 | WRMSE t850 | CRPS |", "|---|---|---|---|---|---|"]
    for n, s in doc["scores"].items():
        L.append(f"| {n} | {s['member']['mse']:.4f} | {s['ensmean']['mse']:.4f} | "
                 f"{s['ensmean']['wrmse_z500']:.1f} | {s['ensmean']['wrmse_t850']:.3f} | "
                 f"{s['ensemble']['crps']:.4f} |")
    if doc["changes"]:
        L += ["", f"## Change against {b} (%, 95 % block-bootstrap interval)", "",
              "| model | MSE (member) | MSE (ens. mean) | WRMSE z500 (member) | CRPS | verdict |",
              "|---|---|---|---|---|---|"]
        for n, ch in doc["changes"].items():
            def f(c):
                return f"{c['pct']:+.2f} [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}]"
            v = doc["verdict"][n]
            L.append(f"| {n} | {f(ch['member']['mse'])} | {f(ch['ensmean']['mse'])} | "
                     f"{f(ch['member']['wrmse_z500'])} | {f(ch['ensemble']['crps'])} | "
                     f"{'gain' if v['gain'] else 'no gain'}: {v['why']} |")
    L += ["", "## Observation space (O−B of the background, O−A of each ensemble mean)", "",
          "| variable | " + " | ".join(f"{n} RMS / χ²" for n in doc["obs_space"]) + " |",
          "|---|" + "---|" * len(doc["obs_space"])]
    for v in doc["obs_space"]["background"]:
        L.append(f"| {v} | " + " | ".join(f"{d[v]['rms']:.4g} / {d[v]['chi2']:.2f}"
                                         for d in doc["obs_space"].values()) + " |")
    return "\n".join(L) + "\n"
