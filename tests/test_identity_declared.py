"""Cache identity declared where the field is (align_rl.identity, align_rl.config_sections): every
config field declares the caches its value enters, the keys hold exactly the declared fields, the
keys of existing workdirs are unchanged, and forecasters fingerprint themselves."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

from align_rl import identity
from align_rl.config import Config, cached, load_config, runtime
from align_rl.errors import InputError
from align_rl.io.normalization import Normalizer
from align_rl.models.forecaster import (EmulatorForecaster, Forecaster, RegriddedForecaster,
                                        TorchForecaster, build_emulator)

# Which fields entered which key before the fields declared it, found by changing every field of
# the default config one at a time and seeing which keys changed (the key functions' hand-written
# lists of da403fd). "dpo_sampled": the fields that enter a DPO run's key only when dpo.mode has
# samplers (sync, async). One field was added deliberately: pretrain.val_every now enters the
# pretrained models' keys (declared unless_set, so only when changed: a model whose own val_every
# is 0 validates at that interval and, with its patience, keeps the best one validated). Two more
# since, deliberately, in the keys at every value: forecaster.precision and diffusion.precision
# (bf16 autocast where the hardware does bf16 arithmetic trains other weights).
BEFORE: dict[str, set[str]] = {
    "dataset": {"data.burn_in_days", "data.coarsen", "data.days", "data.gap_days", "data.grid",
                "data.members", "data.normalization", "data.pref", "data.seed", "data.source",
                "data.stats_times", "data.test", "data.train", "data.val"},
    "forecaster": {"forecaster.batch_size", "forecaster.depth", "forecaster.hidden", "forecaster.kind",
                   "forecaster.lat_north_to_south", "forecaster.lr", "forecaster.mean_path",
                   "forecaster.path", "forecaster.std_path", "forecaster.steps", "forecaster.val_every",
                   "forecaster.patience", "forecaster.precision", "run.seed"},
    "vae": {"run.seed", "vae.batch_size", "vae.depth", "vae.embed_dim", "vae.heads", "vae.kl_weight",
            "vae.latent_channels", "vae.lr", "vae.patch", "vae.preset", "vae.steps", "vae.window",
            "vae.val_every", "vae.patience"},
    "diffusion": {"diffusion.background_skip", "diffusion.batch_size", "diffusion.depth",
                  "diffusion.embed_dim", "diffusion.eps_skip", "diffusion.heads", "diffusion.lr",
                  "diffusion.patch", "diffusion.preset", "diffusion.steps", "diffusion.val_every",
                  "diffusion.patience", "diffusion.precision", "run.seed"},
    "backgrounds": set(),
    "pairs": {"data.pref", "guidance.dps_gamma", "guidance.dps_likelihood", "guidance.dps_zeta",
              "guidance.methods", "obs.density", "obs.mode", "obs.r_floor", "obs.sigma_o",
              "pairs.candidates", "pairs.guidance", "rewards.forecast_hours", "rewards.geo_equator_band",
              "rewards.geo_level", "rewards.names", "run.seed", "sampler.autocast", "sampler.compile",
              "sampler.corrections", "sampler.decode", "sampler.members", "sampler.steps", "sampler.tau"},
    "dpo": {"dpo.anchor", "dpo.batch_size", "dpo.beta", "dpo.checkpoint_every", "dpo.cpus_per_worker",
            "dpo.gpus_per_worker", "dpo.grad_clip", "dpo.lr", "dpo.max_failures", "dpo.mode",
            "dpo.num_workers", "dpo.seed", "dpo.steps", "dpo.t_max", "dpo.t_min", "dpo.use_gpu",
            "dpo.val_backgrounds", "dpo.val_every", "dpo.val_members", "dpo.warmup_steps",
            "pairs.backgrounds", "pairs.candidates", "pairs.decile", "pairs.guidance",
            "pairs.pairs_per_background", "pairs.top_k_phys", "rewards.normalize", "rewards.weights"},
    "dpo_sampled": {"dpo.online_backgrounds", "dpo.refresh_reference", "dpo.reuse", "dpo.staleness",
                    "dpo.sync_every", "dpo.warm_start"},
    "sweep_reference": {"data.val", "guidance.dps_gamma", "guidance.dps_likelihood", "guidance.dps_zeta",
                        "guidance.methods", "obs.density", "obs.mode", "obs.r_floor", "obs.sigma_o",
                        "run.seed", "sampler.autocast", "sampler.compile", "sampler.corrections",
                        "sampler.decode", "sampler.members", "sampler.steps", "sampler.tau"},
}

# The keys of the default config (and two variants) computed by the code of da403fd, before the
# fields declared their caches: the same inputs give the same keys, so existing workdirs are reused.
# The pairs, dpo and sweep keys changed once since, on purpose: the forecasts' first frame became
# the background at t − 6 h shifted by the analysis increment (identity.FORECAST_FIRST_FRAME).
# The dpo key changed once more, on purpose: the default pairs.backgrounds went from 64 to 160.
# The forecaster and diffusion keys (and the later ones) changed on purpose: their precision
# fields, and diffusion.patience 6 -> 3.
BEFORE_KEYS = {
    "default": {"world": "b15dfa86bdf07294", "normalization": "726edebff2857bbf",
                "forecaster": "ba32c2fdfa742f02", "vae": "eba58d3905614c06", "diffusion": "8eec85387f9fc0f2",
                "pairs": "b5e1fd1baed4fa6b", "dpo": "e78e3a53296735a8", "sweep": "92201ea915bf742c"},
    "async": {"world": "b15dfa86bdf07294", "normalization": "726edebff2857bbf",
              "forecaster": "ba32c2fdfa742f02", "vae": "eba58d3905614c06", "diffusion": "8eec85387f9fc0f2",
              "pairs": "b5e1fd1baed4fa6b", "dpo": "9aaf5238d2eaacd4", "sweep": "92201ea915bf742c"},
    "unless_set": {"world": "4d13e1c2f59b2991", "normalization": "ce5dc8e7e027794f",
                   "forecaster": "810294282dab7c98", "vae": "6f2b00139da00668",
                   "diffusion": "f7ecc1f773320998", "pairs": "bf98311b083bfa6e", "dpo": "24d74f24ca528ab3",
                   "sweep": "833f7d78325e1abc"},
}
VARIANTS = {"default": [], "async": ["dpo.mode=async"],
            "unless_set": ["sampler.autocast=bf16", "dpo.gpus_per_worker=0.5", "data.stats_times=10"]}
BEFORE_FORECASTERS = {"emulator": "ea08957c118d59fe", "torch": "e4779bef2bad9896",
                      "torch_plain": "7ee13b8f9aac851b", "regridded": "6c58bc3b57f2e73a"}


def _declared(cache: str) -> set[str]:
    return {f"{sec}.{name}" for sec, names in identity.cache_fields(Config, cache).items() for name in names}


def _unless_set(name: str) -> bool:
    sec, fname = name.split(".")
    f = next(f for f in dataclasses.fields(type(getattr(Config(), sec))) if f.name == fname)
    return bool(f.metadata.get(identity.UNLESS_SET_META))


@pytest.mark.parametrize("cache", sorted(BEFORE))
def test_declared_fields_are_the_ones_each_key_held(cache):
    """Every field the key held before, and no other but fields added since with ``unless_set``
    (out of the key at their defaults, so the keys of existing workdirs stay)."""
    assert set(identity.CACHES) == set(BEFORE)
    declared = _declared(cache)
    assert BEFORE[cache] <= declared
    assert all(_unless_set(name) for name in declared - BEFORE[cache]), declared - BEFORE[cache]


def test_every_config_field_declares_its_caches():
    assert identity.undeclared(Config) == []
    assert identity.undeclared(Config()) == []


def test_a_field_without_a_declaration_is_found():
    """A synthetic config whose sections mix declared fields and plain ones."""

    @dataclass
    class Section:
        a: int = cached(1, "pairs")
        b: str = runtime("x")
        c: float = 0.5  # no declaration
        d: list[str] = field(default_factory=list)  # no declaration

    @dataclass
    class Other:
        e: int = field(default=1, metadata={"hash": "unless-set"})  # the old marker: no declaration

    @dataclass
    class Synthetic:
        sec: Section = field(default_factory=Section)
        other: Other = field(default_factory=Other)

    assert identity.undeclared(Synthetic) == ["sec.c", "sec.d", "other.e"]
    assert identity.undeclared(Synthetic()) == ["sec.c", "sec.d", "other.e"]
    assert identity.cache_fields(Synthetic, "pairs") == {"sec": ("a",)}


def test_declarations_are_checked_when_written():
    with pytest.raises(ValueError, match="unknown caches"):
        cached(1, "pair")  # a misspelt cache
    with pytest.raises(ValueError, match="runtime"):
        cached(1)
    with pytest.raises(KeyError, match="unknown cache"):
        identity.cache_fields(Config, "pair")

    @dataclass
    class Lists:
        a: list[int] = cached([1, 2], "pairs")

    x, y = Lists(), Lists()
    x.a.append(3)
    assert y.a == [1, 2]  # a list default is copied per instance


def _bump(v):
    """Another value of the same type (None: a path)."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1
    if isinstance(v, float):
        return v + 0.5
    if isinstance(v, str):
        return v + "x"
    if v is None:
        return "a-path"
    if isinstance(v, list):
        return v + [v[0] if v else "x"]
    if isinstance(v, dict):
        return {**v, "extra": 2.0}
    raise TypeError(v)


def _keys(cfg):
    """The config's part of every key (the dataset, stores and checkpoints held fixed)."""
    out = {"dataset": identity.canonical(identity.data_dict(cfg))}
    for stage in ("forecaster", "vae", "diffusion"):
        out[stage] = identity.canonical(identity.pretraining(cfg, stage, "store", (8, 16)))
    out["pairs"] = identity.canonical(identity.pair_store(cfg, "ref"))
    out["sweep_reference"] = identity.canonical(identity.sweep_reference(cfg, {}, "ref"))
    out["dpo"] = identity.dpo_run(cfg, {})
    return out


def test_a_changed_field_changes_exactly_the_keys_it_declares(monkeypatch, tmp_path):
    """Every field of every section, one at a time, offline and with samplers."""
    monkeypatch.setattr(identity, "file_digest", lambda p: f"file {p}")
    monkeypatch.setattr(identity, "store_digest", lambda p: "store")
    monkeypatch.setattr(identity, "reference", lambda p: "reference")
    monkeypatch.setattr(identity, "dataset", lambda cfg, store: {"dataset": identity.data_digest(cfg)})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-path").write_text("{}")  # data.normalization set: a file that exists
    keys_of = set(BEFORE) - {"backgrounds", "dpo_sampled"}
    for sec in dataclasses.fields(Config):
        for f in dataclasses.fields(type(getattr(Config(), sec.name))):
            name = f"{sec.name}.{f.name}"
            for mode in ("offline", "async"):
                base, other = Config(), Config()
                base.dpo.mode = other.dpo.mode = mode
                if name == "dpo.mode":
                    other.dpo.mode = "sync" if mode == "async" else "async"
                else:
                    setattr(getattr(other, sec.name), f.name, _bump(getattr(getattr(other, sec.name), f.name)))
                a, b = _keys(base), _keys(other)
                changed = {k for k in a if a[k] != b[k]}
                want = {k for k in keys_of if name in _declared(k)}
                if "dataset" in want:  # every later key holds the dataset
                    want |= {"forecaster", "vae", "diffusion", "pairs"}
                if mode == "async" and name in _declared("dpo_sampled"):
                    want.add("dpo")
                assert changed == want, (name, mode)


def _fixed(module):
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(module.state_dict().items())):
            p.copy_(torch.linspace(-1, 1, p.numel()).reshape(p.shape) * (i + 1))
    return module


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_keys_of_existing_workdirs_are_unchanged(monkeypatch, tmp_path, variant):
    monkeypatch.setattr(identity, "store_digest", lambda p: "0" * 16)
    cfg = load_config(overrides=[f"run.workdir={tmp_path / 'run'}", *VARIANTS[variant]])
    vae = identity.pretraining(cfg, "vae", "store.zarr", (32, 64))
    fc = identity.pretraining(cfg, "forecaster", "store.zarr", (32, 64))
    diff = identity.pretraining(cfg, "diffusion", "store.zarr", (32, 64),
                                {"vae": identity.digest(vae), "forecaster": identity.digest(fc)})
    ref = tmp_path / "final.pt"
    ref.write_text(identity.canonical(diff))
    meta = identity.pair_store(cfg, ref)
    keys = {"world": identity.world(cfg), "normalization": identity.normalization(cfg, "store.zarr"),
            "forecaster": identity.digest(fc), "vae": identity.digest(vae), "diffusion": identity.digest(diff),
            "pairs": identity.digest(meta), "dpo": identity.dpo_run(cfg, meta),
            "sweep": identity.digest(identity.sweep_reference(cfg, {"method": "obsfree", "times": 4}, ref))}
    assert keys == BEFORE_KEYS[variant]


def test_forecasters_fingerprint_themselves_as_before():
    norm = Normalizer(np.zeros(69), np.ones(69))
    lin = _fixed(nn.Linear(4, 3))
    tf = TorchForecaster(lin, norm, np.zeros(69), 2 * np.ones(69))
    found = {"emulator": EmulatorForecaster(_fixed(build_emulator({"hidden": 8, "depth": 1}))),
             "torch": tf, "torch_plain": TorchForecaster(lin),
             "regridded": RegriddedForecaster(tf, "32x64", "31x64")}
    assert {k: f.fingerprint() for k, f in found.items()} == BEFORE_FORECASTERS
    assert {k: identity.forecaster_digest(f) for k, f in found.items()} == BEFORE_FORECASTERS
    # other statistics, another latitude order, other grids: other fingerprints
    others = [TorchForecaster(lin, norm, np.zeros(69), 3 * np.ones(69)),
              TorchForecaster(lin, lat_north_to_south=True),
              RegriddedForecaster(tf, "32x64", "33x64")]
    assert len({f.fingerprint() for f in others} | set(BEFORE_FORECASTERS.values())) == 7


def test_a_forecaster_that_is_not_a_module_must_fingerprint_itself():
    class Shift(Forecaster):
        def step(self, x_prev, x_curr):
            return x_curr

    with pytest.raises(InputError, match="fingerprint"):
        Shift().fingerprint()
    with pytest.raises(InputError, match="fingerprint"):
        identity.forecaster_digest(Shift())

    class Named(Shift):
        def __init__(self, n):
            self.n = n

        def fingerprint(self):
            return identity.digest({"shift": self.n})

    assert identity.forecaster_digest(Named(1)) == Named(1).fingerprint() != Named(2).fingerprint()
    wrapped = [RegriddedForecaster(Named(n), "32x64", "31x64").fingerprint() for n in (1, 1, 2)]
    assert wrapped[0] == wrapped[1] != wrapped[2]


def test_onnx_fingerprint_reads_its_files(tmp_path):
    """The ONNX forecaster opened from the config's spec keys by its files' content, as the key
    built from the config's paths did before."""
    pytest.importorskip("onnxruntime")
    from align_rl.models.loading import forecaster_spec
    from tests.test_forecaster import _export

    rng = np.random.default_rng(0)
    norm = Normalizer(rng.normal(0, 5, 69), rng.uniform(0.5, 2, 69))
    np.save(tmp_path / "mean.npy", norm.mean + 1.0)
    np.save(tmp_path / "std.npy", norm.std * 1.1)
    _export(tmp_path / "m.onnx", True)
    cfg = load_config(overrides={"run": {"workdir": str(tmp_path / "run")}, "data": {"grid": "8x16"}, "vae": {"window": 2},
                                 "forecaster": {"kind": "onnx", "path": str(tmp_path / "m.onnx"),
                                                "mean_path": str(tmp_path / "mean.npy"),
                                                "std_path": str(tmp_path / "std.npy")}})
    fc = forecaster_spec(cfg, None, norm).open("cpu")
    f = cfg.forecaster
    before = identity.digest({"type": "OnnxForecaster", "lat_north_to_south": True,
                              "files": [identity.file_digest(p) for p in (f.path, f.mean_path, f.std_path)]})
    assert fc.fingerprint() == identity.forecaster_digest(fc) == before
    np.save(tmp_path / "std.npy", norm.std * 1.2)
    identity.clear_memo()
    assert fc.fingerprint() != before
