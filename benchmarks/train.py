"""Training figures: input-pipeline throughput at 512 px, and SD 1.5-size parameter / memory counts (meta device).

    python benchmarks/train.py [--dataset CURATED_DIR] [--samples 200]

Without --dataset, a small dataset is curated first from ../shared/data/faces (into a temporary folder).
The memory figures are computed on the meta device (no weights allocated): trainable parameters, AdamW state,
and the tensors autograd saves for the backward pass of one anchoring step (UNet + SAA + face encoder) at
batch 8, 512 px, bf16, with and without gradient checkpointing. Saved tensors are summed as the hooks see them
(a tensor saved by two operations counts twice), so these are upper bounds. With checkpointing the figure is what
is kept between blocks (each checkpoint's inputs plus what is saved outside the checkpointed blocks); the backward
pass adds the recomputed activations of one block at a time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

SHARED_FACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"
GIB = 1024**3


def curate_sample(out: Path) -> Path:
    from dynamicid.curation.pipeline import build_dataset

    photos = out / "photos"
    for identity in sorted((SHARED_FACES / "identities").iterdir()):
        if identity.is_dir():
            (photos / identity.name).mkdir(parents=True)
            for file in sorted(identity.iterdir())[:6]:
                shutil.copy(file, photos / identity.name / file.name)
    build_dataset(photos, out / "dataset", per_identity=6, progress=False)
    return out / "dataset"


def input_pipeline(dataset_dir: Path, samples: int) -> None:
    """Anchoring samples per second on one core: Parquet decode, crops, normalisation, collate (batch 8)."""
    from dynamicid.models.conditioning import Conditioner
    from dynamicid.testing import build_tiny_tokenizer
    from dynamicid.train.data import (
        ANCHOR_COLUMNS,
        RECONFIGURE_COLUMNS,
        AnchorSamples,
        IdentitySamples,
        collate_identities,
        decode_image,
        load_curated,
    )

    torch.set_num_threads(1)
    rows = load_curated(dataset_dir, ANCHOR_COLUMNS)
    anchor = AnchorSamples(
        rows, Conditioner(tokenizer=build_tiny_tokenizer(), text_encoder=None, image_encoder=None).token_ids, 512
    )
    loader = torch.utils.data.DataLoader(anchor, batch_size=8, shuffle=True, num_workers=0)
    for _ in loader:  # warm-up: file cache, tokenizer memo
        break
    seen, start = 0, time.perf_counter()
    while seen < samples:
        for batch in loader:
            seen += len(batch["index"])
            if seen >= samples:
                break
    rate = seen / (time.perf_counter() - start)
    print(f"anchoring input pipeline, 512 px, batch 8, 1 core: {rate:.1f} samples/s ({len(rows)} rows, {seen} samples)")
    start = time.perf_counter()
    for i in range(len(rows)):
        decode_image(rows[i]["image"])
    decode_rate = len(rows) / (time.perf_counter() - start)
    print(
        f"  of which PNG decode of the 512 crops alone: {decode_rate:.1f} images/s ({100 * rate / decode_rate:.0f} % of the time)"
    )

    rows = load_curated(dataset_dir, RECONFIGURE_COLUMNS)
    tokens = torch.zeros(len(rows), 4, 768)
    identities = IdentitySamples(rows, tokens, 512, targets=32, seed=0)
    loader = torch.utils.data.DataLoader(identities, batch_size=1, collate_fn=collate_identities)
    start, count = time.perf_counter(), 0
    for _ in loader:
        count += 1
        if count >= max(4, samples // 33):
            break
    elapsed = time.perf_counter() - start
    print(
        f"reconfiguration input pipeline, 512 px, K=32, 1 core: {count / elapsed:.2f} identities/s "
        f"({33 * count / elapsed:.1f} images/s incl. landmark maps)"
    )


def count(module: torch.nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def saved_activation_bytes(unet, face_encoder, checkpointing: bool, batch: int = 8, size: int = 512) -> int:
    """Bytes autograd saves in one bf16 anchoring forward at `batch` x `size` px (meta tensors)."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    def checkpointed(module, *args):
        nonlocal total  # the inputs each checkpoint keeps for its recomputation
        total += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    if checkpointing:
        unet.enable_gradient_checkpointing(checkpointed)
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    latent = size // 8
    with torch.device("meta"):
        noisy = torch.empty(batch, 4, latent, latent, dtype=torch.bfloat16)
        text = torch.empty(batch, 77, 768, dtype=torch.bfloat16)
        id_embeds = torch.empty(batch, 512, dtype=torch.bfloat16)
        clip = torch.empty(batch, 257, 1280, dtype=torch.bfloat16)
        timesteps = torch.zeros(batch, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tokens = face_encoder(id_embeds, clip)
        unet(noisy, timesteps, encoder_hidden_states=torch.cat([text, tokens], 1)).sample.sum()
    return total


def sd15_sizes() -> None:
    from diffusers import UNet2DConditionModel

    from dynamicid.models import IMR, SD15_UNET_CONFIG, FaceEncoder, KeypointEncoder, install_saa

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        unet.requires_grad_(False)
        install_saa(unet, rank=128, num_tokens=4)
        face_encoder = FaceEncoder(cross_attention_dim=768, id_embeddings_dim=512, clip_embeddings_dim=1280)
        imr, keypoints = IMR(), KeypointEncoder(768)
    unet.to(torch.bfloat16)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    face_encoder.to(torch.bfloat16)
    saa, encoder = count(unet), count(face_encoder)
    print(f"SD 1.5 UNet (frozen): {count(unet, False) - saa:,} params")
    print(f"anchoring trainable: SAA {saa:,} + face encoder {encoder:,} = {saa + encoder:,} params")
    stage_report("anchoring", saa + encoder)
    imr_params, key_params = count(imr), count(keypoints)
    print(
        f"reconfiguration trainable: IMR {imr_params:,} + keypoint encoder {key_params:,} = {imr_params + key_params:,}"
    )
    stage_report("reconfiguration", imr_params + key_params)
    for checkpointing in (False, True):
        saved = saved_activation_bytes(unet, face_encoder, checkpointing)
        print(
            f"anchoring activations saved for backward, batch 8, 512 px, bf16, "
            f"gradient checkpointing {'on' if checkpointing else 'off'}: {saved / GIB:.2f} GiB "
            "(upper bound)"
        )


def stage_report(stage: str, params: int) -> None:
    weights, grads, adam = params * 4, params * 4, params * 8  # fp32 weights, fp32 grads, AdamW m and v
    print(
        f"{stage}: fp32 weights {weights / GIB:.2f} GiB, grads {grads / GIB:.2f} GiB, "
        f"AdamW state {adam / GIB:.2f} GiB, total {(weights + grads + adam) / GIB:.2f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, help="a curated dataset folder (default: curate a sample first)")
    parser.add_argument("--samples", type=int, default=200, help="anchoring samples to time")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("HF_HOME", str(Path(tmp) / "hf"))
        dataset = args.dataset or curate_sample(Path(tmp))
        input_pipeline(dataset, args.samples)
    sd15_sizes()


if __name__ == "__main__":
    main()
