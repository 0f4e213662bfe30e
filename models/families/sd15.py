"""Stable Diffusion 1.5: a cross-attention UNet over one CLIP text encoder's last hidden states (77 x 768)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from dynamicid.models.families.family import BaseFamily, load_part


class SD15Family(BaseFamily):
    """SD 1.5 and its fine-tunes (diffusers layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/).

    SAA sits on every UNet attention layer (`cross_attention_kwargs={"saa": SAACall}`); the face prompt's text
    vector is the CLIP text encoder's pooled output.
    """

    name = "sd15"
    label = "Stable Diffusion 1.5"
    tiny_name = "tiny-random"
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "DynamicIDPipeline")
    markers = frozenset({"unet"})
    checkpoint_keys = ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",)

    def recognises_denoiser(self, denoiser: Any) -> bool:
        config = getattr(denoiser, "config", {})
        return "cross_attention_dim" in config and config.get("addition_embed_type") != "text_time"

    def load(self, folder: Path, *, without: Collection[str] = ()) -> Any:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from dynamicid.models.base import BaseModel

        self.check_folder(folder)
        return BaseModel(
            load_part(folder, "unet", UNet2DConditionModel, without),
            vae=load_part(folder, "vae", AutoencoderKL, without),
            text_encoder=load_part(folder, "text_encoder", CLIPTextModel, without),
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", model_max_length=77),
            noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
            image_encoder=None,
            name=str(folder),
            **self._second_text_encoder(folder, without),
        )

    def _second_text_encoder(self, folder: Path, without: Collection[str]) -> dict[str, Any]:
        return {}

    def build_tiny(self, *, seed: int = 0, with_image_encoder: bool = True) -> Any:
        from dynamicid.testing import TINY_SD15_UNET, tiny_unet_base

        return tiny_unet_base(
            self.tiny_name, TINY_SD15_UNET, two_text_encoders=False, seed=seed, with_image_encoder=with_image_encoder
        )

    def conditioner(self, parts: Any) -> Any:
        from dynamicid.models.conditioning import Conditioner

        return Conditioner(
            tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, image_encoder=parts.image_encoder
        )

    def token_dim(self, denoiser: Any) -> int:
        return int(denoiser.config.cross_attention_dim)

    def text_dim(self, base: Any) -> int:
        return int(base.text_encoder.config.hidden_size)

    def denoise(
        self, denoiser: Any, noisy: Any, timesteps: Any, text: Any, id_tokens: Any, condition: Any, saa: Any
    ) -> Any:
        from dynamicid.models.conditioning import encoder_states

        return denoiser(
            noisy,
            timesteps,
            encoder_hidden_states=encoder_states(text, id_tokens),  # [text ; ID tokens], persons in order
            added_cond_kwargs=condition,
            cross_attention_kwargs={"saa": saa},
        ).sample

    def objective(self, scheduler: Any) -> Any:
        from dynamicid.models.objectives import DDPMObjective

        return DDPMObjective(scheduler)  # epsilon, or v_prediction when the scheduler says so

    def pipeline_class(self) -> type:
        from dynamicid.infer.pipeline import DynamicIDPipeline

        return DynamicIDPipeline

    def plain_pipeline(self, components: dict[str, Any]) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )


SD15 = SD15Family()
