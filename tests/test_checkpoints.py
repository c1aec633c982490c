"""Checkpoints rebuild their model and refuse mismatches with a message naming the fix."""

import os

import pytest
import torch

from align_rl.io.checkpoints import is_checkpoint, load_codec, load_model, read_checkpoint, save_model
from align_rl.config import load_config
from align_rl.errors import CheckpointError
from align_rl.models.dit import build_dit
from align_rl.models.forecaster import build_emulator
from align_rl.models.vae import LatentCodec, build_vae

VAE = {"preset": "demo", "patch": 4, "latent_channels": 6, "embed_dim": 16, "depth": 2, "heads": 2,
       "window": 2, "kl_weight": 1e-6, "steps": 10, "lr": 1e-3, "batch_size": 4}
DIT = {"preset": "demo", "patch": 2, "embed_dim": 16, "depth": 1, "heads": 2, "steps": 10,
       "lr": 1e-3, "batch_size": 4}


def _perturb(model):
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def test_roundtrip_each_kind(tmp_path):
    vae = _perturb(build_vae(VAE, (16, 32)))
    save_model(tmp_path / "vae.pt", vae, "vae", VAE, extra={"step": 3})
    vae2, meta = load_model(tmp_path / "vae.pt", "vae", expect=VAE, shapes={"grid": (16, 32)})
    x = torch.randn(2, 69, 16, 32)
    torch.testing.assert_close(vae2.encode(x)[0], vae.eval().encode(x)[0])
    assert meta["extra"]["step"] == 3 and meta["shapes"]["grid"] == [16, 32] and meta["kind"] == "vae"
    assert not vae2.training

    dit = _perturb(build_dit(DIT, (6, 4, 8)))
    save_model(tmp_path / "dit.pt", dit, "diffusion", DIT)
    dit2, meta = load_model(tmp_path / "dit.pt", "diffusion", expect={**DIT, "steps": 999, "lr": 0.5})
    z, t = torch.randn(2, 6, 4, 8), torch.rand(2)
    torch.testing.assert_close(dit2(z, t, z), dit.eval()(z, t, z))
    assert meta["shapes"]["latent_shape"] == [6, 4, 8]

    cfg = load_config(overrides={"forecaster": {"hidden": 8, "depth": 1}})
    net = _perturb(build_emulator(cfg.forecaster, (16, 32)))
    save_model(tmp_path / "fc.pt", net, "forecaster", cfg.forecaster)
    net2, _ = load_model(tmp_path / "fc.pt", "forecaster", expect=cfg.forecaster)
    torch.testing.assert_close(net2(x, x), net(x, x))
    assert is_checkpoint(tmp_path / "fc.pt") and not is_checkpoint(tmp_path / "nothing.pt")


def test_atomic_write_leaves_no_temporary(tmp_path):
    dit = build_dit(DIT, (6, 4, 8))
    path = tmp_path / "sub" / "final.pt"
    save_model(path, dit, "diffusion", DIT)
    first = path.read_bytes()
    save_model(path, _perturb(dit), "diffusion", DIT)  # overwrite in place
    assert path.read_bytes() != first
    assert sorted(os.listdir(path.parent)) == ["final.pt"]
    obj = read_checkpoint(path)
    assert obj["version"] == "1" and obj["config"] == DIT


def test_mismatches_name_the_problem(tmp_path):
    vae = build_vae(VAE, (16, 32))
    save_model(tmp_path / "vae.pt", vae, "vae", VAE)
    with pytest.raises(CheckpointError, match="vae checkpoint, not a diffusion"):
        load_model(tmp_path / "vae.pt", "diffusion")
    with pytest.raises(CheckpointError, match=r"embed_dim: checkpoint 16 vs config 32.*retrain"):
        load_model(tmp_path / "vae.pt", "vae", expect={**VAE, "embed_dim": 32})
    with pytest.raises(CheckpointError, match=r"grid \(16, 32\).*\(32, 64\)"):
        load_model(tmp_path / "vae.pt", "vae", expect={**VAE, "grid": (32, 64)})
    with pytest.raises(CheckpointError, match="no checkpoint.*pretrain"):
        load_model(tmp_path / "missing.pt", "vae")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_model(tmp_path / "junk.pt", "vae")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an align_rl checkpoint"):
        load_model(tmp_path / "foreign.pt", "vae")
    # a state dict that does not fit the stored architecture
    obj = torch.load(tmp_path / "vae.pt", weights_only=True)
    obj["state_dict"].pop("to_moments.weight")
    torch.save(obj, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="retrain"):
        load_model(tmp_path / "broken.pt", "vae")


def test_codec_checkpoint_keeps_latent_statistics(tmp_path):
    vae = _perturb(build_vae(VAE, (16, 32)))
    save_model(tmp_path / "plain.pt", vae, "vae", VAE)
    with pytest.raises(CheckpointError, match="latent statistics"):
        load_codec(tmp_path / "plain.pt")
    codec = LatentCodec(vae, torch.linspace(-1, 1, 6), torch.linspace(0.5, 2, 6))
    save_model(tmp_path / "codec.pt", codec, "vae", VAE)
    codec2, meta = load_codec(tmp_path / "codec.pt", expect=VAE)
    x = torch.randn(2, 69, 16, 32)
    torch.testing.assert_close(codec2.encode(x), codec.eval().encode(x))
    torch.testing.assert_close(codec2.latent_std, torch.linspace(0.5, 2, 6))
