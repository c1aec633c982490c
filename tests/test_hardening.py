"""Bad inputs and faults against every command and store: each fails cleanly.

The table :data:`CASES` runs each bad input in-process through the command's ``main(argv)`` (or a
store / checkpoint call wrapped like a command) and asserts: exit status 2, a message naming the
problem, and that nothing was written (the file trees of the case's folder and of the shared
inputs are unchanged; a work directory named by the config is not even created). The work the
commands would start (world simulation, pretraining, evaluation, sweeps) is replaced by a trap,
so a check that does not fire fails the case at once instead of running the pipeline. A few cases
also run as real subprocesses to check the exit status and the time to fail.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import yaml

from align_rl.errors import OwnershipError, cli_errors

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Shared read-only inputs: stores (SI units, °C, geopotential height in m), checkpoints
    (diffusion, vae, a garbage file, a truncated one), a foreign folder, a pair store, a sweep file."""
    from align_rl.io.checkpoints import save_model
    from align_rl.io.normalization import Normalizer
    from align_rl.io.schema import CHANNEL_INFO
    from align_rl.io.states import States
    from align_rl.io.store import write_states
    from tests.test_era5 import make_states
    from tests.tiny_align import tiny_config, tiny_models

    d = tmp_path_factory.mktemp("inputs")
    s = make_states(T=4, seed=1)
    s.attrs["normalization"] = Normalizer.fit(s.values).to_dict()
    write_states(d / "truth.zarr", s)
    write_states(d / "analysis.zarr", States(s.values + 0.1, s.times, s.lat, s.lon, dict(s.attrs)))
    celsius = s.values.copy()
    for c in CHANNEL_INFO:
        if c.var in ("t", "t2m"):
            celsius[:, c.index] -= 273.15
    write_states(d / "celsius.zarr", States(celsius, s.times, s.lat, s.lon, dict(s.attrs)))
    metres = s.values.copy()
    for c in CHANNEL_INFO:
        if c.var == "z":
            metres[:, c.index] /= 9.80665
    write_states(d / "metres.zarr", States(metres, s.times, s.lat, s.lon, dict(s.attrs)))
    cfg = tiny_config(d / "unused")
    codec, dit, _ = tiny_models(cfg)
    save_model(d / "dit.pt", dit, "diffusion", cfg.diffusion)
    save_model(d / "vae.pt", codec, "vae", cfg.vae)
    (d / "garbage.pt").write_bytes(b"not a checkpoint at all")
    raw = (d / "dit.pt").read_bytes()
    (d / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    foreign = d / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("user data\n")
    spec = yaml.safe_load((REPO / "tune_configs" / "smoke.yaml").read_text())
    spec["search"] = {"dpo.beta": {"grid": [1000, -1]}}
    (d / "bad_sweep.yaml").write_text(yaml.safe_dump(spec))
    (d / "bad.yaml").write_text("dpo: {beta: [unclosed\n")
    (d / "dup.yaml").write_text("dpo:\n  beta: 1000\n  lr: 1.0e-5\n  beta: 2000\n")
    (d / "dup_section.yaml").write_text("dpo: {beta: 1000}\nvae: {steps: 2}\ndpo: {lr: 1.0e-5}\n")
    (d / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (d / "nul.yaml").write_bytes(b"dpo:\x00 {beta: 1}\n")
    (d / "confdir").mkdir()
    (d / "list.yaml").write_text("- dpo.beta=1\n")
    import xarray as xr

    ds = xr.open_zarr(d / "truth.zarr")
    pa = ds.assign_coords(level=ds["level"].values * 100)
    pa["level"].attrs["units"] = "Pa"
    pa.to_zarr(d / "pa.zarr", mode="w")
    atm = ds.assign_coords(level=ds["level"].values / 1013.25)
    atm["level"].attrs["units"] = "atm"
    atm.to_zarr(d / "atm.zarr", mode="w")
    shutil.copytree(d / "truth.zarr", d / "damaged.zarr")
    chunk = next(p for p in sorted((d / "damaged.zarr" / "temperature").rglob("*")) if p.is_file()
                 and p.name != "zarr.json")
    chunk.write_bytes(b"\x13" * chunk.stat().st_size)  # not a zstd frame: does not decode
    lookalike = d / "lookalike_eval"  # a user's folder holding what an evaluation folder holds
    lookalike.mkdir()
    (lookalike / "report.md").write_text("# my notes\n")
    (lookalike / "metrics.json").write_text(json.dumps({"checks": [], "scores": {}}))
    (lookalike / "thesis.tex").write_text("\\section{mine}\n")
    unmarked = d / "unmarked.zarr"  # a store of write_states layout without the marker
    shutil.copytree(d / "truth.zarr", unmarked)
    (unmarked / ".align_rl").unlink()
    return d


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns if p.is_file() else 0)
    return out


@pytest.fixture
def trap(monkeypatch):
    """Replace the expensive work of every command by an error that fails the case at once."""

    def reached(*a, **k):
        raise AssertionError("the command started its work: the bad input was not caught before")

    import align_rl.world.simulate as sim
    import align_rl.evaluation.runner as ev
    import align_rl.pipeline as tr
    import align_rl.training.pretraining as pre
    import align_rl.tune.run as sw

    monkeypatch.setattr(tr, "run", reached)
    monkeypatch.setattr(pre, "ensure_pretrained", reached)
    monkeypatch.setattr(ev, "load_eval_data", reached)
    monkeypatch.setattr(ev, "run_evaluation", reached)
    monkeypatch.setattr(sw, "run_sweep", reached)
    monkeypatch.setattr(sim, "simulate", reached)
    import align_rl.evaluation.scoring as sc

    real = sc.score_stores

    def guarded(*a, **k):  # scoring is cheap: run it, but the bad input must stop it first
        return real(*a, **k)

    monkeypatch.setattr(sc, "score_stores", guarded)


# ----------------------------------------------------------------------------- the table


def _cmd(module: str) -> Callable[[list[str]], object]:
    def run(argv):
        import importlib

        return importlib.import_module(module).main(argv)

    return run


def _lib(fn: Callable[[SimpleNamespace], object]) -> Callable[[SimpleNamespace], object]:
    """A store or checkpoint call, wrapped as a command is (project errors -> exit 2)."""
    return fn


TRAIN, PRETRAIN, EVALUATE, SCORE, DATA, SWEEP = (
    "align_rl.train", "align_rl.pretrain", "align_rl.evaluate", "align_rl.score", "align_rl.data.__main__",
    "align_rl.sweep")


def _pair_store(path: Path):
    from align_rl.io.pair_store import PairStore
    from tests.test_pair_store import NAMES, SHAPE, group

    st = PairStore.open(path, SHAPE, NAMES)
    st.append([group(i) for i in range(3)])
    return st


def _flip(path: Path, at: int = 100) -> None:
    b = bytearray(path.read_bytes())
    b[min(at, len(b) - 1)] ^= 0xFF
    path.write_bytes(bytes(b))


def _ps_damage(kind: str):
    """Prepare a damaged pair store in the case folder; the call opens and reads it."""

    def prep(t: SimpleNamespace):
        p = t.tmp / "pairs.zarr"
        _pair_store(p)
        if kind == "latent_chunk":
            os.remove(p / "candidates/latent/c/0/0/0/0")
        elif kind == "winner_chunk":
            os.remove(p / "pairs/winner/c/0")
        elif kind == "lost_commit":
            os.remove(p / "COMMIT")
        elif kind == "big_commit":
            c = json.loads((p / "COMMIT").read_text())
            c["candidates"] += 1000
            (p / "COMMIT").write_text(json.dumps(c))
        elif kind == "garbage_meta":
            (p / "zarr.json").write_text("{garbage")
        elif kind == "garbage_commit":
            (p / "COMMIT").write_text("12 rows or so")
        elif kind == "flipped_latent":
            _flip(p / "candidates/latent/c/0/0/0/0", 200)
        elif kind == "flipped_scores":
            _flip(p / "candidates/scores/c/0/0", 40)
        elif kind == "winner_out_of_range":
            import zarr


            a = zarr.open_group(str(p), mode="a")["pairs/winner"]
            a[0] = 10_000  # and COMMIT's checksum no longer matches
        return p

    def call(t: SimpleNamespace):
        from align_rl.io.pair_store import PairDataset, PairStore

        st = PairStore.open(t.prepared, mode="r")
        PairDataset(st, st.pair_set("M")).batch(np.arange(len(st.pair_set("M"))))
        st.candidate_latents(np.arange(st.num_candidates))

    return prep, call


def _ps_into(kind: str):
    def prep(t):
        if kind == "dataset":
            return t.inputs / "truth.zarr"
        return t.inputs / "foreign"

    def call(t):
        from align_rl.io.pair_store import PairStore

        PairStore.open(t.prepared, (3, 2, 4), ["assim", "phys"])

    return prep, call


def _ck(kind: str):
    def prep(t):
        src = t.inputs / "dit.pt"
        dst = t.tmp / "ck.pt"
        shutil.copy(src, dst)
        if kind == "flipped":
            from tests.test_security import _flip_in_largest_tensor

            _flip_in_largest_tensor(dst)
        elif kind == "malicious":
            from tests.test_security import _plant

            _plant(dst, t.tmp / "pwned", {"format": "align_rl.checkpoint"})
        elif kind == "wrong_kind":
            shutil.copy(t.inputs / "vae.pt", dst)
        elif kind == "missing":
            dst.unlink()
        return dst

    def call(t):
        from align_rl.io.checkpoints import load_model

        load_model(t.prepared, "diffusion")

    return prep, call


@dataclasses.dataclass
class Case:
    id: str
    target: str | tuple  # a module with main(argv), or (prep, call) for a library call
    argv: Callable[[SimpleNamespace], list[str]] | None
    match: str  # regex the message must contain
    workdir: bool = False  # the case names t.work as run.workdir: it must not be created
    prep: Callable[[SimpleNamespace], object] | None = None  # files the case needs (made first)


W = lambda t: f"run.workdir={t.work}"  # noqa: E731


def _damage(dst: Path, kind: str, t: SimpleNamespace, src: Path) -> None:
    """Write at ``dst`` a copy of the checkpoint ``src`` damaged as ``kind``."""
    import torch

    dst.parent.mkdir(parents=True, exist_ok=True)
    raw = src.read_bytes()
    if kind == "truncated":
        dst.write_bytes(raw[: len(raw) // 2])
    elif kind == "flipped":
        dst.write_bytes(raw)
        from tests.test_security import _flip_in_largest_tensor

        _flip_in_largest_tensor(dst)
    elif kind == "no_checksum":  # a tensor edited and the checksum key removed
        obj = torch.load(src, weights_only=True)
        obj.pop("checksum")
        k = max(obj["state_dict"], key=lambda k: obj["state_dict"][k].numel())
        obj["state_dict"][k] = obj["state_dict"][k] + 1.0
        torch.save(obj, dst)
    elif kind == "other_kind":
        other = t.inputs / ("dit.pt" if src.name == "vae.pt" else "vae.pt")
        dst.write_bytes(other.read_bytes())
    elif kind == "pickle":
        from tests.test_security import _plant

        _plant(dst, t.tmp / "pwned", {"format": "align_rl.checkpoint"})
    elif kind == "garbage":
        dst.write_bytes(b"not a checkpoint at all")
    elif kind == "empty":
        dst.write_bytes(b"")
    else:
        raise ValueError(kind)


DAMAGES = {"truncated": r"not a readable checkpoint", "flipped": r"damaged: its content does not match",
           "no_checksum": r"has no checksum", "other_kind": r"is a \w+ checkpoint, not a",
           "pickle": r"not a readable checkpoint", "garbage": r"not a readable checkpoint",
           "empty": r"not a readable checkpoint"}
"""How a cached final checkpoint is damaged -> what the message says about it."""


def _damaged_final(model: str, kind: str):
    """Prepare ``t.work`` whose cached ``checkpoints/<model>/final.pt`` is damaged as ``kind``."""

    def prep(t):
        src = t.inputs / ("vae.pt" if model == "vae" else "dit.pt")
        _damage(t.work / "checkpoints" / model / "final.pt", kind, t, src)

    return prep


def _ck_lib(kind: str):
    def prep(t):
        dst = t.tmp / "ck.pt"
        _damage(dst, kind, t, t.inputs / "dit.pt")
        return dst

    def call(t):
        from align_rl.io.checkpoints import load_model

        load_model(t.prepared, "diffusion")

    return prep, call


def _dpo_cached(kind: str):
    """A finished DPO folder (state.pt at 5 of 5 steps, validated) whose best.pt is damaged: the
    cached result is refused, never reported."""

    def prep(t):
        from align_rl.io.checkpoints import save_state

        out = t.tmp / "dpo" / "M-offline-x"
        out.mkdir(parents=True)
        save_state({"step": 5, "version": 1, "history": [{"loss": 0.5}], "best": {"step": 5}},
                   out / "state.pt")
        _damage(out / "best.pt", kind, t, t.inputs / "dit.pt")
        return out

    def call(t):
        from align_rl.alignment.learner import run_dpo
        from align_rl.config import load_config

        cfg = load_config(overrides=["dpo.steps=5"])
        run_dpo(cfg, None, None, t.inputs / "dit.pt", out_dir=t.prepared)

    return prep, call


def _ps_verify(kind: str):
    """A damaged pair store checked as the main job checks it before trusting a cached DPO run."""

    def prep(t):
        p = t.tmp / "pairs.zarr"
        _pair_store(p)
        if kind == "lower_commit":
            c = json.loads((p / "COMMIT").read_text())
            c["pairs"] -= 1
            (p / "COMMIT").write_text(json.dumps(c))
        elif kind == "winner_chunk":
            os.remove(p / "pairs/winner/c/0")
        elif kind == "latent_chunk":
            os.remove(p / "candidates/latent/c/0/0/0/0")
        return p

    def call(t):
        from align_rl.io.pair_store import PairStore

        PairStore.open(t.prepared, mode="r").verify()

    return prep, call


def _eval_lookalike(t):
    """``t.work/eval``: a user's folder with what an evaluation folder holds, and a thesis."""
    ev = t.work / "eval"
    ev.mkdir(parents=True)
    (ev / "report.md").write_text("# my notes\n")
    (ev / "metrics.json").write_text(json.dumps({"checks": [], "scores": {}}))
    (ev / "thesis.tex").write_text("\\section{mine}\n")


SMOKE = str(REPO / "tune_configs" / "smoke.yaml")

CONFIG_BAD = [
    ("top-k", ["pairs.top_k_phys=20"], r"pairs\.top_k_phys=20 needs .*pairs\.candidates=16"),
    ("top-k-9", ["pairs.top_k_phys=9"], r"pairs\.top_k_phys=9 .*use pairs\.top_k_phys <= 8"),
    ("vae-heads", ["vae.heads=5"], r"vae\.embed_dim=128 is not divisible by vae\.heads=5"),
    ("vae-window", ["vae.window=3"], r"vae\.window=3 does not divide the 8x16 token grid"),
    ("vae-patch", ["vae.patch=5"], r"vae\.patch=5 does not divide the grid 32x64"),
    ("grid-window", ["data.grid=64x128", "vae.window=12"], r"vae\.window=12 does not divide the 16x32"),
    ("diffusion-embed", ["diffusion.embed_dim=100"], r"diffusion\.embed_dim=100 is smaller .*>= 276"),
    ("diffusion-heads", ["diffusion.heads=7"], r"diffusion\.embed_dim=288 is not divisible by diffusion\.heads=7"),
    ("diffusion-patch", ["diffusion.patch=3"], r"diffusion\.patch=3 does not divide the latent 8x16"),
    ("baseline", ["eval.baseline=bogus"], r"eval\.baseline='bogus' must be one of eval\.models"),
    ("models-empty", ["eval.models=[]"], r"eval\.models must name at least one"),
    ("models-twice", ["eval.models=[reference, reference]"], r"eval\.models=.* names a model twice"),
    ("workdir-tilde", ["run.workdir=~"], r"run\.workdir is null .*quoted"),
    ("workdir-empty", ["run.workdir=''"], r"run\.workdir is an empty path"),
    ("pairs-store-empty", ["pairs.store=''"], r"pairs\.store is an empty path"),
    ("eval-out-empty", ["eval.out=''"], r"eval\.out is an empty path"),
    ("data-path-empty", ["data.source=zarr", "data.path=' '"], r"data\.path is an empty path"),
    ("forecaster-path-empty", ["forecaster.path=''"], r"forecaster\.path is an empty path"),
    ("normalization-empty", ["data.normalization=''"], r"data\.normalization is an empty path"),
    ("duplicate-override-key", ["rewards.weights={assim: 1, assim: 2, forecast: 1, phys: 1}"],
     r"duplicate key\(s\) assim"),
    ("name-null", ["run.name=null"], r"run\.name is null"),
]
"""Config values refused before any work (cross-field rules, paths, YAML): (id, overrides, message)."""

CONFIG_FILES_BAD = [
    ("folder", "confdir", r"confdir is a folder, not a YAML file"),
    ("binary", "binary.yaml", r"binary\.yaml is not a text file"),
    ("nul", "nul.yaml", r"nul\.yaml is not a text file \(it holds NUL bytes\)"),
    ("duplicate-key", "dup.yaml", r"duplicate key\(s\) dpo\.beta \(line 4\)"),
    ("duplicate-section", "dup_section.yaml", r"duplicate key\(s\) dpo \(line 3\)"),
    ("not-mapping", "list.yaml", r"must hold a mapping"),
]
"""``--config FILE`` inputs that are refused: (id, file in the inputs, message)."""

_ARGV0 = {TRAIN: lambda t: [], PRETRAIN: lambda t: ["all"], EVALUATE: lambda t: [],
          SWEEP: lambda t: [SMOKE]}
_NAME = {TRAIN: "train", PRETRAIN: "pretrain", EVALUATE: "evaluate", SWEEP: "sweep"}


def _generated_cases() -> list["Case"]:
    out = []
    for mod in (TRAIN, PRETRAIN, EVALUATE, SWEEP):
        for cid, ov, match in CONFIG_BAD:
            out.append(Case(f"{_NAME[mod]}-cfg-{cid}", mod,
                            lambda t, mod=mod, ov=ov: [*_ARGV0[mod](t), W(t), *ov], match, True))
        for cid, name, match in CONFIG_FILES_BAD:
            out.append(Case(f"{_NAME[mod]}-config-file-{cid}", mod,
                            lambda t, mod=mod, name=name: [*_ARGV0[mod](t), "--config", str(t.inputs / name), W(t)],
                            match, True))
        out.append(Case(f"{_NAME[mod]}-config-file-empty-path", mod,
                        lambda t, mod=mod: [*_ARGV0[mod](t), "--config", "", W(t)],
                        r"config file path is empty", True))
    for cid, name, match in CONFIG_FILES_BAD:
        out.append(Case(f"data-config-file-{cid}", DATA,
                        lambda t, name=name: ["simulate", "--out", str(t.tmp / "w.zarr"), "--config",
                                              str(t.inputs / name)], match))
    for mod, argv0 in ((EVALUATE, []), (TRAIN, []), (PRETRAIN, ["all"])):
        for model in ("vae", "diffusion"):
            for kind, what in DAMAGES.items():
                out.append(Case(
                    f"{_NAME[mod]}-cached-{model}-{kind}", mod, lambda t, a=argv0: [*a, W(t)],
                    rf"checkpoints/{model}/final\.pt .*{what}.*it is not used or trained over: retrain "
                    rf"it with python -m align_rl\.pretrain {model} --force, or delete",
                    prep=_damaged_final(model, kind)))
    for kind in ("no_checksum", "truncated", "empty", "garbage"):
        out.append(Case(f"ckpt-{kind.replace('_', '-')}", _ck_lib(kind), None, DAMAGES[kind]))
    for kind in ("truncated", "no_checksum", "flipped", "other_kind"):
        out.append(Case(f"dpo-cached-best-{kind.replace('_', '-')}", _dpo_cached(kind), None,
                        rf"best\.pt .*{DAMAGES[kind]}.*delete the folder .*M-offline-x"))
    for kind, match in (("lower_commit", r"pairs/\w+ of the preference store .*does not match its checksum"),
                        ("winner_chunk", r"pairs/winner .*(checksum|missing)"),
                        ("latent_chunk", r"chunk file\(s\) candidates/latent/c/0/0/0/0 .*missing")):
        out.append(Case(f"pairs-verify-{kind.replace('_', '-')}", _ps_verify(kind), None, match))
    return out


CASES: list[Case] = [
    # --- train: config values, files, outputs
    Case("train-lr-nan", TRAIN, lambda t: ["dpo.lr=nan", W(t)], r"dpo\.lr=nan must be a finite", True),
    Case("train-beta-inf", TRAIN, lambda t: ["dpo.beta=.inf", W(t)], r"dpo\.beta=inf", True),
    Case("train-lr-zero", TRAIN, lambda t: ["dpo.lr=0", W(t)], r"dpo\.lr=0\.0 must be a finite number > 0", True),
    Case("train-batch-zero", TRAIN, lambda t: ["dpo.batch_size=0", W(t)], r"dpo\.batch_size=0 must be an integer >= 1", True),
    Case("train-ckpt-every-zero", TRAIN, lambda t: ["dpo.checkpoint_every=0", W(t)], r"dpo\.checkpoint_every", True),
    Case("train-decile-5", TRAIN, lambda t: ["pairs.decile=5", W(t)], r"pairs\.decile=5\.0 must be .* \(0, 0\.5\]", True),
    Case("train-vae-steps-zero", TRAIN, lambda t: ["vae.steps=0", W(t)], r"vae\.steps", True),
    Case("train-forecaster-lr-neg", TRAIN, lambda t: ["forecaster.lr=-1", W(t)], r"forecaster\.lr=-1\.0", True),
    Case("train-days-zero", TRAIN, lambda t: ["data.days=0", W(t)], r"data\.days=0", True),
    Case("train-two-bad", TRAIN, lambda t: ["data.members=0", "sampler.tau=-1", W(t)],
         r"2 bad config values: data\.members=0.*sampler\.tau=-1", True),
    Case("train-mode", TRAIN, lambda t: ["dpo.mode=sometimes", W(t)], r"dpo\.mode='sometimes' must be one of offline, online", True),
    Case("train-unknown-key", TRAIN, lambda t: ["dpo.betta=3", W(t)], r"unknown config key 'dpo\.betta'", True),
    Case("train-variant", TRAIN, lambda t: ["pairs.variants=[M,Q]", W(t)], r"pairs\.variants\[1\]='Q'", True),
    Case("train-weights-zero", TRAIN, lambda t: ["rewards.weights={assim: 0, forecast: 0, phys: 0}", W(t)],
         r"at least one positive weight", True),
    Case("train-weight-negative", TRAIN, lambda t: ["rewards.weights={assim: -1, forecast: 1, phys: 1}", W(t)],
         r"rewards\.weights\.assim=-1\.0", True),
    Case("train-date-range", TRAIN, lambda t: ["data.train=[2003-01-01, 2000-01-01]", W(t)], r"data\.train=.*start <= end", True),
    Case("train-density", TRAIN, lambda t: ["obs.density=1.5", W(t)], r"obs\.density=1\.5 .*\(0, 1\]", True),
    Case("train-eval-members", TRAIN, lambda t: ["eval.members=1", W(t)], r"eval\.members=1 must be an integer >= 2", True),
    Case("train-device", TRAIN, lambda t: ["run.device=tpu", W(t)], r"run\.device='tpu'", True),
    Case("train-no-equals", TRAIN, lambda t: ["dpo.beta", W(t)], r"not of the form section\.key=value", True),
    Case("train-config-missing", TRAIN, lambda t: ["--config", str(t.tmp / "nope.yaml"), W(t)], r"does not exist", True),
    Case("train-config-bad-yaml", TRAIN, lambda t: ["--config", str(t.inputs / "bad.yaml"), W(t)], r"not valid YAML", True),
    Case("train-zarr-no-path", TRAIN, lambda t: ["data.source=zarr", W(t)], r"data\.source=zarr needs data\.path", True),
    Case("train-zarr-missing", TRAIN, lambda t: ["data.source=zarr", f"data.path={t.tmp / 'none.zarr'}", W(t)],
         r"data\.path=.*does not exist", True),
    Case("train-pairs-store-foreign", TRAIN, lambda t: [f"pairs.store={t.inputs / 'foreign'}", W(t)],
         r"not an align_rl preference store", True),
    Case("train-eval-out-foreign", TRAIN, lambda t: [f"eval.out={t.inputs / 'foreign'}", W(t)],
         r"not created by align_rl", True),
    Case("train-hex-grid", TRAIN, lambda t: ["data.grid=0x40", W(t)], r"data\.grid: .*grid 0x40", True),
    # --- pretrain
    Case("pretrain-readme-order", PRETRAIN, lambda t: ["all", "--force", "vae.steps=0", W(t)], r"vae\.steps=0", True),
    Case("pretrain-lr-nan", PRETRAIN, lambda t: ["diffusion", "diffusion.lr=nan", W(t)], r"diffusion\.lr=nan", True),
    Case("pretrain-bad-stage", PRETRAIN, lambda t: ["everything", W(t)], r"invalid choice: 'everything'", True),
    Case("pretrain-forecaster-path", PRETRAIN,
         lambda t: ["all", "forecaster.kind=torch", f"forecaster.path={t.tmp / 'fc.pt'}", W(t)],
         r"forecaster\.path=.*does not exist", True),
    Case("pretrain-ckpt-every", PRETRAIN, lambda t: ["--force", "all", "pretrain.checkpoint_every=0", W(t)],
         r"pretrain\.checkpoint_every=0", True),
    # --- evaluate
    Case("evaluate-missing-ckpt", EVALUATE, lambda t: ["--models", f"A={t.tmp / 'x.pt'}", W(t)],
         r"checkpoint .*x\.pt of model 'A' does not exist", True),
    Case("evaluate-no-equals", EVALUATE, lambda t: ["--models", "Align-M", W(t)], r"NAME=CHECKPOINT", True),
    Case("evaluate-vae-as-model", EVALUATE, lambda t: ["--models", f"A={t.inputs / 'vae.pt'}", W(t)],
         r"is a vae checkpoint, not a diffusion model", True),
    Case("evaluate-reference-name", EVALUATE, lambda t: ["--models", f"reference={t.inputs / 'dit.pt'}", W(t)],
         r"'reference' is the pretrained model", True),
    Case("evaluate-garbage-ckpt", EVALUATE, lambda t: ["--models", f"A={t.inputs / 'garbage.pt'}", W(t)],
         r"not a readable checkpoint", True),
    Case("evaluate-out-foreign", EVALUATE,
         lambda t: ["--models", f"A={t.inputs / 'dit.pt'}", "--out", str(t.inputs / "foreign"), W(t)],
         r"foreign exists but was not created by align_rl", True),
    Case("evaluate-bad-override", EVALUATE, lambda t: ["--models", f"A={t.inputs / 'dit.pt'}", "eval.times=0", W(t)],
         r"eval\.times=0", True),
    # --- score
    Case("score-out-dir", SCORE, lambda t: ["--analysis", str(t.inputs / "analysis.zarr"), "--truth",
                                            str(t.inputs / "truth.zarr"), "--out", str(t.tmp)], r"is a folder"),
    Case("score-out-no-parent", SCORE, lambda t: ["--analysis", str(t.inputs / "analysis.zarr"), "--truth",
                                                  str(t.inputs / "truth.zarr"), "--out", str(t.tmp / "a" / "m.json")],
         r"does not exist; create it first"),
    Case("score-missing-analysis", SCORE, lambda t: ["--analysis", str(t.tmp / "none.zarr"), "--truth",
                                                     str(t.inputs / "truth.zarr")], r"--analysis .*does not exist"),
    Case("score-celsius", SCORE, lambda t: ["--analysis", str(t.inputs / "celsius.zarr"), "--truth",
                                            str(t.inputs / "celsius.zarr"), "--out", str(t.tmp / "m.json")],
         r"t2m ranges over .*K \(temperatures in °C\? add 273\.15\)"),
    Case("score-geopotential-height", SCORE, lambda t: ["--analysis", str(t.inputs / "metres.zarr"), "--truth",
                                                        str(t.inputs / "truth.zarr"), "--out", str(t.tmp / "m.json")],
         r"geopotential height in m.*multiply by g"),
    Case("score-chunk-zero", SCORE, lambda t: ["--analysis", str(t.inputs / "analysis.zarr"), "--truth",
                                               str(t.inputs / "truth.zarr"), "--chunk", "0"], r"--chunk 0 must be >= 1"),
    # --- data
    Case("data-hex-grid", DATA, lambda t: ["simulate", "--out", str(t.tmp / "w.zarr"), "--grid", "0x40"],
         r"data\.grid: .*grid 0x40"),
    Case("data-days-zero", DATA, lambda t: ["simulate", "--out", str(t.tmp / "w.zarr"), "--days", "0"], r"data\.days=0"),
    Case("data-overwrite-foreign", DATA,
         lambda t: ["simulate", "--out", str(t.inputs / "foreign"), "--overwrite", "data.days=1"],
         r"foreign exists but was not created by align_rl"),
    Case("data-exists", DATA, lambda t: ["simulate", "--out", str(t.inputs / "truth.zarr"), "data.days=1"],
         r"exists; remove it or pass --overwrite"),
    Case("data-override-between-options", DATA,
         lambda t: ["simulate", "--out", str(t.tmp / "w.zarr"), "data.days=0", "--quiet", "data.members=0"],
         r"data\.members=0"),
    Case("data-stats-missing", DATA, lambda t: ["stats", str(t.tmp / "none.zarr")], r"does not exist"),
    Case("data-spinup-days", DATA, lambda t: ["spinup", "--days", "0", "--out", str(t.tmp / "r.npz")], r"must be positive"),
    # --- sweep
    Case("sweep-missing-file", SWEEP, lambda t: [str(t.tmp / "nope.yaml"), W(t)], r"does not exist", True),
    Case("sweep-bad-search", SWEEP, lambda t: [str(t.inputs / "bad_sweep.yaml"), W(t)], r"search\.dpo\.beta", True),
    Case("sweep-bad-config-value", SWEEP, lambda t: [str(REPO / "tune_configs/smoke.yaml"), "dpo.lr=nan", W(t)],
         r"dpo\.lr=nan", True),
    Case("sweep-num-samples", SWEEP, lambda t: [str(REPO / "tune_configs/smoke.yaml"), "num_samples=0", W(t)],
         r"num_samples", True),
    Case("sweep-pairs-store-foreign", SWEEP,
         lambda t: [str(REPO / "tune_configs/smoke.yaml"), f"pairs.store={t.inputs / 'foreign'}", W(t)],
         r"not an align_rl preference store", True),
    # --- pair store
    Case("pairs-latent-chunk-deleted", _ps_damage("latent_chunk"), None, r"chunk file\(s\) candidates/latent/c/0/0/0/0 .*missing.*mv "),
    Case("pairs-winner-chunk-deleted", _ps_damage("winner_chunk"), None, r"pairs/winner .*checksum.*reselect"),
    Case("pairs-commit-lost", _ps_damage("lost_commit"), None, r"COMMIT file .* is lost.*not taken for empty"),
    Case("pairs-commit-too-large", _ps_damage("big_commit"), None, r"COMMIT .* counts 1018 candidates but .* holds only 18"),
    Case("pairs-garbage-metadata", _ps_damage("garbage_meta"), None, r"metadata .*zarr\.json\) is unreadable"),
    Case("pairs-garbage-commit", _ps_damage("garbage_commit"), None, r"COMMIT file .* is damaged"),
    Case("pairs-flipped-latent", _ps_damage("flipped_latent"), None, r"(digests|unreadable)"),
    Case("pairs-flipped-scores", _ps_damage("flipped_scores"), None, r"candidates/scores"),
    Case("pairs-winner-overwritten", _ps_damage("winner_out_of_range"), None, r"pairs/winner .*(checksum|outside)"),
    Case("pairs-into-dataset", _ps_into("dataset"), None, r"not an align_rl preference store.*nothing was written"),
    Case("pairs-into-foreign", _ps_into("foreign"), None, r"not an align_rl preference store.*nothing was written"),
    # --- checkpoints
    Case("ckpt-flipped", _ck("flipped"), None, r"damaged: its content does not match its stored checksum"),
    Case("ckpt-malicious", _ck("malicious"), None, r"not a readable checkpoint"),
    Case("ckpt-wrong-kind", _ck("wrong_kind"), None, r"is a vae checkpoint, not a diffusion one"),
    Case("ckpt-missing", _ck("missing"), None, r"no checkpoint at"),
    # --- command lines as the README writes them
    Case("pretrain-overrides-before-stage", PRETRAIN, lambda t: ["--force", "vae.steps=-1", "all", W(t)],
         r"vae\.steps=-1", True),
    Case("pretrain-override-first", PRETRAIN, lambda t: ["vae.steps=0", "--force", "vae", W(t)], r"vae\.steps=0", True),
    Case("pretrain-no-stage", PRETRAIN, lambda t: ["--force", "vae.steps=2", W(t)],
         r"required: stage \(one of forecaster, vae, diffusion, all\)", True),
    Case("pretrain-no-stage-no-overrides", PRETRAIN, lambda t: [], r"required: stage \(one of"),
    Case("sweep-no-spec", SWEEP, lambda t: ["dpo.steps=2", W(t)], r"required: spec \(sweep file", True),
    Case("sweep-overrides-before-spec", SWEEP, lambda t: ["num_samples=0", W(t), SMOKE], r"num_samples", True),
    Case("pretrain-force-other-damaged", PRETRAIN, lambda t: ["diffusion", "--force", W(t)],
         r"checkpoints/vae/final\.pt .*not a readable checkpoint.*pretrain vae --force",
         prep=_damaged_final("vae", "truncated")),
    # --- stores: damaged chunks, level units
    Case("score-damaged-chunk", SCORE, lambda t: ["--analysis", str(t.inputs / "damaged.zarr"), "--truth",
                                                  str(t.inputs / "truth.zarr"), "--out", str(t.tmp / "m.json")],
         r"variable temperature of the store .*damaged\.zarr cannot be read for the times .*chunk is damaged"),
    Case("score-damaged-chunk-truth", SCORE, lambda t: ["--analysis", str(t.inputs / "analysis.zarr"), "--truth",
                                                        str(t.inputs / "damaged.zarr")],
         r"variable temperature of the store .*damaged\.zarr cannot be read"),
    Case("score-level-units-atm", SCORE, lambda t: ["--analysis", str(t.inputs / "atm.zarr"), "--truth",
                                                    str(t.inputs / "truth.zarr"), "--out", str(t.tmp / "m.json")],
         r"level coordinate of .*atm\.zarr has units 'atm'; pressure levels must be in hPa"),
    # --- outputs that are not the project's: refused, the user's files kept
    Case("evaluate-eval-lookalike", EVALUATE, lambda t: [W(t)], r"eval exists but was not created by align_rl",
         prep=_eval_lookalike),
    Case("evaluate-out-lookalike", EVALUATE, lambda t: ["--out", str(t.inputs / "lookalike_eval"), W(t)],
         r"lookalike_eval exists but was not created by align_rl", True),
    Case("train-eval-lookalike", TRAIN, lambda t: [W(t)], r"eval exists but was not created by align_rl",
         prep=_eval_lookalike),
    Case("train-eval-out-lookalike", TRAIN, lambda t: [f"eval.out={t.inputs / 'lookalike_eval'}", W(t)],
         r"lookalike_eval exists but was not created by align_rl", True),
    Case("data-overwrite-unmarked-store", DATA,
         lambda t: ["simulate", "--out", str(t.inputs / "unmarked.zarr"), "--overwrite", "data.days=1"],
         r"unmarked\.zarr exists but was not created by align_rl"),
    # --- model names
    Case("evaluate-models-unknown", EVALUATE, lambda t: ["eval.models=[reference, bogus]", W(t)],
         r"eval\.models names 'bogus', which this command does not evaluate; the models are reference", True),
    Case("evaluate-baseline-not-evaluated", EVALUATE,
         lambda t: ["--models", f"A={t.inputs / 'dit.pt'}", "eval.baseline=B", W(t)],
         r"eval\.baseline='B' must be one of eval\.models \(reference, A\)", True),
    Case("train-models-unknown", TRAIN, lambda t: ["eval.models=[reference, Align-Q]", W(t)],
         r"eval\.models names 'Align-Q'.*the models are reference, Align-M, Align-P", True),
    Case("train-models-variant-not-trained", TRAIN,
         lambda t: ["pairs.variants=[M]", "eval.models=[reference, Align-P]", "eval.baseline=Align-P", W(t)],
         r"eval\.models names 'Align-P'.*the models are reference, Align-M", True),
    *_generated_cases(),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_cleanly(case: Case, inputs, tmp_path, trap, capsys):
    t = SimpleNamespace(inputs=inputs, tmp=tmp_path, work=tmp_path / "work")
    if isinstance(case.target, tuple):
        prep, call = case.target
        t.prepared = prep(t)
        run = cli_errors(lambda: call(t))
        argv = None
    else:
        if case.prep is not None:
            case.prep(t)
        argv = case.argv(t)
        main = _cmd(case.target)
        run = lambda: main(argv)  # noqa: E731
    before_case, before_inputs = _tree(tmp_path), _tree(inputs)
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        run()
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    import re

    assert re.search(case.match, err, re.S), f"{case.id}: {err!r}"
    assert _tree(tmp_path) == before_case, "something was written or removed"
    assert _tree(inputs) == before_inputs, "an input was changed"
    if case.workdir:
        assert not t.work.exists()
    assert time.perf_counter() - t0 < 60


def test_the_table_covers_every_command_and_store():
    ids = [c.id.split("-")[0] for c in CASES]
    assert len(CASES) >= 150
    assert {"train", "pretrain", "evaluate", "score", "data", "sweep", "pairs", "ckpt"} <= set(ids)


# ----------------------------------------------------------------------------- real processes


@pytest.mark.parametrize("argv,match", [
    (["align_rl.train", "dpo.lr=nan"], r"dpo\.lr=nan"),
    (["align_rl.evaluate", "--models", "A={tmp}/x.pt", "run.workdir={tmp}/work"], r"does not exist"),
    (["align_rl.score", "--analysis", "{inputs}/analysis.zarr", "--truth", "{inputs}/truth.zarr", "--out", "{tmp}"],
     r"is a folder"),
    (["align_rl.data", "simulate", "--out", "{tmp}/w.zarr", "--grid", "0x40"], r"0x40"),
], ids=["train", "evaluate", "score", "data"])
def test_commands_exit_2_within_seconds(argv, match, inputs, tmp_path):
    argv = [a.format(tmp=tmp_path, inputs=inputs) for a in argv]
    if argv[0] == "align_rl.train":
        argv.append(f"run.workdir={tmp_path / 'work'}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    before = _tree(tmp_path)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=180)
    wall = time.perf_counter() - t0
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    import re

    assert re.search(match, p.stderr)
    assert _tree(tmp_path) == before
    assert wall < 60, f"took {wall:.0f} s to fail"


# ----------------------------------------------------------------------------- README orders


@pytest.mark.parametrize("module,argv,check", [
    ("align_rl.train", ["--config", "c.yaml", "--no-eval", "dpo.beta=1"], lambda a: a.no_eval and a.overrides == ["dpo.beta=1"]),
    ("align_rl.train", ["dpo.beta=1", "--no-eval", "dpo.lr=1e-5"], lambda a: a.overrides == ["dpo.beta=1", "dpo.lr=1e-5"]),
    ("align_rl.pretrain", ["all", "--force", "vae.steps=2"], lambda a: a.stage == "all" and a.force and a.overrides == ["vae.steps=2"]),
    ("align_rl.pretrain", ["all", "--config", "c.yaml", "--force", "--no-progress", "vae.steps=2"],
     lambda a: a.stage == "all" and a.no_progress and a.overrides == ["vae.steps=2"]),
    ("align_rl.pretrain", ["--force", "vae", "vae.steps=2"], lambda a: a.stage == "vae" and a.force),
    ("align_rl.pretrain", ["--force", "vae.steps=-1", "all"],
     lambda a: a.stage == "all" and a.force and a.overrides == ["vae.steps=-1"]),
    ("align_rl.pretrain", ["vae.steps=2", "--config", "c.yaml", "diffusion.steps=3", "vae"],
     lambda a: a.stage == "vae" and a.config == "c.yaml" and a.overrides == ["vae.steps=2", "diffusion.steps=3"]),
    ("align_rl.sweep", ["num_samples=2", "tune_configs/beta_lr.yaml", "dpo.steps=4"],
     lambda a: a.spec == "tune_configs/beta_lr.yaml" and a.overrides == ["num_samples=2", "dpo.steps=4"]),
    ("align_rl.evaluate", ["--config", "c.yaml", "--models", "Align-M=a.pt", "Align-P=b.pt", "eval.times=2"],
     lambda a: a.models == ["Align-M=a.pt", "Align-P=b.pt", "eval.times=2"]),
    ("align_rl.evaluate", ["eval.times=2", "--models", "Align-M=a.pt"], lambda a: a.overrides == ["eval.times=2"]),
    ("align_rl.sweep", ["tune_configs/beta_lr.yaml", "--config", "c.yaml", "dpo.steps=4", "num_samples=2"],
     lambda a: a.spec == "tune_configs/beta_lr.yaml" and a.overrides == ["dpo.steps=4", "num_samples=2"]),
    ("align_rl.score", ["--analysis", "A.zarr", "--truth", "T.zarr", "--out", "m.json", "--normalization", "S"],
     lambda a: a.out == "m.json"),
])
def test_readme_argument_orders_parse(module, argv, check):
    import importlib

    from align_rl.cli import parse_args

    mod = importlib.import_module(module)
    assert check(parse_args(mod.build_parser(), argv))


def test_evaluate_models_and_overrides_are_told_apart():
    from align_rl.cli import split_model_specs

    models, ov = split_model_specs(["A=x.pt", "run.workdir=/w", "v1.2=y.pt", "dpo.beta=3"])
    assert models == ["A=x.pt", "v1.2=y.pt"] and ov == ["run.workdir=/w", "dpo.beta=3"]


def test_data_cli_takes_overrides_between_options(tmp_path, monkeypatch, capsys):
    import align_rl.world.simulate as sim
    from align_rl.data.__main__ import main

    seen = {}

    def fake_build(cfg, out, overwrite=False, progress=True):
        seen.update(days=cfg.data.days, members=cfg.data.members, overwrite=overwrite)
        raise SystemExit(0)

    monkeypatch.setattr(sim, "build_world", fake_build)
    with pytest.raises(SystemExit):
        main(["simulate", "--out", str(tmp_path / "w.zarr"), "data.days=2", "--overwrite", "data.members=1"])
    assert seen == {"days": 2, "members": 1, "overwrite": True}


def test_score_without_unit_check_scores_unusual_data(inputs, tmp_path):
    from align_rl.score import main

    out = tmp_path / "m.json"
    assert main(["--analysis", str(inputs / "celsius.zarr"), "--truth", str(inputs / "celsius.zarr"),
                 "--out", str(out), "--no-unit-check"]) == 0
    assert json.loads(out.read_text())["mse"] == 0.0


# ----------------------------------------------------------------------------- config table


def test_every_numeric_config_key_has_a_range():
    """A numeric config field (int, float, or a list / mapping of them) needs an entry in
    ``align_rl.config.RANGES``; add one next to the others when adding a field."""
    from align_rl.config import RANGES, Config

    missing = []
    for sec in dataclasses.fields(Config):
        hints = typing.get_type_hints(sec.type if isinstance(sec.type, type) else
                                      typing.get_type_hints(Config)[sec.name])
        for name, tp in hints.items():
            key = f"{sec.name}.{name}"
            args = typing.get_args(tp)
            numeric = tp in (int, float) or (args and any(a in (int, float) for a in args))
            if numeric and not any(k in RANGES for k in (key, f"{key}[]", f"{key}.*")):
                missing.append(key)
    assert not missing, f"config keys without a range in RANGES: {missing}"


def test_defaults_and_presets_validate_and_bounds_are_inclusive_where_stated():
    from align_rl.config import PRESETS, load_config

    for preset in PRESETS:
        load_config(preset=preset)
    load_config(overrides=["pairs.decile=0.5", "obs.density=1", "sampler.corrections=0", "dpo.staleness=0",
                           "guidance.dps_zeta=0", "rewards.forecast_hours=6"])


def test_yaml_values_are_read_as_yaml_1_2():
    from align_rl.config import yaml_load

    assert yaml_load("0x40") == "0x40" and yaml_load("1_000") == "1_000" and yaml_load("1:20") == "1:20"
    assert yaml_load("1e-5") == 1e-5 and yaml_load("12") == 12 and yaml_load("-3.5") == -3.5
    assert yaml_load("{a: [1, 2.0, x]}") == {"a": [1, 2.0, "x"]}


# ----------------------------------------------------------------------------- owned folders


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_replacement_is_atomic_and_refuses_foreign_folders(tmp_path):
    from align_rl.owned import MARKER, is_owned, remove_owned, staged

    target = tmp_path / "out"
    with staged(target, "eval") as new:
        new.mkdir()
        (new / "a.txt").write_text("1")
    assert is_owned(target) and (target / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError):
        with staged(target, "eval") as new:
            new.mkdir()
            (new / "a.txt").write_text("2")
            raise RuntimeError("crash while writing")
    assert (target / "a.txt").read_text() == "1"  # the old one stays
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "x").write_text("keep")
    with pytest.raises(OwnershipError, match="not created by align_rl"):
        with staged(foreign, "eval") as new:
            raise AssertionError("not reached")
    with pytest.raises(OwnershipError):
        remove_owned(foreign)
    assert (foreign / "x").read_text() == "keep" and not (foreign / MARKER).exists()


def test_stale_staging_of_a_dead_process_is_cleaned_or_restored(tmp_path):
    from align_rl.owned import _HOST, mark

    from align_rl.io.states import States
    from align_rl.io.store import write_states
    from tests.test_era5 import make_states

    s = make_states(T=2)
    target = tmp_path / "w.zarr"
    write_states(target, s)
    # a killed writer of another (dead) process: its staging folder, 1 file of new content
    dead = tmp_path / f".w.zarr.tmp-{_HOST}-{_dead_pid()}"
    dead.mkdir()
    mark(dead, "staging")
    (dead / "new").mkdir()
    (dead / "new" / "junk").write_bytes(b"x" * 1000)
    # a live process's staging folder and another host's are left alone
    live = tmp_path / f".w.zarr.tmp-{_HOST}-{os.getppid()}"
    live.mkdir()
    mark(live, "staging")
    other = tmp_path / f".w.zarr.tmp-otherhost-{_dead_pid()}"
    other.mkdir()
    mark(other, "staging")
    write_states(target, States(s.values + 1, s.times, s.lat, s.lon), overwrite=True)
    assert not dead.exists() and live.exists() and other.exists()
    # killed between "old aside" and "new in": the old store is moved back
    shutil.rmtree(live)
    crashed = tmp_path / f".w.zarr.tmp-{_HOST}-{_dead_pid()}"
    crashed.mkdir()
    mark(crashed, "staging")
    os.replace(target, crashed / "old")
    from align_rl.owned import clean_stale

    clean_stale(target)
    assert target.exists() and not crashed.exists()
    from align_rl.io.era5 import open_states

    np.testing.assert_allclose(open_states(target, check_units=False).values, s.values + 1)


def test_a_store_without_marker_is_never_adopted_or_replaced(tmp_path):
    """No adoption by content: a store written by write_states whose marker is gone (a copy, a
    user's own store in the same layout) is refused, and left as it was."""
    from align_rl.owned import MARKER, is_owned
    from align_rl.io.store import write_states
    from tests.test_era5 import make_states

    s = make_states(T=2)
    p = write_states(tmp_path / "w.zarr", s)
    (p / MARKER).unlink()
    before = _tree(p)
    with pytest.raises(OwnershipError, match="not created by align_rl"):
        write_states(p, s, overwrite=True)
    assert not is_owned(p) and _tree(p) == before


def test_a_folder_that_looks_like_an_evaluation_is_not_adopted(tmp_path):
    """The folder of the report (report.md, metrics.json with checks) and a user's file beside
    them: refused, nothing marked, the user's file kept."""
    from align_rl.owned import is_owned, require_owned

    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "report.md").write_text("# Evaluation\n")
    (ev / "metrics.json").write_text(json.dumps({"checks": [], "scores": {}}))
    (ev / "thesis.tex").write_text("\\section{mine}\n")
    with pytest.raises(OwnershipError, match="not created by align_rl"):
        require_owned(ev)
    assert not is_owned(ev) and (ev / "thesis.tex").exists()


def test_opening_the_workdir_cleans_temporaries_of_dead_processes(tmp_path):
    from align_rl.config import load_config
    from align_rl.owned import _HOST, mark
    from align_rl.workspace import Workspace

    ck = tmp_path / "checkpoints" / "vae"
    ck.mkdir(parents=True)
    half = ck / f".final.pt.tmp-{_HOST}-{_dead_pid()}"  # a checkpoint writer's staging folder
    half.mkdir()
    mark(half, "staging")
    (half / "new").write_bytes(b"half a checkpoint")
    stage = tmp_path / f".world.zarr.tmp-{_HOST}-{_dead_pid()}"
    stage.mkdir()
    mark(stage, "staging")
    (stage / "new").mkdir()
    keep = tmp_path / "pairs.zarr"
    keep.mkdir()
    (keep / f".x.tmp-{_HOST}-{_dead_pid()}").write_text("inside a store: not ours to sweep")
    Workspace.from_config(load_config(overrides=[f"run.workdir={tmp_path}"]))
    assert not half.exists() and not stage.exists()
    assert len(list(keep.iterdir())) == 1
