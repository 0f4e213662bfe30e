"""GPU memory of DynamicID on FLUX.1-dev, computed from parameter and activation counts (nothing downloaded).

    .venv/bin/python benchmarks/flux_memory.py [--rank 128] [--train-size 512]

Parameters are counted on modules built on the meta device with the real configurations: FLUX.1-dev's
transformer (19 double + 38 single blocks, width 3072), T5-XXL's encoder, CLIP ViT-L/14's text tower, Flux's VAE,
CLIP ViT-H/14's vision tower (the face encoder's image encoder), and DynamicID's modules at Flux's width (SAA:
`to_k_id`/`to_v_id` + LoRA of rank `--rank` in the 19 double-stream blocks; face encoder, IMR and keypoint encoder
with 3072-wide tokens). Bytes per parameter: bf16 2, float8 1 (diffusers layerwise casting stores fp8, computes
in bf16); trainable parameters with AdamW: fp32 weight + fp32 gradient + two fp32 moments = 16 bytes.

Activations (batch 1, flash / memory-efficient SDPA: no tokens x tokens matrix), with N = image tokens + 512 T5
tokens (image tokens = (side / 16)^2) and d = 3072:
- inference, transformer: the peak of one block, ~ 24 N d values in bf16 (q, k, v, attention output, 4d-wide MLP
  hidden before and after GELU for the image and text streams, norms, residuals), plus the running streams;
- inference, VAE decode of the image at side x side: ~ 10 GB at 1024x1024 in bf16 untiled (diffusers' decoder,
  128-channel 1024x1024 feature maps at up to 512 channels); 1.5 GB with `vae.enable_tiling()`, the setting used;
- training, transformer with gradient checkpointing per block: each block's input kept (N d bf16 per block, 57
  blocks) plus one block recomputed for its backward (~ 24 N d values plus their gradients, x2).
- people: every person adds 4 ID tokens (4 x 3072) and a 4 x (image tokens) logit map per head in the 19
  double-stream blocks; one and three people differ by a few MB.
Offload `model`: only the part that runs is on the GPU (the transformer during denoising), others in CPU memory.
"""

from __future__ import annotations

import argparse

import torch

GB = 1024**3
WIDTH, T5_TOKENS, BLOCKS = 3072, 512, 57
CARDS = (24, 48, 80)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128, help="SAA LoRA rank")
    parser.add_argument("--train-size", type=int, default=512, help="training image side (pixels)")
    parser.add_argument("--size", type=int, default=1024, help="inference image side (pixels)")
    return parser.parse_args()


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(rank: int) -> dict[str, int]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from dynamicid.models import IMR, FaceEncoder, KeypointEncoder
    from dynamicid.models.saa_flux import flux_saa_state_dict, install_flux_saa

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)  # FLUX.1-dev's defaults: 19 + 38 blocks
        counts = {"transformer": count(transformer)}
        install_flux_saa(transformer, rank=rank)
        counts["saa"] = sum(t.numel() for t in flux_saa_state_dict(transformer).values())
        # The text and image towers as (model, configuration, its fields).
        towers = {
            "t5": (
                T5EncoderModel,
                T5Config,
                {
                    "vocab_size": 32128,
                    "d_model": 4096,
                    "d_kv": 64,
                    "d_ff": 10240,
                    "num_layers": 24,
                    "num_heads": 64,
                    "feed_forward_proj": "gated-gelu",
                },
            ),
            "clip_text": (  # CLIP ViT-L/14's text tower
                CLIPTextModel,
                CLIPTextConfig,
                {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
            ),
            "image_encoder": (  # CLIP ViT-H/14's vision tower
                CLIPVisionModelWithProjection,
                CLIPVisionConfig,
                {
                    "hidden_size": 1280,
                    "intermediate_size": 5120,
                    "num_hidden_layers": 32,
                    "num_attention_heads": 16,
                    "patch_size": 14,
                    "image_size": 224,
                    "projection_dim": 1024,
                },
            ),
        }
        counts.update({name: count(model(config(**fields))) for name, (model, config, fields) in towers.items()})
        counts["vae"] = count(
            AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=16,
                use_quant_conv=False,
                use_post_quant_conv=False,
            )
        )
        counts["face_encoder"] = count(FaceEncoder(cross_attention_dim=WIDTH, clip_embeddings_dim=1280))
        counts["imr"] = count(IMR(embedding_dim=WIDTH, txt_dim=768))
        counts["keypoint_encoder"] = count(KeypointEncoder(WIDTH))
    return counts


def activation_bytes(
    image_tokens: int,
    training: bool,
    *,
    width: int = WIDTH,
    text_tokens: int = T5_TOKENS,
    blocks: int = BLOCKS,
    bytes_per_value: int = 2,
) -> float:
    """The activation formula of the docstring for any Flux-shaped transformer (`flux_memory_check.py` runs it on
    smaller ones): N = image + text tokens, d = width."""
    stream = (image_tokens + text_tokens) * width * bytes_per_value  # one N x d tensor
    block_peak = 24 * stream
    if not training:
        return block_peak + 2 * stream
    return blocks * stream + 2 * block_peak


def activations_gb(side: int, training: bool) -> float:
    return activation_bytes((side // 16) ** 2, training) / GB


def fits(total: float) -> str:
    return " / ".join("yes" if total <= card * 0.95 else "no" for card in CARDS)  # 5 % for the CUDA context


def main() -> None:
    args = parse_args()
    n = parameter_counts(args.rank)
    print("parameters (millions): " + ", ".join(f"{k} {v / 1e6:.0f}" for k, v in n.items()))
    identity = n["face_encoder"] + n["imr"] + n["keypoint_encoder"]
    encoders = (n["t5"] + n["clip_text"]) * 2 / GB
    rows = []
    vae_decode = 1.5  # GB, tiled decode at 1024x1024 (see the docstring)
    for label, weight_bytes, offload in (
        ("bf16, all on the GPU", 2, False),
        ("bf16, --offload model", 2, True),
        ("--weights-dtype float8, --offload model", 1, True),
    ):
        transformer = (n["transformer"] + n["saa"]) * weight_bytes / GB
        others = (n["vae"] + n["image_encoder"] + identity) * 2 / GB
        for people in (1, 3):
            act = activations_gb(args.size, training=False) + vae_decode + people * 4 * WIDTH * 2 / GB
            total = transformer + others + act + (0 if offload else encoders)
            rows.append((f"inference {args.size}x{args.size}, {people} person(s), {label}", total))
    frozen = n["transformer"] * 2 / GB  # T5/CLIP embeddings cached ahead of training (cache-tokens)
    trainable_anchor = (n["saa"] + n["face_encoder"]) * 16 / GB
    trainable_reconfigure = (n["imr"] + n["keypoint_encoder"]) * 16 / GB
    act = activations_gb(args.train_size, training=True)
    for label, frozen_gb in (("bf16 base", frozen), ("float8 base", frozen / 2)):
        saa_frozen = n["saa"] * 2 / GB + n["face_encoder"] * 2 / GB + n["image_encoder"] * 2 / GB
        rows.append((f"training anchoring {args.train_size}px, batch 1, {label}", frozen_gb + trainable_anchor + act))
        rows.append(
            (
                f"training reconfiguration {args.train_size}px, batch 1, {label}",
                frozen_gb + saa_frozen + trainable_reconfigure + act,
            )
        )
    print(f"\n| setting | GB | fits {' / '.join(f'{c} GB' for c in CARDS)} |\n|---|---|---|")
    for label, total in rows:
        print(f"| {label} | {total:.1f} | {fits(total)} |")


if __name__ == "__main__":
    main()
