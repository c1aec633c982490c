"""Aligned models trained with several seeds (docs/method.md §10): their rows, the row of their
mean, the trivial baselines built for them, and the across-seed spread the report shows.

A model given as a list of score networks (one per seed, index = seed) is evaluated as one row per
seed, ``<name>@seed<k>``, and the row ``<name>`` holds the per-time mean of their scores (the
seed mean: its change against the reference and its interval are those of the mean). A model given
as one network is one row (one seed). Every aligned model ``Align-<V>`` gets a trivial baseline
row (:mod:`align_rl.evaluation.baselines`): ``Blend-P`` (towards the background) for ``Align-P``
(the physics variant, whose gain is the Geo-Score), ``Shrink-<V>`` for every other variant; with
``blend_val``, one more row, ``Blend-val`` (the reference towards the background with the weight
fitted on validation times), built from the baseline for every MSE verdict line, and per aligned
``-M`` row ``<row>`` (``Align-M``, ``Align-<anything>-M``, each seed row ``Align-M@seed<k>``) the row
``Blend-val-<row>`` (kind ``blend-val-aligned``): that model's own members blended towards the
background with its own validation-fitted weight, the like-with-like comparison the report shows
beside ``Blend-val`` (no verdict line of its own). A several-seed model's ``Blend-val-<name>`` is the
per-time mean of its seeds' ``Blend-val-<name>@seed<k>`` rows (:attr:`RowPlan.trivial_means`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from align_rl.errors import ConfigError

SEED_SEP = "@seed"
ALIGNED = re.compile(r"^Align-(?P<v>[A-Za-z0-9_]+)$")
BLEND_VAL = "Blend-val"
"""The row of the reference blended towards the background with the validation-fitted weight."""
BLEND_VAL_ALIGNED = "blend-val-aligned"
"""The trivial kind of ``Blend-val-<row>``: an aligned ``-M`` row blended with its own val-fitted w."""
MSE_ALIGNED = re.compile(r"^Align-(?:.+-)?M$")
"""The aligned rows (seed rows by their model's name) that get a ``Blend-val-<row>`` row."""


def blend_val_name(row: str) -> str:
    """The ``Blend-val-<row>`` row of an aligned row: ``Align-M@seed1`` → ``Blend-val-Align-M@seed1``."""
    return f"{BLEND_VAL}-{row}"


@dataclass
class RowPlan:
    """The rows of one evaluation: ``sampled`` (row name → score network, in order), ``groups``
    (mean row → its per-seed rows, only for several seeds), ``trivial`` (baseline row →
    ``(kind, aligned row)``), ``trivial_means`` (a trivial row that is the per-time mean of
    per-seed trivial rows → those rows: ``Blend-val-Align-M`` → ``Blend-val-Align-M@seed<k>``)."""

    sampled: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    trivial: dict[str, tuple[str, str]] = field(default_factory=dict)
    trivial_means: dict[str, list[str]] = field(default_factory=dict)

    def names(self) -> list[str]:
        """Every row but the background, in the Dataset's order: for each model its (mean) row,
        then its seed rows; then the trivial baselines."""
        out = []
        for name in self.sampled:
            base = name.split(SEED_SEP, 1)[0] if SEED_SEP in name else name
            if base in self.groups and base not in out:
                out.append(base)
            out.append(name)
        return out + list(self.trivial)

    def coords(self, names: list[str]) -> dict[str, tuple[str, list]]:
        """The ``model`` coordinates of :mod:`align_rl.evaluation.results` for rows ``names``."""
        seed_of = {r: g for g, rows in self.groups.items() for r in rows}
        return {
            "seed_of": ("model", [seed_of.get(n, "") for n in names]),
            "seed": ("model", [int(n.rsplit(SEED_SEP, 1)[1]) if n in seed_of else -1 for n in names]),
            "n_seeds": ("model", [len(self.groups.get(n, self.trivial_means.get(n, [n]))) for n in names]),
            "trivial_for": ("model", [self.trivial.get(n, ("", ""))[1] for n in names]),
            "trivial_kind": ("model", [self.trivial.get(n, ("", ""))[0] for n in names]),
        }


def plan_rows(models: dict[str, Any], baseline: str = "reference", trivial: bool = True,
              blend_val: bool = False) -> RowPlan:
    """The :class:`RowPlan` of ``models`` (name → network, or → list of networks, one per seed);
    ``blend_val``: add the row :data:`BLEND_VAL` (kind ``blend-val``, built for the baseline) and
    per aligned ``-M`` row (:data:`MSE_ALIGNED`; each seed row, and the seed mean as their mean)
    its ``Blend-val-<row>`` (kind :data:`BLEND_VAL_ALIGNED`, built for that row)."""
    plan = RowPlan()
    for name, m in models.items():
        if SEED_SEP in name:
            raise ConfigError(f"model name {name!r} may not contain {SEED_SEP!r} (kept for seed rows); rename it")
        nets = list(m) if isinstance(m, (list, tuple)) else [m]
        if not nets:
            raise ConfigError(f"model {name!r} has no checkpoint (an empty list of seeds)")
        if len(nets) == 1:
            plan.sampled[name] = nets[0]
            continue
        rows = [f"{name}{SEED_SEP}{k}" for k in range(len(nets))]
        plan.groups[name] = rows
        plan.sampled.update(zip(rows, nets))
    if trivial:
        for name in models:
            hit = ALIGNED.match(name)
            if hit is None or name == baseline:
                continue
            v = hit.group("v")
            kind, row = ("blend", "Blend-P") if v == "P" else ("shrink", f"Shrink-{v}")
            if row in models:
                raise ConfigError(f"model name {row!r} is the trivial baseline of {name}; rename it")
            plan.trivial[row] = (kind, name)
    if blend_val:
        if BLEND_VAL in models:
            raise ConfigError(f"model name {BLEND_VAL!r} is the validation-fitted blend baseline; rename it")
        plan.trivial[BLEND_VAL] = ("blend-val", baseline)
        _plan_blend_val_aligned(plan, models, baseline)
    return plan


def _plan_blend_val_aligned(plan: RowPlan, models: dict[str, Any], baseline: str) -> None:
    """The ``Blend-val-<row>`` rows of the aligned ``-M`` models of ``plan`` (seed rows first, then
    their mean row)."""
    for name in models:
        if name == baseline or MSE_ALIGNED.match(name) is None:
            continue
        rows = plan.groups.get(name, [name])
        for row in [*rows, name] if name in plan.groups else rows:
            if blend_val_name(row) in models:
                raise ConfigError(f"model name {blend_val_name(row)!r} is the validation-fitted blend of "
                                  f"{row}; rename it")
            plan.trivial[blend_val_name(row)] = (BLEND_VAL_ALIGNED, row)
        if name in plan.groups:
            plan.trivial_means[blend_val_name(name)] = [blend_val_name(r) for r in rows]


def group_of(name: str) -> str:
    """The model a row belongs to: ``Align-M@seed2`` → ``Align-M``."""
    return name.split(SEED_SEP, 1)[0]


def across_seeds(ds: xr.Dataset, model: str, method: str, kind: str, stat: str, metric: str,
                 setting: str = "main") -> dict | None:
    """The per-seed % changes against the baseline of one cell of a several-seed model:
    ``{"seeds": [pct per seed], "mean", "std" (ddof 1), "min", "max", "n"}``; None for one seed."""
    if "seed_of" not in ds.coords:
        return None
    rows = [str(m) for m, g in zip(ds["model"].values, ds["seed_of"].values) if str(g) == model]
    if not rows:
        return None
    sel = {"setting": setting, "method": method, "kind": kind, "stat": stat, "metric": metric}
    try:
        pct = [float(ds["pct"].sel({**sel, "model": r})) for r in rows]
    except KeyError:
        return None
    v = np.asarray(pct)
    fin = v[np.isfinite(v)]
    if len(fin) == 0:
        return None
    return {"seeds": pct, "mean": float(fin.mean()), "std": float(fin.std(ddof=1)) if len(fin) > 1 else 0.0,
            "min": float(fin.min()), "max": float(fin.max()), "n": len(pct)}
