"""Face tokens of every dataset row from the frozen anchoring face encoder: the reconfiguration stage's input.

TOKENS_DIR/tokens.safetensors holds `tokens` (rows, num_tokens, C) in dataset row order, and in its header
the dataset fingerprint and the anchor weights' hash, so a cache is never used with other rows or weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tqdm import tqdm

from dynamicid.clitools import progress_options
from dynamicid.models import load_dynamicid
from dynamicid.models.base import load_base_model
from dynamicid.models.checkpoints import check_base_family, read_safetensors, write_safetensors
from dynamicid.models.families import detect_family
from dynamicid.train.data import (
    TOKEN_CACHE_COLUMNS,
    clip_tensor,
    dataset_fingerprint,
    decode_image,
    embedding_info,
    load_curated,
)

TOKENS_FILE = "tokens.safetensors"


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def check_anchor_fits(weights, dataset_path: str | Path, id_model: str, id_dim: int) -> None:
    """The anchor's face encoder must have been trained on this dataset's kind of identity embedding."""
    metadata = weights.metadata
    where = ", ".join(map(str, weights.paths))
    if metadata.id_embed_dim != id_dim:
        raise ValueError(
            f"{where} was made for identity embeddings of width {metadata.id_embed_dim} ({metadata.id_embed_model}), "
            f"but dataset {dataset_path} has width {id_dim} ({id_model}); use a dataset curated with that backend"
        )
    if metadata.id_embed_model != id_model:
        raise ValueError(
            f"{where} was made for {metadata.id_embed_model} embeddings, but dataset {dataset_path} has {id_model}"
        )


@torch.no_grad()
def cache_tokens(
    anchor: str | Path,
    dataset: str | Path,
    output: str | Path,
    *,
    base_model: str,
    image_encoder: str | None = None,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = False,
) -> Path:
    """Write OUTPUT/tokens.safetensors; returns its path."""
    rows = load_curated(dataset, TOKEN_CACHE_COLUMNS)
    id_model, id_dim = embedding_info(rows, dataset)
    weights = load_dynamicid(anchor)
    check_anchor_fits(weights, dataset, id_model, id_dim)
    family = detect_family(base_model)
    check_base_family(weights.metadata.base_family, family.name, str(anchor))
    # only the CLIP image encoder runs: the denoiser, VAE and text encoders (Flux's T5) stay unloaded
    base = load_base_model(
        base_model, image_encoder, without=(family.denoiser_name, "vae", "text_encoder", "text_encoder_2")
    )
    if base.clip_dim != weights.metadata.clip_embed_dim:
        raise ValueError(
            f"{anchor} was made for CLIP states of width {weights.metadata.clip_embed_dim}, the image encoder "
            f"gives {base.clip_dim}; pass the --image-encoder the anchor was trained with"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base.image_encoder.to(device)
    face_encoder = weights.build_face_encoder().to(device).eval()
    conditioner = family.conditioner(base)
    tokens = []
    for start in tqdm(
        range(0, len(rows), batch_size), desc="cache-tokens", unit="batch", disable=not progress, **progress_options()
    ):
        batch = rows.select(range(start, min(start + batch_size, len(rows))))
        clip = torch.stack([clip_tensor(decode_image(r["image"]), r["kps5"]) for r in batch])
        embeds = torch.tensor(list(batch["embedding"]), dtype=torch.float32, device=device)
        tokens.append(face_encoder(*conditioner.face_encoder_inputs(clip, embeds)).float().cpu())
    out = Path(output) / TOKENS_FILE
    header = {
        "dataset_fingerprint": dataset_fingerprint(rows),
        "anchor_sha256": file_digest(anchor),
        "anchor": str(anchor),
    }
    return write_safetensors({"tokens": torch.cat(tokens).contiguous()}, out, header)


def read_tokens(folder: str | Path, dataset, anchor: str | Path) -> torch.Tensor:
    """The cached tokens, checked against the dataset rows and the anchor weights they must come from."""
    path = Path(folder) / TOKENS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `dynamicid-train cache-tokens --output {folder}` first")
    header, tensors = read_safetensors(path)
    if header.get("dataset_fingerprint") != dataset_fingerprint(dataset):
        raise ValueError(f"{path} was cached from other dataset rows; rerun `dynamicid-train cache-tokens`")
    if header.get("anchor_sha256") != file_digest(anchor):
        raise ValueError(f"{path} was cached with other anchor weights ({header.get('anchor')}); rerun cache-tokens")
    return tensors["tokens"]
