"""The training images as latents: VAE posterior samples, scaled.

The noising and the regression target come from the base family's objective (`dynamicid.models.objectives`:
epsilon, v_prediction, flow matching), the conditioning (text states, face tokens, IMR edits) from
`dynamicid.models.conditioning`, shared with inference.

Randomness (latent sampling, noise, timesteps) always comes from an explicit CPU generator, so a run's draws
depend only on its seed and position (the RunState), never on the global RNG.
"""

from __future__ import annotations

import torch

from dynamicid.models.base import BaseModel


@torch.no_grad()
def vae_latents(base: BaseModel, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Latents sampled from the VAE posterior of uint8 images (scaled to [-1, 1] on the device), shifted and scaled
    by the VAE's `shift_factor` (Flux's; none for SD) and `scaling_factor`."""
    vae = base.vae
    pixels = pixel_values.to(device=vae.device, dtype=vae.dtype) / 127.5 - 1.0
    dist = vae.encode(pixels).latent_dist
    draw = torch.randn(dist.mean.shape, generator=generator).to(dist.mean.device, dist.mean.dtype)
    shift = vae.config.get("shift_factor") or 0.0
    return (dist.mean + dist.std * draw - shift) * vae.config.scaling_factor
