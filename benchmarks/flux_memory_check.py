"""Check `flux_memory.py`'s formula against measured peak memory on CPU, on tiny-random-flux and on a Flux-shaped
reduced-depth transformer.

    .venv/bin/python benchmarks/flux_memory_check.py [--size 256] [--rank 128]

Cases: tiny-random-flux's transformer (64x64 pixels, 32 text tokens), and a transformer with FLUX.1-dev's widths
(3072 = 24 x 128, T5 states 512 x 4096, guidance embeds) at reduced depth, 1 double + 1 single block, as
`flux_step.py` builds it, at `--size`. Each with SAA installed (LoRA rank `--rank`; tiny: 4) and two people.
- inference step: one transformer call under no_grad;
- training step: forward + backward + AdamW step with SAA trainable and the base frozen, gradient checkpointing on.
Each case runs in its own subprocess in float32 (4 bytes per value, so the formula runs with 4 where the README's
table uses bf16's 2). Weights are measured exactly (the bytes of every parameter and buffer); the step's memory
as the process's peak resident memory during the step (VmHWM, reset through /proc/self/clear_refs just before)
minus its resident memory just before, after one warm-up call under no_grad (one-time allocations of the CPU
kernels and thread pools, ~10 MB, are not the step's). Predicted: the formula's activations for the case's token count, width
and block count; training adds the trainable parameters' gradient and two AdamW moments (12 bytes each in fp32;
their fp32 weight is in the weights). CPU attention here is torch's SDPA (flash kernel: no tokens x tokens
matrix), as the formula assumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MB = 1024**2
BOXES = ((0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0))  # two people, the image's halves
HERE = Path(__file__).resolve().parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="reduced model's image side (16 pixels per token)")
    parser.add_argument("--rank", type=int, default=128, help="SAA LoRA rank on the reduced model")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    return parser.parse_args()


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_case(case: dict) -> dict:
    """Build, measure one step, return the measured and predicted bytes (runs in a fresh process)."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from flux_memory import activation_bytes

    from dynamicid.models.saa import SAACall
    from dynamicid.models.saa_flux import flux_saa_processors, install_flux_saa

    torch.set_num_threads(2)
    torch.manual_seed(0)
    if case["model"] == "tiny-random-flux":
        from dynamicid.testing import build_tiny_random_flux

        transformer = build_tiny_random_flux(with_image_encoder=False).denoiser
    else:
        transformer = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True).eval()
    install_flux_saa(transformer, rank=case["rank"])
    config, side, text = transformer.config, case["side"], case["text_tokens"]
    inputs = {
        "hidden_states": torch.randn(1, side * side, config.in_channels),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "txt_ids": torch.zeros(text, 3),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32),
        "joint_attention_kwargs": {
            "saa": SAACall(num_ids=2, boxes=BOXES, boost=2.0, image_size=(side * 16, side * 16)),
            "id_tokens": torch.randn(1, 8, transformer.inner_dim),
        },
        "return_dict": False,
    }
    training = case["step"] == "training"
    trainable = []
    transformer.requires_grad_(False)
    if training:
        for processor in flux_saa_processors(transformer).values():
            processor.requires_grad_(True)
            trainable += list(processor.parameters())
        transformer.train()
        transformer.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    weights = sum(t.numel() * t.element_size() for t in [*transformer.parameters(), *transformer.buffers()])
    with torch.no_grad():  # warm-up: the kernels' and thread pools' one-time allocations are not the step's
        transformer(**inputs)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak) to the current resident memory
    before = _status_kb("VmRSS") * 1024
    if training:
        prediction = transformer(**inputs)[0]
        torch.nn.functional.mse_loss(prediction, torch.randn_like(prediction)).backward()
        optimizer.step()
    else:
        with torch.no_grad():
            transformer(**inputs)
    peak = _status_kb("VmHWM") * 1024
    blocks = config.num_layers + config.num_single_layers
    predicted = activation_bytes(
        side * side, training, width=transformer.inner_dim, text_tokens=text, blocks=blocks, bytes_per_value=4
    )
    if training:
        predicted += 12 * sum(p.numel() for p in trainable)  # gradient + two AdamW moments, fp32
    return {"weights": weights, "predicted": predicted, "measured": peak - before, "tokens": side * side + text}


def main() -> None:
    args = parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    cases = [
        {"model": "tiny-random-flux", "side": 4, "text_tokens": 32, "rank": 4},  # 64x64 pixels
        {"model": "Flux-shaped, 1 double + 1 single", "side": args.size // 16, "text_tokens": 512, "rank": args.rank},
    ]
    print(
        f"{'model':34} {'step':9} {'tokens':>6} {'weights MB':>10} {'predicted MB':>12} {'measured MB':>11} "
        f"{'measured/predicted':>18}"
    )
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    for case in cases:
        for step in ("inference", "training"):
            spec = json.dumps(case | {"step": step})
            run = subprocess.run(
                [sys.executable, __file__, "--case", spec], capture_output=True, text=True, env=env, check=True
            )
            result = json.loads(run.stdout.strip().splitlines()[-1])
            print(
                f"{case['model']:34} {step:9} {result['tokens']:>6} {result['weights'] / MB:>10.1f} "
                f"{result['predicted'] / MB:>12.1f} {result['measured'] / MB:>11.1f} "
                f"{result['measured'] / result['predicted']:>18.2f}"
            )


if __name__ == "__main__":
    main()
