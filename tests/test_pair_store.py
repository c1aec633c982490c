"""The append-only preference store: atomic commits, dedup, crash recovery, reselect, dataset."""

from __future__ import annotations

import numpy as np
import pytest

from align_rl.errors import ConfigError, InputError
from align_rl.io.pair_store import CandidateGroup, PairDataset, PairStore
from align_rl.alignment.pairs import background_pairs

SHAPE = (3, 2, 4)
NAMES = ["assim", "phys"]


def group(bg_id, version=0, n=6, seed=None, mode="M", weights=None):
    rng = np.random.default_rng(seed if seed is not None else bg_id * 100 + version)
    lat = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    zb = rng.normal(size=SHAPE).astype(np.float32)
    scores = {"assim": rng.random(n), "phys": rng.random(n)}
    w = weights or {"assim": 1.0, "phys": 1.0}
    pairs = {mode: background_pairs(scores, mode, w, 4, rng, top_k=2, decile=0.34)}
    return CandidateGroup(bg_id, np.datetime64("2004-01-01T00") + np.timedelta64(6 * bg_id, "h"),
                          version, "dps", zb, lat, scores, pairs)


def test_append_read_dedup_and_reopen(tmp_path):
    p = tmp_path / "pairs.zarr"
    st = PairStore.open(p, SHAPE, NAMES, meta={"ref": "a"})
    g0, g1 = group(0), group(1)
    out = st.append([g0, g1])
    assert out["backgrounds"] == 2 and out["candidates"] == 12
    n_pairs = st.num_pairs
    assert n_pairs == out["pairs"] > 0
    # the same groups again (a retried task): nothing new
    assert st.append([group(0), group(1)])["skipped"] == 2
    assert st.num_pairs == n_pairs
    # a group with other key but identical content: its pairs are dropped by hash
    dup = group(0)
    dup.bg_id = 99
    out = st.append([dup])
    assert out["backgrounds"] == 1 and out["pairs"] == 0
    # reopen: same view; mismatched inputs refused
    st2 = PairStore.open(p, SHAPE, NAMES, meta={"ref": "a"})
    assert st2.num_pairs == n_pairs and st2.num_candidates == 18
    with pytest.raises(InputError, match="other inputs"):
        PairStore.open(p, SHAPE, NAMES, meta={"ref": "b"})
    with pytest.raises(ConfigError, match="rewards"):
        PairStore.open(p, SHAPE, ["assim"])
    with pytest.raises(InputError, match="latents"):
        PairStore.open(p, (3, 2, 2), NAMES)
    # pair rows point at the right latents and hashes
    ps = st2.pair_set("M")
    ds = PairDataset(st2, ps)
    zw, zl, zb = ds.batch(np.arange(len(ps)))
    bgs = st2.backgrounds()
    for i in range(len(ps)):
        g = g0 if bgs["bg_id"][ps.background[i]] == 0 else g1
        off = 0 if g is g0 else 6
        np.testing.assert_array_equal(zw[i].numpy(), g.latents[ps.winner[i] - off])
        np.testing.assert_array_equal(zl[i].numpy(), g.latents[ps.loser[i] - off])
        np.testing.assert_array_equal(zb[i].numpy(), g.z_b)
    lazy = PairDataset(st2, ps, preload=False)
    for a, b in zip(lazy.batch([2, 0, 2]), ds.batch([2, 0, 2])):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_crash_mid_append_is_invisible_and_resumable(tmp_path, monkeypatch):
    p = tmp_path / "pairs.zarr"
    st = PairStore.open(p, SHAPE, NAMES)
    st.append([group(0)])
    before = st.committed
    real = PairStore._write_commit

    def boom(self, c):
        raise RuntimeError("killed")

    monkeypatch.setattr(PairStore, "_write_commit", boom)
    with pytest.raises(RuntimeError):
        st.append([group(1), group(2)])
    monkeypatch.setattr(PairStore, "_write_commit", real)
    re = PairStore.open(p, mode="r")
    assert re.committed == before  # rows past the counts are not seen
    assert re.backgrounds()["bg_id"].tolist() == [0]
    re = PairStore.open(p, SHAPE, NAMES)
    out = re.append([group(1), group(2)])  # the rerun
    assert out["backgrounds"] == 2
    fresh = PairStore.open(tmp_path / "ref.zarr", SHAPE, NAMES)
    fresh.append([group(0)]); fresh.append([group(1), group(2)])
    a, b = re.pair_set(None), fresh.pair_set(None)
    np.testing.assert_array_equal(a.hash, b.hash)
    np.testing.assert_array_equal(re.candidate_latents(np.arange(18)), fresh.candidate_latents(np.arange(18)))


def test_reselect_uses_stored_scores_and_drop_stale(tmp_path):
    st = PairStore.open(tmp_path / "s.zarr", SHAPE, NAMES)
    st.append([group(i, version=v) for i in range(3) for v in (0, 1)])
    sc = st.scores()
    assert sc["assim"].shape == (36,)
    # P mode from stored phys: every pair's winner has higher phys than its loser
    ps = st.reselect(None, "P", per_background=4, top_k=2)
    assert len(ps) == 6 * 4
    assert np.all(sc["phys"][ps.winner] > sc["phys"][ps.loser])
    assert np.all(st.scores()["phys"] == sc["phys"])  # nothing written
    # weights that only look at assim: winners are each background's assim best
    ps = st.reselect({"assim": 1.0, "phys": 0.0}, "M", per_background=1, decile=0.1)
    cb = np.asarray(st.g["candidates/background"][:36])
    for w, b in zip(ps.winner, ps.background):
        rows = np.flatnonzero(cb == b)
        assert w == rows[np.argmax(sc["assim"][rows])]
    # deterministic
    np.testing.assert_array_equal(ps.hash, st.reselect({"assim": 1.0}, "M", per_background=1).hash)
    # a store holding more backgrounds than the run uses: only the run's backgrounds' pairs
    bg = st.backgrounds()
    sub = st.reselect(None, "P", per_background=4, top_k=2, bg_ids=[0, 2])
    assert len(sub) == 4 * 4 and set(bg["bg_id"][sub.background].tolist()) == {0, 2}
    # staleness: version 0 leaves the view
    n_all = len(st.pair_set("M"))
    n_new = st.drop_stale(1)
    assert 0 < n_new < n_all
    assert np.all(st.pair_set("M").version >= 1)
    assert np.all(st.reselect(None, "P", top_k=2).version >= 1)
    assert len(st.pair_set("M", min_version=0)) == n_all  # rows are still there


def test_empty_dataset_is_an_error(tmp_path):
    st = PairStore.open(tmp_path / "e.zarr", SHAPE, NAMES)
    with pytest.raises(InputError, match="no preference pairs"):
        PairDataset(st)
    with pytest.raises(InputError, match="no preference store"):
        PairStore.open(tmp_path / "none.zarr", mode="r")


def test_store_of_format_1_is_read_and_upgraded_on_append(tmp_path):
    """A store written before digests existed (format /1): read as is, upgraded when opened for
    appending (row digests and column checksums computed from its content)."""
    import json
    import shutil

    import zarr

    p = tmp_path / "old.zarr"
    st = PairStore.open(p, SHAPE, NAMES)
    st.append([group(0), group(1)])
    want = st.pair_set("M")
    g = zarr.open_group(str(p), mode="a")
    for name in ("backgrounds/digest", "candidates/digest"):
        del g[name]
    g.attrs["format"] = "align_rl.pairs/1"
    c = json.loads((p / "COMMIT").read_text())
    c.pop("columns")
    (p / "COMMIT").write_text(json.dumps(c))
    (p / ".align_rl").unlink()
    old = PairStore.open(p, mode="r")
    assert old.format == "align_rl.pairs/1" and len(old.pair_set("M")) == len(want)
    up = PairStore.open(p, SHAPE, NAMES)
    assert up.format == "align_rl.pairs/2" and "columns" in up.committed
    assert (p / ".align_rl").exists()
    up.append([group(2)])
    again = PairStore.open(p, mode="r")
    kept = {bytes(h) for h in again.pair_set("M").hash}
    assert {bytes(h) for h in want.hash} <= kept and len(kept) > len(want)  # old pairs kept, new added
    again.candidate_latents(np.arange(again.num_candidates))  # digests of old and new rows match
    shutil.rmtree(p / "candidates/latent/c")
    with pytest.raises(Exception, match="missing"):
        PairStore.open(p, mode="r")


def test_pair_sets_do_not_depend_on_the_commit_order(tmp_path):
    """Actors finish in any order: the same groups committed in another order give the same pair
    set, in the same order (the learner draws batches by position)."""
    a, b = PairStore.open(tmp_path / "a.zarr", SHAPE, NAMES), PairStore.open(tmp_path / "b.zarr", SHAPE, NAMES)
    a.append([group(0), group(1)])
    a.append([group(2)])
    b.append([group(2)])
    b.append([group(1), group(0)])
    pa, pb = a.pair_set("M"), b.pair_set("M")
    np.testing.assert_array_equal(pa.hash, pb.hash)
    assert not np.array_equal(pa.winner, pb.winner)  # other rows, same pairs
    for x, y in ((a, pa), (b, pb)):
        np.testing.assert_array_equal(x.candidate_latents(y.winner), a.candidate_latents(pa.winner))
    ra = a.reselect({"assim": 1.0, "phys": 0.5}, "M", per_background=2, seed=3)
    rb = b.reselect({"assim": 1.0, "phys": 0.5}, "M", per_background=2, seed=3)
    np.testing.assert_array_equal(ra.hash, rb.hash)


def test_the_guidance_index_grows_with_each_new_method(tmp_path):
    """The store's guidance index is the list of method names it has seen, in order of arrival:
    a method registered later (a plugin's) gets the next index, and every committed row keeps
    pointing at its own name after reopening."""
    import dataclasses

    p = tmp_path / "pairs.zarr"
    st = PairStore.open(p, SHAPE, NAMES)
    assert list(st.g.attrs["guidance_names"]) == []
    st.append([group(0), dataclasses.replace(group(1), guidance="halfrepaint")])
    st.append([dataclasses.replace(group(2), guidance="obsfree"), group(3)])
    assert list(st.g.attrs["guidance_names"]) == ["dps", "halfrepaint", "obsfree"]
    again = PairStore.open(p, mode="r")
    assert again.backgrounds()["guidance"].tolist() == ["dps", "halfrepaint", "obsfree", "dps"]
    assert again.done_keys() >= {(1, 0, "halfrepaint"), (2, 0, "obsfree"), (3, 0, "dps")}
    with pytest.raises(ConfigError, match="no guidance"):
        st.append([dataclasses.replace(group(4), guidance="")])
