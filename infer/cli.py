"""Command line: dynamicid-infer."""

from __future__ import annotations

import functools
import json
import os
import platform
import secrets
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from dynamicid.clitools import AtLeast, InputError, ToolGroup
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

KEEP = "keep"  # --expression/--pose value that keeps the reference's own label


def _options(*options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """One decorator for a group of click options shared by `generate` and `batch`."""

    def decorate(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


model_options = _options(
    click.option(
        "--base-model",
        required=True,
        help="SD 1.5 or SDXL folder (diffusers layout), or tiny-random / tiny-random-sdxl.",
    ),
    click.option(
        "--weights", type=click.Path(path_type=Path), multiple=True, help="Our DynamicID .safetensors file(s)."
    ),
    click.option("--saa", type=click.Path(path_type=Path), help="Release SAA .bin file (SAA_module + proj_module)."),
    click.option("--imr", type=click.Path(path_type=Path), help="Release IMR .bin file (with --saa)."),
    click.option(
        "--keypoint-encoder", type=click.Path(path_type=Path), help="Release keypoint-encoder .bin (with --saa)."
    ),
    click.option("--image-encoder", help="CLIP vision model folder (default: BASE/image_encoder)."),
    click.option(
        "--face-backend", type=click.Choice(["auto", "embedded", "insightface"]), default="auto", show_default=True
    ),
    click.option("--insightface-root", type=click.Path(path_type=Path), help="Local insightface model pack folder."),
)
run_options = _options(
    click.option("--negative-prompt", default="", help="What to steer away from."),
    click.option("--steps", type=AtLeast(1), default=50, show_default=True, help="Denoising steps (DDIM)."),
    click.option("--guidance-scale", type=float, default=5.0, show_default=True, help="Classifier-free guidance."),
    click.option("--id-scale", type=float, default=1.0, show_default=True, help="Weight of the identity branch."),
    click.option("--size", help="WIDTHxHEIGHT in pixels, multiples of 8 (default: the base model's native size)."),
    click.option("--activation-maps", is_flag=True, help="Also write per-person SAA activation maps over the image."),
    click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... (auto: cuda if present)."),
    click.option("--fp16", is_flag=True, help="Run the models in float16 (GPU)."),
)


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
    _quiet_libraries()
    from dynamicid.infer.people import DynamicIDWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DynamicIDWarning)
        sidecar = _generate(options, caught)
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
    _quiet_libraries()
    import torch

    from dynamicid.infer.batch import plan_batch
    from dynamicid.infer.manifest import read_manifest
    from dynamicid.infer.people import DynamicIDWarning

    rows = read_manifest(manifest, references_dir)
    weights = _weights(options)
    _parse_size(options["size"])
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan_batch(rows, out_dir, options)
    pipe = None
    for job in jobs:
        if job.done:
            click.echo(f"skipped {job.out} (done with the same settings)")
            continue
        try:
            if pipe is None:
                pipe = _load_pipeline(options, weights, torch)
                pipe.set_progress_bar_config(disable=True)  # one "wrote" line per row instead
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DynamicIDWarning)
                people = [person.to_person() for person in job.row.people]
                _generate(job.options, caught, pipe, people, job.sidecar_fields())
        except (InputError, ValueError, OSError) as error:
            raise InputError(f"{manifest} (id {job.row.id!r}): {error}") from error
        click.echo(f"wrote {job.out}")


def _quiet_libraries() -> None:
    """Keep the terminal to this tool's own lines: library info logs off (MediaPipe's C++ start-up lines remain)."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()


def _generate(
    options: dict[str, Any],
    caught: list[warnings.WarningMessage],
    pipe: Any = None,
    people: list[Any] | None = None,
    extra: dict[str, Any] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """One run of `generate`; `batch` passes its loaded pipeline, each row's people and sidecar fields;
    `dynamicid-app` its pipeline, people and `on_step(done, total)`, called after each denoising step."""
    import torch

    from dynamicid.faces import load_image
    from dynamicid.infer.outputs import IMAGE_SUFFIXES, PERSON_COLORS, Staging, output_names, overlay_activation
    from dynamicid.infer.people import check_box, check_person_labels

    # 1. Everything that can be checked without a model
    out: Path = options["out"]
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"--out {out}: the file name must end in one of {', '.join(IMAGE_SUFFIXES)}")
    if not out.parent.resolve().is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist")
    width, height = _parse_size(options["size"])
    if options["num_images"] < 1 or options["steps"] < 1:
        raise InputError("--num-images and --steps must be at least 1")
    people = _people(options) if people is None else people
    for i, person in enumerate(people):
        check_person_labels(person, i)
        if person.box is not None:
            check_box(person.box, i)
        for image in (person.image, person.landmark_image):
            if image is not None:
                load_image(image)  # unreadable photos fail here, before any model loads
    weights = _weights(options)

    # 2. Models
    clock = time.perf_counter()
    pipe = _load_pipeline(options, weights, torch) if pipe is None else pipe
    load_seconds = time.perf_counter() - clock

    # 3. Generate
    seed = options["seed"] if options["seed"] is not None else secrets.randbelow(2**31)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    result = pipe(
        options["prompt"],
        people,
        negative_prompt=options["negative_prompt"],
        height=height,
        width=width,
        num_inference_steps=options["steps"],
        guidance_scale=options["guidance_scale"],
        num_images_per_prompt=options["num_images"],
        generator=generator,
        id_scale=options["id_scale"],
        return_activation_maps=options["activation_maps"],
        callback_on_step_end=None if on_step is None else lambda _, i, t, tensors: on_step(i + 1, options["steps"]),
    )

    # 4. Write everything, or nothing
    clock = time.perf_counter()
    names = output_names(out, len(result.images), len(people), options["activation_maps"])
    staging = Staging(out.parent)
    with staging.open():
        for k, image in enumerate(result.images):
            image.save(staging.path(names["images"][k]))
            for i, path in enumerate(names["activation_maps"][k]):
                color = PERSON_COLORS[i % len(PERSON_COLORS)]
                box = result.people[i]["box"]
                overlay_activation(image, result.activation_maps[k, i], color, box).save(staging.path(path))
        sidecar = _sidecar(options, pipe, result, people, seed, (width, height), names, caught)
        sidecar["timings"] = {"load": round(load_seconds, 4), **result.timings}
        sidecar["timings"]["write"] = round(time.perf_counter() - clock, 4)
        sidecar |= extra or {}
        staging.write_json(names["sidecar"], sidecar)
    for message in sidecar["warnings"]:
        click.echo(f"warning: {message}", err=True)
    return sidecar


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    from dynamicid.infer.outputs import MAX_IMAGE_SIDE

    if size is None:
        return None, None
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise InputError(f"--size {size!r}: expected WIDTHxHEIGHT, e.g. 768x512") from None
    if not (0 < width <= MAX_IMAGE_SIDE and 0 < height <= MAX_IMAGE_SIDE) or width % 8 or height % 8:
        raise InputError(f"--size {size}: width and height must be multiples of 8 in 8..{MAX_IMAGE_SIDE}")
    return width, height


def _per_person(values: tuple[str, ...], count: int, option: str) -> list[str | None]:
    if not values:
        return [None] * count
    if len(values) != count:
        raise InputError(
            f"{len(values)} {option} for {count} --person: give one per person, in order "
            f"(or none){f', {KEEP!r} keeps a reference as it is' if option != '--box' else ''}"
        )
    return [None if v == KEEP else v for v in values]


def _people(options: dict[str, Any]) -> list[Any]:
    from dynamicid.infer.people import Person

    count = len(options["persons"])
    expressions = _per_person(options["expressions"], count, "--expression")
    poses = _per_person(options["poses"], count, "--pose")
    landmark_images = _per_person(options["landmark_images"], count, "--landmark-image")
    boxes = _per_person(options["boxes"], count, "--box") if options["boxes"] else [None] * count
    people = []
    for i, path in enumerate(options["persons"]):
        box = None
        if boxes[i] is not None:
            try:
                box = tuple(float(v) for v in boxes[i].split(","))
            except ValueError:
                raise InputError(f"--box {boxes[i]!r} (person {i + 1}): expected four numbers y0,x0,y1,x1") from None
        landmark_image = Path(landmark_images[i]) if landmark_images[i] is not None else None
        people.append(Person(path, expressions[i], poses[i], landmark_image, box))
    return people


def _weights(options: dict[str, Any]) -> Any:
    from dynamicid.infer.weights import ReleaseFiles

    release = {k: options[k] for k in ("saa", "imr", "keypoint_encoder") if options[k] is not None}
    if options["weights"] and release:
        raise InputError("give either --weights (our format) or the release files (--saa ...), not both")
    if not options["weights"] and not release:
        raise InputError(
            "no weights: give --weights FILE, or the release's --saa FILE [--imr FILE --keypoint-encoder FILE]"
        )
    if release and "saa" not in release:
        raise InputError("the release's --imr/--keypoint-encoder need its --saa file too")
    for path in [*options["weights"], *release.values()]:
        if not path.is_file():
            raise InputError(f"weights file not found: {path}")
    return ReleaseFiles(**release) if release else list(options["weights"])


def _load_pipeline(options: dict[str, Any], weights: Any, torch: Any) -> Any:
    from dynamicid.infer.pipeline import pipeline_for
    from dynamicid.models.base import load_base_model

    device = options["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if options["fp16"] else torch.float32
    base = load_base_model(options["base_model"], options["image_encoder"], torch_dtype=dtype)
    pipe = pipeline_for(base)
    pipe.load_dynamicid(
        weights, face_analyzer=_reference_analyzer(options["face_backend"], options["insightface_root"])
    )
    pipe.to(device)
    pipe.dynamicid.to(pipe.device, dtype)
    return pipe


@functools.lru_cache(maxsize=4)
def _reference_analyzer(backend: str, insightface_root: Path | None) -> Any:
    """One analyzer per backend per process (the face models load once; results are cached by picture)."""
    from dynamicid.faces import FaceAnalyzer
    from dynamicid.infer.references import ReferenceAnalyzer

    options = {"insightface_root": str(insightface_root)} if insightface_root else {}
    return ReferenceAnalyzer(FaceAnalyzer(backend, **options))


def _sidecar(
    options: dict[str, Any],
    pipe: Any,
    result: Any,
    people: list[Any],
    seed: int,
    size: tuple[int | None, int | None],
    names: dict[str, Any],
    caught: list[warnings.WarningMessage],
) -> dict[str, Any]:
    import diffusers
    import torch

    from dynamicid.infer.people import DynamicIDWarning
    from dynamicid.infer.weights import folder_hashes

    modules = pipe.dynamicid
    hashes = modules.file_hashes()
    base_files = {}
    for option in ("base_model", "image_encoder"):
        if options[option] is not None and Path(options[option]).is_dir():
            base_files[option] = folder_hashes(options[option])
    image = result.images[0]
    return {
        "tool": "dynamicid-infer generate",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "prompt": options["prompt"],
            "negative_prompt": options["negative_prompt"],
            "seed": seed,
            "steps": options["steps"],
            "guidance_scale": options["guidance_scale"],
            "id_scale": options["id_scale"],
            "width": image.width,
            "height": image.height,
            "size_requested": None if size[0] is None else f"{size[0]}x{size[1]}",
            "num_images": options["num_images"],
            "scheduler": type(pipe.scheduler).__name__,
            "activation_maps": options["activation_maps"],
            "device": str(pipe.device),
            "dtype": str(pipe.unet.dtype).removeprefix("torch."),
            "saa": result.saa,
        },
        "models": {
            "base_model": options["base_model"],
            "image_encoder": options["image_encoder"],
            "weights_format": modules.format,
            "files": {role: {"path": str(path), "sha256": hashes[role]} for role, path in modules.files.items()},
            "base_files_sha256": base_files,
            "face_backend": pipe.reference_analyzer.analyzer.backend,
            "embedding_model": pipe.reference_analyzer.embedding_model,
        },
        "people": [
            {
                "requested": {
                    "expression": person.expression,
                    "pose": person.pose,
                    "landmark_image": None if person.landmark_image is None else str(person.landmark_image),
                    "box": person.box,
                },
                **report,
            }
            for person, report in zip(people, result.people, strict=True)
        ],
        "outputs": {
            "images": [str(p) for p in names["images"]],
            "sidecar": str(names["sidecar"]),
            "activation_maps": [str(p) for group in names["activation_maps"] for p in group],
        },
        "warnings": [str(w.message) for w in caught if issubclass(w.category, DynamicIDWarning)],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },
    }
