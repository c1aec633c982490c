"""The Pareto front of a multi-objective sweep, its picture and the sweep's own report.

A trial is on the front when no other trial is at least as good on every objective and strictly
better on one (``objectives``: metric -> min | max of the sweep file). The front answers "which
weightings trade one preference against another without wasting any"; the reference (the
pretrained model, no alignment) sits at the origin of the change axes.

Outputs in ``<run.workdir>/sweeps/<name>/``: ``report.md`` (the question, the front with each
objective's % change against the reference and its 95 % interval over the validation times, the
chosen trial), ``front.png`` and the learning curves ``curves.png``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

SIGN = {"min": 1.0, "max": -1.0}


def pareto_mask(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """Which rows of ``values`` (N, K) are non-dominated for objectives with ``modes`` (K,)
    (``min`` | ``max``). A row with a non-finite value is never on the front (and dominates none).
    Equal rows are all on the front. (N,) bool."""
    v = np.asarray(values, np.float64).reshape(len(values), len(modes))
    x = v * np.array([SIGN[m] for m in modes])  # all minimised
    ok = np.all(np.isfinite(x), axis=1)
    front = ok.copy()
    for i in np.flatnonzero(ok):
        others = x[ok]
        dominated = np.all(others <= x[i], axis=1) & np.any(others < x[i], axis=1)
        front[i] = not dominated.any()
    return front


def front_of(rows: Sequence[Any], goals: dict[str, str]) -> list[Any]:
    """The trials (:class:`~align_rl.tune.results.TrialRow`) on the Pareto front of ``goals``,
    among the completed ones (a trial stopped early was compared on fewer stages)."""
    done = [r for r in rows if r.status == "completed" and all(k in r.metrics for k in goals)]
    if not done:
        return []
    vals = np.array([[r.metrics[k] for k in goals] for r in done])
    mask = pareto_mask(vals, list(goals.values()))
    return [r for r, m in zip(done, mask) if m]


def improves(row: Any, goals: dict[str, str]) -> bool:
    """Whether the trial is better than the reference on every objective (its % changes)."""
    ch = [row.metrics.get(f"{k}_change_pct") for k in goals]
    return all(c is not None and math.isfinite(c) and SIGN[m] * c < 0 for c, m in zip(ch, goals.values()))


def choose(front: Sequence[Any], goals: dict[str, str], metric: str, mode: str) -> Any | None:
    """The chosen trial of the front: among those better than the reference on every objective
    (:func:`improves`), else among the whole front, the best on the primary ``metric``."""
    pool = [r for r in front if improves(r, goals)] or list(front)
    if not pool:
        return None
    return min(pool, key=lambda r: SIGN[mode] * r.metrics[metric])


def change_cell(metrics: dict[str, float], k: str) -> str:
    """``-1.2 % [-2.0, -0.4]``: the % change of ``k`` against the reference with its interval."""
    c = metrics.get(f"{k}_change_pct")
    if c is None:
        return f"{metrics[k]:.4g}" if k in metrics else ""
    lo, hi = metrics.get(f"{k}_change_lo"), metrics.get(f"{k}_change_hi")
    return f"{c:+.2f} % [{lo:+.2f}, {hi:+.2f}]" if lo is not None and hi is not None else f"{c:+.2f} %"


def plot_front(rows: Sequence[Any], front: Sequence[Any], path: Path, reference: dict[str, float] | None,
               x: str = "val_mse_change_pct", y: str = "val_fc_mse_change_pct",
               color: str = "val_geo_score", label: Any = None, title: str = "") -> Path | None:
    """``x`` against ``y`` of every completed trial (the front ringed and joined, the reference at
    the origin), coloured by ``color``; written to ``path`` (PNG). None when no trial has
    ``x`` and ``y``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.status == "completed" and x in r.metrics and y in r.metrics]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    cvals = [r.metrics.get(color, np.nan) for r in pts]
    ref_c = (reference or {}).get(color)
    finite = [c for c in cvals + [ref_c] if c is not None and np.isfinite(c)]
    norm = matplotlib.colors.Normalize(min(finite), max(finite)) if finite else None
    sc = ax.scatter([r.metrics[x] for r in pts], [r.metrics[y] for r in pts], c=cvals, cmap="viridis",
                    norm=norm, s=40, zorder=3)
    fr = sorted(front, key=lambda r: r.metrics[x])
    if fr:
        ax.plot([r.metrics[x] for r in fr], [r.metrics[y] for r in fr], "-", color="0.5", zorder=2,
                label="Pareto front")
        ax.scatter([r.metrics[x] for r in fr], [r.metrics[y] for r in fr], s=140, facecolors="none",
                   edgecolors="crimson", linewidths=1.5, zorder=4)
    ax.scatter([0.0], [0.0], marker="*", s=220, c=[ref_c if ref_c is not None else np.nan],
               cmap="viridis", norm=norm, edgecolors="k", zorder=5, label="reference")
    if label is not None:
        for r in fr:
            ax.annotate(label(r), (r.metrics[x], r.metrics[y]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
    if title:
        ax.set_title(title, fontsize=9)
    ax.axhline(0, color="0.8", lw=0.8, zorder=1)
    ax.axvline(0, color="0.8", lw=0.8, zorder=1)
    ax.set_xlabel(f"{x} (% vs reference; < 0 better)")
    ax.set_ylabel(f"{y} (% vs reference; < 0 better)")
    if norm is not None:
        fig.colorbar(sc, ax=ax, label=color)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    """Write ``fig`` to ``path`` (PNG) through a temporary beside it, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_curves(rows: Sequence[Any], path: Path, y: str = "val_mse_change_pct", label: Any = None) -> Path | None:
    """Each trial's ``y`` after every stage against its DPO steps (``row.history``), the
    reference as the zero line; written to ``path`` (PNG). None when no trial reported ``y``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(r, [h for h in r.history if y in h and "dpo_steps" in h]) for r in rows]
    runs = [(r, h) for r, h in runs if h]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for r, h in runs:
        ax.plot([p["dpo_steps"] for p in h], [p[y] for p in h], "o-", ms=3, lw=1,
                label=label(r) if label is not None else str(r.trial_id))
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel("DPO steps")
    ax.set_ylabel(f"{y} (% vs reference)")
    if len(runs) <= 12:
        ax.legend(fontsize=7)
    return _save(fig, path)
