"""The streaming pair buffer (staleness, reuse, consumption log, resume, warm start), the loop's
measures and the learner's reference refresh, against hand-built groups, hand-computed intervals
and the tiny models (docs/method.md §9.4)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from align_rl.alignment.buffer import PairBuffer, read_takes, staleness_histogram, warm_groups
from align_rl.alignment.candidates import BackgroundTask, Drawn, make_group
from align_rl.alignment.loop_metrics import covered, learner_spans, loop_metrics, union
from align_rl.errors import ConfigError
from align_rl.io.pair_store import CandidateGroup, PairStore

SHAPE = (1, 2, 2)
PCFG = SimpleNamespace(pairs_per_background=4, top_k_phys=2, decile=0.25)
W = {"assim": 1.0, "phys": 1.0}


def group(bg: int, version: int, n: int = 8) -> CandidateGroup:
    """``n`` candidates with distinct latents; 4 pairs (2 winners × 2 losers) of mode M."""
    rng = np.random.default_rng([bg, version])
    scores = {"assim": rng.normal(size=n), "phys": rng.normal(size=n)}
    task = BackgroundTask(bg, 6 * 3600 * 10**9 * bg, np.zeros((69, 2, 2), np.float32), np.zeros((69, 2, 2), np.float32))
    drawn = Drawn(bg, version, rng.normal(size=SHAPE).astype(np.float32),
                  rng.normal(size=(n, *SHAPE)).astype(np.float32), np.zeros((n, 69, 2, 2), np.float32))
    return make_group(task, drawn, scores, "repaint", ["M"], PCFG, W, 0, "zscore")


def buffer(tmp_path, s=1, u=2):
    return PairBuffer(tmp_path / "buf.zarr", SHAPE, ["assim", "phys"], "M", s, u, tmp_path / "learner")


def test_reuse_limit_and_distinct_pairs(tmp_path):
    b = buffer(tmp_path, s=0, u=2)
    assert b.add([group(0, 0), group(1, 0)])["pairs"] == 8
    assert b.add([group(0, 0)])["pairs"] == 0  # the same group again: nothing new
    got = []
    step = 0
    while (out := b.take(step, 0, 3, 0)) is not None:
        got.append(out)
        step += 1
    # 8 pairs × 2 uses = 16 takes of single pairs; batches of 3 distinct pairs: 5 batches, then
    # 1 use left on one pair (< 3) -> no batch
    assert step == 5
    counts = Counter(h for t in read_takes(b.log_path) for h in t["pairs"])
    assert max(counts.values()) == 2 and sum(counts.values()) == 15
    assert all(len(set(t["pairs"])) == 3 for t in b.takes)  # distinct pairs within a batch
    assert got[0]["z_w"].shape == (3, *SHAPE) and got[0]["z_b"].dtype == np.float32
    # least used first: the first 8 pairs taken are the 8 distinct pairs
    first = [h for t in b.takes for h in t["pairs"]][:8]
    assert len(set(first)) == 8


def test_staleness_bound_and_newest_first(tmp_path):
    b = buffer(tmp_path, s=1, u=5)
    b.add([group(0, 0), group(1, 2), group(2, 3)])
    out = b.take(0, 0, 4, current=3)  # eligible: versions >= 2 (8 pairs), the newest first
    assert out["versions"].tolist() == [3, 3, 3, 3]
    assert b.take(1, 0, 9, current=3) is None  # only 8 pairs are fresh enough
    out = b.take(1, 0, 8, current=3)
    assert sorted(out["versions"].tolist()) == [2, 2, 2, 2, 3, 3, 3, 3]
    assert b.take(2, 0, 1, current=5) is None  # everything is now more than 1 version behind
    assert staleness_histogram(b.takes) == {0: 8, 1: 4}


def test_pairs_of_a_version_above_the_learners_wait(tmp_path):
    """After a resume from an earlier checkpoint the buffer can hold pairs drawn by versions the
    learner has not reached again: they are not taken until it has (no negative staleness)."""
    b = buffer(tmp_path, s=1, u=5)
    b.add([group(0, 0), group(1, 2), group(2, 3)])
    out = b.take(0, 0, 4, current=2)  # eligible: versions 1 … 2 only
    assert out["versions"].tolist() == [2, 2, 2, 2]
    assert b.take(1, 0, 5, current=2) is None
    assert b.take(1, 0, 1, current=0)["versions"].tolist() == [0]
    assert min(staleness_histogram(b.takes)) == 0


def test_log_resumes_and_rolls_back_undone_steps(tmp_path):
    b = buffer(tmp_path, s=5, u=1)
    b.add([group(i, 0) for i in range(3)])  # 12 pairs
    for step in range(4):
        b.take(step, 0, 2, 0)
    used = set(b.uses)
    b2 = buffer(tmp_path, s=5, u=1)  # a new driver: the use counts come back from the log
    assert set(b2.uses) == used and len(b2.takes) == 4
    b2.take(2, 0, 2, 0)  # the learner resumed from its checkpoint of step 2
    assert [t["step"] for t in read_takes(b2.log_path)] == [0, 1, 2]
    assert len(b2.uses) == 6 and max(b2.uses.values()) == 1
    # ranks of one step do not roll each other back
    b2.take(3, 0, 2, 0)
    b2.take(3, 1, 2, 0)
    assert [(t["step"], t["rank"]) for t in b2.takes] == [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1)]


def test_bad_bounds_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="dpo.reuse"):
        buffer(tmp_path, u=0)


def test_warm_start_rebuilds_the_offline_groups_and_pairs(tmp_path):
    off = PairStore.open(tmp_path / "offline.zarr", SHAPE, ["assim", "phys"])
    groups = [group(i, 0) for i in range(3)]
    off.append(groups)
    warm = warm_groups(off, "M", W, PCFG, 0, "zscore")
    assert [g.key for g in warm] == [g.key for g in groups]
    for a, b in zip(warm, groups):
        np.testing.assert_array_equal(a.pairs["M"], b.pairs["M"])
        np.testing.assert_array_equal(a.latents, b.latents)
        np.testing.assert_array_equal(a.z_b, b.z_b)
    b = buffer(tmp_path)
    assert b.add(warm)["pairs"] == 12
    assert set(bytes(h) for h in b.ps.hash) == set(bytes(h) for h in off.pair_set("M").hash)
    # only the backgrounds the offline run of the same settings uses
    assert [g.key for g in warm_groups(off, "M", W, PCFG, 0, "zscore", bg_ids=[2, 0])] == \
        [groups[0].key, groups[2].key]


def test_async_runs_follow_the_alignment_seed(tmp_path, monkeypatch):
    """dpo.seed reaches the asynchronous learner (its batch order, t and ε)."""
    from align_rl.alignment import async_loop
    from align_rl.alignment.async_loop import learner_config
    from align_rl.alignment.pairs import alignment_seed
    from align_rl.config import Config, with_values

    monkeypatch.setattr(async_loop, "_diffusion_section", lambda ckpt: {})
    seeds = []
    for s in (0, 1, 2):
        cfg = with_values(Config(), {"dpo.seed": s, "dpo.mode": "async"})
        c = learner_config(cfg, tmp_path / "ref.pt", tmp_path / "ref.pt", tmp_path, None, None, "M", False)
        assert c["seed"] == alignment_seed(cfg.run.seed, s)
        seeds.append(c["seed"])
    assert len(set(seeds)) == 3


def test_loop_measures_from_hand_made_timelines():
    assert union([(0, 2), (1, 3), (5, 6)]) == [(0, 3), (5, 6)]
    assert covered([(0, 10)], [(-1, 2), (1, 4), (8, 12)]) == pytest.approx(6.0)
    learner = [{"kind": "start", "t0": 0.0, "t1": 0.0},
               {"kind": "take", "t0": 0.0, "t1": 1.5, "wait": 1.0},
               {"kind": "publish", "t0": 2.0, "t1": 2.1},
               {"kind": "take", "t0": 3.0, "t1": 5.0, "wait": 2.0},
               {"kind": "publish", "t0": 6.0, "t1": 6.3},
               {"kind": "end", "t0": 10.0, "t1": 10.0}]
    assert learner_spans(learner) == [(0.0, 10.0)]
    samplers = [{"t0": -1.0, "t1": 2.0, "candidates": 8}, {"t0": 1.0, "t1": 4.0, "candidates": 8},
                {"t0": 8.0, "t1": 12.0, "candidates": 8}]
    takes = [{"current": 3, "versions": [3, 2, 2]}, {"current": 4, "versions": [2, 4]}]
    m = loop_metrics(learner, samplers, takes)
    assert m["loop/overlap"] == pytest.approx(0.6)
    assert m["loop/learner_wait"] == pytest.approx(0.3)
    assert m["loop/publish_s"] == pytest.approx(0.2) and m["loop/publish_share"] == pytest.approx(0.04)
    assert m["loop/steps_per_s"] == pytest.approx(0.2)
    assert m["loop/candidates_per_s"] == pytest.approx(24 / 13)
    assert m["loop/staleness"] == {"0": 2, "1": 2, "2": 1} and m["loop/staleness_max"] == 2
    # a cut attempt and a resumed one: two spans, the gap between them is not learner time
    two = learner[:3] + [{"kind": "start", "t0": 20.0, "t1": 20.0}, {"kind": "end", "t0": 24.0, "t1": 24.0}]
    assert learner_spans(two) == [(0.0, 2.1), (20.0, 24.0)]


def test_reference_refresh_takes_the_policy_and_survives_a_restart(tmp_path):
    import torch

    from align_rl.alignment.async_task import AsyncDPOTask
    from align_rl.io.checkpoints import read_checkpoint
    from align_rl.training.loop import Worker

    from .tiny_align import tiny_world

    cfg, ws, models, truth, bg, ref = tiny_world(tmp_path)
    conf = {"cfg": cfg.to_dict(), "seed": 0, "k": 2, "refresh_reference": 2, "reference_ckpt": str(ref),
            "init_ckpt": str(ref), "diffusion_cfg": dict(read_checkpoint(ref)["config"]),
            "out_dir": str(tmp_path / "out"), "buffer": None, "weights": None, "steps": 10}
    (tmp_path / "out").mkdir()

    def params(m):
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    task = AsyncDPOTask(conf, Worker())
    model = task.build(torch.device("cpu"))
    ref0 = params(task.reference).clone()
    task._refresh_reference(1)  # version 1 < r: still the pretrained reference
    assert torch.equal(params(task.reference), ref0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    task._refresh_reference(2)  # version 2: the reference becomes the policy of version 2
    assert task.ref_version == 2 and torch.equal(params(task.reference), params(model))
    assert not torch.equal(params(task.reference), ref0)
    # a restarted learner (fresh task, other weights) takes the saved reference of version 2
    again = AsyncDPOTask(conf, Worker())
    again.build(torch.device("cpu"))
    again._refresh_reference(3)
    assert again.ref_version == 2 and torch.equal(params(again.reference), params(model))
