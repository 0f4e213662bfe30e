"""Run configurations of the two training stages: one dataclass each, defaults from METHOD.md ("Training").

A run's values come from, in order of precedence: command-line flags, a YAML file (`--config run.yaml`, keys
are the field names), then these defaults. The resolved configuration is written to `RUN/config.yaml`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dynamicid.models.families import tiny_names
from dynamicid.models.layerwise import WEIGHTS_DTYPES

MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


def knob(default: Any, help: str, minimum: float | None = None) -> Any:
    """A config field with its help text and lowest valid value (the CLI builds one checked flag per field)."""
    return field(default=default, metadata={"help": help, "minimum": minimum})


def flag(name: str) -> str:
    """The command-line flag of a config field."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Settings both stages share (the diffusers training-example knobs)."""

    base_model: str = knob(
        "", f"base model folder (diffusers layout), or {' / '.join(tiny_names())} (CPU smoke-run FAKEs)"
    )
    image_encoder: str | None = knob(None, "CLIP vision model folder (ViT-H/14); default <base-model>/image_encoder")
    dataset: str = knob("", "curated dataset folder (dynamicid-curate output), read with datasets.load_dataset")
    output_dir: str = knob("", "run folder: config.yaml, checkpoints/, weights.safetensors, logs/")
    seed: int = knob(0, "seed of the model initialisation, data order, noise and timesteps")
    resolution: int = knob(512, "training resolution in pixels (the 512 crops are resized to it)", 8)
    train_batch_size: int = knob(8, "samples per device per step", 1)
    max_steps: int = knob(20000, "optimizer steps to train for", 1)
    learning_rate: float = knob(1e-4, "AdamW learning rate", 0)
    adam_beta1: float = knob(0.9, "AdamW beta1")
    adam_beta2: float = knob(0.999, "AdamW beta2")
    adam_weight_decay: float = knob(1e-2, "AdamW weight decay", 0)
    adam_epsilon: float = knob(1e-8, "AdamW epsilon", 0)
    max_grad_norm: float = knob(1.0, "gradient clipping norm (0 = off)", 0)
    lr_scheduler: str = knob("constant", f"learning-rate schedule: {', '.join(LR_SCHEDULERS)}")
    lr_warmup_steps: int = knob(0, "warm-up steps of the schedule", 0)
    gradient_accumulation_steps: int = knob(1, "batches accumulated per optimizer step", 1)
    gradient_checkpointing: bool = knob(False, "recompute UNet activations in the backward pass (less memory)")
    mixed_precision: str = knob("no", f"{', '.join(MIXED_PRECISION)}; frozen parts run in it, trained ones stay fp32")
    checkpointing_steps: int = knob(500, "save a resumable checkpoint (and its weights) every N steps", 1)
    checkpoints_total_limit: int = knob(3, "keep only the last K checkpoints (0 keeps all)", 0)
    resume: str | None = knob(None, "resume from 'latest' (in output_dir/checkpoints) or a checkpoint folder")
    overwrite: bool = knob(False, "replace the run already in output_dir (without it, or --resume, it is refused)")
    progress: bool = knob(True, "progress bar on stderr (step, loss, lr, it/s, ETA); off: a line per checkpoint")
    report_to: str = knob("tensorboard", "accelerate tracker ('tensorboard', 'none'); metrics.jsonl is always written")
    eval_samples: int = knob(8, "size of the fixed evaluation set (fixed rows, noise and timesteps)", 1)
    eval_steps: int = knob(
        0, "evaluate the fixed set (and --eval-manifest) every N steps (0 = at the start and end only)", 0
    )
    eval_manifest: str | None = knob(
        None, "benchmark manifest (dynamicid-eval manifest) generated and scored at each evaluation; RUN/eval/step-<N>/"
    )
    validation_steps: int = knob(0, "write sample images every N steps (0 = off)", 0)
    num_validation_images: int = knob(2, "references (first rows of the dataset) used for sample images", 1)
    validation_inference_steps: int = knob(25, "DDIM steps of the sample images", 1)
    validation_guidance_scale: float = knob(5.0, "classifier-free guidance of the sample images")
    dataloader_num_workers: int = knob(0, "data-loading worker processes per device", 0)
    record_samples: bool = knob(False, "write the dataset rows each process sees to logs/samples-rank<i>.txt")
    base_dtype: str | None = knob(
        None,
        f"{', '.join(WEIGHTS_DTYPES)}: the frozen denoiser's weights stored in it (diffusers layerwise casting), "
        "computed in the mixed-precision dtype; trained parameters stay float32 (BENCHMARKS.md: its loss change)",
    )
    prompt_cache: str | None = knob(
        None, "prompt embeddings from `dynamicid-train cache-prompts`: the text encoders are then not loaded"
    )


@dataclass
class AnchorConfig(TrainConfig):
    """Anchoring: SAA + face encoder on single-person images, the base objective's MSE; all else frozen."""

    lora_rank: int = knob(128, "LoRA rank of the SAA processors", 1)
    num_tokens: int = knob(4, "face tokens per person", 1)
    drop_text: float = knob(0.05, "fraction of samples trained without text", 0)
    drop_id: float = knob(0.05, "fraction of samples trained without the ID (zero embedding, zero CLIP image)", 0)
    drop_both: float = knob(0.05, "fraction of samples trained without either", 0)
    init_from: str | None = knob(
        None,
        "start from weights: ours (.safetensors), the release's SAA .bin, IP-Adapter FaceID-PlusV2, or (Flux) XLabs' "
        "Flux IP-Adapter (.safetensors)",
    )


@dataclass
class ReconfigureConfig(TrainConfig):
    """Reconfiguration: IMR + keypoint encoder, loss DFM + LDC; UNet, SAA and face encoder frozen."""

    train_batch_size: int = knob(1, "identities per device per step (each: one source and K targets)")
    anchor: str = knob("", "the anchoring run's weights.safetensors (SAA + face encoder)")
    tokens: str = knob("", "face-token cache folder written by `dynamicid-train cache-tokens`")
    targets_per_identity: int = knob(32, "K: target images per identity and step (drawn with replacement if fewer)", 1)
    dfm_weight: float = knob(1.0, "weight of the token loss (DFM)", 0)
    ldc_weight: float = knob(1.0, "weight of the latent consistency loss (LDC)", 0)
    imr_dim: int = knob(1024, "IMR inner width", 1)
    imr_depth: int = knob(1, "IMR layers per half", 1)
    imr_heads: int = knob(16, "IMR attention heads", 1)
    imr_dim_head: int = knob(64, "IMR attention head width", 1)
    keypoint_width: int = knob(16, "keypoint encoder's first-block channels (doubled per block up to 32x)", 1)


ConfigT = TypeVar("ConfigT", bound=TrainConfig)

# With the tiny-random FAKE base, settings not given default to sizes that fit it (smoke files of a few MB,
# steps in a fraction of a second) instead of SD 1.5's; the names are models.families.tiny_names().
SMOKE_DEFAULTS = {
    "resolution": 64,
    "lora_rank": 4,
    "imr_dim": 64,
    "imr_heads": 2,
    "imr_dim_head": 32,
    "keypoint_width": 2,
}


def resolve_config(
    cls: type[ConfigT],
    yaml_path: str | Path | None,
    overrides: dict[str, Any],
    announce: Callable[[str], None] | None = None,
) -> ConfigT:
    """Defaults <- YAML file <- overrides (entries that are None are not given); `announce` hears smoke defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: file not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: expected a mapping of field: value, got {type(loaded).__name__}")
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise ValueError(f"--config {path}: unknown field(s) {unknown}; valid: {', '.join(sorted(names))}")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("base_model") in tiny_names():
        smoke = {k: v for k, v in SMOKE_DEFAULTS.items() if k in names and k not in values}
        if smoke and announce is not None:
            announce(
                f"{values['base_model']} base: {' '.join(f'{flag(k)} {v}' for k, v in smoke.items())} (give them to override)"
            )
        values = {**smoke, **values}
    config = cls(**values)
    check_config(config)
    return config


def check_config(config: TrainConfig) -> None:
    """Refuse impossible settings before anything loads; each message names the flag."""
    required = ["base_model", "dataset", "output_dir"]
    if isinstance(config, ReconfigureConfig):
        required += ["anchor", "tokens"]
    missing = [name for name in required if not getattr(config, name)]
    if missing:
        raise ValueError(f"missing required setting(s): {', '.join(flag(m) for m in missing)}")
    for f in dataclasses.fields(config):
        minimum, value = f.metadata["minimum"], getattr(config, f.name)
        if minimum is not None and value < minimum:
            raise ValueError(f"{flag(f.name)} must be >= {minimum}, got {value}")
    if config.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"--mixed-precision {config.mixed_precision!r}; valid: {', '.join(MIXED_PRECISION)}")
    if config.base_dtype is not None and config.base_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"--base-dtype {config.base_dtype!r}; valid: {', '.join(WEIGHTS_DTYPES)}")
    if config.lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"--lr-scheduler {config.lr_scheduler!r}; valid: {', '.join(LR_SCHEDULERS)}")
    if config.resolution % 8:
        raise ValueError(f"--resolution must be a multiple of 8, got {config.resolution}")
    if config.resume is not None and config.overwrite:
        raise ValueError("--resume continues the run in --output-dir and --overwrite replaces it: give one of them")
    if config.eval_manifest is not None and not Path(config.eval_manifest).is_file():
        raise ValueError(f"--eval-manifest {config.eval_manifest}: file not found")
    if config.prompt_cache is not None and (config.validation_steps or config.eval_manifest):
        # the pipeline encodes its own prompts (and CFG's negative one): it needs the text encoders
        raise ValueError(
            "--validation-steps and --eval-manifest generate images, which needs the text encoders that "
            "--prompt-cache leaves unloaded: set --validation-steps 0 and no --eval-manifest, or drop --prompt-cache"
        )
    if isinstance(config, AnchorConfig):
        drops = (config.drop_text, config.drop_id, config.drop_both)
        if sum(drops) > 1:
            raise ValueError(f"--drop-text, --drop-id, --drop-both = {drops}: together <= 1")


def write_config(config: TrainConfig, path: str | Path) -> Path:
    """The resolved configuration as YAML (loadable again with --config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    return path
