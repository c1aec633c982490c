"""Do the held-out splits hold weather that no training state holds? (docs/method.md §2.1)

The check compares the z500 eddy field (the departure from its zonal mean) of every state of a
held-out split (``val``, ``pref``, ``test``) with the state of the same index — the same offset
from the split's start, i.e. the same day of the run — in every training stretch, after undoing
any stored longitude rotation of the members (``member_rotation_deg``, worlds of the earlier
scheme). The yardstick is the correlation between states of the store that share no weather:
pairs at least ``min_days_apart`` days apart (default 10) inside one stretch.

A split **passes** when the 90th percentile of its correlations with training states is at most
the 95th percentile of that yardstick plus ``margin`` (0.1). Networks that are close to
equivariant in longitude would see a rotated copy of training weather as training weather, so
the rotations are undone before comparing.

Shapes: a stretch is ``(T, H, W)`` of z500 in physical units (m² s⁻²); correlations are Pearson
correlations over all grid points (area weights are not applied: this is a similarity test, not a
score).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from align_rl.errors import InputError

HELD_OUT = ("val", "pref", "test")


def eddy_unit(z: np.ndarray) -> np.ndarray:
    """Eddy fields of ``z`` ``(T, H, W)``: zonal mean removed, then centred and scaled to unit
    norm over the grid, so a dot product is a Pearson correlation. Returns ``(T, H·W)``."""
    x = np.asarray(z, np.float64)
    x = x - x.mean(axis=-1, keepdims=True)
    x = x.reshape(x.shape[0], -1)
    x = x - x.mean(axis=-1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)


def unrotate(z: np.ndarray, degrees: float) -> np.ndarray:
    """Turn ``z`` ``(T, H, W)`` back (westward) by ``degrees`` to the nearest grid column."""
    d = 360.0 / z.shape[-1]
    return np.roll(z, -int(round(float(degrees) / d)), axis=-1)


def same_index_correlations(held: np.ndarray, train: list[np.ndarray]) -> np.ndarray:
    """Correlations of each state of ``held`` ``(T, H, W)`` with the state of the same index of
    every training stretch (``(T_k, H, W)`` each; indices beyond a shorter stretch are skipped).
    Returns a flat array (one value per state and training stretch)."""
    h = eddy_unit(held)
    out = []
    for tr in train:
        n = min(len(h), len(tr))
        if n:
            out.append(np.sum(h[:n] * eddy_unit(tr[:n]), axis=-1))
    return np.concatenate(out) if out else np.zeros(0)


def independent_correlations(stretches: list[np.ndarray], steps_apart: int, max_pairs: int = 20000,
                             seed: int = 0) -> np.ndarray:
    """Correlations between states at least ``steps_apart`` indices apart inside one stretch:
    the level of chance for this store's weather (at most ``max_pairs`` pairs, drawn at random)."""
    rng = np.random.default_rng(seed)
    vals = []
    for s in stretches:
        u = eddy_unit(s)
        i, j = np.triu_indices(len(u), k=int(steps_apart))
        if len(i) == 0:
            continue
        take = rng.choice(len(i), size=min(len(i), max_pairs), replace=False)
        vals.append(np.sum(u[i[take]] * u[j[take]], axis=-1))
    return np.concatenate(vals) if vals else np.zeros(0)


@dataclass
class SplitCheck:
    """The result for one held-out split."""

    split: str
    n: int  # correlations computed (states × training stretches)
    p90: float  # 90th percentile of the correlations with training states
    max: float
    threshold: float  # the yardstick's 95th percentile + margin
    passed: bool


@dataclass
class IndependenceReport:
    """Per-split results and the yardstick (docs/method.md §2.1)."""

    splits: list[SplitCheck]
    chance_p95: float  # 95th percentile of correlations between states ≥ min_days_apart apart
    chance_n: int
    min_days_apart: float
    margin: float
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.splits)

    def table(self) -> str:
        """A Markdown table of the result."""
        lines = [f"Level of chance: 95th percentile of the z500 eddy correlation between states "
                 f"≥ {self.min_days_apart:g} days apart = {self.chance_p95:.3f} ({self.chance_n} "
                 f"pairs); a split passes when its 90th percentile ≤ {self.chance_p95:.3f} + "
                 f"{self.margin:g}.", "",
                 "| split | correlations | p90 | max | threshold | verdict |", "|---|---|---|---|---|---|"]
        for s in self.splits:
            lines.append(f"| {s.split} | {s.n} | {s.p90:.3f} | {s.max:.3f} | {s.threshold:.3f} | "
                         f"{'independent' if s.passed else 'SHARES WEATHER WITH TRAIN'} |")
        return "\n".join(lines + [f"- {n}" for n in self.notes])

    def to_dict(self) -> dict:
        return {"passed": self.passed, "chance_p95": self.chance_p95, "chance_n": self.chance_n,
                "min_days_apart": self.min_days_apart, "margin": self.margin, "notes": self.notes,
                "splits": [s.__dict__ for s in self.splits]}


def check_stretches(train: list[np.ndarray], held: dict[str, list[np.ndarray]],
                    steps_per_day: float = 4.0, min_days_apart: float = 10.0,
                    margin: float = 0.1) -> IndependenceReport:
    """The check on z500 stretches in memory, rotations already undone.

    ``train``: the training stretches; ``held``: split name → its stretches (each ``(T, H, W)``,
    6-hourly by default: ``steps_per_day`` = 4)."""
    if not train:
        raise InputError("the independence check needs at least one training stretch")
    everything = list(train) + [s for v in held.values() for s in v]
    chance = independent_correlations(everything, int(round(min_days_apart * steps_per_day)))
    notes = []
    if len(chance) == 0:
        raise InputError(f"no stretch is longer than {min_days_apart:g} days: the level of chance "
                         "cannot be measured; simulate more days (data.days) or lower --min-days")
    p95 = float(np.percentile(chance, 95))
    thr = p95 + float(margin)
    out = []
    for name, stretches in held.items():
        c = np.concatenate([same_index_correlations(s, train) for s in stretches]) if stretches \
            else np.zeros(0)
        if len(c) == 0:
            notes.append(f"{name}: no state to compare")
            continue
        p90 = float(np.percentile(c, 90))
        out.append(SplitCheck(name, int(len(c)), p90, float(c.max()), thr, p90 <= thr))
    return IndependenceReport(out, p95, int(len(chance)), float(min_days_apart), float(margin), notes)


def _year_stretches(z: np.ndarray, times: np.ndarray, start: str, end: str) -> list[tuple[int, np.ndarray]]:
    """The states of ``[start, end]`` cut into one stretch per calendar year (a member of the
    embedded world, or one year of a real store), as ``(year, (T, H, W))``."""
    t = np.asarray(times, "datetime64[ns]")
    sel = (t >= np.datetime64(start)) & (t < np.datetime64(end) + np.timedelta64(1, "D"))
    years = t.astype("datetime64[Y]").astype(int) + 1970
    return [(int(y), z[sel & (years == y)]) for y in np.unique(years[sel])]


def check_store(path, splits: dict[str, list[str]] | None = None, min_days_apart: float = 10.0,
                margin: float = 0.1) -> IndependenceReport:
    """The check on a WeatherBench2-layout store (the embedded world or a user's).

    ``splits``: ``{"train": [start, end], "val": …, "pref": …, "test": …}``; default the store's
    own ``splits`` attribute (the embedded world writes it). Each split is cut into calendar years
    (members of the embedded world); the same index means the same offset from the year's start.
    Rotations stored in ``member_rotation_deg`` (year ``2000 + m`` ↔ member ``m``) are undone."""
    import json

    import xarray as xr

    ds = xr.open_zarr(str(path), consolidated=None)
    attrs = {k: (json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v) for k, v in ds.attrs.items()}
    splits = splits or attrs.get("splits")
    if not splits or "train" not in splits:
        raise InputError(f"{path} records no data splits; pass them (--train START END, --test …)")
    if "geopotential" not in ds or "level" not in ds["geopotential"].dims:
        raise InputError(f"{path} has no geopotential on pressure levels; the check uses z500")
    z = ds["geopotential"].sel(level=500)
    lat = "latitude" if "latitude" in z.dims else "lat"
    z = z.transpose("time", lat, ...).values.astype(np.float64)
    times = ds["time"].values
    rot = attrs.get("member_rotation_deg") or []
    base = int(attrs.get("member_years", "2000").split("year ")[-1][:4]) if "member_years" in attrs else 2000

    def stretches(name):
        out = []
        for year, s in _year_stretches(z, times, *splits[name]):
            m = year - base
            deg = rot[m] if 0 <= m < len(rot) else 0.0
            out.append(unrotate(s, deg) if deg else s)
        return out

    steps_per_day = 86400e9 / float(np.median(np.diff(times[:50]).astype("timedelta64[ns]").astype(float)))
    train = stretches("train")
    held = {k: stretches(k) for k in HELD_OUT if k in splits}
    return check_stretches(train, held, steps_per_day, min_days_apart, margin)
