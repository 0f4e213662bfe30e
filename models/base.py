"""The frozen base: Stable Diffusion 1.5 parts and the CLIP image encoder, from local folders or tiny-random.

`load_base_model(DIR, IMAGE_ENCODER_DIR)` reads a diffusers-layout SD 1.5 folder (unet/, vae/, text_encoder/,
tokenizer/, scheduler/) and a CLIP vision folder (e.g. IP-Adapter's `models/image_encoder`, ViT-H/14). Nothing
is downloaded: a missing folder or part is an error that names it.

`load_base_model("tiny-random")` is a FAKE for smoke runs and tests on CPU: a seeded, randomly initialised model
set with SD 1.5's structure (8x VAE, cross-attention UNet, CLIP text and vision towers) but tiny widths. It
produces noise, never images of anyone; it is only used when asked for by name, never as a fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

TINY_RANDOM = "tiny-random"
BASE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_IMAGE_SIZE = 224


@dataclass
class BaseModel:
    """The frozen parts every stage shares."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    noise_scheduler: Any  # diffusers.DDPMScheduler (training); pipelines make their own sampler from its config
    image_encoder: Any | None  # transformers.CLIPVisionModelWithProjection, None when not loaded
    clip_mean: tuple[float, float, float] = CLIP_MEAN
    clip_std: tuple[float, float, float] = CLIP_STD
    name: str = TINY_RANDOM

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def text_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def clip_dim(self) -> int:
        if self.image_encoder is None:
            raise ValueError("no CLIP image encoder loaded: pass --image-encoder DIR (a CLIP vision model folder)")
        return int(self.image_encoder.config.hidden_size)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_base_model(
    base_model: str | Path,
    image_encoder: str | Path | None = None,
    *,
    torch_dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> BaseModel:
    """Load SD 1.5 from a diffusers folder (or build `tiny-random`) and the CLIP image encoder.

    `image_encoder`: a CLIP vision folder, "tiny-random", or None (then `<base>/image_encoder` is used if it
    exists, else no image encoder is loaded). With a tiny-random base, None means a tiny-random encoder too.
    """
    if str(base_model) == TINY_RANDOM:
        base = build_tiny_random(seed=seed, with_image_encoder=image_encoder in (None, TINY_RANDOM))
        if image_encoder not in (None, TINY_RANDOM):
            base.image_encoder = _load_image_encoder(Path(image_encoder))
    else:
        base = _load_base_folder(Path(base_model))
        if image_encoder == TINY_RANDOM:
            raise ValueError("a tiny-random image encoder only goes with --base-model tiny-random")
        if image_encoder is None and (Path(base_model) / "image_encoder").is_dir():
            image_encoder = Path(base_model) / "image_encoder"
        if image_encoder is not None:
            base.image_encoder = _load_image_encoder(Path(image_encoder))
    for module in (base.unet, base.vae, base.text_encoder, base.image_encoder):
        if module is None:
            continue
        module.requires_grad_(False).eval()
        if module.dtype != torch_dtype:  # diffusers warns on every .to(dtype), even a no-op one
            module.to(dtype=torch_dtype)
    return base


def _load_base_folder(folder: Path) -> BaseModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if not folder.is_dir():
        raise FileNotFoundError(
            f"base model folder {folder} does not exist (expected Stable Diffusion 1.5 in diffusers layout, "
            f"or 'tiny-random' for a CPU smoke run)"
        )
    missing = [part for part in BASE_PARTS if not (folder / part).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"base model folder {folder} has no {', '.join(missing)} subfolder(s); a Stable Diffusion 1.5 "
            f"checkpoint in diffusers layout has {', '.join(BASE_PARTS)}"
        )
    return BaseModel(
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", model_max_length=77),
        noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
        image_encoder=None,
        name=str(folder),
    )


def _load_image_encoder(folder: Path) -> Any:
    from transformers import CLIPVisionModelWithProjection

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"image encoder folder {folder} has no config.json (expected a CLIP vision model folder, "
            f"e.g. IP-Adapter's models/image_encoder with CLIP ViT-H/14)"
        )
    return CLIPVisionModelWithProjection.from_pretrained(folder)


def _byte_level_alphabet() -> list[str]:
    """GPT-2/CLIP byte-to-unicode alphabet: one printable character per byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def build_tiny_tokenizer() -> Any:
    """A CLIP tokenizer with a character-level vocabulary (no merges): real tokenization, no downloaded files."""
    from transformers import CLIPTokenizer

    alphabet = _byte_level_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def build_tiny_random(seed: int = 0, with_image_encoder: bool = True) -> BaseModel:
    """The tiny-random FAKE base (see module docstring), seeded and independent of the global RNG."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=3,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                projection_dim=32,
            )
        )
        image_encoder = None
        if with_image_encoder:
            image_encoder = CLIPVisionModelWithProjection(
                CLIPVisionConfig(
                    hidden_size=48,
                    intermediate_size=64,
                    num_attention_heads=4,
                    num_hidden_layers=3,
                    image_size=CLIP_IMAGE_SIZE,
                    patch_size=32,
                    projection_dim=32,
                )
            )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler, image_encoder, name=TINY_RANDOM)


def clip_pixel_values(base: BaseModel, faces_224: list[Any] | np.ndarray) -> torch.Tensor:
    """CLIP-normalised (N, 3, 224, 224) float32 from aligned 224x224 RGB faces (PIL images or uint8 NHWC).

    No resize or crop: the faces are already aligned by `dynamicid.faces.align.arcface_align(..., size=224)`.
    """
    arrays = np.stack([np.asarray(face, dtype=np.uint8) for face in faces_224])
    if arrays.ndim != 4 or arrays.shape[1:] != (CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE, 3):
        raise ValueError(f"CLIP input must be RGB {CLIP_IMAGE_SIZE}x{CLIP_IMAGE_SIZE} faces, got {arrays.shape[1:]}")
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(base.clip_mean).view(1, 3, 1, 1)
    std = torch.tensor(base.clip_std).view(1, 3, 1, 1)
    return (pixels - mean) / std


def clip_hidden_states(base: BaseModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """The penultimate hidden states of the CLIP image encoder, (N, tokens, clip_dim): the face encoder's input."""
    if base.image_encoder is None:
        raise ValueError("no CLIP image encoder loaded: pass --image-encoder DIR (a CLIP vision model folder)")
    encoder = base.image_encoder
    pixel_values = pixel_values.to(device=encoder.device, dtype=encoder.dtype)
    return encoder(pixel_values, output_hidden_states=True).hidden_states[-2]
