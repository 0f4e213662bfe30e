"""FLUX.1: a transformer of double- and single-stream blocks over T5 states (512 x 4096) and CLIP's pooled vector.

A FLUX.1-dev folder in diffusers layout holds `transformer/` (FluxTransformer2DModel, guidance embeds on), `vae/`
(16 latent channels, with a shift and a scaling factor), `text_encoder/` + `tokenizer/` (CLIP: its pooled output
conditions the transformer and is the IMR's face-prompt vector), `text_encoder_2/` + `tokenizer_2/` (T5: the
prompt states) and `scheduler/` (FlowMatchEulerDiscreteScheduler with dynamic shifting). SAA sits on the
double-stream blocks' joint attention (`joint_attention_kwargs`; `dynamicid.models.saa_flux`), the face tokens as
wide as the transformer (3072), or as T5's states (4096) for weights started from XLabs' IP-Adapter: the width is
read off the weights (`token_dim`, metadata `cross_attention_dim`). A transformer alone may come from one `.safetensors` file (BFL's layout or
diffusers') through diffusers' `from_single_file` (`load_flux_transformer`).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from dynamicid.models.families.family import BaseFamily, load_part

T5_MAX_LENGTH = 512  # FLUX.1-dev's prompt length in T5 tokens (schnell uses 256)
TRAINING_GUIDANCE = 3.5  # FLUX.1-dev's guidance embedding while training (diffusers' Flux training examples)


class FluxFamily(BaseFamily):
    """FLUX.1 dev / schnell and their fine-tunes (diffusers layout)."""

    name = "flux"
    label = "FLUX.1"
    tiny_name = "tiny-random-flux"
    parts = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    pipeline_classes = ("FluxPipeline", "DynamicIDFluxPipeline")
    markers = frozenset({"transformer", "text_encoder_2"})
    checkpoint_keys = ("double_blocks.0.img_attn.qkv.weight",)  # BFL's flux1-dev.safetensors layout
    denoiser_name = "transformer"
    attention_kwargs = "joint_attention_kwargs"

    def recognises_denoiser(self, denoiser: Any) -> bool:
        return hasattr(denoiser, "single_transformer_blocks") and hasattr(denoiser, "transformer_blocks")

    def load(self, folder: Path, transformer: str | Path | None = None, *, without: Collection[str] = ()) -> Any:
        """The parts of a FLUX.1 diffusers folder; `transformer` replaces its transformer (a file or folder);
        the parts named in `without` are not loaded (e.g. the T5 when training from a prompt cache)."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

        from dynamicid.models.base import BaseModel

        if transformer is None:
            self.check_folder(folder)
        local = {"local_files_only": True}
        return BaseModel(
            None if "transformer" in without else load_flux_transformer(transformer or folder / "transformer", folder),
            vae=load_part(folder, "vae", AutoencoderKL, without, **local),
            text_encoder=load_part(folder, "text_encoder", CLIPTextModel, without, **local),
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **local),
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", **local),
            image_encoder=None,
            text_encoder_2=load_part(folder, "text_encoder_2", T5EncoderModel, without, **local),
            tokenizer_2=T5Tokenizer.from_pretrained(folder, subfolder="tokenizer_2", **local),
            name=str(folder),
        )

    def build_tiny(self, *, seed: int = 0, with_image_encoder: bool = True) -> Any:
        from dynamicid.testing import build_tiny_random_flux

        return build_tiny_random_flux(seed=seed, with_image_encoder=with_image_encoder)

    def conditioner(self, parts: Any) -> Any:
        from dynamicid.models.conditioning_flux import FluxConditioner

        return FluxConditioner.from_parts(parts)

    def token_dim(self, denoiser: Any) -> int:
        """The installed SAA processors' token width, else the transformer's (3072 for FLUX.1)."""
        from dynamicid.models.saa_flux import FluxSAAProcessor

        installed = [p for p in denoiser.attn_processors.values() if isinstance(p, FluxSAAProcessor)]
        return installed[0].id_dim if installed else int(denoiser.inner_dim)

    def text_dim(self, base: Any) -> int:
        return int(base.text_encoder_2.config.d_model)

    def install_identity_attention(
        self, denoiser: Any, *, rank: int, num_tokens: int, token_dim: int | None = None
    ) -> None:
        """SAA on the double-stream blocks; ID tokens `token_dim` wide (default the transformer's width; 4096, T5's,
        for weights started from XLabs' IP-Adapter: `dynamicid.models.xlabs`)."""
        from dynamicid.models.saa_flux import install_flux_saa

        install_flux_saa(denoiser, rank=rank, num_tokens=num_tokens, id_dim=token_dim)

    def denoise(
        self, denoiser: Any, noisy: Any, timesteps: Any, text: Any, id_tokens: Any, condition: Any, saa: Any
    ) -> Any:
        """The transformer's flow prediction for VAE latents `noisy` (B, 16, h, w): packed into 2x2 patches, the
        ID tokens and SAA inputs in `joint_attention_kwargs`, the guidance embedding at FLUX.1-dev's 3.5, as
        diffusers' Flux training examples set it; unpacked back to the latents' shape."""
        import torch
        from diffusers import FluxPipeline

        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full((batch,), TRAINING_GUIDANCE, device=noisy.device, dtype=torch.float32)
        prediction = denoiser(
            hidden_states=packed,
            timestep=timesteps.to(noisy.dtype) / 1000,
            guidance=guidance,
            pooled_projections=condition["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=condition["txt_ids"],
            img_ids=image_ids,
            joint_attention_kwargs={"saa": saa, "id_tokens": id_tokens},
            return_dict=False,
        )[0]
        # _unpack_latents takes the pixel size: latent side x the VAE's 8
        return FluxPipeline._unpack_latents(prediction, height * 8, width * 8, 8)

    def objective(self, scheduler: Any) -> Any:
        from dynamicid.models.objectives import FlowMatchingObjective

        return FlowMatchingObjective.from_scheduler(scheduler)  # rectified flow, as FLUX.1 is trained

    def pipeline_class(self) -> type:
        from dynamicid.infer.pipeline_flux import DynamicIDFluxPipeline

        return DynamicIDFluxPipeline

    def plain_pipeline(self, components: dict[str, Any]) -> Any:
        from diffusers import FluxPipeline

        return FluxPipeline(**components)


def load_flux_transformer(source: str | Path, config_folder: str | Path | None = None) -> Any:
    """A FluxTransformer2DModel from a diffusers folder or from one `.safetensors` file (BFL's or diffusers' key
    layout, through diffusers' `from_single_file`; `config_folder`'s transformer/ config is used when given, so
    no config is looked up online)."""
    from diffusers import FluxTransformer2DModel

    path = Path(source)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"transformer file {path} must be a .safetensors file (pickled weights are refused)")
        options: dict[str, Any] = {"local_files_only": True}
        if config_folder is not None:
            options |= {"config": str(config_folder), "subfolder": "transformer"}
        return FluxTransformer2DModel.from_single_file(str(path), **options)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"transformer {path} is neither a .safetensors file nor a folder with config.json")
    return FluxTransformer2DModel.from_pretrained(path, local_files_only=True)


FLUX = FluxFamily()
