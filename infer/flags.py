"""The generation flags shared by `dynamicid-infer generate|batch` and `dynamicid-app`, and their translation
into the public API's `ModelOptions` / `GenerateRequest` (errors here name the flags)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dynamicid.clitools import AtLeast, InputError
from dynamicid.faces.backends import BACKEND_CHOICES
from dynamicid.infer.generate import (
    DTYPES,
    OFFLOAD_MODES,
    WEIGHTS_DTYPES,
    GenerateRequest,
    ModelOptions,
    check_size,
)
from dynamicid.models.families import tiny_names

if TYPE_CHECKING:
    from dynamicid.infer.people import Person

OFFLOAD_HELP = "Keep models in CPU memory and move each to --device when used (model), or layer by layer (sequential)."
KEEP = "keep"  # --expression/--pose value (and the app's choice) that keeps the reference's own label
RELEASE_FLAGS = ("saa", "imr", "keypoint_encoder")
# Flags that are `GenerateRequest` fields of the same name.
REQUEST_FLAGS = ("negative_prompt", "steps", "guidance_scale", "seed", "id_scale", "num_images", "activation_maps")


def option_group(*options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """One decorator for a group of click options."""

    def decorate(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


model_options = option_group(
    click.option(
        "--base-model",
        required=True,
        help=f"Base model folder (diffusers layout), or {' / '.join(tiny_names())}.",
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
    click.option("--face-backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True),
    click.option("--insightface-root", type=click.Path(path_type=Path), help="Local insightface model pack folder."),
    click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... (auto: cuda if present)."),
    click.option(
        "--dtype", type=click.Choice(DTYPES), default="float32", show_default=True, help="The models' compute dtype."
    ),
    click.option("--offload", type=click.Choice(OFFLOAD_MODES), default="none", show_default=True, help=OFFLOAD_HELP),
    click.option(
        "--weights-dtype",
        type=click.Choice(list(WEIGHTS_DTYPES)),
        help="Store the denoiser's weights in this dtype, computed in --dtype (float8: about half of 16-bit).",
    ),
)
run_options = option_group(
    click.option("--negative-prompt", default="", help="What to steer away from."),
    click.option(
        "--steps", type=AtLeast(1), help="Denoising steps (default: the base family's, 50 DDIM steps for SD)."
    ),
    click.option(
        "--guidance-scale", type=float, help="Classifier-free guidance (default: the base family's, 5 for SD)."
    ),
    click.option("--id-scale", type=float, default=1.0, show_default=True, help="Weight of the identity branch."),
    click.option("--size", help="WIDTHxHEIGHT in pixels, multiples of 8 (default: the base model's native size)."),
    click.option("--activation-maps", is_flag=True, help="Also write per-person SAA activation maps over the image."),
)


def load_options(flags: dict[str, Any]) -> ModelOptions:
    """`ModelOptions` of the model flags, checked (weights given one way, files there)."""
    from dynamicid.infer.weights import ReleaseFiles

    release = {k: flags[k] for k in RELEASE_FLAGS if flags[k] is not None}
    if flags["weights"] and release:
        raise InputError("give either --weights (our format) or the release files (--saa ...), not both")
    if not flags["weights"] and not release:
        raise InputError(
            "no weights: give --weights FILE, or the release's --saa FILE [--imr FILE --keypoint-encoder FILE]"
        )
    if release and "saa" not in release:
        raise InputError("the release's --imr/--keypoint-encoder need its --saa file too")
    options = ModelOptions(
        base_model=flags["base_model"],
        weights=ReleaseFiles(**release) if release else list(flags["weights"]),
        image_encoder=flags["image_encoder"],
        face_backend=flags["face_backend"],
        face_options={"insightface_root": flags["insightface_root"]} if flags["insightface_root"] else {},
        device=flags["device"],
        dtype=flags["dtype"],
        offload=flags["offload"],
        weights_dtype=flags["weights_dtype"],
    )
    options.check()
    return options


def parse_size(size: str | None) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise InputError(f"--size {size!r}: expected WIDTHxHEIGHT, e.g. 768x512") from None
    return check_size(width, height, "--size")


def request_from_flags(flags: dict[str, Any], people: list[Person]) -> GenerateRequest:
    """The request of the run flags (a batch row's flags carry its own settings)."""
    settings = {name: flags[name] for name in REQUEST_FLAGS}
    return GenerateRequest(flags["prompt"], people, size=parse_size(flags["size"]), **settings)


def people_from_flags(flags: dict[str, Any]) -> list[Person]:
    """One `Person` per --person, with its --expression / --pose / --landmark-image / --box in order."""
    from dynamicid.infer.people import Person

    count = len(flags["persons"])
    expressions = _per_person(flags["expressions"], count, "--expression")
    poses = _per_person(flags["poses"], count, "--pose")
    landmark_images = _per_person(flags["landmark_images"], count, "--landmark-image")
    boxes = _per_person(flags["boxes"], count, "--box")
    people = []
    for i, path in enumerate(flags["persons"]):
        box = None
        if boxes[i] is not None:
            try:
                box = tuple(float(v) for v in boxes[i].split(","))
            except ValueError:
                raise InputError(f"--box {boxes[i]!r} (person {i + 1}): expected four numbers y0,x0,y1,x1") from None
        landmark_image = Path(landmark_images[i]) if landmark_images[i] is not None else None
        people.append(Person(path, expressions[i], poses[i], landmark_image, box))
    return people


def _per_person(values: tuple[str, ...], count: int, option: str) -> list[str | None]:
    if not values:
        return [None] * count
    if len(values) != count:
        raise InputError(
            f"{len(values)} {option} for {count} --person: give one per person, in order "
            f"(or none){f', {KEEP!r} keeps a reference as it is' if option != '--box' else ''}"
        )
    return [None if v == KEEP else v for v in values]
