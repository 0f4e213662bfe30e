"""Command line: dynamicid-app, the browser app (Gradio) over the inference pipeline and a curated dataset."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import click

from dynamicid.clitools import INPUT_ERRORS, InputError, flags_for_arguments
from dynamicid.infer.cli import model_options

EPILOG = """\b
Examples:
  dynamicid-app --base-model models/sd15 --weights dynamicid.safetensors --image-encoder models/image_encoder
  dynamicid-app --base-model models/sd15 --saa SAA.bin --imr IMR.bin --keypoint-encoder KPE.bin \\
      --image-encoder models/image_encoder --dataset curated/ --port 7860
  dynamicid-app --base-model tiny-random --weights fake.safetensors   # CPU smoke run: the images are noise
"""


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dynamicid", prog_name="dynamicid-app")
@model_options
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... (auto: cuda if present).")
@click.option("--fp16", is_flag=True, help="Run the models in float16 (GPU).")
@click.option(
    "--dataset",
    type=click.Path(path_type=Path, file_okay=False),
    help="A dynamicid-curate output folder to browse in the Dataset tab.",
)
@click.option(
    "--output-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where each request's image, maps and sidecar are written (default: a new temporary folder).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=int, default=7860, show_default=True, help="Port to listen on.")
@click.option("--share/--no-share", default=False, show_default=True, help="Also open a public Gradio share link.")
def main(**options: Any) -> None:
    """Open the DynamicID app in the browser: put 1-4 people in a picture, each with an expression and a box."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine unless --share
    try:
        demo, output_dir = build(options)
    except INPUT_ERRORS as error:  # the shared convention (dynamicid.clitools): one `error:` line, exit code 2
        raise InputError(flags_for_arguments(str(error), click.get_current_context().command)) from error
    click.echo(f"outputs go to {output_dir}")
    from dynamicid.app.ui import launch

    launch(demo, options["host"], options["port"], options["share"], output_dir)


def build(options: dict[str, Any]) -> tuple[Any, Path]:
    """Check the flags, load the models once, and lay the app out."""
    from dynamicid.infer.cli import _load_pipeline, _weights

    weights = _weights(options)  # flag errors come before anything heavy is imported
    import torch

    from dynamicid.app.dataset_tab import DatasetBrowser
    from dynamicid.app.ui import build_app

    dataset = DatasetBrowser.open(options["dataset"]) if options["dataset"] is not None else None
    output_dir = options["output_dir"] or Path(tempfile.mkdtemp(prefix="dynamicid-app-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    model_keys = ("base_model", "weights", "saa", "imr", "keypoint_encoder", "image_encoder", "face_backend")
    load_options = {k: options[k] for k in (*model_keys, "insightface_root", "device", "fp16")}
    pipe = _load_pipeline(load_options, weights, torch)
    return build_app(pipe, load_options, output_dir, dataset), output_dir
