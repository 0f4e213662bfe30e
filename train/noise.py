"""The diffusion objective's inputs: VAE latents of the training images, Gaussian noise and timesteps.

The conditioning (text states, face tokens, IMR edits) comes from `dynamicid.models.conditioning`, shared with
inference.

Randomness (latent sampling, noise, timesteps) always comes from an explicit CPU generator, so a run's draws
depend only on its seed and position (the RunState), never on the global RNG.
"""

from __future__ import annotations

import torch

from dynamicid.models.base import BaseModel


@torch.no_grad()
def vae_latents(base: BaseModel, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scaled latents sampled from the VAE posterior of uint8 images (scaled to [-1, 1] on the device)."""
    vae = base.vae
    pixels = pixel_values.to(device=vae.device, dtype=vae.dtype) / 127.5 - 1.0
    dist = vae.encode(pixels).latent_dist
    draw = torch.randn(dist.mean.shape, generator=generator).to(dist.mean.device, dist.mean.dtype)
    return (dist.mean + dist.std * draw) * vae.config.scaling_factor


def noised(
    base: BaseModel, latents: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, noise, timesteps) with uniform timesteps and Gaussian noise (epsilon objective)."""
    scheduler = base.noise_scheduler
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    timesteps = timesteps.to(latents.device)
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps
