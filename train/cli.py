"""Command line: dynamicid-train (also `python -m dynamicid.train`, e.g. under `accelerate launch`).

Every field of a stage's config dataclass is a flag (`--learning-rate`, `--gradient-checkpointing/--no-...`);
flags override `--config run.yaml`, which overrides the defaults.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path

import click

from dynamicid.clitools import AtLeast, InputError, ToolGroup
from dynamicid.train.config import (
    MIXED_PRECISION,
    AnchorConfig,
    ReconfigureConfig,
    TrainConfig,
    flag,
    resolve_config,
)

ANCHOR_EPILOG = """\b
Examples:
  dynamicid-train anchor --base-model sd15/ --image-encoder ip-adapter/models/image_encoder \\
      --dataset curated/ --output-dir runs/anchor
  dynamicid-train anchor --config run.yaml --resume latest
  accelerate launch --num_processes 8 -m dynamicid.train anchor --config run.yaml --mixed-precision bf16
  dynamicid-train anchor --base-model tiny-random --dataset curated/ --output-dir /tmp/smoke \\
      --max-steps 20      # CPU smoke run on a tiny random FAKE model, sized for it (64 px, LoRA rank 4)
"""

RECONFIGURE_EPILOG = """\b
Examples:
  dynamicid-train cache-tokens --base-model sd15/ --image-encoder enc/ --anchor runs/anchor/weights.safetensors \\
      --dataset curated/ --output runs/tokens
  dynamicid-train reconfigure --base-model sd15/ --image-encoder enc/ --anchor runs/anchor/weights.safetensors \\
      --tokens runs/tokens --dataset curated/ --output-dir runs/reconfigure
"""


PROMPTS_EPILOG = """\b
Examples (then train with --prompt-cache runs/prompts: the text encoders are not loaded):
  dynamicid-train cache-prompts --base-model flux-dev/ --dataset curated/ --output runs/prompts --mixed-precision bf16
  dynamicid-train anchor --base-model flux-dev/ --dataset curated/ --prompt-cache runs/prompts --mixed-precision bf16 ...
"""


def _click_type(annotation: typing.Any) -> type:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def config_options(cls: type[TrainConfig]):
    """One option per config field (default None = 'not given', so YAML values survive), plus --config."""
    hints = typing.get_type_hints(cls)

    def decorate(command):
        for f in reversed(dataclasses.fields(cls)):
            name, kind, minimum = flag(f.name), _click_type(hints[f.name]), f.metadata["minimum"]
            help_text = f.metadata["help"] + {"": " [required]", None: ""}.get(f.default, f" [default: {f.default}]")
            if kind is bool:
                option = click.option(f"{name}/--no-{name[2:]}", f.name, default=None, help=help_text)
            else:
                kind = kind if minimum is None else AtLeast(minimum, kind)
                option = click.option(name, f.name, type=kind, default=None, help=help_text)
            command = option(command)
        return click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            help="YAML file of settings (keys: the option names with underscores); flags override it",
        )(command)

    return decorate


def _resolve(cls: type[TrainConfig], config_file: str | None, values: dict) -> TrainConfig:
    try:
        return resolve_config(cls, config_file, values, announce=lambda line: click.echo(line, err=True))
    except (ValueError, FileNotFoundError) as error:
        raise InputError(str(error)) from None


RESUME = "rerun with --resume latest to continue from the last checkpoint (see --checkpointing-steps)"


@click.group(cls=ToolGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(package_name="dynamicid", prog_name="dynamicid-train")
def main() -> None:
    """Train the DynamicID anchoring and reconfiguration stages."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its torchvision notices are not the user's concern


@main.command(epilog=ANCHOR_EPILOG, interrupted=RESUME)
@config_options(AnchorConfig)
def anchor(config_file: str | None, **values) -> None:
    """Anchoring: train SAA + the face encoder on the curated dataset."""
    from dynamicid.train.anchor import train_anchor

    out = train_anchor(_resolve(AnchorConfig, config_file, values))
    click.echo(f"weights: {out}")


@main.command("cache-tokens", epilog=RECONFIGURE_EPILOG, interrupted="nothing was written; rerun the command")
@click.option("--anchor", "anchor_weights", required=True, type=click.Path(dir_okay=False), help="anchoring weights")
@click.option("--dataset", required=True, type=click.Path(), help="curated dataset folder")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="token cache folder to write")
@click.option(
    "--base-model", required=True, help="SD 1.5/SDXL folder or 'tiny-random(-sdxl)' (the CLIP encoder's companion)"
)
@click.option("--image-encoder", default=None, help="CLIP vision model folder; default <base-model>/image_encoder")
@click.option("--batch-size", default=16, show_default=True, type=AtLeast(1), help="rows per forward pass")
@click.option("--progress/--no-progress", default=True, show_default=True, help="progress bar on stderr")
def cache_tokens_command(anchor_weights, dataset, output, base_model, image_encoder, batch_size, progress) -> None:
    """Face tokens of every dataset row from the frozen anchoring face encoder (reconfiguration input)."""
    from dynamicid.train.cache_tokens import cache_tokens

    out = cache_tokens(
        anchor_weights,
        dataset,
        output,
        base_model=base_model,
        image_encoder=image_encoder,
        batch_size=batch_size,
        progress=progress,
    )
    click.echo(f"tokens: {out}")


@main.command("cache-prompts", epilog=PROMPTS_EPILOG, interrupted="the cache is incomplete; rerun the command")
@click.option("--dataset", required=True, type=click.Path(), help="curated dataset folder")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="prompt cache folder to write")
@click.option("--base-model", required=True, help="base model folder or a tiny-random FAKE name (its text encoders)")
@click.option("--seed", default=0, show_default=True, type=int, help="the run's --seed (a tiny-random FAKE's weights)")
@click.option(
    "--mixed-precision",
    default="no",
    show_default=True,
    type=click.Choice(MIXED_PRECISION),
    help="the run's --mixed-precision: the encoders run and the embeddings are stored in it",
)
@click.option("--batch-size", default=16, show_default=True, type=AtLeast(1), help="prompts per forward pass")
@click.option("--shard-size", default=256, show_default=True, type=AtLeast(1), help="prompts per safetensors file")
@click.option("--progress/--no-progress", default=True, show_default=True, help="progress bar on stderr")
def cache_prompts_command(dataset, output, base_model, seed, mixed_precision, batch_size, shard_size, progress) -> None:
    """Text embeddings of every prompt training uses, so both stages train without the text encoders."""
    from dynamicid.train.cache_prompts import cache_prompts

    out = cache_prompts(
        dataset,
        output,
        base_model=base_model,
        seed=seed,
        mixed_precision=mixed_precision,
        batch_size=batch_size,
        shard_size=shard_size,
        progress=progress,
    )
    click.echo(f"prompts: {out}")


@main.command(epilog=RECONFIGURE_EPILOG, interrupted=RESUME)
@config_options(ReconfigureConfig)
def reconfigure(config_file: str | None, **values) -> None:
    """Reconfiguration: train IMR + the keypoint encoder from an anchoring run and its token cache."""
    from dynamicid.train.reconfigure import train_reconfigure

    out = train_reconfigure(_resolve(ReconfigureConfig, config_file, values))
    click.echo(f"weights: {out}")


@main.command("convert-release")
@click.option("--saa", "saa_bin", required=True, type=click.Path(dir_okay=False), help="the release's SAA .bin")
@click.option("--imr", "imr_bin", type=click.Path(dir_okay=False), help="the release's IMR .bin")
@click.option("--keypoint-encoder", "keypoint_bin", type=click.Path(dir_okay=False), help="key_point_encoder .bin")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="safetensors file to write")
@click.option("--num-tokens", default=4, show_default=True, type=AtLeast(1), help="face tokens per person")
def convert_release_command(saa_bin, imr_bin, keypoint_bin, out, num_tokens) -> None:
    """Rewrite the authors' released .bin files as one of this project's safetensors weights files."""
    from dynamicid.models import convert_release

    path = convert_release(saa_bin, imr_bin, keypoint_bin, out=Path(out), num_tokens=num_tokens)
    click.echo(f"weights: {path}")
