"""Background-anchored decoding (docs/method.md §4) and the clean-space Repaint step (§6.2)."""

from __future__ import annotations

import pytest
import torch

from align_rl.diffusion.guidance import LatentRepaint
from align_rl.diffusion.sampler import StepContext
from align_rl.diffusion.schedule import mu, sigma
from align_rl.errors import ConfigError
from align_rl.models.anchored import AnchoredCodec, decoder_for


class LossyCodec:
    """A codec that loses the small scales: ``E`` keeps the 2 × 2 block means of a (1, 4, 8) field
    in a (1, 2, 4) latent, nonlinearly squashed; ``D`` maps back by repetition (and un-squashes).
    ``D(E(x))`` is the block-mean field: its error is the field's sub-block detail."""

    latent_shape = (1, 2, 4)

    def encode(self, x):
        b = x.reshape(x.shape[0], 1, 2, 2, 4, 2).mean(dim=(3, 5))
        return torch.tanh(b / 4)

    def decode(self, z):
        b = 4 * torch.atanh(z.clamp(-0.999999, 0.999999))
        return b.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)

    def parameters(self):
        return iter(())


def _fields(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.randn(n, 1, 2, 4, generator=g).repeat_interleave(2, 2).repeat_interleave(2, 3)
    return smooth + 0.5 * torch.randn(n, 1, 4, 8, generator=g)  # large scales + small-scale detail


def test_anchored_decoding_returns_the_background_and_cancels_its_error():
    codec = LossyCodec()
    x_b = _fields(0)
    anch = AnchoredCodec(codec, x_b)
    # z_a = z_b gives the background back exactly, whatever the codec loses
    torch.testing.assert_close(anch.decode(codec.encode(x_b)), x_b, rtol=0, atol=1e-5)
    assert ((codec.decode(codec.encode(x_b)) - x_b) ** 2).mean() > 0.1
    # a truth that differs from the background at large scales only: plain decoding loses the
    # truth's small scales, anchored decoding keeps the background's (here: the truth's)
    incr = torch.randn(3, 1, 2, 4, generator=torch.Generator().manual_seed(1))
    x = x_b + 0.3 * incr.repeat_interleave(2, 2).repeat_interleave(2, 3)
    z = codec.encode(x)
    plain = ((codec.decode(z) - x) ** 2).mean()
    anchored = ((anch.decode(z) - x) ** 2).mean()
    assert anchored < 1e-8 < 0.1 < plain
    # rows are members, background-major: member n of background b uses background b
    zz = z.repeat_interleave(2, dim=0)
    torch.testing.assert_close(anch.decode(zz), anch.decode(z).repeat_interleave(2, dim=0))
    # encode inverts decode as E inverts D
    torch.testing.assert_close(anch.encode(anch.decode(z)), codec.encode(codec.decode(z)), atol=1e-5, rtol=0)
    assert decoder_for(codec, x_b, "plain") is codec
    with pytest.raises(ConfigError, match="sampler.decode"):
        decoder_for(codec, x_b, "residual")


def _ctx(z, s, eps):
    m, sg = float(mu(torch.tensor(s))), float(sigma(torch.tensor(s)))
    return StepContext(eps_fn=None, z_b=torch.zeros_like(z), members=1, t=s + 0.05, s=s, step=0,
                       steps=20, z0_hat=(z - sg * eps) / m, eps=eps)


def _obs(mask_fraction, seed=3):
    g = torch.Generator().manual_seed(seed)
    y = _fields(seed, 2)
    m = (torch.rand(y.shape, generator=g) < mask_fraction).float()

    class O:
        values, mask, variance = m * y, m, 1e-2
    return O


@pytest.mark.parametrize("s", [0.5, 0.7, 0.9])
def test_repaint_keeps_the_noisy_state(s):
    """Nothing observed: the step leaves z exactly as it was. A few observations: z moves by
    μ(s)·[E(mix) − E(x̂_0)] only, and keeps > 0.95 correlation with itself — a decode/re-encode of
    the noisy latent (the old step) would not (its correlation is measured below for contrast)."""
    codec = LossyCodec()
    g = torch.Generator().manual_seed(5)
    z0 = 0.8 * torch.tanh(torch.randn(2, *codec.latent_shape, generator=g))
    eps = torch.randn(2, *codec.latent_shape, generator=g)
    m, sg = float(mu(torch.tensor(s))), float(sigma(torch.tensor(s)))
    z = m * z0 + sg * eps
    ctx = _ctx(z, s, eps)
    none = _obs(0.0)
    torch.testing.assert_close(LatentRepaint(codec, none)(z, ctx), z, rtol=0, atol=0)
    few = _obs(0.1)
    out = LatentRepaint(codec, few)(z, ctx)
    x0 = codec.decode(ctx.z0_of(z))
    expect = z + m * (codec.encode(x0 + few.mask * (few.values - x0)) - codec.encode(x0))
    torch.testing.assert_close(out, expect)
    corr = torch.corrcoef(torch.stack([out.flatten(), z.flatten()]))[0, 1]
    assert corr > 0.95
    roundtrip = codec.encode(codec.decode(z))  # the old step's E(D(z_t)) at unobserved points
    assert torch.corrcoef(torch.stack([roundtrip.flatten(), z.flatten()]))[0, 1] < corr


def test_fitted_anchor_weights_are_the_least_squares_blend():
    """α per channel minimises ‖e(x) − α e(x_b)‖²: 1 when the two errors are the same, 0 when
    they are unrelated, and blending never does worse than plain or full anchoring."""
    from align_rl.models.anchored import fit_anchor_weights

    codec = LossyCodec()
    x_b = _fields(0, 64)
    same = x_b + 0.3 * torch.randn(64, 1, 2, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert fit_anchor_weights(codec, same, x_b).item() == pytest.approx(1.0, abs=1e-4)
    other = _fields(9, 64)  # unrelated small scales
    a = fit_anchor_weights(codec, other, x_b).item()
    assert 0.0 <= a < 0.2
    z = codec.encode(other)
    err = {w: ((AnchoredCodec(codec, x_b, torch.tensor([w])).decode(z) - other) ** 2).mean().item()
           for w in (0.0, a, 1.0)}
    assert err[a] <= min(err[0.0], err[1.0]) + 1e-9
