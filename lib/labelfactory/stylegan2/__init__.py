"""StyleGAN2-ADA: networks, ADA, loss, training loop, config, the published generator file."""
