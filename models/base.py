"""The frozen base: a base family's parts and the CLIP image encoder, from local folders or FAKEs.

`load_base_model(DIR, IMAGE_ENCODER_DIR)` reads a diffusers-layout folder and a CLIP vision folder (e.g.
IP-Adapter's `models/image_encoder`, ViT-H/14). The folder's base family (`dynamicid.models.families`: SD 1.5,
SDXL, ...) is recognised from its model_index.json or subfolders, and the family loads it. The returned
`BaseModel` holds the parts under their diffusers names and knows its family (`base.base_family`);
`Conditioner.from_parts(base)` encodes prompts for it, so callers never branch on the family.
Nothing is downloaded: a missing folder or part is an error that names it.

`load_base_model("tiny-random")`, `load_base_model("tiny-random-sdxl")` (one name per family,
`families.tiny_names()`) are FAKEs for smoke runs and tests on CPU (`dynamicid.testing`): seeded, randomly
initialised, with the structure of the family but tiny widths. They produce noise, never images of anyone; they
are only used when asked for by name, never as a fallback.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dynamicid.models.families import BaseFamily, denoiser_family, detect_family, tiny_names

TINY_RANDOM = "tiny-random"  # also the name of the tiny-random CLIP image encoder that goes with a tiny base
CLIP_IMAGE_SIZE = 224  # the CLIP image encoder sees ArcFace-aligned 224x224 faces


@dataclass
class BaseModel:
    """The frozen parts every stage shares; `text_encoder_2`/`tokenizer_2` only for families with two encoders.

    `denoiser` is the family's UNet or transformer; `.unet` reads and sets it for UNet families.
    """

    denoiser: Any  # diffusers.UNet2DConditionModel (SD 1.5, SDXL) or a transformer (`base_family.denoiser_name`)
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel; None when training from a prompt cache
    tokenizer: Any  # transformers.CLIPTokenizer
    noise_scheduler: Any  # the training scheduler (DDPM); pipelines make their own sampler from its config
    image_encoder: Any | None  # transformers.CLIPVisionModelWithProjection, None when not loaded
    text_encoder_2: Any | None = None  # SDXL: transformers.CLIPTextModelWithProjection
    tokenizer_2: Any | None = None
    name: str = TINY_RANDOM

    @property
    def base_family(self) -> BaseFamily:
        return denoiser_family(self.denoiser)

    @property
    def family(self) -> str:
        """The family's name, as recorded in weights (`base_family`)."""
        return self.base_family.name

    @property
    def unet(self) -> Any:
        if self.base_family.denoiser_name != "unet":
            raise AttributeError(f"base model {self.name} has a {self.base_family.denoiser_name}, not a UNet")
        return self.denoiser

    @unet.setter
    def unet(self, unet: Any) -> None:
        self.denoiser = unet

    @property
    def cross_attention_dim(self) -> int:
        """Width of the tokens the identity attention reads (text states and ID tokens)."""
        return self.base_family.token_dim(self.denoiser)

    @property
    def text_dim(self) -> int:
        """Width of the per-token text states (the denoiser's text condition)."""
        return self.base_family.text_dim(self)

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled text vector: IMR's text input (and SDXL's `text_embeds`)."""
        return self.base_family.pooled_dim(self)

    @property
    def clip_dim(self) -> int:
        if self.image_encoder is None:
            raise ValueError("no CLIP image encoder loaded: pass image_encoder=DIR (a CLIP vision model folder)")
        return int(self.image_encoder.config.hidden_size)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def components(self) -> dict[str, Any]:
        """The parts under their diffusers pipeline names (the scheduler left to the pipeline)."""
        parts = {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            self.base_family.denoiser_name: self.denoiser,
            "image_encoder": self.image_encoder,
        }
        if self.text_encoder_2 is not None:
            parts |= {"text_encoder_2": self.text_encoder_2, "tokenizer_2": self.tokenizer_2}
        return parts

    def modules(self) -> list[torch.nn.Module]:
        """The frozen torch modules that are loaded (for device/dtype moves and freezing)."""
        parts = (self.denoiser, self.vae, self.text_encoder, self.text_encoder_2, self.image_encoder)
        return [part for part in parts if part is not None]


def load_base_model(
    base_model: str | Path,
    image_encoder: str | Path | None = None,
    *,
    torch_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    without: Collection[str] = (),
) -> BaseModel:
    """Load a base family's diffusers folder (or build a tiny-random FAKE) and the CLIP image encoder.

    `without`: parts left unloaded (None), by diffusers name ("text_encoder", "text_encoder_2", "unet" /
    "transformer", "vae", "image_encoder"): training from `dynamicid-train cache-prompts`' embeddings never loads
    the text encoders. A tiny FAKE is built whole (its seeded parts stay the same) and those parts dropped.

    `image_encoder`: a CLIP vision folder, "tiny-random", or None (then `<base>/image_encoder` is used if it
    exists, else no image encoder is loaded). With a tiny-random base, None means a tiny-random encoder too.
    """
    family = detect_family(base_model)
    if str(base_model) == family.tiny_name:
        tiny_encoder = image_encoder in (None, TINY_RANDOM)
        base = family.build_tiny(seed=seed, with_image_encoder=tiny_encoder)
        if not tiny_encoder and "image_encoder" not in without:
            base.image_encoder = load_image_encoder(image_encoder)
        for name in without:
            setattr(base, "denoiser" if name == family.denoiser_name else name, None)
    else:
        folder = Path(base_model)
        if not folder.is_dir():
            raise ValueError(
                f"{folder} is a single-file {family.label} checkpoint; give its diffusers folder (diffusers' "
                f"from_single_file(...).save_pretrained(DIR) writes one)"
            )
        base = family.load(folder, without=without)
        if image_encoder == TINY_RANDOM:
            raise ValueError(f"a tiny-random image encoder only goes with base_model={' / '.join(tiny_names())}")
        if image_encoder is None and (folder / "image_encoder").is_dir():
            image_encoder = folder / "image_encoder"
        if image_encoder is not None and "image_encoder" not in without:
            base.image_encoder = load_image_encoder(image_encoder)
    for module in base.modules():
        module.requires_grad_(False).eval()
        if module.dtype != torch_dtype:  # diffusers warns on every .to(dtype), even a no-op one
            module.to(dtype=torch_dtype)
    return base


def load_image_encoder(source: str | Path | torch.nn.Module) -> Any:
    """The CLIP vision tower from a local folder (e.g. IP-Adapter's models/image_encoder), or a module as it is."""
    if isinstance(source, torch.nn.Module):
        return source.eval()
    if str(source) in (TINY_RANDOM, *tiny_names()):
        raise ValueError(
            f"a tiny-random image encoder comes with a tiny-random base (base_model={' / '.join(tiny_names())})"
        )
    from transformers import CLIPVisionModelWithProjection

    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"image encoder folder {folder} has no config.json (expected a CLIP vision model folder, "
            f"e.g. IP-Adapter's models/image_encoder with CLIP ViT-H/14)"
        )
    return CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True).eval()
