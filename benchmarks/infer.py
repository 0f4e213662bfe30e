"""Per-step time of DynamicIDPipeline vs the plain StableDiffusionPipeline on the same base (two people).

Bases (random weights, FAKE, nothing downloaded):
- tiny: the tiny-random base of dynamicid.models.base;
- sd15: a UNet with Stable Diffusion 1.5's configuration (860M parameters) with a small 768-wide text encoder
  and the tiny VAE / image encoder (only the UNet matters for the per-step time).
Both at 32x32 latents (256x256 pixels), classifier-free guidance on (batch 2 per UNet call), DDIM.
A step is timed between consecutive `callback_on_step_end` calls, so reference analysis, token encoding and
decoding are excluded; the median over the steps after the first is reported. Times are process CPU seconds
with one torch thread: on a shared machine, wall time mostly measures the neighbours.

    .venv/bin/python benchmarks/infer.py [--bases tiny,sd15] [--steps 6] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from dynamicid.faces import FaceAnalyzer
from dynamicid.infer import DynamicIDPipeline, Person
from dynamicid.infer.references import ReferenceAnalyzer
from dynamicid.models.checkpoints import SD15_UNET_CONFIG
from dynamicid.testing import build_tiny_random, random_parts, save_random_weights

FACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces" / "identities"
PEOPLE = [
    Person(FACES / "obama" / "obama.jpg", expression="happy", box=(0.1, 0.05, 0.9, 0.45)),
    Person(FACES / "biden" / "biden.jpg", expression="surprised", box=(0.1, 0.55, 0.9, 0.95)),
]
SIZE = 256  # 32x32 latents
PROMPT = "two friends laughing in a cafe"


def build_base(name: str):
    base = build_tiny_random(seed=0)
    if name == "sd15":
        torch.manual_seed(0)
        base.unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval().requires_grad_(False)
        base.text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(base.tokenizer),
                hidden_size=768,
                intermediate_size=1024,
                num_attention_heads=12,
                num_hidden_layers=2,
                max_position_embeddings=77,
                bos_token_id=base.tokenizer.bos_token_id,
                eos_token_id=base.tokenizer.eos_token_id,
                pad_token_id=base.tokenizer.pad_token_id,
                projection_dim=768,
            )
        ).eval()
    return base


def step_times(pipe, call) -> list[float]:
    stamps: list[float] = []

    def callback(pipeline, step, timestep, tensors):
        stamps.append(time.process_time())
        return {}

    call(pipe, callback)
    return [b - a for a, b in itertools.pairwise(stamps)]


def run(base_name: str, steps: int, repeats: int, analyzer: ReferenceAnalyzer, workdir: Path) -> dict[str, float]:
    base = build_base(base_name)
    scheduler = DDIMScheduler.from_config(base.noise_scheduler.config)
    plain_unet = copy.deepcopy(base.unet)  # keeps diffusers' own attention processors
    plain = StableDiffusionPipeline(
        base.vae, base.text_encoder, base.tokenizer, plain_unet, scheduler, None, None, requires_safety_checker=False
    )
    plain.set_progress_bar_config(disable=True)

    # SAA installed on the base's UNet with random DynamicID weights (LoRA rank 128 on SD 1.5's shape).
    rank = 128 if base_name == "sd15" else 4
    parts = random_parts(base, analyzer, lora_rank=rank)
    weights = save_random_weights(parts, workdir / f"{base_name}.safetensors")
    pipe = DynamicIDPipeline.from_base(base)
    pipe.load_dynamicid(weights, face_analyzer=analyzer)
    pipe.set_progress_bar_config(disable=True)

    common = {"height": SIZE, "width": SIZE, "num_inference_steps": steps, "output_type": "latent"}
    plain_steps: list[float] = []
    ours_steps: list[float] = []
    for _ in range(repeats):  # interleaved, so load changes on a shared machine hit both alike
        plain_steps += step_times(
            plain,
            lambda p, cb: p(
                PROMPT,
                guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0),
                callback_on_step_end=cb,
                **common,
            ),
        )
        ours_steps += step_times(
            pipe,
            lambda p, cb: p(
                PROMPT, PEOPLE, generator=torch.Generator().manual_seed(0), callback_on_step_end=cb, **common
            ),
        )
    plain_s, ours_s = statistics.median(plain_steps), statistics.median(ours_steps)
    return {"plain_s": plain_s, "dynamicid_s": ours_s, "ratio": ours_s / plain_s, "lora_rank": rank}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", default="tiny,sd15", help="comma-separated: tiny, sd15")
    parser.add_argument("--steps", type=int, default=6, help="denoising steps per run (the first is not counted)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each pipeline")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    analyzer = ReferenceAnalyzer(FaceAnalyzer("embedded"))
    print(f"torch threads: {torch.get_num_threads()}, 2 people, {SIZE}x{SIZE} ({SIZE // 8}x{SIZE // 8} latents), CFG")
    print(f"{'base':6} {'lora':>5} {'plain CPU s/step':>17} {'DynamicID CPU s/step':>21} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as workdir, torch.no_grad():
        for name in args.bases.split(","):
            result = run(name, args.steps, args.repeats, analyzer, Path(workdir))
            print(
                f"{name:6} {result['lora_rank']:>5} {result['plain_s']:>17.4f} {result['dynamicid_s']:>21.4f} "
                f"{result['ratio']:>6.2f}"
            )


if __name__ == "__main__":
    main()
