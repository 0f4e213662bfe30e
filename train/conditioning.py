"""Frozen encoders turned into the UNet's inputs: latents, text states, pooled text vectors, CLIP face states.

Randomness (latent sampling, noise, timesteps) always comes from an explicit CPU generator, so a run's draws
depend only on its seed and position (the RunState), never on the global RNG.
"""

from __future__ import annotations

from typing import Any

import torch

from dynamicid.models.base import BaseModel, clip_hidden_states


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


def token_ids(base: BaseModel, prompts: list[str]) -> torch.Tensor:
    tokenizer = base.tokenizer
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def text_states(base: BaseModel, input_ids: torch.Tensor) -> torch.Tensor:
    """The text encoder's last hidden states (B, 77, text_dim): the UNet's text condition."""
    encoder = base.text_encoder
    return encoder(input_ids.to(encoder.device))[0]


@torch.no_grad()
def pooled_text(base: BaseModel, prompts: list[str]) -> torch.Tensor:
    """The pooled CLIP text output (N, text_dim): IMR's text vector of a face prompt."""
    encoder = base.text_encoder
    return encoder(token_ids(base, prompts).to(encoder.device)).pooler_output


def clip_normalised(base: BaseModel, clip_pixel_values: torch.Tensor) -> torch.Tensor:
    """uint8 aligned faces (N, 3, 224, 224) -> CLIP's mean/std-normalised input, on the encoder's device."""
    encoder: Any = base.image_encoder
    mean = torch.tensor(base.clip_mean, device=encoder.device).view(1, 3, 1, 1)
    std = torch.tensor(base.clip_std, device=encoder.device).view(1, 3, 1, 1)
    pixels = clip_pixel_values.to(encoder.device, torch.float32) / 255.0
    return ((pixels - mean) / std).to(encoder.dtype)


@torch.no_grad()
def clip_states(base: BaseModel, clip_pixel_values: torch.Tensor) -> torch.Tensor:
    """CLIP penultimate hidden states of normalised aligned 224 faces (see dynamicid.train.data)."""
    return clip_hidden_states(base, clip_pixel_values)


def unconditional_face_inputs(base: BaseModel, id_dim: int, count: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero ID embeddings, CLIP states of an all-zero image tensor): the face encoder's 'no identity' input."""
    encoder: Any = base.image_encoder
    size = encoder.config.image_size
    zeros = torch.zeros(count, 3, size, size, device=encoder.device, dtype=encoder.dtype)
    return torch.zeros(count, id_dim, device=encoder.device), clip_states(base, zeros)
