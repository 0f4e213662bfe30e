"""DynamicID's weights as one diffusers pipeline component (`id_adapter`), saved and loaded beside the base parts.

A pipeline's `save_pretrained` writes the UNet without SAA (the base UNet as it was) and this component in its own
`id_adapter/` folder: the face encoder, the IMR and keypoint encoder when present, and the SAA processors in
`unet.attn_processors` order (the release's index-keyed layout). `from_pretrained` builds it back from its config
and the pipeline puts the processors back on its UNet, so a saved pipeline reloads as it was and the UNet's own
file holds only the UNet's weights.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from dynamicid.models.face_encoder import FaceEncoder
from dynamicid.models.imr import IMR
from dynamicid.models.keypoint_encoder import KeypointEncoder
from dynamicid.models.saa import SAAProcessor, saa_processors
from dynamicid.models.saa_unet import keep_saa


class DynamicIDAdapter(ModelMixin, ConfigMixin):
    """Face encoder + optional IMR and keypoint encoder + the SAA processors of every UNet attention layer.

    Args (its config; the modules are `face_encoder`, `imr`, `keypoint_encoder` and `saa`, a ModuleList):
        face_encoder_args: `FaceEncoder` arguments (cross_attention_dim, id_embeddings_dim, clip_embeddings_dim,
            num_tokens).
        saa_args: {"rank", "num_tokens", "layers": [[processor name, hidden_size, cross_attention_dim or None]]}.
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
        self.saa = nn.ModuleList(
            SAAProcessor(hidden, cross, rank=saa_args["rank"], num_tokens=saa_args["num_tokens"])
            for _, hidden, cross in saa_args["layers"]
        )

    @classmethod
    def from_modules(
        cls,
        face_encoder: FaceEncoder,
        unet: nn.Module,
        imr: IMR | None = None,
        keypoint_encoder: KeypointEncoder | None = None,
        id_embed_model: str = "",
    ) -> DynamicIDAdapter:
        """The component over modules held in memory and the SAA processors on `unet` (shared, not copied)."""
        processors = saa_processors(unet)
        first = next(iter(processors.values()))
        config = {
            "face_encoder_args": {
                "cross_attention_dim": face_encoder.cross_attention_dim,
                "id_embeddings_dim": face_encoder.id_embeddings_dim,
                "clip_embeddings_dim": face_encoder.clip_embeddings_dim,
                "num_tokens": face_encoder.num_tokens,
            },
            "saa_args": {
                "rank": first.rank,
                "num_tokens": first.num_tokens,
                "layers": [[name, p.hidden_size, p.cross_attention_dim] for name, p in processors.items()],
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

    def attach(self, unet: nn.Module) -> None:
        """Put the SAA processors on `unet`'s attention layers (the same modules, not copies)."""
        names = set(unet.attn_processors)
        if names != set(self.processor_names):
            raise ValueError(
                f"the id_adapter's SAA was made for another UNet: its {len(self.processor_names)} attention layers "
                f"do not match the UNet's {len(names)}; load DynamicID weights made for this base model"
            )
        processors = dict(zip(self.processor_names, self.saa, strict=True))
        if any(unet.attn_processors[name] is not p for name, p in processors.items()):
            unet.set_attn_processor(processors)
        keep_saa(unet)

    def attached_to(self, unet: nn.Module) -> bool:
        """Whether every attention layer of `unet` still runs this component's SAA processor."""
        current = unet.attn_processors
        return all(current.get(name) is p for name, p in zip(self.processor_names, self.saa, strict=True))
