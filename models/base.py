"""The frozen base: a Stable Diffusion family's parts and the CLIP image encoder, from local folders or FAKEs.

`load_base_model(DIR, IMAGE_ENCODER_DIR)` reads a diffusers-layout folder and a CLIP vision folder (e.g.
IP-Adapter's `models/image_encoder`, ViT-H/14). Two base families are known:
- `sd15`: Stable Diffusion 1.5 (unet/, vae/, text_encoder/, tokenizer/, scheduler/);
- `sdxl`: SDXL (model_index.json `StableDiffusionXLPipeline`, plus text_encoder_2/ and tokenizer_2/): two text
  encoders whose penultimate states are concatenated, and a UNet that also takes the pooled text vector and the
  size ids (`added_cond_kwargs` text_embeds / time_ids).
The returned `BaseModel` knows its family; `dynamicid.models.conditioning.conditioner_for(base)` encodes prompts
for it, so callers never branch on the family.
Nothing is downloaded: a missing folder or part is an error that names it.

`load_base_model("tiny-random")` and `load_base_model("tiny-random-sdxl")` are FAKEs for smoke runs and tests
on CPU (`dynamicid.testing`): seeded, randomly initialised, with the structure of SD 1.5 / SDXL but tiny widths.
They produce noise, never images of anyone; they are only used when asked for by name, never as a fallback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dynamicid.schemas.checkpoint import BASE_FAMILIES

TINY_RANDOM = "tiny-random"
TINY_RANDOM_SDXL = "tiny-random-sdxl"
TINY_BASES = (TINY_RANDOM, TINY_RANDOM_SDXL)
FAMILY_PARTS: dict[str, tuple[str, ...]] = {
    "sd15": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}
SDXL_PIPELINE_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
CLIP_IMAGE_SIZE = 224  # the CLIP image encoder sees ArcFace-aligned 224x224 faces


def unet_family(unet: Any) -> str:
    """`sdxl` for a UNet that also takes the pooled text and size ids (SDXL's `text_time` addition), else `sd15`."""
    return "sdxl" if unet.config.get("addition_embed_type") == "text_time" else "sd15"


@dataclass
class BaseModel:
    """The frozen parts every stage shares; `text_encoder_2`/`tokenizer_2` only for SDXL."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    noise_scheduler: Any  # diffusers.DDPMScheduler (training); pipelines make their own sampler from its config
    image_encoder: Any | None  # transformers.CLIPVisionModelWithProjection, None when not loaded
    text_encoder_2: Any | None = None  # transformers.CLIPTextModelWithProjection (SDXL)
    tokenizer_2: Any | None = None
    name: str = TINY_RANDOM

    @property
    def family(self) -> str:
        return unet_family(self.unet)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def text_dim(self) -> int:
        """Width of the per-token text states (the UNet's text condition)."""
        return sum(int(encoder.config.hidden_size) for _, encoder in self.text_encoders)

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled text vector: IMR's text input (and SDXL's `text_embeds`)."""
        if self.text_encoder_2 is not None:
            return int(self.text_encoder_2.config.projection_dim)
        return int(self.text_encoder.config.hidden_size)

    @property
    def clip_dim(self) -> int:
        if self.image_encoder is None:
            raise ValueError("no CLIP image encoder loaded: pass image_encoder=DIR (a CLIP vision model folder)")
        return int(self.image_encoder.config.hidden_size)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def text_encoders(self) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs in the order their states are concatenated."""
        pairs = [(self.tokenizer, self.text_encoder)]
        if self.text_encoder_2 is not None:
            pairs.append((self.tokenizer_2, self.text_encoder_2))
        return pairs

    def components(self) -> dict[str, Any]:
        """The parts under their diffusers pipeline names (the scheduler left to the pipeline)."""
        parts = {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "unet": self.unet,
            "image_encoder": self.image_encoder,
        }
        if self.text_encoder_2 is not None:
            parts |= {"text_encoder_2": self.text_encoder_2, "tokenizer_2": self.tokenizer_2}
        return parts

    def modules(self) -> list[torch.nn.Module]:
        """The frozen torch modules that are loaded (for device/dtype moves and freezing)."""
        parts = (self.unet, self.vae, self.text_encoder, self.text_encoder_2, self.image_encoder)
        return [part for part in parts if part is not None]


def load_base_model(
    base_model: str | Path,
    image_encoder: str | Path | None = None,
    *,
    torch_dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> BaseModel:
    """Load an SD 1.5 or SDXL diffusers folder (or build a tiny-random FAKE) and the CLIP image encoder.

    `image_encoder`: a CLIP vision folder, "tiny-random", or None (then `<base>/image_encoder` is used if it
    exists, else no image encoder is loaded). With a tiny-random base, None means a tiny-random encoder too.
    """
    if str(base_model) in TINY_BASES:
        from dynamicid.testing import build_tiny_random

        tiny_encoder = image_encoder in (None, TINY_RANDOM)
        base = build_tiny_random(str(base_model), seed=seed, with_image_encoder=tiny_encoder)
        if not tiny_encoder:
            base.image_encoder = load_image_encoder(image_encoder)
    else:
        base = _load_base_folder(Path(base_model))
        if image_encoder == TINY_RANDOM:
            raise ValueError("a tiny-random image encoder only goes with --base-model tiny-random(-sdxl)")
        if image_encoder is None and (Path(base_model) / "image_encoder").is_dir():
            image_encoder = Path(base_model) / "image_encoder"
        if image_encoder is not None:
            base.image_encoder = load_image_encoder(image_encoder)
    for module in base.modules():
        module.requires_grad_(False).eval()
        if module.dtype != torch_dtype:  # diffusers warns on every .to(dtype), even a no-op one
            module.to(dtype=torch_dtype)
    return base


def base_model_family(base_model: str | Path) -> str:
    """The family of a `--base-model` value (a tiny-random name or a diffusers folder), without loading it."""
    if str(base_model) in TINY_BASES:
        return "sdxl" if str(base_model) == TINY_RANDOM_SDXL else "sd15"
    return folder_family(Path(base_model))


def folder_family(folder: Path) -> str:
    """A diffusers folder's base family: SDXL when model_index.json names SDXL's pipeline or lists a second text
    encoder (also a saved DynamicIDXLPipeline), else SD 1.5; without model_index.json, from the subfolders."""
    index = folder / "model_index.json"
    if index.is_file():
        try:
            entries = json.loads(index.read_text())
            sdxl = entries.get("_class_name") in SDXL_PIPELINE_CLASSES or bool(entries.get("text_encoder_2"))
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{index} is not a JSON object; copy the model folder again") from None
        return "sdxl" if sdxl else "sd15"
    return "sdxl" if (folder / "text_encoder_2").is_dir() else "sd15"


def _load_base_folder(folder: Path) -> BaseModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if not folder.is_dir():
        raise FileNotFoundError(
            f"base model folder {folder} does not exist (expected Stable Diffusion 1.5 or SDXL in diffusers "
            f"layout, or 'tiny-random' / 'tiny-random-sdxl' for a CPU smoke run)"
        )
    family = folder_family(folder)
    parts = FAMILY_PARTS[family]
    missing = [part for part in parts if not (folder / part).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"base model folder {folder} has no {', '.join(missing)} subfolder(s); a {BASE_FAMILIES[family]} checkpoint in "
            f"diffusers layout has {', '.join(parts)}"
        )
    second = {}
    if family == "sdxl":
        second = {
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"),
            "tokenizer_2": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2", model_max_length=77),
        }
    return BaseModel(
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", model_max_length=77),
        noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
        image_encoder=None,
        name=str(folder),
        **second,
    )


def load_image_encoder(source: str | Path | torch.nn.Module) -> Any:
    """The CLIP vision tower from a local folder (e.g. IP-Adapter's models/image_encoder), or a module as it is."""
    if isinstance(source, torch.nn.Module):
        return source.eval()
    if str(source) in TINY_BASES:
        raise ValueError("a tiny-random image encoder comes with a tiny-random base (--base-model tiny-random(-sdxl))")
    from transformers import CLIPVisionModelWithProjection

    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"image encoder folder {folder} has no config.json (expected a CLIP vision model folder, "
            f"e.g. IP-Adapter's models/image_encoder with CLIP ViT-H/14)"
        )
    return CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True).eval()
