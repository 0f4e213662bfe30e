"""Time the SAA processor against diffusers' AttnProcessor2_0: one SD 1.5 cross-attention layer, then a UNet.

    python benchmarks/attention.py                                   # CPU figures (float32)
    python benchmarks/attention.py --device cuda --dtype float16 --unet-latents 64 96

Random weights (nothing is downloaded). The baseline sees the 77 text tokens; SAA sees 77 text + 4 per person.
The two persons' boxes default to the image's left and right halves (every query inside a box, as in most
two-person layouts); `--boxes release` takes the release's two small boxes instead.
Prints one line per measurement: median milliseconds over --repeats runs after warm-up, and the SAA/baseline ratio.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from dynamicid.models import SD15_UNET_CONFIG, SAACall, install_saa
from dynamicid.models.saa import SAAProcessor

TEXT_TOKENS, TOKENS_PER_ID = 77, 4
BOXES = {
    "halves": ((0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)),  # left and right half of the image
    "release": ((0.1, 0.1, 0.5, 0.4), (0.1, 0.6, 0.5, 0.9)),  # the release's two-person layout
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--layer-latent", type=int, default=64, help="latent side of the single-layer test")
    parser.add_argument("--batch", type=int, default=2, help="batch of the single-layer test (CFG halves)")
    parser.add_argument("--boxes", default="halves", choices=sorted(BOXES), help="the two persons' boxes")
    parser.add_argument("--unet-latents", type=int, nargs="*", default=[32], help="latent sides of the UNet test")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement")
    parser.add_argument("--unet-repeats", type=int, default=5, help="timed runs per UNet measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    return parser.parse_args()


def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000


def paired_ms(
    baseline: Callable[[], object], candidate: Callable[[], object], device: torch.device, repeats: int
) -> tuple[float, float, float]:
    """Median ms of each and the median of the per-pair ratios; runs interleaved so that load from other
    processes hits both alike."""
    for _ in range(2):  # warm-up
        baseline(), candidate()
    base, cand = [], []
    for _ in range(repeats):
        base.append(timed_ms(baseline, device))
        cand.append(timed_ms(candidate, device))
    ratio = statistics.median(c / b for b, c in zip(base, cand, strict=True))
    return statistics.median(base), statistics.median(cand), ratio


@torch.no_grad()
def bench_layer(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """SD 1.5's first cross-attention layer: 320 channels, 8 heads, 768-wide text, side x side queries."""
    torch.manual_seed(0)
    attn = Attention(query_dim=320, cross_attention_dim=768, heads=8, dim_head=40).to(device, dtype).eval()
    hidden = torch.randn(args.batch, args.layer_latent**2, 320, device=device, dtype=dtype)
    text = torch.randn(args.batch, TEXT_TOKENS, 768, device=device, dtype=dtype)
    two_ids = torch.randn(args.batch, 2 * TOKENS_PER_ID, 768, device=device, dtype=dtype)

    baseline = AttnProcessor2_0()
    with torch.device(device):
        saa = SAAProcessor(320, 768, rank=128, num_tokens=TOKENS_PER_ID)
    saa.to(dtype)
    states = torch.cat([text, two_ids], dim=1)

    def run(processor, inputs, **kwargs):
        attn.set_processor(processor)
        return attn(hidden, encoder_hidden_states=inputs, **kwargs)

    boxes = BOXES[args.boxes]
    variants = {
        "2 persons, gating off": SAACall(num_ids=2, gating=False),
        "2 persons, gating + boxes": SAACall(num_ids=2, boxes=boxes),
        "2 persons, gating + boxes + boost": SAACall(num_ids=2, boxes=boxes, boost=2.0),
        "2 persons, gating + maps recorded": SAACall(num_ids=2, boxes=boxes, return_activation_maps=True),
        "text only (LoRA attention)": SAACall(num_ids=0, gating=False),
    }
    side = args.layer_latent
    print(
        f"layer {side}x{side} (320 ch, 8 heads), batch {args.batch}, {args.boxes} boxes; "
        "baseline AttnProcessor2_0 on 77 tokens"
    )
    for label, call in variants.items():
        inputs = text if call.num_ids == 0 else states
        base, ms, ratio = paired_ms(
            lambda: run(baseline, text),
            lambda inputs=inputs, call=call: run(saa, inputs, saa=call),
            device,
            args.repeats,
        )
        print(f"  SAA {label}: {ms:.2f} ms vs {base:.2f} ms, ratio {ratio:.2f}x")


@torch.no_grad()
def bench_unet(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, side: int) -> None:
    """The whole SD 1.5-sized UNet (random weights), batch 1, with SAA (2 persons, gating) vs without."""
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    if dtype != torch.float32:
        unet.to(dtype)
    unet.set_attn_processor(AttnProcessor2_0())
    latents = torch.randn(1, 4, side, side, device=device, dtype=dtype)
    text = torch.randn(1, TEXT_TOKENS, 768, device=device, dtype=dtype)
    states = torch.cat([text, torch.randn(1, 2 * TOKENS_PER_ID, 768, device=device, dtype=dtype)], dim=1)
    saa_unet = copy.deepcopy(unet)
    install_saa(saa_unet, rank=128, num_tokens=TOKENS_PER_ID)
    call = {"saa": SAACall(num_ids=2, boxes=BOXES[args.boxes], boost=2.0)}
    base, ms, ratio = paired_ms(
        lambda: unet(latents, 500, encoder_hidden_states=text),
        lambda: saa_unet(latents, 500, encoder_hidden_states=states, cross_attention_kwargs=call),
        device,
        args.unet_repeats,
    )
    print(
        f"unet {side}x{side} batch 1: AttnProcessor2_0 {base:.1f} ms, SAA (2 persons, gating) {ms:.1f} ms, ratio {ratio:.2f}x"
    )


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}, {args.dtype}")
    bench_layer(args, device, dtype)
    for side in args.unet_latents:
        bench_unet(args, device, dtype, side)


if __name__ == "__main__":
    main()
