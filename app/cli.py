"""Command line: dynamicid-app, the browser app (Gradio) over the inference pipeline and a curated dataset."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import click

from dynamicid.clitools import INPUT_ERRORS, AtLeast, InputError, flags_for_arguments, sigterm_as_interrupt
from dynamicid.infer.flags import load_options, model_options

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
@click.option(
    "--max-upload-mb",
    type=AtLeast(1),
    default=64,
    show_default=True,
    help="Largest file a browser may upload (a 108 MP phone photo is about 30 MB); larger ones are refused.",
)
def main(**options: Any) -> None:
    """Open the DynamicID app in the browser: put 1-4 people in a picture, each with an expression and a box."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine unless --share
    # Uploads go to a folder of this app's own (under $GRADIO_TEMP_DIR or the system's temporary folder), removed
    # when it stops: on Ctrl-C and on SIGTERM alike. Set before Gradio is imported, which reads it then.
    parent = os.environ.get("GRADIO_TEMP_DIR")
    uploads = Path(tempfile.mkdtemp(prefix="dynamicid-app-uploads-", dir=parent))
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)
    try:
        with sigterm_as_interrupt():
            try:
                demo, output_dir = build(options)
            except INPUT_ERRORS as error:  # the shared convention (dynamicid.clitools): one `error:` line, exit 2
                raise InputError(flags_for_arguments(str(error), click.get_current_context().command)) from error
            click.echo(f"outputs go to {output_dir}")
            from dynamicid.app.ui import launch

            launch(demo, options["host"], options["port"], options["share"], output_dir, options["max_upload_mb"])
    finally:
        shutil.rmtree(uploads, ignore_errors=True)
        # A second run in this process (tests, a notebook) must not make its folder inside the removed one.
        if parent is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = parent


def build(options: dict[str, Any]) -> tuple[Any, Path]:
    """Check the flags, load the models once, and lay the app out."""
    model = load_options(options)  # flag errors come before anything heavy is imported
    from dynamicid.app.dataset_tab import DatasetBrowser
    from dynamicid.app.ui import build_app
    from dynamicid.infer.generate import load_pipeline

    dataset = DatasetBrowser.open(options["dataset"]) if options["dataset"] is not None else None
    output_dir = options["output_dir"] or Path(tempfile.mkdtemp(prefix="dynamicid-app-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    return build_app(load_pipeline(model), output_dir, dataset), output_dir
