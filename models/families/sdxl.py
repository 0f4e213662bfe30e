"""SDXL: a UNet over two CLIP text encoders' penultimate states side by side, plus the pooled text and size ids."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from dynamicid.models.families.family import load_part
from dynamicid.models.families.sd15 import SD15Family


class SDXLFamily(SD15Family):
    """SDXL and its fine-tunes (diffusers layout: SD 1.5's plus text_encoder_2/ and tokenizer_2/).

    The UNet also takes the second encoder's projected pooled vector and the size ids (`added_cond_kwargs`
    text_embeds / time_ids); that pooled vector is also the IMR's text vector of a face prompt. Loading, SAA
    and the token width are SD 1.5's (this class extends it).
    """

    name = "sdxl"
    label = "SDXL"
    tiny_name = "tiny-random-sdxl"
    parts = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "DynamicIDXLPipeline")
    markers = frozenset({"unet", "text_encoder_2"})
    checkpoint_keys = (
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",  # base (diffusers' xl_base)
        "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias",  # refiner
    )

    def recognises_denoiser(self, denoiser: Any) -> bool:
        return getattr(denoiser, "config", {}).get("addition_embed_type") == "text_time"

    def _second_text_encoder(self, folder: Path, without: Collection[str]) -> dict[str, Any]:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        return {
            "text_encoder_2": load_part(folder, "text_encoder_2", CLIPTextModelWithProjection, without),
            "tokenizer_2": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2", model_max_length=77),
        }

    def build_tiny(self, *, seed: int = 0, with_image_encoder: bool = True) -> Any:
        from dynamicid.testing import TINY_SDXL_UNET, tiny_unet_base

        return tiny_unet_base(
            self.tiny_name, TINY_SDXL_UNET, two_text_encoders=True, seed=seed, with_image_encoder=with_image_encoder
        )

    def conditioner(self, parts: Any) -> Any:
        from dynamicid.models.conditioning import SDXLConditioner, two_text_encoder_parts

        return SDXLConditioner(**two_text_encoder_parts(parts))

    def text_dim(self, base: Any) -> int:
        return int(base.text_encoder.config.hidden_size) + int(base.text_encoder_2.config.hidden_size)

    def pooled_dim(self, base: Any) -> int:
        return int(base.text_encoder_2.config.projection_dim)

    def pipeline_class(self) -> type:
        from dynamicid.infer.pipeline import DynamicIDXLPipeline

        return DynamicIDXLPipeline

    def plain_pipeline(self, components: dict[str, Any]) -> Any:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(**components)


SDXL = SDXLFamily()
