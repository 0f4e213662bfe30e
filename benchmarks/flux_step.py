"""Time one DynamicID-Flux denoising step against one FluxPipeline step on a Flux-shaped transformer.

    .venv/bin/python benchmarks/flux_step.py                    # CPU: 1 double + 2 single blocks, 512x512
    python benchmarks/flux_step.py --device cuda --dtype bfloat16 --double 19 --single 38 --size 1024

A step of either pipeline is one transformer call (the scheduler's Euler update is negligible). The transformer
has FLUX.1-dev's widths (3072 = 24 heads x 128, T5 states 512 x 4096, pooled CLIP 768, guidance embeds, 64
packed latent channels) and random weights, at reduced depth: FLUX.1-dev's 1:2 ratio of double- to
single-stream blocks (19 + 38) is kept, so the share of the double-stream attention, the only place SAA adds
work, is the real model's. Baseline: diffusers' `FluxAttnProcessor` everywhere. DynamicID: `install_flux_saa`
(LoRA rank `--rank`) and two people, 4 tokens each, gating, boxes = the image's left and right halves, boost 2,
passed as `joint_attention_kwargs`. Runs are interleaved and the ratio is the median of per-pair ratios; on CPU
each run is timed in process CPU time (the machine is shared), on CUDA in wall time after synchronising.
"""

from __future__ import annotations

import argparse

import torch
from attention import paired_ms  # benchmarks/attention.py: interleaved timing, median of per-pair ratios
from diffusers import FluxPipeline, FluxTransformer2DModel

from dynamicid.models.saa import SAACall
from dynamicid.models.saa_flux import install_flux_saa

T5_TOKENS, T5_WIDTH, CLIP_POOLED = 512, 4096, 768
BOXES = ((0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1-dev: 19)")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks (FLUX.1-dev: 38)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (16 pixels per token)")
    parser.add_argument("--rank", type=int, default=0, help="LoRA rank of the SAA processors (0 = none)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    return parser.parse_args()


@torch.no_grad()
def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(device):
        transformer = FluxTransformer2DModel(
            num_layers=args.double, num_single_layers=args.single, guidance_embeds=True
        ).eval()
    if dtype != torch.float32:
        transformer.to(dtype)
    side = args.size // 16
    inputs = {
        "hidden_states": torch.randn(1, side * side, 64, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, T5_TOKENS, T5_WIDTH, device=device, dtype=dtype),
        "pooled_projections": torch.randn(1, CLIP_POOLED, device=device, dtype=dtype),
        "timestep": torch.tensor([0.5], device=device, dtype=dtype),
        "guidance": torch.tensor([3.5], device=device, dtype=dtype),
        "txt_ids": torch.zeros(T5_TOKENS, 3, device=device, dtype=dtype),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, side, side, device, dtype),
        "return_dict": False,
    }
    flux_processors = transformer.attn_processors
    install_flux_saa(transformer, rank=args.rank)
    saa_processors = transformer.attn_processors
    saa_inputs = {
        "saa": SAACall(num_ids=2, boxes=BOXES, boost=2.0, image_size=(args.size, args.size)),
        "id_tokens": torch.randn(1, 8, transformer.inner_dim, device=device, dtype=dtype),
    }

    def flux_step():
        transformer.set_attn_processor(dict(flux_processors))
        return transformer(**inputs)

    def dynamicid_step():
        transformer.set_attn_processor(dict(saa_processors))
        return transformer(**inputs, joint_attention_kwargs=saa_inputs)

    base, ours, ratio = paired_ms(flux_step, dynamicid_step, device, args.repeats)
    print(
        f"Flux-shaped transformer: {args.double} double + {args.single} single blocks, width 3072 (24 x 128), "
        f"{side * side} image + {T5_TOKENS} T5 tokens ({args.size}x{args.size}), {args.dtype} on {args.device}, "
        f"SAA LoRA rank {args.rank}, 2 people (gating, halves, boost 2)"
    )
    print(f"  FluxPipeline step {base:.0f} ms, DynamicID-Flux step {ours:.0f} ms, ratio {ratio:.3f}x")


if __name__ == "__main__":
    main()
