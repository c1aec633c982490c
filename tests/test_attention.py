"""The models' attention is the fused ``scaled_dot_product_attention`` and equals the explicit
``softmax(q kᵀ / √d + mask) v`` within float32 rounding: per layer (with and without the
pole mask of shifted windows) and through whole networks (VAE, DiT)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from align_rl.models import layers
from align_rl.models.dit import LatentDiT
from align_rl.models.vae import FieldVAE


def explicit_attention(q, k, v, attn_mask=None, **kwargs):
    """Softmax attention written out; a boolean mask marks the keys a query may see."""
    assert not kwargs, kwargs
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    return s.softmax(dim=-1) @ v


def test_layers_call_the_fused_kernel(monkeypatch):
    seen = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention",
                        lambda *a, **k: seen.append(1) or fused(*a, **k))
    x = torch.randn(2, 5, 8)
    layers.SelfAttention(8, 2)(x)
    layers.CrossAttention(8, 2)(x, torch.randn(2, 3, 8))
    assert len(seen) == 2


@pytest.mark.parametrize("masked", [False, True])
def test_self_and_cross_attention_equal_the_explicit_softmax(monkeypatch, masked):
    torch.manual_seed(0)
    sa, ca = layers.SelfAttention(16, 4), layers.CrossAttention(16, 4)
    x, ctx = torch.randn(3, 9, 16), torch.randn(3, 5, 16)
    mask = None
    if masked:
        mask = torch.rand(3, 1, 9, 9) > 0.3
        mask |= torch.eye(9, dtype=torch.bool)  # every query sees at least itself
    fused = (sa(x, mask), ca(x, ctx))
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", explicit_attention)
    ref = (sa(x, mask), ca(x, ctx))
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_shifted_window_blocks_and_networks_equal_the_explicit_softmax(monkeypatch):
    """Shifted windows carry the pole mask: a VAE with latitude shifts and a DiT, fused against
    explicit attention."""
    torch.manual_seed(0)
    vae = FieldVAE((16, 32), latent_channels=4, patch=2, embed_dim=16, depth=2, heads=2, window=2).eval()
    assert any(b.mask is not None for b in vae.enc_blocks)
    dit = LatentDiT((4, 8, 16), patch=2, embed_dim=16, depth=2, heads=2).eval()
    torch.nn.init.normal_(dit.out.weight, std=0.1)
    x = torch.randn(2, 69, 16, 32)
    z, zb, t = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        fused = (vae.encode(x)[0], vae.decode(torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(1))),
                 dit(z, t, zb))
        monkeypatch.setattr(layers.F, "scaled_dot_product_attention", explicit_attention)
        ref = (vae.encode(x)[0], vae.decode(torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(1))),
               dit(z, t, zb))
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
