"""Training with the frozen denoiser stored in float8 (`--base-dtype float8`) against the plain float32 base:
the anchoring loss of the same run (same seed, data order, noise, timesteps, drops) on each tiny base family.

    python benchmarks/train_fp8.py [--dataset CURATED_DIR] [--steps 10] [--mixed-precision no|bf16]

Without --dataset, a small dataset is curated first from ../shared/data/faces (benchmarks/train.py's sample).
Both runs train SAA + face encoder for --steps steps (batch 2, 64 px, lr 1e-3, the paper's drops); figures:
the per-step training loss (mean and largest |fp8 - plain| / plain over the steps) and the fixed evaluation set's
loss (fixed rows, noise and timesteps, no drops) before training (the float8 rounding alone) and after it
(rounding plus the different path the weights took). The compute dtype is --mixed-precision's (float32 for
"no"; both runs of a row use it, so the row isolates the float8 storage); the convolutions of the UNet
families keep float32 storage when training (models/layerwise.py says why), so on SD 1.5 / SDXL only the linear
layers (attention, feed-forward, time embedding) are rounded, on Flux every transformer projection is.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from train import curate_sample  # benchmarks/train.py (a script's folder is on sys.path)

FAMILIES = ("tiny-random", "tiny-random-sdxl", "tiny-random-flux")


def anchoring_losses(family: str, dataset: Path, out: Path, steps: int, precision: str, base_dtype: str | None) -> dict:
    from dynamicid.train.anchor import train_anchor
    from dynamicid.train.config import AnchorConfig
    from dynamicid.train.runner import read_metrics

    config = AnchorConfig(
        base_model=family,
        dataset=str(dataset),
        output_dir=str(out),
        resolution=64,
        lora_rank=4,
        train_batch_size=2,
        eval_samples=4,
        max_steps=steps,
        learning_rate=1e-3,
        report_to="none",
        progress=False,
        mixed_precision=precision,
        base_dtype=base_dtype,
    )
    train_anchor(config)
    rows = read_metrics(out)
    return {
        "loss": [row["loss"] for row in rows if "loss" in row],
        "eval": [row["eval_loss"] for row in rows if "eval_loss" in row],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, help="curated dataset folder (default: curate a small sample)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16"), help="compute dtype of both runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or curate_sample(Path(tmp))
        print(f"--mixed-precision {args.mixed_precision}")
        print(
            "| family | steps | training loss: mean / max rel. diff | fixed-set loss before (plain, fp8) | after (plain, fp8) |"
        )
        print("|---|---|---|---|---|")
        for family in FAMILIES:
            runs = {label: Path(tmp) / f"{family}-{label}" for label in ("plain", "fp8")}
            plain = anchoring_losses(family, dataset, runs["plain"], args.steps, args.mixed_precision, None)
            fp8 = anchoring_losses(family, dataset, runs["fp8"], args.steps, args.mixed_precision, "float8")
            rel = [abs(b - a) / a for a, b in zip(plain["loss"], fp8["loss"], strict=True)]
            before = f"{plain['eval'][0]:.4f}, {fp8['eval'][0]:.4f}"
            after = f"{plain['eval'][-1]:.4f}, {fp8['eval'][-1]:.4f}"
            print(f"| {family} | {args.steps} | {sum(rel) / len(rel):.2%} / {max(rel):.2%} | {before} | {after} |")


if __name__ == "__main__":
    main()
