"""Transformer VAE: shapes, parameter counts by hand, periodic windows, codec statistics."""

import pytest
import torch

from align_rl.config import load_config
from align_rl.errors import ConfigError, InputError
from align_rl.models.layers import WindowBlock
from align_rl.models.vae import FieldVAE, LatentCodec, build_vae, fit_latent_stats, vae_loss

TINY = {"patch": 4, "latent_channels": 69, "embed_dim": 32, "depth": 2, "heads": 2, "window": 2}


def _hand_count(H, W, p, C, D, depth, cin=69):
    h, w = H // p, W // p
    block = (2 * D) + (3 * D * D + 3 * D) + (D * D + D) + (2 * D) + (4 * D * D + 4 * D) + (4 * D * D + D)
    enc = (cin * p * p * D + D) + (h + w) * D + depth * block + 2 * D + (D * 2 * C + 2 * C)
    dec = (C * D + D) + (h + w) * D + depth * block + 2 * D + (D * cin * p * p + cin * p * p)
    return enc + dec


def _smooth_fields(n, H=16, W=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.linspace(-1.4, 1.4, H)[:, None]
    lon = torch.linspace(0, 2 * torch.pi, W + 1)[:-1][None]
    amp = torch.randn(n, 69, 4, generator=g)
    ph = torch.rand(n, 1, 2, generator=g) * 2 * torch.pi
    x = (amp[..., 0, None, None] * torch.cos(lat)
         + amp[..., 1, None, None] * torch.sin(2 * lon + ph[..., 0, None, None]) * torch.cos(lat)
         + amp[..., 2, None, None] * torch.sin(lat) * torch.cos(3 * lon + ph[..., 1, None, None]))
    return x


def test_demo_shapes_and_count():
    cfg = load_config().vae
    vae = build_vae(cfg, "32x64")
    x = torch.randn(2, 69, 32, 64)
    recon, mean, logvar = vae.eval()(x)
    assert mean.shape == logvar.shape == (2, 69, 8, 16)
    assert recon.shape == x.shape
    n = sum(p.numel() for p in vae.parameters())
    assert n == _hand_count(32, 64, 4, 69, cfg.embed_dim, cfg.depth)


def test_paper_preset_on_meta_device():
    cfg = load_config(preset="paper")
    assert (cfg.vae.embed_dim, cfg.vae.depth, cfg.data.grid) == (1024, 24, "128x256")
    with torch.device("meta"):
        vae = build_vae(cfg.vae, cfg.data.grid)
        x = torch.empty(1, 69, 128, 256)
        mean, logvar = vae.encode(x)
        out = vae.decode(mean)
    assert mean.shape == (1, 69, 32, 64) and logvar.shape == (1, 69, 32, 64)
    assert out.shape == (1, 69, 128, 256)
    n = sum(p.numel() for p in vae.parameters())
    assert n == _hand_count(128, 256, 4, 69, 1024, 24)
    assert 600e6 < n < 620e6  # 2 × 24 blocks of 12 D² ≈ 604 M


def test_shifted_window_wraps_longitude_not_latitude():
    torch.manual_seed(0)
    h, w, win, D = 8, 16, 4, 8
    blk = WindowBlock(D, 2, h, w, win, shifted=True).eval()
    x = torch.randn(1, h, w, D)
    base = blk(x)
    # a token at longitude 0 reaches longitude w-1 (neighbours across the date line) ...
    y = x.clone()
    y[0, 2, 0] += 5.0 * torch.randn(D)
    changed = (blk(y) - base).abs().sum(-1)[0] > 1e-6
    assert changed[2, w - 1] and changed[2, w - 2]
    # ... but a token on the southernmost row never reaches the northernmost row (no pole wrap)
    y = x.clone()
    y[0, 0, 5] += 5.0 * torch.randn(D)
    changed = (blk(y) - base).abs().sum(-1)[0] > 1e-6
    assert not changed[h - 1].any() and not changed[h - 2].any()
    assert changed[1, 5]
    # unshifted windows do not cross the date line
    blk0 = WindowBlock(D, 2, h, w, win, shifted=False).eval()
    y = x.clone()
    y[0, 2, 0] += 5.0 * torch.randn(D)
    changed = (blk0(y) - blk0(x)).abs().sum(-1)[0] > 1e-6
    assert not changed[:, w - 1].any()


def test_encoder_equivariant_to_longitude_rolls():
    """Without the longitude embedding, rolling the field by one window of patches rolls the
    latent the same way: the attention is periodic in longitude (no edge)."""
    vae = FieldVAE((16, 32), latent_channels=6, patch=4, embed_dim=16, depth=2, heads=2, window=2).eval()
    with torch.no_grad():
        vae.enc_pos.lon.zero_()
        vae.dec_pos.lon.zero_()
    x = torch.randn(1, 69, 16, 32)
    shift = 4 * 2  # patch × window pixels
    m0, _ = vae.encode(x)
    m1, _ = vae.encode(torch.roll(x, shift, dims=-1))
    torch.testing.assert_close(m1, torch.roll(m0, 2, dims=-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(vae.decode(torch.roll(m0, 2, -1)), torch.roll(vae.decode(m0), shift, -1),
                               atol=1e-5, rtol=1e-4)


def test_vae_loss_matches_closed_form_kl():
    g = torch.Generator().manual_seed(0)
    x, recon = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    mean, logvar = torch.randn(2, 5, 1, 2, generator=g), torch.randn(2, 5, 1, 2, generator=g)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).mean()
    loss, parts = vae_loss(recon, x, mean, logvar, kl_weight=0.1)
    torch.testing.assert_close(parts["kl"], kl)
    torch.testing.assert_close(loss, ((recon - x) ** 2).mean() + 0.1 * kl)


def test_training_reduces_reconstruction_error():
    torch.manual_seed(0)
    vae = build_vae({**TINY, "embed_dim": 16, "depth": 1}, (16, 32))
    x = _smooth_fields(8)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-2)
    vae.eval()
    with torch.no_grad():
        start = ((vae(x)[0] - x) ** 2).mean().item()
    vae.train()
    for _ in range(30):
        recon, mean, logvar = vae(x)
        loss, _ = vae_loss(recon, x, mean, logvar, 1e-6)
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        end = ((vae(x)[0] - x) ** 2).mean().item()
    assert end < 0.6 * start


def test_codec_standardises_and_decodes_differentiably():
    vae = build_vae(TINY, (16, 32)).eval()
    x = _smooth_fields(12)
    mean, std = fit_latent_stats(vae, [(x[:5],), (x[5:],)])
    m_ref, _ = vae.encode(x)
    torch.testing.assert_close(mean, m_ref.mean(dim=(0, 2, 3)).detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(std, m_ref.std(dim=(0, 2, 3), unbiased=False).detach(), atol=1e-5, rtol=1e-4)
    m2, s2 = fit_latent_stats(vae, x, batch_size=5)  # tensor input gives the same
    torch.testing.assert_close(m2, mean)
    codec = LatentCodec(vae, mean, std)
    z = codec.encode(x)
    assert z.shape == (12, 69, 4, 8)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(69), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(69), atol=1e-4, rtol=0)
    torch.testing.assert_close(codec.decode(z), vae.decode(m_ref), atol=1e-4, rtol=1e-4)
    zr = z.detach().requires_grad_(True)
    codec.decode(zr).pow(2).sum().backward()
    assert zr.grad is not None and zr.grad.abs().sum() > 0


def test_bad_configuration_and_input():
    with pytest.raises(ConfigError, match="window"):
        build_vae({**TINY, "window": 3}, (16, 32))
    with pytest.raises(ConfigError, match="patch"):
        build_vae({**TINY, "patch": 5}, (16, 32))
    vae = build_vae(TINY, (16, 32))
    with pytest.raises(InputError, match="16, 32"):
        vae.encode(torch.zeros(1, 69, 32, 64))
    with pytest.raises(InputError):
        LatentCodec(vae, torch.zeros(3), torch.ones(3))
