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

import torch

TINY_RANDOM = "tiny-random"
BASE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
CLIP_IMAGE_SIZE = 224  # the CLIP image encoder sees ArcFace-aligned 224x224 faces


@dataclass
class BaseModel:
    """The frozen parts every stage shares."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    noise_scheduler: Any  # diffusers.DDPMScheduler (training); pipelines make their own sampler from its config
    image_encoder: Any | None  # transformers.CLIPVisionModelWithProjection, None when not loaded
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
            base.image_encoder = load_image_encoder(image_encoder)
    else:
        base = _load_base_folder(Path(base_model))
        if image_encoder == TINY_RANDOM:
            raise ValueError("a tiny-random image encoder only goes with --base-model tiny-random")
        if image_encoder is None and (Path(base_model) / "image_encoder").is_dir():
            image_encoder = Path(base_model) / "image_encoder"
        if image_encoder is not None:
            base.image_encoder = load_image_encoder(image_encoder)
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


def load_image_encoder(source: str | Path | torch.nn.Module) -> Any:
    """The CLIP vision tower from a local folder (e.g. IP-Adapter's models/image_encoder), or a module as it is."""
    if isinstance(source, torch.nn.Module):
        return source.eval()
    if str(source) == TINY_RANDOM:
        raise ValueError("a tiny-random image encoder comes with the tiny-random base (--base-model tiny-random)")
    from transformers import CLIPVisionModelWithProjection

    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"image encoder folder {folder} has no config.json (expected a CLIP vision model folder, "
            f"e.g. IP-Adapter's models/image_encoder with CLIP ViT-H/14)"
        )
    return CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True).eval()


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
