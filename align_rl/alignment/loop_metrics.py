"""Measures of the asynchronous loop itself (docs/method.md §9.4), from its timelines.

Inputs (wall-clock seconds since the epoch, so the driver's and the learner's clocks agree on one
machine; across machines they are as good as the nodes' clock sync):

- ``learner``: the learner's events, dicts with ``kind`` ∈ {``start``, ``take``, ``publish``,
  ``end``}, ``t0``, ``t1``; a ``take`` has ``wait`` (seconds spent without a batch) and ``steps``;
- ``samplers``: one dict per sampler task (``t0``, ``t1``: submitted, its candidates back),
  ``candidates``;
- ``takes``: the buffer's consumption log (:mod:`align_rl.alignment.buffer`).

Outputs (``loop/...``):

- ``overlap``: |learner span ∩ (∪ sampler intervals)| / |learner span|, the learner span being
  [first ``start``, last ``end``] (each attempt of a resumed run counts on its own);
- ``learner_wait``: Σ waits / learner span;
- ``publish_s`` (mean seconds per publication), ``publish_share`` (Σ / learner span);
- ``candidates_per_s`` (over the samplers' first submit → last result), ``steps_per_s``
  (learner steps / learner span);
- ``staleness``: the histogram ``{versions behind: pairs}`` of the consumed pairs, its ``max`` and
  mean.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from align_rl.alignment.buffer import staleness_histogram


def union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint sorted intervals covering the same points as ``intervals``."""
    out: list[list[float]] = []
    for a, b in sorted((float(a), float(b)) for a, b in intervals if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def covered(spans: Sequence[tuple[float, float]], by: Sequence[tuple[float, float]]) -> float:
    """Seconds of ``spans`` (disjoint) covered by the union of ``by``."""
    u = union(by)
    tot = 0.0
    for a, b in spans:
        for c, d in u:
            tot += max(0.0, min(b, d) - max(a, c))
    return tot


def learner_spans(learner: Sequence[Mapping]) -> list[tuple[float, float]]:
    """The learner's attempts as ``[(start, end)]``: from each ``start`` to its ``end`` (or to the
    last event of the attempt when it was cut)."""
    spans, t0, last = [], None, None
    for e in sorted(learner, key=lambda e: e["t0"]):
        if e["kind"] == "start":
            if t0 is not None:
                spans.append((t0, last))
            t0, last = e["t0"], e["t0"]
        elif t0 is not None:
            last = max(last, e["t1"])
            if e["kind"] == "end":
                spans.append((t0, last))
                t0 = None
    if t0 is not None:
        spans.append((t0, last))
    return union(spans)


def loop_metrics(learner: Sequence[Mapping], samplers: Sequence[Mapping],
                 takes: Sequence[Mapping]) -> dict:
    """The ``loop/...`` measures of the module docstring."""
    spans = learner_spans(learner)
    wall = sum(b - a for a, b in spans)
    busy = [(s["t0"], s["t1"]) for s in samplers]
    waits = sum(float(e.get("wait", 0.0)) for e in learner if e["kind"] == "take")
    pubs = [e["t1"] - e["t0"] for e in learner if e["kind"] == "publish"]
    steps = sum(int(e.get("steps", 1)) for e in learner if e["kind"] == "take")
    hist = staleness_histogram(takes)
    n = sum(hist.values())
    s_span = (max(s["t1"] for s in samplers) - min(s["t0"] for s in samplers)) if samplers else 0.0
    cands = sum(int(s.get("candidates", 0)) for s in samplers)
    div = wall if wall > 0 else float("nan")
    return {
        "loop/learner_s": wall,
        "loop/overlap": covered(spans, busy) / div,
        "loop/learner_wait": waits / div,
        "loop/publishes": len(pubs),
        "loop/publish_s": float(np.mean(pubs)) if pubs else 0.0,
        "loop/publish_share": float(np.sum(pubs)) / div,
        "loop/steps": steps,
        "loop/steps_per_s": steps / div,
        "loop/sampler_tasks": len(samplers),
        "loop/candidates": cands,
        "loop/candidates_per_s": cands / s_span if s_span > 0 else float("nan"),
        "loop/staleness": {str(k): v for k, v in hist.items()},
        "loop/staleness_max": max(hist) if hist else 0,
        "loop/staleness_mean": sum(k * v for k, v in hist.items()) / n if n else 0.0,
    }
