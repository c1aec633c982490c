"""Preference pairs from scored candidates (docs/method.md §8).

For the N candidates of ONE background:

- ``-P`` (physics only): winners = the ``top_k`` candidates by the ``phys`` reward (Geo-Score),
  losers = the ``top_k`` lowest (``top_k`` = 5 in the paper; at most ``N // 2`` each).
- ``-M`` (multi): winners = the top decile of the composite reward (each component normalised
  within the background first, :func:`align_rl.alignment.rewards.composite`), losers = the bottom decile,
  ``k = max(1, round(decile · N))`` each, at most ``N // 2`` (so N = 16 → 2, N = 32 → 3, N = 8 → 1).
- Ties are broken by candidate index (stable sort), so selection is deterministic.
- Pairs: winners × losers of the same background, then a stratified random subsample of at most
  ``per_background`` pairs: the candidate pairs are visited winner by winner in round-robin
  (each winner's losers in random order), so every winner contributes as evenly as the budget allows.
- Content hash: SHA-256 of the float32 bytes of (background latent, winner latent, loser latent)
  (first 16 bytes kept), so the same pair drawn twice — e.g. by a retried actor task — is stored once.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np

from align_rl.errors import ConfigError, InputError
from align_rl.alignment.rewards import composite

MODES = ("M", "P")
HASH_BYTES = 16


def select(
    scores: Mapping[str, np.ndarray],
    mode: str,
    weights: Mapping[str, float] | None = None,
    top_k: int = 5,
    decile: float = 0.1,
    normalize: str = "zscore",
) -> tuple[np.ndarray, np.ndarray]:
    """Winner and loser candidate indices ``(winners, losers)`` of one background's scores.

    ``scores``: ``{reward: (N,)}``; ``mode`` ``"P"`` uses ``scores["phys"]``, ``"M"`` the composite
    with ``weights``. Winners are listed best first, losers worst first.
    """
    if mode == "P":
        if "phys" not in scores:
            raise ConfigError("pairs.mode=P ranks by the 'phys' reward; add phys to rewards.names")
        r = np.asarray(scores["phys"], dtype=np.float64)
        k = int(top_k)
    elif mode == "M":
        if weights is None:
            raise ConfigError("pairs.mode=M needs rewards.weights")
        r = composite(scores, weights, normalize)
        if not 0 < decile <= 0.5:
            raise ConfigError(f"pairs.decile={decile} must lie in (0, 0.5]")
        k = max(1, int(round(decile * len(r))))
    else:
        raise ConfigError(f"pairs.mode={mode!r} is not one of {', '.join(MODES)}")
    n = len(r)
    if n < 2:
        raise InputError("pair selection needs at least 2 candidates per background")
    k = max(1, min(k, n // 2))
    order = np.argsort(-r, kind="stable")  # best first
    winners = order[:k]
    losers = order[::-1][:k]  # worst first
    return winners.astype(np.int64), losers.astype(np.int64)


def pair_up(winners: np.ndarray, losers: np.ndarray, per_background: int,
            rng: np.random.Generator) -> np.ndarray:
    """Stratified random subsample of winners × losers → ``(P, 2)`` rows ``(winner, loser)``.

    ``P = min(per_background, |W|·|L|)``; round-robin over winners (shuffled), each winner's losers
    shuffled, so winners appear ``⌊P/|W|⌋`` or ``⌈P/|W|⌉`` times.
    """
    if per_background < 1:
        raise ConfigError(f"pairs.pairs_per_background={per_background} must be >= 1")
    w = list(rng.permutation(np.asarray(winners)))
    queues = {int(a): list(rng.permutation(np.asarray(losers))) for a in w}
    out: list[tuple[int, int]] = []
    total = min(per_background, len(winners) * len(losers))
    while len(out) < total:
        for a in w:
            if queues[int(a)] and len(out) < total:
                out.append((int(a), int(queues[int(a)].pop())))
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and machines)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def alignment_seed(run_seed: int, dpo_seed: int) -> int:
    """The seed of one alignment run (docs/method.md §9.5): the learner's batch order, ``t`` and
    ``ε``, and the pair draw from the stored candidates. ``dpo_seed = 0`` is ``run_seed`` itself
    (the pairs as first committed); another value derives a seed from both (< 2³¹)."""
    if int(dpo_seed) == 0:
        return int(run_seed)
    return seed_of(run_seed, 0x5EED, dpo_seed) % 2**31


def pair_rng(seed: int, bg_id: int, version: int, mode: str) -> np.random.Generator:
    """The generator of one background's pair subsample (the same when pairs are first built and
    when :meth:`~align_rl.io.pair_store.PairStore.reselect` rebuilds them with the same weights)."""
    return np.random.default_rng(seed_of(seed, bg_id, version, ord(mode)))


def pair_hash(z_b: np.ndarray, z_w: np.ndarray, z_l: np.ndarray) -> bytes:
    """Content hash (16 bytes) of a pair: SHA-256 over the float32 bytes of ``z_b, z_w, z_l``."""
    h = hashlib.sha256()
    for z in (z_b, z_w, z_l):
        h.update(np.ascontiguousarray(np.asarray(z, dtype=np.float32)).tobytes())
    return h.digest()[:HASH_BYTES]


def background_pairs(
    scores: Mapping[str, np.ndarray],
    mode: str,
    weights: Mapping[str, float] | None,
    per_background: int,
    rng: np.random.Generator,
    top_k: int = 5,
    decile: float = 0.1,
    normalize: str = "zscore",
) -> np.ndarray:
    """``select`` then ``pair_up`` for one background → ``(P, 2)`` candidate indices."""
    w, l = select(scores, mode, weights, top_k, decile, normalize)
    return pair_up(w, l, per_background, rng)
