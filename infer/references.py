"""Reference photos -> the face the pipeline uses: its box, keypoints, landmarks, labels and ID embedding.

Analysis results are cached by the image's pixels, so the same photo is analysed once per process.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from dynamicid.faces import Face, FaceAnalyzer, arcface_align, load_image, transform_points
from dynamicid.faces.align import ffhq_matrix
from dynamicid.infer.people import DynamicIDWarning, ImageSource, describe_source
from dynamicid.models.base import CLIP_IMAGE_SIZE

CLIP_FACE_SIZE = CLIP_IMAGE_SIZE  # the CLIP image encoder sees the ArcFace-aligned face at 224x224
LANDMARK_FRAME = 512  # landmarks are expressed in the 512x512 FFHQ crop, as in the curated dataset


class NoFaceError(ValueError):
    """A reference (or target landmark) image in which no face was found."""


@dataclass
class Reference:
    """The face the pipeline takes from one image (the largest one), or from a curated crop (`from_crop`)."""

    source: str
    face: Face
    num_faces: int
    clip_face: Image.Image  # arcface_align(image, kps5, 224)
    landmarks_512: np.ndarray | None  # landmarks in the FFHQ 512 crop's pixels
    expression: str | None  # the face's labels: the IMR's source expression and pose
    pose: str | None

    @classmethod
    def from_crop(
        cls,
        crop: np.ndarray,
        *,
        kps5: Any,
        embedding: Any,
        landmarks: Any | None = None,
        expression: str | None = None,
        pose: str | None = None,
        source: str = "crop",
    ) -> Reference:
        """The face of a curated dataset row: its FFHQ crop (RGB uint8) with keypoints and landmarks in crop
        pixels and its ID embedding; no face analysis runs (the dataset's labels are used as they are)."""
        kps5 = np.asarray(kps5, dtype=np.float32).reshape(5, 2)
        height, width = crop.shape[:2]
        points = None if landmarks is None else np.asarray(landmarks, dtype=np.float32).reshape(-1, 2)
        face = Face(
            bbox=(0.0, 0.0, float(width), float(height)),
            score=1.0,
            kps5=kps5,
            landmarks=points,
            expression=expression,
            embedding=np.asarray(embedding, dtype=np.float32),
            backend="dataset",
        )
        landmarks_512 = None if points is None else points * (LANDMARK_FRAME / width)
        clip_face = arcface_align(crop, kps5, CLIP_FACE_SIZE)
        return cls(source, face, 1, clip_face, landmarks_512, expression, pose)

    def labels(self) -> dict[str, Any]:
        """What the face layer found, for the sidecar."""
        face = self.face
        return {
            "source": self.source,
            "faces_found": self.num_faces,
            "bbox": [round(float(v), 1) for v in face.bbox],
            "expression": face.expression,
            "pose": self.pose,
            "yaw": None if face.yaw is None else round(float(face.yaw), 2),
            "pitch": None if face.pitch is None else round(float(face.pitch), 2),
            "roll": None if face.roll is None else round(float(face.roll), 2),
            "backend": face.backend,
        }


class ReferenceAnalyzer:
    """Wraps a `FaceAnalyzer`; remembers the faces of the last `cache_size` distinct pictures."""

    def __init__(self, analyzer: FaceAnalyzer, cache_size: int = 64):
        self.analyzer = analyzer
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[Face, int]] = OrderedDict()

    @property
    def embedding_model(self) -> str:
        return self.analyzer.embedding_model

    @property
    def embedding_dim(self) -> int:
        return self.analyzer.embedding_dim

    def analyze(self, source: ImageSource, role: str = "reference") -> Reference:
        """The largest face of `source`; warns when there are several, raises NoFaceError when there is none."""
        name = describe_source(source)
        image = source if isinstance(source, Image.Image) else load_image(source)
        image = image.convert("RGB")
        key = _pixel_key(image)
        if key not in self._cache:
            faces = self.analyzer.analyze(image)
            if not faces:
                raise NoFaceError(f"no face found in {role} {name}; use a photo in which one face is clearly visible")
            self._cache[key] = (faces[0], len(faces))
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        face, num_faces = self._cache[key]
        if num_faces > 1:
            warnings.warn(f"{num_faces} faces in {role} {name}; using the largest", DynamicIDWarning, stacklevel=2)
        landmarks = None
        if face.landmarks is not None:
            landmarks = transform_points(face.landmarks, ffhq_matrix(face.kps5, LANDMARK_FRAME))
        clip_face = arcface_align(image, face.kps5, CLIP_FACE_SIZE)
        return Reference(name, face, num_faces, clip_face, landmarks, face.expression, face.pose_bin)


def _pixel_key(image: Image.Image) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(np.asarray(image)).tobytes())
    digest.update(f"{image.width}x{image.height}".encode())
    return digest.hexdigest()
