"""Sample images during training: a small DDIM loop with classifier-free guidance, on the main process.

Fixed references (the dataset's first rows) and a fixed seed, so the images of successive steps compare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dynamicid.models import SAACall
from dynamicid.models.base import BaseModel


@torch.no_grad()
def sample_images(
    base: BaseModel,
    unet: Any,
    text: torch.Tensor,
    uncond_text: torch.Tensor,
    id_tokens: torch.Tensor,
    uncond_id_tokens: torch.Tensor,
    *,
    size: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    saa: SAACall,
) -> list[Image.Image]:
    """One image per row of `text` (B, 77, C) / `id_tokens` (B, tokens, C), SAA running with `saa`."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(base.noise_scheduler.config)
    scheduler.set_timesteps(steps)
    count = text.shape[0]
    dtype = next(unet.parameters()).dtype
    device = text.device
    shape = (count, unet.config.in_channels, size // base.vae_scale_factor, size // base.vae_scale_factor)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    latents = latents * scheduler.init_noise_sigma
    cond = torch.cat([text, id_tokens.to(text.dtype)], dim=1)
    uncond = torch.cat([uncond_text.expand(count, -1, -1), uncond_id_tokens.to(text.dtype).expand(count, -1, -1)], 1)
    states = torch.cat([uncond, cond]).to(dtype)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        prediction = unet(model_input, t, encoder_hidden_states=states, cross_attention_kwargs={"saa": saa}).sample
        noise_uncond, noise_cond = prediction.chunk(2)
        noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
    vae = base.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(image)) for image in images]


def save_samples(accelerator: Any, images: list[Image.Image], output_dir: str | Path, step: int) -> Path:
    """PNG files under samples/step-<N>/ and, with TensorBoard, an image grid in the logs."""
    folder = Path(output_dir) / "samples" / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:02d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images("samples", stacked, step, dataformats="NHWC")
    return folder
