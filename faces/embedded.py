"""The `embedded` backend: every model ships inside a PyPI wheel, nothing is downloaded.

MediaPipe 0.10.21 detection (short + full range) and 478-point mesh, head pose solved from the mesh,
dlib's 128-d ResNet embedding, and the FER-2013 mini-Xception expression model (PyTorch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from dynamicid.faces.dlib_embedding import DLIB_EMBEDDING_MODEL, DlibEmbedder
from dynamicid.faces.expression import FER_EXPRESSION_MODEL, ExpressionClassifier, ExpressionCrop
from dynamicid.faces.face import Face
from dynamicid.faces.mediapipe_face import (
    MESH_POSE_POINTS,
    MediaPipeConfig,
    MediaPipeFace,
    kps5_from_detection,
    kps5_from_mesh,
)
from dynamicid.faces.pose import solve_pose

DETECTOR_MODEL = "mediapipe-0.10.21-face-detection-full+short-range"
MESH_MODEL = "mediapipe-0.10.21-face-mesh-478"
POSE_MODEL = "solvepnp-6-point(mediapipe-face-mesh-478)"


@dataclass
class EmbeddedConfig:
    mediapipe: MediaPipeConfig = field(default_factory=MediaPipeConfig)
    expression_crop: ExpressionCrop = field(default_factory=ExpressionCrop)
    # Euclidean distance between L2-normalised dlib descriptors. dlib's usual 0.6 applies to raw descriptors,
    # whose norms are about 1.4 (1.29..1.60 on identities/), so it becomes about 0.43 here. On all pairs of
    # ../shared/data/faces/identities the balanced accuracy peaks at 0.43-0.44 (98.0 %); 0.5 gives 95.9 %,
    # 0.6 only 72 % (ORL's tiny grey faces are the hard different pairs).
    same_person_threshold: float = 0.44


class EmbeddedBackend:
    name = "embedded"
    embedding_model = DLIB_EMBEDDING_MODEL
    embedding_dim = 128

    def __init__(self, config: EmbeddedConfig | None = None):
        self.config = config or EmbeddedConfig()
        self.same_person_threshold = self.config.same_person_threshold
        self._mediapipe = MediaPipeFace(self.config.mediapipe)
        self._embedder = DlibEmbedder()
        self._expression = ExpressionClassifier(self.config.expression_crop)

    def detect(self, rgb: np.ndarray) -> list[Face]:
        return [
            Face(
                bbox=tuple(float(v) for v in det.box),
                score=det.score,
                kps5=kps5_from_detection(det),
                backend=self.name,
                models={"bbox": DETECTOR_MODEL, "score": DETECTOR_MODEL, "kps5": DETECTOR_MODEL},
            )
            for det in self._mediapipe.detect(rgb)
        ]

    def describe(self, rgb: np.ndarray, face: Face) -> Face:
        box = np.asarray(face.bbox, dtype=np.float64)
        models = dict(face.models)
        mesh = self._mediapipe.mesh(rgb, box)
        kps5, landmarks, pose = face.kps5, None, (None, None, None)
        if mesh is not None:
            kps5, landmarks = kps5_from_mesh(mesh), mesh[:, :2].copy()
            height, width = rgb.shape[:2]
            pose = solve_pose(mesh[list(MESH_POSE_POINTS), :2], (width, height))
            models.update(kps5=MESH_MODEL, landmarks=MESH_MODEL, pose=POSE_MODEL)
        scores = self._expression.scores(rgb, kps5)
        models.update(expression=FER_EXPRESSION_MODEL, embedding=DLIB_EMBEDDING_MODEL)
        return dataclasses.replace(
            face,
            kps5=kps5,
            landmarks=landmarks,
            yaw=pose[0],
            pitch=pose[1],
            roll=pose[2],
            expression=max(scores, key=scores.get),
            expression_scores=scores,
            embedding=self._embedder.embed(rgb, box),
            backend=self.name,
            models=models,
        )

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """Euclidean distance between two embeddings (dlib's metric)."""
        return float(np.linalg.norm(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)))

    def close(self) -> None:
        self._mediapipe.close()
