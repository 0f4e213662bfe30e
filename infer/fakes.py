"""FAKE DynamicID weights for smoke runs, tests and benchmarks: every part randomly initialised, seeded.

They have the shapes a given base model and face backend need, so the whole inference path runs; they
produce nothing meaningful. Written in our safetensors format or in the release's `.bin` layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dynamicid.faces import FaceAnalyzer
from dynamicid.models import IMR, FaceEncoder, KeypointEncoder, install_saa, saa_processors
from dynamicid.models.base import BaseModel
from dynamicid.models.checkpoints import save_dynamicid
from dynamicid.schemas import CheckpointMetadata


@dataclass
class RandomParts:
    """Randomly initialised DynamicID modules; SAA lives in `unet`'s processors."""

    face_encoder: FaceEncoder
    unet: nn.Module
    imr: IMR
    keypoint_encoder: KeypointEncoder
    metadata: CheckpointMetadata


def random_parts(
    base: BaseModel, analyzer: FaceAnalyzer, *, lora_rank: int = 4, imr_dim: int = 64, seed: int = 0
) -> RandomParts:
    """Install SAA on `base.unet` (LoRA `up` weights random, not zero, so the LoRA path is exercised) and build
    the rest with the widths of `base` (text, CLIP, cross-attention) and of `analyzer`'s ID embedding.

    The IMR uses 64-wide heads, as the release's files imply, so these parts also round-trip through the
    release layout.
    """
    unet, text_dim, clip_dim = base.unet, base.text_dim, base.clip_dim
    id_embed_dim, id_embed_model = analyzer.embedding_dim, analyzer.embedding_model
    cross_attention_dim = base.cross_attention_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        install_saa(unet, rank=lora_rank, num_tokens=4)
        for processor in saa_processors(unet).values():
            for lora in (processor.to_q_lora, processor.to_k_lora, processor.to_v_lora, processor.to_out_lora):
                nn.init.normal_(lora.up.weight, std=0.02)
        face_encoder = FaceEncoder(
            cross_attention_dim=cross_attention_dim,
            id_embeddings_dim=id_embed_dim,
            clip_embeddings_dim=clip_dim,
            num_tokens=4,
        )
        imr = IMR(
            dim=imr_dim,
            dim_head=64,
            heads=max(1, imr_dim // 64),
            embedding_dim=cross_attention_dim,
            txt_dim=text_dim,
            ff_mult=2,
            depth=1,
        )
        keypoint_encoder = KeypointEncoder(cross_attention_dim)
    metadata = CheckpointMetadata(
        cross_attention_dim=cross_attention_dim,
        lora_rank=lora_rank,
        num_tokens=4,
        id_embed_model=id_embed_model,
        id_embed_dim=id_embed_dim,
        clip_embed_dim=clip_dim,
        imr_depth=1,
        imr_dim=imr_dim,
        keypoint_dim=cross_attention_dim,
        source="random",
    )
    return RandomParts(face_encoder.eval(), unet, imr.eval(), keypoint_encoder.eval(), metadata)


def save_random_weights(parts: RandomParts, path: str | Path) -> Path:
    """Our safetensors format, all four parts in one file."""
    return save_dynamicid(
        path,
        metadata=parts.metadata,
        face_encoder=parts.face_encoder,
        unet=parts.unet,
        imr=parts.imr,
        keypoint_encoder=parts.keypoint_encoder,
    )


def save_release_layout(parts: RandomParts, folder: str | Path) -> dict[str, Path]:
    """The release's three `.bin` files: SAA (`SAA_module` index-keyed in attn_processors order + `proj_module`,
    nested dicts), IMR (`IMR.` keys) and keypoint encoder (`key_point_encoder.` keys)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    saa_module = {
        f"{index}.{key}": tensor
        for index, processor in enumerate(saa_processors(parts.unet).values())
        for key, tensor in processor.state_dict().items()
    }
    files = {
        "saa": (folder / "SAA.bin", {"SAA_module": saa_module, "proj_module": parts.face_encoder.state_dict()}),
        "imr": (folder / "IMR.bin", {f"IMR.{k}": v for k, v in parts.imr.state_dict().items()}),
        "keypoint_encoder": (
            folder / "KPE.bin",
            {f"key_point_encoder.{k}": v for k, v in parts.keypoint_encoder.state_dict().items()},
        ),
    }
    for path, state in files.values():
        torch.save(state, path)
    return {role: path for role, (path, _) in files.items()}
