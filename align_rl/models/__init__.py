"""Networks: the field VAE, the latent DiT score model, the 6 h forecasters."""
