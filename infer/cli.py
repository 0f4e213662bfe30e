"""Command line: dynamicid-infer."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from dynamicid.clitools import AtLeast, InputError, ToolGroup, progress_options, quiet_libraries
from dynamicid.infer.flags import (
    KEEP,
    load_options,
    model_options,
    parse_size,
    people_from_flags,
    request_from_flags,
    run_options,
)
from dynamicid.infer.generate import generate as run
from dynamicid.infer.generate import load_pipeline
from dynamicid.schemas import EXPRESSIONS, POSE_BINS

EPILOG = """\b
Examples:
  dynamicid-infer generate --base-model models/sd15 --weights dynamicid.safetensors \\
      --image-encoder models/image_encoder --prompt "two friends laughing in a cafe" \\
      --person ref1.jpg --expression happy --box 0.1,0.1,0.5,0.4 \\
      --person ref2.jpg --expression surprised --box 0.1,0.6,0.5,0.9 --seed 2025 --out out.png
  dynamicid-infer generate --base-model models/sd15 --saa SAA.bin --imr IMR.bin \\
      --keypoint-encoder KPE.bin --image-encoder models/image_encoder --prompt "a portrait" \\
      --person ref.jpg --expression surprised --out portrait.png --activation-maps
"""

BATCH_EPILOG = """\b
Examples:
  dynamicid-infer batch --manifest bench.jsonl --out-dir gen/ --base-model models/sd15 \\
      --weights dynamicid.safetensors --image-encoder models/image_encoder --steps 30
  A row: {"id": "r1", "prompt": "two friends in a cafe", "seed": 7, "people": [{"references": ["a.jpg"],
  "expression": "happy", "box": [0.1, 0.1, 0.5, 0.4]}, ...], "steps": 30}; see dynamicid.infer.manifest.
"""


@click.group(cls=ToolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dynamicid", prog_name="dynamicid-infer")
def main() -> None:
    """Generate images of several people with DynamicID."""


@main.command(epilog=EPILOG, interrupted="nothing was written (outputs appear only once complete)")
@model_options
@click.option("--prompt", required=True, help="What the image shows.")
@click.option(
    "--person",
    "persons",
    type=click.Path(path_type=Path),
    multiple=True,
    required=True,
    help="Reference photo of one person; repeat for each person, in order.",
)
@click.option(
    "--expression",
    "expressions",
    multiple=True,
    help=f"Target expression, once per --person in order ('{KEEP}' keeps the reference's): "
    + ", ".join(EXPRESSIONS)
    + ".",
)
@click.option(
    "--pose",
    "poses",
    multiple=True,
    help=f"Target pose, once per --person in order ('{KEEP}' keeps the reference's): "
    + ", ".join(p.name for p in POSE_BINS)
    + ".",
)
@click.option(
    "--landmark-image",
    "landmark_images",
    multiple=True,
    help=f"Photo whose face gives the target landmarks, once per --person in order ('{KEEP}': none).",
)
@click.option("--box", "boxes", multiple=True, help="y0,x0,y1,x1 in [0, 1], once per --person (none: equal strips).")
@click.option("--seed", type=int, help="Random seed (default: a random one, recorded in the sidecar).")
@run_options
@click.option("--num-images", type=AtLeast(1), default=1, show_default=True, help="Images to generate.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output image (.png, .jpg, .webp).")
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar JSON on stdout instead of a summary.")
def generate(**options: Any) -> None:
    """Generate images of the given people in one scene, each with an optional target expression."""
    from dynamicid.infer.outputs import check_output_path

    check_output_path(options["out"], "--out")
    request = request_from_flags(options, people_from_flags(options))
    quiet_libraries()
    request.check()  # unreadable photos and bad labels fail before any model loads
    model = load_options(options)
    clock = time.perf_counter()
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(**progress_options())  # a line per update when stderr is not a terminal
    load_seconds = round(time.perf_counter() - clock, 4)
    generated = run(pipe, request)
    generated.sidecar["timings"] = {"load": load_seconds, **generated.sidecar["timings"]}
    sidecar = generated.save(options["out"])
    _echo_warnings(sidecar)
    if options["as_json"]:
        click.echo(json.dumps(sidecar, indent=2))
    else:
        for path in sidecar["outputs"]["images"]:
            click.echo(f"wrote {path}")
        click.echo(f"wrote {sidecar['outputs']['sidecar']}")
        for path in sidecar["outputs"]["activation_maps"]:
            click.echo(f"wrote {path}")


@main.command(epilog=BATCH_EPILOG, interrupted="the rows written are kept; rerun the same command to continue")
@click.option("--manifest", type=click.Path(path_type=Path), required=True, help="Benchmark manifest (JSONL).")
@click.option("--out-dir", type=click.Path(path_type=Path), required=True, help="Folder for <id>.png + <id>.json.")
@click.option("--references-dir", type=click.Path(path_type=Path), help="Base of relative paths (default: manifest's).")
@model_options
@run_options
def batch(manifest: Path, out_dir: Path, references_dir: Path | None, **options: Any) -> None:
    """Generate every row of a manifest (image + sidecar per row id); rows already done are skipped."""
    from dynamicid.infer.batch import plan_batch
    from dynamicid.infer.manifest import read_manifest

    rows = read_manifest(manifest, references_dir)
    model = load_options(options)
    parse_size(options["size"])
    jobs = plan_batch(rows, out_dir, options)
    quiet_libraries()
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = None
    for job in jobs:
        if job.done:
            click.echo(f"skipped {job.out} (done with the same settings)")
            continue
        try:
            request = request_from_flags(job.options, [person.to_person() for person in job.row.people])
            request.check()
            if pipe is None:
                pipe = load_pipeline(model)
                pipe.set_progress_bar_config(disable=True)  # one "wrote" line per row instead
            generated = run(pipe, request)
            generated.sidecar |= job.sidecar_fields()
            _echo_warnings(generated.save(job.out))
        except (InputError, ValueError, OSError) as error:
            raise InputError(f"{manifest} (id {job.row.id!r}): {error}") from error
        click.echo(f"wrote {job.out}")


def _echo_warnings(sidecar: dict[str, Any]) -> None:
    for message in sidecar["warnings"]:
        click.echo(f"warning: {message}", err=True)
