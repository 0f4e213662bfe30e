"""The frozen FLUX.1 base: its parts from a local diffusers folder (optionally the transformer from one file).

A FLUX.1-dev folder in diffusers layout holds `transformer/` (FluxTransformer2DModel, guidance embeds on),
`vae/` (16 latent channels, with a shift and a scaling factor), `text_encoder/` + `tokenizer/` (CLIP: its pooled
output conditions the transformer and is the IMR's face-prompt vector), `text_encoder_2/` + `tokenizer_2/` (T5:
the prompt states) and `scheduler/` (FlowMatchEulerDiscreteScheduler with dynamic shifting). The CLIP image
encoder that feeds the face encoder is a separate folder (or `<base>/image_encoder`), as for SD 1.5 and SDXL.
Nothing is downloaded: a missing folder or part is an error that names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FLUX_FAMILY = "flux"
TINY_RANDOM_FLUX = "tiny-random-flux"
FLUX_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
FLUX_PIPELINE_CLASSES = ("FluxPipeline", "DynamicIDFluxPipeline")
T5_MAX_LENGTH = 512  # FLUX.1-dev's prompt length in T5 tokens (schnell uses 256)


@dataclass
class FluxBase:
    """The frozen parts of a FLUX.1 base; `image_encoder` is the CLIP vision tower of the face encoder."""

    transformer: Any  # diffusers.FluxTransformer2DModel
    vae: Any  # diffusers.AutoencoderKL (16 latent channels)
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    text_encoder_2: Any  # transformers.T5EncoderModel
    tokenizer_2: Any  # transformers.T5Tokenizer
    scheduler: Any  # diffusers.FlowMatchEulerDiscreteScheduler
    image_encoder: Any | None = None  # transformers.CLIPVisionModelWithProjection
    name: str = ""

    family = FLUX_FAMILY

    @property
    def inner_dim(self) -> int:
        """The transformer's token width (3072 for FLUX.1): the width of the face tokens."""
        return int(self.transformer.inner_dim)

    cross_attention_dim = inner_dim  # the face tokens' width, under the SD families' name

    @property
    def pooled_dim(self) -> int:
        """The CLIP text encoder's pooled width (768 for FLUX.1): the IMR's text-vector width."""
        return int(self.text_encoder.config.hidden_size)

    @property
    def clip_dim(self) -> int:
        return int(self.image_encoder.config.hidden_size)

    def components(self) -> dict[str, Any]:
        """The parts under diffusers' FluxPipeline names."""
        return {
            "transformer": self.transformer,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "text_encoder_2": self.text_encoder_2,
            "tokenizer_2": self.tokenizer_2,
            "scheduler": self.scheduler,
            "image_encoder": self.image_encoder,
        }

    def modules(self) -> list[torch.nn.Module]:
        parts = (self.transformer, self.vae, self.text_encoder, self.text_encoder_2, self.image_encoder)
        return [part for part in parts if part is not None]


def is_flux_folder(folder: Path) -> bool:
    """A diffusers folder holds FLUX.1 when model_index.json names a Flux pipeline or it has a transformer/ folder
    with a FluxTransformer2DModel config."""
    index = folder / "model_index.json"
    if index.is_file():
        try:
            return json.loads(index.read_text()).get("_class_name") in FLUX_PIPELINE_CLASSES
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{index} is not a JSON object; copy the model folder again") from None
    config = folder / "transformer" / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("_class_name") == "FluxTransformer2DModel"


def load_flux_transformer(source: str | Path, config_folder: str | Path | None = None) -> Any:
    """A FluxTransformer2DModel from a diffusers folder or from one `.safetensors` file (BFL's or diffusers' key
    layout, through diffusers' `from_single_file`; `config_folder`'s transformer/ config is used when given,
    so no config is looked up online)."""
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


def load_flux_base(folder: str | Path, transformer: str | Path | None = None) -> FluxBase:
    """The parts of a FLUX.1 diffusers folder; `transformer` replaces its transformer (a file or folder)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"base model folder {folder} does not exist (expected FLUX.1 in diffusers layout)")
    needed = [p for p in FLUX_PARTS if not (transformer is not None and p == "transformer")]
    missing = [part for part in needed if not (folder / part).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"base model folder {folder} has no {', '.join(missing)} subfolder(s); a FLUX.1 checkpoint in diffusers "
            f"layout has {', '.join(FLUX_PARTS)}"
        )
    local = {"local_files_only": True}
    return FluxBase(
        transformer=load_flux_transformer(transformer or folder / "transformer", folder),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", **local),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **local),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **local),
        text_encoder_2=T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2", **local),
        tokenizer_2=T5Tokenizer.from_pretrained(folder, subfolder="tokenizer_2", **local),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", **local),
        name=str(folder),
    )
