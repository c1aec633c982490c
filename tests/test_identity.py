"""Cache identities (align_rl.identity): one digest length, content not paths or times, and a
changed input changes exactly the caches that depend on it."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from align_rl import identity
from align_rl.config import load_config
from align_rl.errors import InputError
from align_rl.models.forecaster import TorchForecaster
from align_rl.io.normalization import Normalizer
from align_rl.pipeline import dpo_dir
from align_rl.workspace import Workspace
from tests.test_era5 import make_states, write_layout

HEX = re.compile(rf"^[0-9a-f]{{{identity.DIGEST_CHARS}}}$")


def _cfg(tmp_path, *extra):
    return load_config(overrides=[f"run.workdir={tmp_path / 'run'}", "data.grid=8x16", "vae.window=2", *extra])


@pytest.fixture
def store(tmp_path):
    identity.clear_memo()
    return write_layout(tmp_path / "era5.zarr", make_states(T=3, attrs={"title": "test store"}))


def _checkpoint(path, content: object):
    """A stand-in for a trained checkpoint: its bytes follow what it was trained for (as the
    identity saved in a real checkpoint's ``extra`` does)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(identity.canonical(content))
    return path


def test_one_digest_length_everywhere(tmp_path, store):
    cfg = _cfg(tmp_path)
    ref = _checkpoint(tmp_path / "final.pt", {"weights": 1})
    net = nn.Linear(3, 2)
    meta = identity.pair_store(cfg, ref)
    keys = [identity.digest({"a": 1}), identity.file_digest(ref), identity.module_digest(net),
            identity.array_digest(np.zeros(3)), identity.store_digest(store), identity.world(cfg),
            identity.section_digest(cfg, "obs"), cfg.section_hash("data"),
            identity.forecaster_digest(net), identity.normalization(cfg, store),
            identity.dpo_run(cfg, meta), identity.reference(ref), *meta.values(),
            *identity.dataset(cfg, store).values(), *identity.diffusion_deps(net, net).values()]
    assert all(HEX.match(k) for k in keys), keys
    assert dpo_dir(cfg, Workspace(tmp_path), "M", meta).name.endswith(identity.dpo_run(cfg, meta))


def test_reference_checkpoint_same_key_in_main_job_and_sweep(tmp_path):
    cfg = _cfg(tmp_path)
    ref = _checkpoint(tmp_path / "run" / "checkpoints" / "diffusion" / "final.pt", {"weights": [1.0, 2.0]})
    validation = {"method": "obsfree", "backgrounds": 2}
    main, sweep = identity.pair_store(cfg, ref), identity.sweep_reference(cfg, validation, ref)
    assert main["reference"] == sweep["reference"] == identity.file_digest(ref)
    # touching the file (a copy, a restore from backup, `touch`) invalidates neither cache
    st = ref.stat()
    os.utime(ref, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert identity.pair_store(cfg, ref) == main
    assert identity.sweep_reference(cfg, validation, ref) == sweep
    # a copy elsewhere is the same reference
    copy = tmp_path / "elsewhere.pt"
    shutil.copy(ref, copy)
    assert identity.pair_store(cfg, copy) == main
    # other bytes invalidate both
    _checkpoint(ref, {"weights": [1.0, 2.5]})
    assert identity.pair_store(cfg, ref)["reference"] != main["reference"]
    assert identity.sweep_reference(cfg, validation, ref)["reference"] != sweep["reference"]
    assert identity.dpo_run(cfg, identity.pair_store(cfg, ref)) != identity.dpo_run(cfg, main)
    with pytest.raises(InputError, match="does not exist"):
        identity.file_digest(tmp_path / "missing.pt")


def test_a_copied_store_keeps_its_identity_other_data_does_not(tmp_path, store):
    cfg = _cfg(tmp_path, "data.source=zarr", f"data.path={store}")
    copy = tmp_path / "copy" / "moved.zarr"
    shutil.copytree(store, copy)
    cfg_copy = _cfg(tmp_path, "data.source=zarr", f"data.path={copy}")
    assert identity.store_digest(copy) == identity.store_digest(store)
    assert identity.dataset(cfg_copy, copy) == identity.dataset(cfg, store)
    assert identity.normalization(cfg_copy, copy) == identity.normalization(cfg, store)
    assert identity.pretraining(cfg_copy, "vae", copy, (8, 16)) == identity.pretraining(cfg, "vae", store, (8, 16))
    # other values on the same times and grid
    other = write_layout(tmp_path / "other.zarr", make_states(T=3, seed=1, attrs={"title": "test store"}))
    assert identity.store_digest(other) != identity.store_digest(store)
    # one value changed at the last time
    s = make_states(T=3, attrs={"title": "test store"})
    s.values[-1, 0, 0, 0] += 1.0
    assert identity.store_digest(write_layout(tmp_path / "edited.zarr", s)) != identity.store_digest(store)
    # other times, other attributes: another store; a timing attribute is not content
    later = make_states(T=3, start="2000-01-02", attrs={"title": "test store"})
    assert identity.store_digest(write_layout(tmp_path / "later.zarr", later)) != identity.store_digest(store)
    retitled = make_states(T=3, attrs={"title": "another"})
    assert identity.store_digest(write_layout(tmp_path / "t.zarr", retitled)) != identity.store_digest(store)
    timed = make_states(T=3, attrs={"title": "test store", "wall_seconds": 12.5})
    assert identity.store_digest(write_layout(tmp_path / "w.zarr", timed)) == identity.store_digest(store)
    with pytest.raises(InputError, match="does not exist"):
        identity.store_digest(tmp_path / "nowhere.zarr")


def _all_keys(cfg, store, ref_dir):
    """Every cache key of a run on ``store`` whose checkpoints follow their identities."""
    vae = identity.pretraining(cfg, "vae", store, (8, 16))
    fc = identity.pretraining(cfg, "forecaster", store, (8, 16))
    deps = {"vae": identity.digest(vae), "forecaster": identity.digest(fc)}  # trained from them
    diff = identity.pretraining(cfg, "diffusion", store, (8, 16), deps)
    ref = _checkpoint(ref_dir / identity.digest(diff) / "final.pt", diff)
    meta = identity.pair_store(cfg, ref)
    return {"world": identity.world(cfg), "normalization": identity.normalization(cfg, store),
            "forecaster": identity.digest(fc), "vae": identity.digest(vae),
            "diffusion": identity.digest(diff), "pairs": identity.digest(meta),
            "dpo": identity.dpo_run(cfg, meta),
            "sweep": identity.digest(identity.sweep_reference(cfg, {"method": "obsfree"}, ref))}


@pytest.mark.parametrize("change, changed", [
    ("diffusion.steps=7", {"diffusion", "pairs", "dpo", "sweep"}),
    ("vae.kl_weight=0.5", {"vae", "diffusion", "pairs", "dpo", "sweep"}),
    ("forecaster.steps=9", {"forecaster", "diffusion", "pairs", "dpo", "sweep"}),
    ("dpo.beta=123", {"dpo"}),
    ("rewards.weights={assim: 1.0, forecast: 2.0, phys: 1.0}", {"dpo"}),
    ("pairs.candidates=9", {"pairs", "dpo"}),
    ("sampler.steps=11", {"pairs", "dpo", "sweep"}),
    ("data.seed=5", {"world", "normalization", "forecaster", "vae", "diffusion", "pairs", "dpo", "sweep"}),
    ("diffusion.num_workers=3", set()),  # how it trains, not what it is
    ("dpo.seed=2", {"dpo"}),  # another alignment seed: another learner run
    ("dpo.seeds=5", set()),  # how many seeds the main job runs: no single run changes
    ("dpo.staleness=7", set()),  # read only by the schedules with samplers, not offline
])
def test_a_changed_input_changes_exactly_the_caches_that_depend_on_it(tmp_path, store, change, changed):
    base = _cfg(tmp_path)
    other = _cfg(tmp_path, change)
    a = _all_keys(base, store, tmp_path / "a")
    b = _all_keys(other, store, tmp_path / "b")
    assert {k for k in a if a[k] != b[k]} == changed


def test_sampler_schedules_key_their_own_fields(tmp_path, store):
    """The fields that only the sync and async schedules read enter their learner's key."""
    a = _all_keys(_cfg(tmp_path, "dpo.mode=async"), store, tmp_path / "a")
    b = _all_keys(_cfg(tmp_path, "dpo.mode=async", "dpo.staleness=7"), store, tmp_path / "b")
    assert {k for k in a if a[k] != b[k]} == {"dpo"}


def test_data_section_enters_by_content_not_paths(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b" / "stats.json"
    b.parent.mkdir()
    a.write_text('{"mean": [0.0], "std": [1.0]}')
    shutil.copy(a, b)
    cfg_a = _cfg(tmp_path, f"data.normalization={a}", "data.path=/one/store.zarr")
    cfg_b = _cfg(tmp_path, f"data.normalization={b}", "data.path=/another/copy.zarr")
    assert identity.data_digest(cfg_a) == identity.data_digest(cfg_b) != identity.data_digest(_cfg(tmp_path))
    assert identity.world(cfg_a) == identity.world(cfg_b)
    b.write_text('{"mean": [0.0], "std": [2.0]}')
    assert identity.data_digest(cfg_a) != identity.data_digest(cfg_b)
    with pytest.raises(InputError, match="data.normalization"):
        identity.data_digest(_cfg(tmp_path, f"data.normalization={tmp_path / 'missing.json'}"))


def test_module_and_forecaster_digests_follow_the_weights():
    torch.manual_seed(0)
    a = nn.Linear(4, 3)
    b = nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert identity.module_digest(a) == identity.module_digest(b)
    with torch.no_grad():
        b.bias[0] += 1e-3
    assert identity.module_digest(a) != identity.module_digest(b)
    assert identity.module_digest(a.to(torch.bfloat16)) != identity.module_digest(b)  # dtype counts
    # a wrapped module: its weights and the conversion statistics
    norm = Normalizer(np.zeros(69), np.ones(69))
    f1 = TorchForecaster(a, norm, np.zeros(69), np.ones(69))
    f2 = TorchForecaster(a, norm, np.zeros(69), 2 * np.ones(69))
    assert identity.forecaster_digest(f1) == identity.forecaster_digest(TorchForecaster(a, norm, np.zeros(69), np.ones(69)))
    assert identity.forecaster_digest(f1) != identity.forecaster_digest(f2)
    with pytest.raises(InputError, match="fingerprint"):
        identity.forecaster_digest(object())


def test_identities_compare_by_content_not_container_type():
    a = {"grid": (8, 16), "x": np.float32(0.5), "n": np.int64(3), "deps": {}}
    b = {"deps": {}, "n": 3, "x": 0.5, "grid": [8, 16]}
    assert identity.same(a, b) and identity.digest(a) == identity.digest(b)
    assert not identity.same(a, {**b, "n": 4})
