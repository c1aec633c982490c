"""Pair selection (-P, -M), stratified pairing and content hashes (docs/method.md §8)."""

from __future__ import annotations

import numpy as np
import pytest

from align_rl.errors import ConfigError
from align_rl.alignment.pairs import pair_hash, pair_up, select


def test_select_P_top_and_bottom_by_phys():
    phys = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.95, 0.2, 0.6, 0.4, 0.8, 0.05, 0.65])
    w, l = select({"phys": phys, "assim": np.zeros(12)}, "P", top_k=5)
    assert list(w) == [5, 0, 9, 3, 11]
    assert list(l) == [10, 1, 6, 4, 8]
    # fewer candidates than 2·top_k: N // 2 each, disjoint
    w, l = select({"phys": np.array([3.0, 1.0, 2.0, 0.0])}, "P", top_k=5)
    assert list(w) == [0, 2] and list(l) == [3, 1]
    with pytest.raises(ConfigError, match="phys"):
        select({"assim": phys}, "P")


def test_select_M_decile_rounding_on_composite():
    rng = np.random.default_rng(0)
    a, p = rng.random(16), rng.random(16)
    comp = 1.0 * (a - a.mean()) / a.std() + 2.0 * (p - p.mean()) / p.std()  # z-scores, weighted
    w, l = select({"assim": a, "phys": p}, "M", weights={"assim": 1.0, "phys": 2.0}, decile=0.1)
    # round(0.1 · 16) = 2 each
    assert list(w) == list(np.argsort(-comp)[:2])
    assert list(l) == list(np.argsort(comp)[:2])
    w, l = select({"assim": a[:8]}, "M", weights={"assim": 1.0})  # round(0.8) = 1
    assert len(w) == len(l) == 1
    w, l = select({"assim": a[:3]}, "M", weights={"assim": 1.0})  # at least 1 each
    assert len(w) == len(l) == 1 and w[0] != l[0]
    w, _ = select({"assim": rng.random(32)}, "M", weights={"assim": 1.0})  # round(3.2) = 3
    assert len(w) == 3


def test_pair_up_is_stratified_and_seeded():
    w, l = np.array([0, 1, 2]), np.array([7, 8, 9, 10])
    p = pair_up(w, l, 7, np.random.default_rng(1))
    assert p.shape == (7, 2)
    assert len({tuple(r) for r in p}) == 7
    counts = np.bincount(p[:, 0], minlength=3)
    assert sorted(counts) == [2, 2, 3]  # each winner 2 or 3 times
    assert set(p[:, 1]) <= set(l)
    np.testing.assert_array_equal(p, pair_up(w, l, 7, np.random.default_rng(1)))
    assert len(pair_up(w, l, 100, np.random.default_rng(0))) == 12  # all of W × L


def test_pair_hash_content_not_identity():
    rng = np.random.default_rng(0)
    zb, zw, zl = (rng.normal(size=(3, 2, 4)).astype(np.float32) for _ in range(3))
    h = pair_hash(zb, zw, zl)
    assert len(h) == 16
    assert h == pair_hash(zb.copy(), zw.copy(), zl.astype(np.float64))
    assert h != pair_hash(zb, zl, zw)
    zw2 = zw.copy()
    zw2[0, 0, 0] += 1e-6
    assert h != pair_hash(zb, zw2, zl)


def test_alignment_seeds():
    """dpo.seed 0 is the run seed itself (the pairs as committed); other seeds differ from it and
    from each other, fit a 31-bit generator seed, and the main job runs dpo.seed … + dpo.seeds − 1."""
    from align_rl.alignment.pairs import alignment_seed
    from align_rl.config import load_config
    from align_rl.pipeline import seed_list

    assert alignment_seed(7, 0) == 7
    got = {alignment_seed(7, s) for s in range(1, 6)} | {alignment_seed(8, 1)}
    assert len(got) == 6 and 7 not in got and all(0 <= g < 2**31 for g in got)
    assert alignment_seed(7, 3) == alignment_seed(7, 3)  # stable
    assert seed_list(load_config(overrides=["dpo.seeds=3"])) == [0, 1, 2]
    assert seed_list(load_config(overrides=["dpo.seeds=2", "dpo.seed=4"])) == [4, 5]
