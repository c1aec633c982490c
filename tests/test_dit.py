"""Latent DiT: shapes, parameter counts by hand, cross-attention conditioning, DSM loss."""

import pytest
import torch

from align_rl.config import load_config
from align_rl.diffusion.schedule import mu, sigma
from align_rl.errors import ConfigError, InputError
from align_rl.models.dit import build_dit, dsm_loss

SMALL = {"patch": 2, "embed_dim": 32, "depth": 2, "heads": 2}


def _hand_count(C, h, w, p, D, depth):
    P, th, tw = C * p * p, h // p, w // p
    attn = 3 * D * D + 3 * D + D * D + D
    cross = (D * D + D) + (2 * D * D + 2 * D) + (D * D + D)
    mlp = (4 * D * D + 4 * D) + (4 * D * D + D)
    block = attn + 2 * D + cross + mlp + (6 * D * D + 6 * D)
    embeds = 2 * (P * D + D) + 2 * (th + tw) * D + 2 * D  # z_t and z_b embeddings, positions, z_b norm
    return embeds + 2 * (D * D + D) + depth * block + (2 * D * D + 2 * D) + (D * P + P)


def _randomise_zero_inits(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().sum() == 0 and p.ndim == 2:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def test_demo_shapes_count_and_zero_init():
    cfg = load_config().diffusion
    model = build_dit(cfg, (69, 8, 16))
    z = torch.randn(3, 69, 8, 16)
    eps = model(z, torch.rand(3), torch.randn(3, 69, 8, 16))
    assert eps.shape == z.shape
    # adaLN-Zero output layer: before training ε̂ is the output skip alone, E[ε | z_t] for
    # z_0 ~ N(z_b, s²): with s² = 0.25, by hand
    assert cfg.eps_skip == "background"
    model.set_skip_var(torch.full((69,), 0.25))
    zb = torch.randn(3, 69, 8, 16)
    m, s = mu(0.4), sigma(0.4)
    torch.testing.assert_close(model(z, torch.full((3,), 0.4), zb), s * (z - m * zb) / (0.25 * m**2 + s**2))
    gauss = build_dit({**SMALL, "eps_skip": "gaussian"}, (6, 4, 8))
    z6 = torch.randn(2, 6, 4, 8)
    torch.testing.assert_close(gauss(z6, torch.full((2,), 0.4), torch.randn(2, 6, 4, 8)), s / (m**2 + s**2) * z6)
    assert torch.all(build_dit({**SMALL, "eps_skip": False}, (6, 4, 8))(
        torch.randn(2, 6, 4, 8), torch.rand(2), torch.randn(2, 6, 4, 8)) == 0)
    assert sum(p.numel() for p in model.parameters()) == _hand_count(69, 8, 16, 2, cfg.embed_dim, cfg.depth)


def test_paper_preset_on_meta_device():
    cfg = load_config(preset="paper").diffusion
    with torch.device("meta"):
        model = build_dit(cfg, (69, 32, 64))
        out = model(torch.empty(2, 69, 32, 64), torch.empty(2), torch.empty(2, 69, 32, 64))
    assert out.shape == (2, 69, 32, 64)
    n = sum(p.numel() for p in model.parameters())
    assert n == _hand_count(69, 32, 64, 2, 1024, 24)
    assert 550e6 < n < 560e6  # 24 blocks of 22 D²


def test_background_enters_by_cross_attention_everywhere():
    torch.manual_seed(0)
    model = build_dit(SMALL, (6, 4, 8)).eval()
    _randomise_zero_inits(model)
    z, t = torch.randn(2, 6, 4, 8), torch.tensor([0.2, 0.7])
    zb = torch.randn(2, 6, 4, 8)
    base = model(z, t, zb)
    # perturbing one background patch changes the output at every patch (attention is global)
    zb2 = zb.clone()
    zb2[:, :, 0:2, 0:2] += 1.0
    diff = (model(z, t, zb2) - base).abs().sum(dim=1)
    assert torch.all(diff > 1e-6)
    # the time enters too, and samples do not interact
    assert (model(z, torch.tensor([0.5, 0.7]), zb) - base)[0].abs().max() > 1e-6
    torch.testing.assert_close(model(z, torch.tensor([0.5, 0.7]), zb)[1], base[1])
    # cross-attention is the only path of z_b: without it, the output ignores z_b
    for blk in model.blocks:
        blk.cross.proj.weight.data.zero_()
        blk.cross.proj.bias.data.zero_()
    torch.testing.assert_close(model(z, t, zb), model(z, t, zb2))


def test_dsm_loss_oracle_and_null_models():
    """An oracle that knows z0 (given as the background) recovers ε exactly: loss ≈ 0; a model
    answering ε̂ = 0 has loss E ε² ≈ 1."""
    z0 = torch.randn(64, 4, 4, 8)

    def oracle(z_t, t, z_b):
        return (z_t - mu(t)[:, None, None, None] * z_b) / sigma(t)[:, None, None, None]

    g = torch.Generator().manual_seed(0)
    assert dsm_loss(oracle, z0, z0, generator=g).item() < 1e-8
    null = dsm_loss(lambda z_t, t, z_b: torch.zeros_like(z_t), z0, z0, generator=g).item()
    assert abs(null - 1.0) < 0.03
    l1 = dsm_loss(lambda z_t, t, z_b: z_t, z0, z0, generator=torch.Generator().manual_seed(5))
    l2 = dsm_loss(lambda z_t, t, z_b: z_t, z0, z0, generator=torch.Generator().manual_seed(5))
    assert l1.item() == l2.item()


def test_training_uses_the_background():
    """Trained on pairs whose target is the background plus small noise, the model's DSM loss
    drops far below that of the unconditional optimum at small t."""
    torch.manual_seed(0)
    model = build_dit(SMALL, (4, 4, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(250):
        zb = torch.randn(32, 4, 4, 8, generator=g)
        loss = dsm_loss(model, zb + 0.05 * torch.randn(zb.shape, generator=g), zb, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    zb = torch.randn(64, 4, 4, 8, generator=g)
    z0 = zb + 0.05 * torch.randn(zb.shape, generator=g)
    t = torch.full((64,), 0.3)
    eps = torch.randn(z0.shape, generator=g)
    z_t = mu(t)[:, None, None, None] * z0 + sigma(t)[:, None, None, None] * eps
    with torch.no_grad():
        err = ((model(z_t, t, zb) - eps) ** 2).mean().item()
        err_wrong_bg = ((model(z_t, t, torch.randn_like(zb)) - eps) ** 2).mean().item()
    # an unconditional denoiser of N(0, I) data cannot beat σ²… the conditional one must
    uncond = (mu(t[0]) ** 2).item() / (mu(t[0]) ** 2 + sigma(t[0]) ** 2).item()
    assert err < 0.6 * uncond
    assert err_wrong_bg > err


def test_bad_input():
    with pytest.raises(ConfigError, match="patch"):
        build_dit(SMALL, (4, 5, 8))
    with pytest.raises(ConfigError, match="heads"):
        build_dit({**SMALL, "heads": 3}, (4, 4, 8))
    model = build_dit(SMALL, (4, 4, 8))
    with pytest.raises(InputError, match="z_b"):
        model(torch.zeros(1, 4, 4, 8), torch.zeros(1), torch.zeros(1, 4, 8, 8))


def _fit_and_probe(cfg: dict, shape, steps: int = 60):
    """Train on N(0, I) latents, return the ε error at t = 0.9, where the optimum ε̂ = σ z_t
    leaves only μ² ≈ 0.024 (VP: E[ε | z_t] = σ z_t for unit-variance Gaussian data)."""
    torch.manual_seed(0)
    model = build_dit(cfg, shape)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        z0 = torch.randn(32, *shape, generator=g)
        loss = dsm_loss(model, z0, torch.zeros_like(z0), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    z0 = torch.randn(64, *shape, generator=g)
    t = torch.full((64,), 0.9)
    eps = torch.randn(z0.shape, generator=g)
    z_t = mu(t)[:, None, None, None] * z0 + sigma(t)[:, None, None, None] * eps
    with torch.no_grad():
        return ((model(z_t, t, torch.zeros_like(z0)) - eps) ** 2).mean().item()


def test_a_token_narrower_than_its_patch_stalls_and_is_warned_about():
    """Regression: a 12-channel latent with (2, 2) patches has 48-value tokens. A 16-wide
    embedding keeps at most 16 of those directions, so even at t = 0.9, where ε ≈ z_t / σ is
    trivial, its error stays near 1 − 16/48 ≈ 0.67; a 64-wide one learns it (the demo DiT once
    had this defect with 69·2² = 276-value tokens and a 128-wide embedding)."""
    shape = (12, 4, 8)
    with pytest.warns(UserWarning, match="embed_dim=16 is smaller than a patch token's 12·2² = 48"):
        narrow = _fit_and_probe({"patch": 2, "embed_dim": 16, "depth": 1, "heads": 2}, shape)
    wide = _fit_and_probe({"patch": 2, "embed_dim": 64, "depth": 1, "heads": 2}, shape)
    optimum = (mu(torch.tensor(0.9)) ** 2).item()
    assert narrow > 0.5
    assert wide < 0.2 and wide < narrow / 3
    assert wide > 0.5 * optimum  # no model beats the Bayes optimum


@pytest.mark.parametrize("preset", ["demo", "paper"])
def test_presets_embed_a_whole_patch_token(preset):
    cfg = load_config(preset=preset)
    assert cfg.diffusion.embed_dim >= cfg.vae.latent_channels * cfg.diffusion.patch ** 2


def test_output_skip_keeps_the_sampler_on_the_data_scale():
    """The untrained skip model is the exact ε of N(0, I) latents: DDIM samples stay unit-variance.
    A model whose ε̂ ignores the scale of z_t (the final LayerNorm alone) with a 5 % error lets the
    predictor's μ(t−Δ)/μ(t) amplify it: its samples' variance explodes."""
    from align_rl.diffusion.sampler import sample

    model = build_dit({**SMALL, "eps_skip": "gaussian"}, (4, 4, 8)).eval()
    zb = torch.zeros(8, 4, 4, 8)
    with torch.no_grad():
        z = sample(model, zb, 4, steps=32, corrections=0, tau=0.1, generator=torch.Generator().manual_seed(0))
    assert 0.8 < z.var().item() < 1.25

    g = torch.Generator().manual_seed(1)
    bias = 0.05 * torch.randn(1, 4, 4, 8, generator=g)

    def scale_blind(z_t, t, z_b):  # unit-norm ε̂ pointing along z_t, plus a fixed 5 % error
        n = z_t.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None] / z_t[0].numel() ** 0.5
        return z_t / n + bias

    with torch.no_grad():
        z_blind = sample(scale_blind, zb, 4, steps=32, corrections=0, tau=0.1,
                         generator=torch.Generator().manual_seed(0))
    assert z_blind.var().item() > 10 * z.var().item()


def test_background_skip_variance_is_estimated_checked_and_saved(tmp_path):
    from align_rl.io.checkpoints import load_model, save_model
    from align_rl.models.dit import background_error_var

    g = torch.Generator().manual_seed(0)
    zb = torch.randn(50, 4, 4, 8, generator=g)
    scale = torch.tensor([0.1, 0.2, 0.5, 1.0])[None, :, None, None]
    z = zb + scale * torch.randn(zb.shape, generator=g)
    var = background_error_var(z, zb)
    torch.testing.assert_close(var, scale.flatten() ** 2, rtol=0.15, atol=0.0)
    cfg = {**SMALL, "eps_skip": "background"}
    model = build_dit(cfg, (4, 4, 8))
    model.set_skip_var(var)
    with pytest.raises(InputError, match="positive"):
        model.set_skip_var(torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ConfigError, match="eps_skip"):
        build_dit({**SMALL, "eps_skip": "sometimes"}, (4, 4, 8))
    path = tmp_path / "d.pt"
    save_model(path, model, "diffusion", cfg, shapes={"latent_shape": (4, 4, 8)})
    loaded, _ = load_model(path, "diffusion")
    torch.testing.assert_close(loaded.skip_var, var)
    # at t -> 0 the skip alone returns ≈ (z_t − z_b)/σ scaled: with F = 0, ε̂ matches the oracle
    # of N(z_b, s²) data, whose DSM loss is far below the unconditional one
    from align_rl.models.dit import dsm_loss
    loss = dsm_loss(loaded, z, zb, generator=torch.Generator().manual_seed(1)).item()
    uncond = dsm_loss(build_dit({**SMALL, "eps_skip": "gaussian"}, (4, 4, 8)), z, zb,
                      generator=torch.Generator().manual_seed(1)).item()
    assert loss < 0.5 * uncond
