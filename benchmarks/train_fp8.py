"""Training with the frozen denoiser stored in float8 (`--base-dtype float8`) against the plain float32 base:
the loss of the same run (same seed, data order, noise, timesteps, drops) of each stage on each tiny base family.

    python benchmarks/train_fp8.py [--dataset CURATED_DIR] [--steps 10] [--mixed-precision no|bf16]

Without --dataset, a small dataset is curated first from ../shared/data/faces (benchmarks/train.py's sample).
Per family: anchoring (SAA + face encoder, batch 2, 64 px, lr 1e-3, the paper's drops) plain and float8; then
reconfiguration (IMR + keypoint encoder, 1 identity x 4 targets per step, loss DFM + LDC) from the plain
anchoring run's weights and face tokens, plain and float8; --steps steps each. Figures:
the per-step training loss (mean and largest |fp8 - plain| / plain over the steps) and the fixed evaluation set's
loss (fixed rows, noise and timesteps, no drops) before training (the float8 rounding alone) and after it
(rounding plus the different path the weights took). The compute dtype is --mixed-precision's (float32 for
"no"; both runs of a row use it, so the row isolates the float8 storage); the convolutions of the UNet
families keep the compute dtype when training (models/layerwise.py says why), so on SD 1.5 / SDXL only the linear
layers (attention, feed-forward, time embedding) are rounded, on Flux every transformer projection is.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from train import curate_sample  # benchmarks/train.py (a script's folder is on sys.path)

FAMILIES = ("tiny-random", "tiny-random-sdxl", "tiny-random-flux")


COMMON = {"resolution": 64, "report_to": "none", "progress": False, "eval_samples": 4, "learning_rate": 1e-3}


def stage_losses(stage: str, out: Path, **settings) -> dict:
    """Train one stage into `out`; its per-step losses and fixed-set losses (before, after)."""
    from dynamicid.train.anchor import train_anchor
    from dynamicid.train.config import AnchorConfig, ReconfigureConfig
    from dynamicid.train.reconfigure import train_reconfigure
    from dynamicid.train.runner import read_metrics

    if stage == "anchor":
        train_anchor(AnchorConfig(**COMMON, **settings, output_dir=str(out), lora_rank=4, train_batch_size=2))
    else:
        small = {"targets_per_identity": 4, "imr_dim": 32, "imr_heads": 2, "imr_dim_head": 16, "keypoint_width": 2}
        train_reconfigure(ReconfigureConfig(**COMMON, **settings, **small, output_dir=str(out)))
    rows = read_metrics(out)
    return {
        "loss": [row["loss"] for row in rows if "loss" in row],
        "eval": [row["eval_loss"] for row in rows if "eval_loss" in row],
    }


def row(family: str, stage: str, plain: dict, fp8: dict) -> str:
    rel = [abs(b - a) / a for a, b in zip(plain["loss"], fp8["loss"], strict=True)]
    before = f"{plain['eval'][0]:.4f}, {fp8['eval'][0]:.4f}"
    after = f"{plain['eval'][-1]:.4f}, {fp8['eval'][-1]:.4f}"
    return f"| {family} | {stage} | {sum(rel) / len(rel):.2%} / {max(rel):.2%} | {before} | {after} |"


def main() -> None:
    from dynamicid.train.cache_tokens import cache_tokens

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, help="curated dataset folder (default: curate a small sample)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16"), help="compute dtype of both runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    COMMON.update(max_steps=args.steps, mixed_precision=args.mixed_precision)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or curate_sample(Path(tmp))
        print(f"--mixed-precision {args.mixed_precision}, {args.steps} steps per run")
        print("| family | stage | training loss: mean / max rel. diff | fixed-set loss before (plain, fp8) | after |")
        print("|---|---|---|---|---|")
        for family in FAMILIES:
            base = {"base_model": family, "dataset": str(dataset)}
            runs = {
                f"{stage}-{kind}": Path(tmp) / family / f"{stage}-{kind}"
                for stage in ("a", "r")
                for kind in ("plain", "fp8")
            }
            plain = stage_losses("anchor", runs["a-plain"], **base)
            fp8 = stage_losses("anchor", runs["a-fp8"], **base, base_dtype="float8")
            print(row(family, "anchoring", plain, fp8))
            # reconfiguration from the plain anchoring run's weights and tokens, plain base against float8 base
            anchor = runs["a-plain"] / "weights.safetensors"
            tokens = cache_tokens(anchor, dataset, Path(tmp) / family / "tokens", base_model=family).parent
            stage = {**base, "anchor": str(anchor), "tokens": str(tokens)}
            plain = stage_losses("reconfigure", runs["r-plain"], **stage)
            fp8 = stage_losses("reconfigure", runs["r-fp8"], **stage, base_dtype="float8")
            print(row(family, "reconfiguration", plain, fp8))


if __name__ == "__main__":
    main()
