"""The public generate API every front end calls (CLI `generate` / `batch`, the app, training's samples and
benchmark evaluation, ComfyUI): `load_pipeline(ModelOptions)` loads a base with DynamicID's weights,
`generate(pipe, GenerateRequest)` makes the images and the sidecar that records how they were made, and
`Generated.save(out)` writes them all or nothing.

    >>> from dynamicid.infer import GenerateRequest, ModelOptions, Person, generate, load_pipeline
    >>> pipe = load_pipeline(ModelOptions("models/sd15", ["dynamicid.safetensors"], image_encoder="models/image_encoder"))
    >>> request = GenerateRequest("two friends in a cafe", [Person("a.jpg", "happy"), Person("b.jpg")], seed=7)
    >>> generate(pipe, request).save("friends.png")

The base's family picks the pipeline class (`dynamicid.infer.pipeline.pipeline_for`), so a new family plugs
in without a change here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import platform
import secrets
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynamicid.models.layerwise import WEIGHTS_DTYPES, store_weights

if TYPE_CHECKING:  # the CLIs import this module for its defaults before torch and the models load
    from PIL import Image

    from dynamicid.infer.people import Person
    from dynamicid.infer.weights import WeightsSource

DTYPES = ("float32", "float16", "bfloat16")
OFFLOAD_MODES = ("none", "model", "sequential")  # diffusers enable_model_cpu_offload / enable_sequential_cpu_offload
TOOL = "dynamicid-infer generate"  # the sidecar's producer (dynamicid-eval reads sidecars whose tool starts so)


@dataclass
class ModelOptions:
    """What `load_pipeline` loads and how it places it in memory.

    Args:
        base_model: a diffusers base folder of a known family, or a tiny FAKE name (tiny-random, tiny-random-sdxl).
        weights: our safetensors file(s), or the release's files as `ReleaseFiles` (or a dict saa/imr/keypoint_encoder).
        image_encoder: CLIP vision folder; None = BASE/image_encoder.
        face_backend: "auto", "embedded" or "insightface"; face_options go to it (e.g. insightface_root=DIR).
        device: "auto" (cuda when present), "cpu", "cuda", "cuda:1", ...: where the models run.
        dtype: the models' compute dtype ("float32", "float16", "bfloat16").
        offload: "none", "model" (whole models move to `device` when used) or "sequential" (layer by layer;
            least memory, slowest): diffusers' CPU offload.
        weights_dtype: None, or "float8": the denoiser's weights stored in float8 (e4m3) and computed in `dtype`
            layer by layer (diffusers' layerwise casting), about half the memory of 16-bit weights.
    """

    base_model: str | Path
    weights: WeightsSource
    image_encoder: str | Path | None = None
    face_backend: str = "auto"
    face_options: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "float32"
    offload: str = "none"
    weights_dtype: str | None = None

    def check(self) -> None:
        """Refuse bad settings before anything loads (the message names the argument)."""
        from dynamicid.faces.backends import BACKEND_CHOICES

        for name, value, valid in (
            ("face_backend", self.face_backend, BACKEND_CHOICES),
            ("dtype", self.dtype, DTYPES),
            ("offload", self.offload, OFFLOAD_MODES),
            ("weights_dtype", self.weights_dtype, (None, *WEIGHTS_DTYPES)),
        ):
            if value not in valid:
                raise ValueError(f"ModelOptions.{name} {value!r}: valid: {', '.join(map(str, valid))}")
        for path in weight_files(self.weights):
            if not path.is_file():
                raise ValueError(f"weights file not found: {path}")


@dataclass
class GenerateRequest:
    """One generation: the scene, the people in it, and the sampler settings.

    Args:
        prompt: the scene, e.g. "two friends laughing in a cafe".
        people: one `Person` per identity, in order: reference photo (or an analysed `Reference`), optional target
            expression / pose / landmark image, optional box (y0, x0, y1, x1) in [0, 1] (none: equal strips).
        negative_prompt: what to steer away from; None = the pipeline's default (SDXL: zeros, not the empty text).
        size: (width, height) in pixels, multiples of 8; None = the base's native size.
        steps, guidance_scale: denoising steps and guidance; None = the pipeline's defaults (its family's reference
            settings, `sampler_defaults`).
        seed: None draws one (recorded in the sidecar).
        id_scale, gating, boost, boost_steps: the identity branch (see `DynamicIDPipeline.__call__`).
        num_images: images of the same request, with successive noise from one seeded generator.
        activation_maps: also make each person's activation-map overlay per image.
    """

    prompt: str
    people: Sequence[Person]
    negative_prompt: str | None = None
    size: tuple[int, int] | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    id_scale: float = 1.0
    gating: bool = True
    boost: float | None = None
    boost_steps: int | None = None
    num_images: int = 1
    activation_maps: bool = False

    def check(self) -> None:
        """What can be refused without a model: counts, size, labels, boxes, unreadable reference files."""
        from dynamicid.faces import load_image
        from dynamicid.infer.people import check_box, check_person_labels

        if (self.steps is not None and self.steps < 1) or self.num_images < 1:
            raise ValueError(f"steps ({self.steps}) and num_images ({self.num_images}) must be at least 1")
        if self.size is not None:
            check_size(*self.size)
        if not self.people:
            raise ValueError("people is empty: give at least one Person")
        for i, person in enumerate(self.people):
            check_person_labels(person, i)
            if person.box is not None:
                check_box(person.box, i)
            for image in (person.image, person.landmark_image):
                if isinstance(image, (str, Path)):
                    load_image(image)  # unreadable photos fail here, before any model runs


@dataclass
class Generated:
    """What `generate` made: the images, per image each person's activation-map overlay, and the sidecar."""

    images: list[Image.Image]
    activation_maps: list[list[Image.Image]]
    sidecar: dict[str, Any]

    def save(self, out: str | Path) -> dict[str, Any]:
        """Write the images (`out`, or `stem-k.suffix` for several), the overlays and `out`'s .json sidecar, all or
        nothing; returns the sidecar with the paths written ("outputs") and the write time."""
        from dynamicid.infer.outputs import Staging, check_output_path, output_names

        out = check_output_path(Path(out))
        clock = time.perf_counter()
        names = output_names(out, len(self.images), len(self.sidecar["people"]), bool(self.activation_maps))
        sidecar = dict(self.sidecar)
        sidecar["outputs"] = {
            "images": [str(p) for p in names["images"]],
            "sidecar": str(names["sidecar"]),
            "activation_maps": [str(p) for group in names["activation_maps"] for p in group],
        }
        overlays = self.activation_maps or [[] for _ in self.images]
        with Staging(out.parent).open() as staging:
            for k, image in enumerate(self.images):
                image.save(staging.path(names["images"][k]))
                for overlay, path in zip(overlays[k], names["activation_maps"][k], strict=True):
                    overlay.save(staging.path(path))
            sidecar["timings"] = {**sidecar["timings"], "write": round(time.perf_counter() - clock, 4)}
            staging.write_json(names["sidecar"], sidecar)
        self.sidecar = sidecar
        return sidecar


def weight_files(weights: WeightsSource) -> list[Path]:
    """The files of a weights source."""
    from dynamicid.infer.weights import ReleaseFiles

    if isinstance(weights, Mapping):
        weights = ReleaseFiles(**weights)
    if isinstance(weights, ReleaseFiles):
        return list(weights.paths().values())
    if isinstance(weights, (str, Path)):
        return [Path(weights)]
    return [Path(p) for p in weights]


def check_size(width: int, height: int, name: str = "size") -> tuple[int, int]:
    from dynamicid.infer.outputs import MAX_IMAGE_SIDE

    if not (0 < width <= MAX_IMAGE_SIDE and 0 < height <= MAX_IMAGE_SIDE) or width % 8 or height % 8:
        raise ValueError(f"{name} {width}x{height}: width and height must be multiples of 8 in 8..{MAX_IMAGE_SIDE}")
    return width, height


def load_pipeline(options: ModelOptions) -> Any:
    """The DynamicID pipeline of `options.base_model`'s family with the weights, image encoder and face
    analysis loaded, on `options.device` (or offloaded) in `options.dtype`."""
    options.check()
    import torch

    from dynamicid.infer.pipeline import pipeline_for
    from dynamicid.models.base import load_base_model

    device = resolve_device(options.device)
    if options.offload == "sequential" and torch.device(device).type == "cpu":
        # accelerate fails to move a layer back off an indexed CPU device (diffusers offloads to "cpu:0")
        raise ValueError(
            f"ModelOptions.offload 'sequential' needs an accelerator (device is {device!r}): on the CPU the "
            "models are in CPU memory already; use offload 'none'"
        )
    dtype = getattr(torch, options.dtype)
    base = load_base_model(options.base_model, options.image_encoder, torch_dtype=dtype)
    pipe = pipeline_for(base)
    pipe.load_dynamicid(options.weights, face_analyzer=reference_analyzer(options.face_backend, options.face_options))
    if options.weights_dtype is not None:
        store_weights(pipe.denoiser, options.weights_dtype, dtype)
    if options.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif options.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.dynamicid.to(torch.device(device), dtype)
    pipe.model_options = dataclasses.replace(options, device=device)  # what the sidecar records
    return pipe


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@functools.lru_cache(maxsize=4)
def _cached_analyzer(backend: str, options: tuple[tuple[str, Any], ...]) -> Any:
    from dynamicid.faces import FaceAnalyzer
    from dynamicid.infer.references import ReferenceAnalyzer

    return ReferenceAnalyzer(FaceAnalyzer(backend, **dict(options)))


def reference_analyzer(backend: str = "auto", options: Mapping[str, Any] | None = None) -> Any:
    """One `ReferenceAnalyzer` per backend and options per process (the face models load once; results are
    cached by picture), shared by every pipeline `load_pipeline` makes."""
    given = {k: str(v) for k, v in (options or {}).items() if v is not None}
    return _cached_analyzer(backend, tuple(sorted(given.items())))


def sampler_defaults(pipe: Any) -> tuple[int, float]:
    """The pipeline's default steps and guidance scale: its family's reference settings."""
    parameters = inspect.signature(pipe.__call__).parameters
    return parameters["num_inference_steps"].default, parameters["guidance_scale"].default


def generate(pipe: Any, request: GenerateRequest, on_step: Callable[[int, int], None] | None = None) -> Generated:
    """Run `request` on `pipe` (from `load_pipeline`, or any DynamicID pipeline with its modules set).

    `on_step(done, total)` is called after each denoising step. Warnings about the request (overlapping
    boxes, several faces in a reference) are collected into the sidecar's "warnings", not re-issued.
    """
    import torch

    from dynamicid.infer.outputs import PERSON_COLORS, overlay_activation
    from dynamicid.infer.people import DynamicIDWarning

    request.check()
    default_steps, default_guidance = sampler_defaults(pipe)
    request = dataclasses.replace(
        request,
        seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
        steps=request.steps or default_steps,
        guidance_scale=default_guidance if request.guidance_scale is None else request.guidance_scale,
    )
    width, height = request.size if request.size is not None else (None, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DynamicIDWarning)
        result = pipe(
            request.prompt,
            list(request.people),
            negative_prompt=request.negative_prompt,
            height=height,
            width=width,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=request.num_images,
            generator=torch.Generator(device="cpu").manual_seed(request.seed),
            id_scale=request.id_scale,
            gating=request.gating,
            boost=request.boost,
            boost_steps=request.boost_steps,
            return_activation_maps=request.activation_maps,
            callback_on_step_end=None if on_step is None else lambda _, i, t, tensors: on_step(i + 1, request.steps),
        )
    overlays = []
    if request.activation_maps:
        for k, image in enumerate(result.images):
            overlays.append(
                [
                    overlay_activation(
                        image, result.activation_maps[k, i], PERSON_COLORS[i % len(PERSON_COLORS)], report["box"]
                    )
                    for i, report in enumerate(result.people)
                ]
            )
    messages = [str(w.message) for w in caught if issubclass(w.category, DynamicIDWarning)]
    return Generated(list(result.images), overlays, sidecar(pipe, request, result, messages))


def sidecar(pipe: Any, request: GenerateRequest, result: Any, messages: list[str]) -> dict[str, Any]:
    """How the images were made: settings, models (with file hashes), people, warnings, versions, timings."""
    import diffusers
    import torch

    from dynamicid.infer.people import describe_source
    from dynamicid.infer.weights import folder_hashes

    options: ModelOptions | None = getattr(pipe, "model_options", None)
    modules = pipe.dynamicid
    hashes = modules.file_hashes()
    base_model = None if options is None else str(options.base_model)
    image_encoder = None if options is None or options.image_encoder is None else str(options.image_encoder)
    base_files = {
        role: folder_hashes(path)
        for role, path in (("base_model", base_model), ("image_encoder", image_encoder))
        if path is not None and Path(path).is_dir()
    }
    image = result.images[0]
    analyzer = pipe.reference_analyzer
    return {
        "tool": TOOL,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "seed": request.seed,
            "steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "id_scale": request.id_scale,
            "width": image.width,
            "height": image.height,
            "size_requested": None if request.size is None else "{}x{}".format(*request.size),
            "num_images": request.num_images,
            "scheduler": type(pipe.scheduler).__name__,
            "activation_maps": request.activation_maps,
            "device": str(pipe.device) if options is None else options.device,
            "dtype": str(pipe.denoiser.dtype).removeprefix("torch."),
            "offload": "none" if options is None else options.offload,
            "weights_dtype": None if options is None else options.weights_dtype,
            "saa": result.saa,
        },
        "models": {
            "base_model": base_model,
            "image_encoder": image_encoder,
            "weights_format": modules.format,
            "files": {role: {"path": str(path), "sha256": hashes[role]} for role, path in modules.files.items()},
            "base_files_sha256": base_files,
            "face_backend": None if analyzer is None else analyzer.analyzer.backend,
            "embedding_model": None if analyzer is None else analyzer.embedding_model,
        },
        "people": [
            {
                "requested": {
                    "expression": person.expression,
                    "pose": person.pose,
                    "landmark_image": None if person.landmark_image is None else describe_source(person.landmark_image),
                    "box": None if person.box is None else list(person.box),
                },
                **report,
            }
            for person, report in zip(request.people, result.people, strict=True)
        ],
        "warnings": messages,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },
        "timings": dict(result.timings),
    }
