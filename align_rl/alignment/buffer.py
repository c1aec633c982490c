"""The streaming pair buffer of asynchronous online DPO (docs/method.md §9.4).

A :class:`PairBuffer` owns one pair store (:class:`~align_rl.io.pair_store.PairStore`, append-only,
each pair tagged with the policy version that drew it) and hands the learner its batches:

- **staleness bound** ``s``: at learner version ``v`` only pairs of version ``≥ v − s`` are
  eligible (older pairs have left the buffer for good: the version only grows);
- **reuse limit** ``u``: a pair is trained on at most ``u`` times;
- **choice**: among the eligible pairs, the least used first, then the newest, then a random order
  seeded by ``(seed, step, rank)``; a batch holds distinct pairs, so fewer than ``size`` eligible
  pairs give no batch (the learner waits);
- **consumption log**: every batch handed out is a line of ``takes.jsonl`` (step, rank, learner
  version, the pairs' hashes and versions, wall time), written before the batch leaves. Use counts
  are rebuilt from it when the buffer is opened again (a rerun of a killed driver), and a request
  for a step that the log already holds (the learner restarted from an earlier checkpoint) first
  removes the takes of that step and later ones, so the pairs of undone steps count as unused;
- **warm start**: :func:`warm_groups` rebuilds the candidate groups of an offline store (policy
  version 0) to commit first.

The store dedups by group key ``(bg_id, version, guidance)`` and pair content hash, so a group
committed twice (a sampler task redone after a failure) adds nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from align_rl.alignment.pairs import background_pairs, pair_rng, seed_of
from align_rl.errors import ConfigError
from align_rl.io.pair_store import CandidateGroup, PairStore

TAKES_FILE = "takes.jsonl"


def read_takes(path: str | Path) -> list[dict]:
    """The consumption log (one dict per batch handed out; a torn last line is dropped)."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the line a killed process was writing
            break
    return out


def staleness_histogram(takes: Iterable[Mapping]) -> dict[int, int]:
    """``{versions behind: number of consumed pairs}`` over the takes of the log."""
    c: Counter = Counter()
    for t in takes:
        for v in t["versions"]:
            c[int(t["current"]) - int(v)] += 1
    return dict(sorted(c.items()))


def use_counts(takes: Iterable[Mapping]) -> Counter:
    """``{pair hash (hex): times consumed}`` over the takes of the log."""
    c: Counter = Counter()
    for t in takes:
        c.update(t["pairs"])
    return c


class PairBuffer:
    """The buffer over the store at ``store_path`` (created with ``latent_shape``, ``reward_names``
    and ``meta`` when missing) for pair ``mode``; ``staleness`` = s (versions), ``reuse`` = u
    (≥ 1); the consumption log in ``log_dir/takes.jsonl``."""

    def __init__(self, store_path: str | Path, latent_shape: Sequence[int], reward_names: Sequence[str],
                 mode: str, staleness: int, reuse: int, log_dir: str | Path, seed: int = 0,
                 meta: dict | None = None):
        if int(reuse) < 1:
            raise ConfigError(f"dpo.reuse={reuse} must be >= 1")
        if int(staleness) < 0:
            raise ConfigError(f"dpo.staleness={staleness} must be >= 0")
        self.store = PairStore.open(store_path, tuple(latent_shape), list(reward_names), meta=meta)
        self.mode, self.s, self.u, self.seed = mode, int(staleness), int(reuse), int(seed)
        self.log_path = Path(log_dir) / TAKES_FILE
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.takes = read_takes(self.log_path)
        self.uses = use_counts(self.takes)
        self.misses = 0
        self._index()

    def _index(self) -> None:
        self.ps = self.store.pair_set(self.mode, min_version=0)
        self.keys = [bytes(h).hex() for h in self.ps.hash]

    # ------------------------------------------------------------------ producer side
    def add(self, groups: Sequence[CandidateGroup]) -> dict:
        """Commit ``groups`` (duplicates skipped); returns the store's counts added plus
        ``total_pairs`` of the mode."""
        out = self.store.append(list(groups))
        if out["pairs"] or out["backgrounds"]:
            self._index()
        return {**out, "total_pairs": len(self.ps)}

    def drawn(self) -> list[tuple[int, int]]:
        """``(bg_id, version)`` of every committed group (what the samplers need not draw again)."""
        b = self.store.backgrounds()
        return [(int(i), int(v)) for i, v in zip(b["bg_id"], b["version"])]

    # ------------------------------------------------------------------ learner side
    def _rollback(self, step: int, rank: int) -> None:
        if not any(int(t["step"]) > step or (int(t["step"]) == step and int(t["rank"]) == rank)
                   for t in self.takes):
            return
        self.takes = [t for t in self.takes if int(t["step"]) < step]
        self.uses = use_counts(self.takes)
        tmp = self.log_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(t) + "\n" for t in self.takes))
        os.replace(tmp, self.log_path)

    def eligible(self, current: int) -> np.ndarray:
        """Positions (in the buffer's pair set) of the pairs a learner at ``current`` may take:
        versions ``current − s … current``, used fewer than ``u`` times."""
        uses = np.fromiter((self.uses.get(k, 0) for k in self.keys), np.int64, len(self.keys))
        v = self.ps.version
        # never a version above the learner's: such pairs exist only after a resume from an
        # earlier checkpoint, and wait until the learner is at their version again
        return np.flatnonzero((v >= int(current) - self.s) & (v <= int(current)) & (uses < self.u))

    def take(self, step: int, rank: int, size: int, current: int) -> dict | None:
        """The batch of learner ``step`` on worker ``rank`` (``size`` distinct pairs) for a learner
        at policy version ``current``: ``{"z_w", "z_l", "z_b"}`` latents ``(size, C, h, w)`` float32
        and ``versions`` ``(size,)``; None when fewer than ``size`` pairs are eligible."""
        self._rollback(int(step), int(rank))
        idx = self.eligible(current)
        if len(idx) < int(size):
            self.misses += 1
            return None
        uses = np.array([self.uses.get(self.keys[i], 0) for i in idx])
        rnd = np.random.default_rng(seed_of(self.seed, step, rank)).random(len(idx))
        pick = idx[np.lexsort((rnd, -self.ps.version[idx], uses))[: int(size)]]
        rec = {"step": int(step), "rank": int(rank), "current": int(current), "t": time.time(),
               "pairs": [self.keys[i] for i in pick], "versions": self.ps.version[pick].tolist()}
        with open(self.log_path, "a") as f:  # before the batch leaves: a crash undoes nothing twice
            f.write(json.dumps(rec) + "\n")
        self.takes.append(rec)
        self.uses.update(rec["pairs"])
        ps = self.ps
        return {"z_w": self.store.candidate_latents(ps.winner[pick]),
                "z_l": self.store.candidate_latents(ps.loser[pick]),
                "z_b": self.store.background_latents(ps.background[pick]),
                "versions": ps.version[pick].copy()}

    def stats(self) -> dict[str, Any]:
        """Pairs held, pairs consumed, most uses of one pair, staleness histogram, misses."""
        return {"pairs": len(self.ps), "consumed": sum(len(t["pairs"]) for t in self.takes),
                "distinct_consumed": len(self.uses), "max_uses": max(self.uses.values(), default=0),
                "staleness": staleness_histogram(self.takes), "misses": self.misses,
                "backgrounds": self.store.num_backgrounds, "candidates": self.store.num_candidates}


def warm_groups(store: PairStore, mode: str, weights: Mapping[str, float], pairs_cfg: Any, seed: int,
                normalize: str = "zscore", bg_ids: Iterable[int] | None = None) -> list[CandidateGroup]:
    """The version-0 candidate groups of an offline ``store`` (only the backgrounds ``bg_ids`` when
    given: those the offline run of the same settings uses) with their ``mode`` pairs chosen again
    with the run's ``weights``, ``normalize`` and alignment ``seed`` (the seeds of
    :func:`pair_rng`, so the same pairs as the offline run's), to warm-start the buffer."""
    b = store.backgrounds()
    cb = store.candidate_backgrounds()
    scores = store.scores()
    out = []
    rows0 = b["version"] == 0
    if bg_ids is not None:
        rows0 &= np.isin(b["bg_id"].astype(np.int64), np.fromiter(bg_ids, np.int64))
    for row in np.flatnonzero(rows0):
        rows = np.flatnonzero(cb == row)
        if len(rows) < 2:
            continue
        sc = {k: v[rows] for k, v in scores.items()}
        bg_id = int(b["bg_id"][row])
        pl = background_pairs(sc, mode, weights, int(pairs_cfg.pairs_per_background),
                              pair_rng(seed, bg_id, 0, mode), int(pairs_cfg.top_k_phys),
                              float(pairs_cfg.decile), normalize)
        out.append(CandidateGroup(bg_id, int(b["time"][row].astype(np.int64)), 0, str(b["guidance"][row]),
                                  store.background_latents(np.array([row]))[0],
                                  store.candidate_latents(rows), sc, {mode: pl}))
    return out
