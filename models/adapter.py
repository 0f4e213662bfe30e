"""DynamicID's weights as one diffusers pipeline component (`id_adapter`), saved and loaded beside the base parts.

A pipeline's `save_pretrained` writes the denoiser without SAA (the base UNet / Flux transformer as it was) and
this component in its own `id_adapter/` folder: the face encoder, the IMR and keypoint encoder when present, and
the SAA processors in `attn_processors` order (a UNet's every attention layer, the release's index-keyed layout; a
Flux transformer's double-stream blocks, `dynamicid.models.saa_flux`). `from_pretrained` builds it back from its
config and the pipeline puts the processors back on its denoiser, so a saved pipeline reloads as it was and the
denoiser's own file holds only the base's weights.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from dynamicid.models.checkpoints import identity_processors
from dynamicid.models.face_encoder import FaceEncoder
from dynamicid.models.families import denoiser_family
from dynamicid.models.imr import IMR
from dynamicid.models.keypoint_encoder import KeypointEncoder
from dynamicid.models.saa import SAAProcessor
from dynamicid.models.saa_unet import keep_saa


class DynamicIDAdapter(ModelMixin, ConfigMixin):
    """Face encoder + optional IMR and keypoint encoder + the SAA processors of the denoiser's attention layers.

    Args (its config; the modules are `face_encoder`, `imr`, `keypoint_encoder` and `saa`, a ModuleList):
        face_encoder_args: `FaceEncoder` arguments (cross_attention_dim, id_embeddings_dim, clip_embeddings_dim,
            num_tokens, and proj_dim where the weights started from XLabs' Flux IP-Adapter).
        saa_args: {"rank", "num_tokens", "layers": [[processor name, hidden_size, token width]], "denoiser"}: the
            token width is a UNet layer's cross_attention_dim (None: self-attention) or a Flux block's id_dim;
            "denoiser" is "unet" (absent in folders saved before Flux) or "transformer" (Flux).
        imr_args, keypoint_encoder_args: `IMR` / `KeypointEncoder` arguments, None when the weights lack the part.
        id_embed_model: the ID-embedding model the face encoder was trained with (e.g. "arcface-buffalo_l").
    """

    @register_to_config
    def __init__(
        self,
        face_encoder_args: dict[str, int],
        saa_args: dict[str, Any],
        imr_args: dict[str, int] | None = None,
        keypoint_encoder_args: dict[str, int] | None = None,
        id_embed_model: str = "",
    ):
        super().__init__()
        self.face_encoder = FaceEncoder(**face_encoder_args)
        self.imr = IMR(**imr_args) if imr_args is not None else None
        self.keypoint_encoder = KeypointEncoder(**keypoint_encoder_args) if keypoint_encoder_args is not None else None
        processor = SAAProcessor
        if saa_args.get("denoiser", "unet") == "transformer":
            from dynamicid.models.saa_flux import FluxSAAProcessor as processor  # diffusers' Flux: only when needed
        self.saa = nn.ModuleList(
            processor(hidden, width, rank=saa_args["rank"], num_tokens=saa_args["num_tokens"])
            for _, hidden, width in saa_args["layers"]
        )

    @classmethod
    def from_modules(
        cls,
        face_encoder: FaceEncoder,
        denoiser: nn.Module,
        imr: IMR | None = None,
        keypoint_encoder: KeypointEncoder | None = None,
        id_embed_model: str = "",
    ) -> DynamicIDAdapter:
        """The component over modules held in memory and the SAA processors on `denoiser` (a UNet or a Flux
        transformer; shared, not copied)."""
        processors = identity_processors(denoiser)
        first = next(iter(processors.values()))
        config = {
            "face_encoder_args": {
                "cross_attention_dim": face_encoder.cross_attention_dim,
                "id_embeddings_dim": face_encoder.id_embeddings_dim,
                "clip_embeddings_dim": face_encoder.clip_embeddings_dim,
                "num_tokens": face_encoder.num_tokens,
            }
            # an XLabs start's MLP width (absent otherwise, so earlier saved folders keep their config)
            | ({"proj_dim": face_encoder.proj_dim} if face_encoder.proj_dim is not None else {}),
            "saa_args": {
                "rank": first.rank,
                "num_tokens": first.num_tokens,
                "layers": [[name, p.hidden_size, _token_width(p)] for name, p in processors.items()],
                "denoiser": denoiser_family(denoiser).denoiser_name,
            },
            "imr_args": dict(imr.config) if imr is not None else None,
            "keypoint_encoder_args": (
                {"embedding_dim": keypoint_encoder.embedding_dim, "width": keypoint_encoder.width}
                if keypoint_encoder is not None
                else None
            ),
            "id_embed_model": id_embed_model,
        }
        with torch.device("meta"):  # the structure only: every part is replaced by the given module
            adapter = cls(**config)
        adapter.face_encoder, adapter.imr, adapter.keypoint_encoder = face_encoder, imr, keypoint_encoder
        adapter.saa = nn.ModuleList(processors.values())
        return adapter

    @property
    def processor_names(self) -> list[str]:
        return [name for name, _, _ in self.config.saa_args["layers"]]

    def attach(self, denoiser: nn.Module) -> None:
        """Put the SAA processors on `denoiser`'s attention layers (the same modules, not copies); on a Flux
        transformer the single-stream blocks get the pass-through processor."""
        flux = self.config.saa_args.get("denoiser", "unet") == "transformer"
        names = set(denoiser.attn_processors)
        if flux:
            from dynamicid.models.saa_flux import DOUBLE_STREAM_PREFIX, FluxSAASingleStreamProcessor

            names = {name for name in names if name.startswith(DOUBLE_STREAM_PREFIX)}
        if names != set(self.processor_names):
            raise ValueError(
                f"the id_adapter's SAA was made for another denoiser: its {len(self.processor_names)} attention "
                f"layers do not match this one's {len(names)}; load DynamicID weights made for this base model"
            )
        if not self.attached_to(denoiser):
            processors = dict(zip(self.processor_names, self.saa, strict=True))
            if flux:  # diffusers sets all of a transformer's processors at once
                processors = {n: processors.get(n) or FluxSAASingleStreamProcessor() for n in denoiser.attn_processors}
            denoiser.set_attn_processor(processors)
        if not flux:
            keep_saa(denoiser)  # the UNet's slicing / fusion / default-processor methods keep SAA

    def attached_to(self, denoiser: nn.Module) -> bool:
        """Whether every SAA attention layer of `denoiser` still runs this component's processor."""
        current = denoiser.attn_processors
        return all(current.get(name) is p for name, p in zip(self.processor_names, self.saa, strict=True))


def _token_width(processor: nn.Module) -> int | None:
    """A UNet SAA processor's cross_attention_dim (None on self-attention), a Flux one's id_dim."""
    return getattr(processor, "id_dim", getattr(processor, "cross_attention_dim", None))
