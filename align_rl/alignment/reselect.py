"""Pairs chosen again from a preference store's stored per-candidate scores (docs/method.md §8).

No sampling and no rollouts: per committed background group, the candidates' stored reward
components are ranked with the current weights (:func:`~align_rl.alignment.pairs.background_pairs`)
and paired with the same seeded stream as when they were built
(:func:`~align_rl.alignment.pairs.pair_rng`), so the same weights and seed give back the pairs
committed with the candidates, and other weights give a new selection.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping

import numpy as np

from align_rl.alignment.pairs import HASH_BYTES, background_pairs, pair_hash, pair_rng
from align_rl.io.pair_format import PairSet


def _groups(store: Any, min_version: int, bg_ids: Collection[int] | None = None):
    """``(background row, bg_id, version, candidate rows)`` of every committed background group
    of version ≥ ``min_version`` with at least two candidates (only those of ``bg_ids`` when
    given)."""
    keep = None if bg_ids is None else {int(i) for i in bg_ids}
    cb = store.candidate_backgrounds()
    bg = store.backgrounds()
    order = np.argsort(cb, kind="stable")
    starts = np.searchsorted(cb[order], np.arange(len(bg["bg_id"]) + 1))
    for b in range(len(bg["bg_id"])):
        rows = order[starts[b]:starts[b + 1]]
        if keep is not None and int(bg["bg_id"][b]) not in keep:
            continue
        if int(bg["version"][b]) >= min_version and len(rows) >= 2:
            yield b, int(bg["bg_id"][b]), int(bg["version"][b]), rows


def reselect_pairs(store: Any, weights: Mapping[str, float] | None, mode: str = "M",
                   per_background: int = 8, seed: int = 0, top_k: int = 5, decile: float = 0.1,
                   min_version: int | None = None, normalize: str = "zscore",
                   bg_ids: Collection[int] | None = None) -> PairSet:
    """A new :class:`~align_rl.io.pair_format.PairSet` from the stored scores of ``store`` (a
    :class:`~align_rl.io.pair_store.PairStore`).

    Per committed background group of version ≥ ``min_version`` (default: the store's stale
    bound), and of the backgrounds ``bg_ids`` when given (a store that holds more backgrounds than a
    run uses, e.g. after a run with a larger ``pairs.backgrounds``): ``select`` by ``mode`` with ``weights``, stratified ``pair_up``, dedup by content hash
    (``(z_b, z_w, z_l)``, :func:`~align_rl.alignment.pairs.pair_hash`). Not written to the store;
    hand ``(store, pair_set)`` to :class:`~align_rl.io.pair_store.PairDataset` or ``run_dpo``.
    """
    c = store.committed
    mv = c.get("min_version", 0) if min_version is None else int(min_version)
    sc = store.scores()
    W, L, B, V, H = [], [], [], [], []
    seen: set[bytes] = set()
    for b, bg_id, version, rows in _groups(store, mv, bg_ids):
        s = {k: v[rows] for k, v in sc.items()}
        rng = pair_rng(seed, bg_id, version, mode)
        pl = background_pairs(s, mode, weights, per_background, rng, top_k, decile, normalize)
        if len(pl) == 0:
            continue
        zb = store.background_latents(np.array([b]))[0]
        lat = store.candidate_latents(rows)
        for wi, li in pl:
            h = pair_hash(zb, lat[wi], lat[li])
            if h in seen:
                continue
            seen.add(h)
            W.append(rows[wi]); L.append(rows[li]); B.append(b)
            V.append(version); H.append(np.frombuffer(h, np.uint8))
    return store.in_task_order(PairSet(np.asarray(W, np.int64), np.asarray(L, np.int64),
                                       np.asarray(B, np.int64), np.asarray(V, np.int32),
                                       np.stack(H) if H else np.zeros((0, HASH_BYTES), np.uint8), mode))
