"""The `embedded` backend: every model ships inside a PyPI wheel, nothing is downloaded.

MediaPipe 0.10.21 detection (short + full range) and 478-point mesh, head pose solved from the mesh,
dlib's 128-d ResNet embedding, and the FER-2013 mini-Xception expression model (PyTorch) calibrated with the
mesh (faces/expression_calibration.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dynamicid.faces.dlib_embedding import DLIB_EMBEDDING_MODEL, DlibEmbedder
from dynamicid.faces.expression import ExpressionClassifier, ExpressionCrop
from dynamicid.faces.expression_calibration import shipped_calibration
from dynamicid.faces.face import Face
from dynamicid.faces.mediapipe_face import (
    DETECTION_STRATEGY,
    MESH_POSE_POINTS,
    TILE_SOURCE,
    MediaPipeConfig,
    MediaPipeFace,
    kps5_from_detection,
    kps5_from_mesh,
)
from dynamicid.faces.pose import KPS5_MODEL_3D, solve_pose

DETECTOR_MODEL = "mediapipe-0.10.21-face-detection-full+short-range"
MESH_MODEL = "mediapipe-0.10.21-face-mesh-478"
POSE_MODEL = "solvepnp-6-point(mediapipe-face-mesh-478, crop + mirror averaged)"
KPS5_POSE_MODEL = "solvepnp-5-point(mediapipe-face-detection keypoints)"


@dataclass
class EmbeddedConfig:
    mediapipe: MediaPipeConfig = field(default_factory=MediaPipeConfig)
    expression_crop: ExpressionCrop = field(default_factory=ExpressionCrop)
    # Euclidean distance between L2-normalised dlib descriptors. dlib's usual 0.6 applies to raw descriptors,
    # whose norms are about 1.4 (1.29..1.60 on identities/), so it becomes about 0.43 here. On all pairs of
    # ../shared/data/faces/identities the balanced accuracy peaks at 0.43-0.44 (98.4 %); 0.5 gives 96.4 %,
    # 0.6 only 73 % (ORL's tiny grey faces are the hard different pairs). Chosen instead on one half of the
    # people and measured on the other (faces/verification.py): 0.450 -> 99.7 %, 0.440 -> 97.7 % held out.
    same_person_threshold: float = 0.44


class EmbeddedBackend:
    name = "embedded"
    embedding_model = DLIB_EMBEDDING_MODEL
    embedding_dim = 128

    def __init__(self, config: EmbeddedConfig | None = None, device: str = "cpu"):
        """device: "cpu" or "cuda" (`threads.pick_device`) for the ResNet and the expression model; MediaPipe's
        detector and mesh run on the CPU (its Python wheel has no GPU delegate on Linux)."""
        self.config = config or EmbeddedConfig()
        self.device = device
        self.same_person_threshold = self.config.same_person_threshold
        # Everything that changes results besides the model files (curation keys its caches by it).
        self.settings = {
            "detector": DETECTOR_MODEL,
            "detection_strategy": DETECTION_STRATEGY,
            **dataclasses.asdict(self.config),
        }
        self._mediapipe = MediaPipeFace(self.config.mediapipe)
        self._embedder = DlibEmbedder(device=device)
        self._expression = ExpressionClassifier(self.config.expression_crop, device=device)
        self._calibration = shipped_calibration()
        self.expression_model = self._calibration.version

    def detect(self, rgb: np.ndarray) -> list[Face]:
        faces = []
        for det in self._mediapipe.detect(rgb):
            model = MESH_MODEL if det.source == TILE_SOURCE else DETECTOR_MODEL  # crowded photos' extra faces
            faces.append(
                Face(
                    bbox=tuple(float(v) for v in det.box),
                    score=det.score,
                    kps5=kps5_from_detection(det),
                    backend=self.name,
                    models={"bbox": model, "score": model, "kps5": model},
                )
            )
        return faces

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        """`detect` per image: MediaPipe's graphs take one image at a time."""
        return [self.detect(rgb) for rgb in images]

    def describe_batch(self, images: Sequence[np.ndarray], faces: Sequence[Sequence[Face]]) -> list[list[Face]]:
        """Each face of each image described; the embeddings of all the images' faces run as one ResNet batch."""
        chips = [
            self._embedder.chip(rgb, np.asarray(face.bbox, dtype=np.float64))
            for rgb, image_faces in zip(images, faces, strict=True)
            for face in image_faces
        ]
        embeddings = iter(self._embedder.embed_chips(chips))
        return [
            [self._describe(rgb, face, next(embeddings)) for face in image_faces]
            for rgb, image_faces in zip(images, faces, strict=True)
        ]

    def _describe(self, rgb: np.ndarray, face: Face, embedding: np.ndarray) -> Face:
        box = np.asarray(face.bbox, dtype=np.float64)
        models = dict(face.models)
        mesh = self._mediapipe.mesh(rgb, box)
        if mesh is not None:
            kps5, landmarks = kps5_from_mesh(mesh), mesh[:, :2].copy()
            pose = self._pose(rgb, box, mesh)
            models.update(kps5=MESH_MODEL, landmarks=MESH_MODEL, pose=POSE_MODEL)
        else:  # the pose from the detector's 5 keypoints (a coarser model)
            kps5, landmarks = face.kps5, None
            pose = solve_pose(face.kps5, rgb.shape[1::-1], KPS5_MODEL_3D)
            models["pose"] = KPS5_POSE_MODEL
        label = self._calibration.label(self._expression.scores(rgb, kps5), landmarks)
        models.update(expression=label.model, embedding=DLIB_EMBEDDING_MODEL)
        return face.described(
            kps5=kps5,
            landmarks=landmarks,
            pose=pose,
            label=label,
            embedding=embedding,
            backend=self.name,
            models=models,
        )

    def _pose(self, rgb: np.ndarray, box: np.ndarray, mesh: np.ndarray) -> tuple[float, float, float]:
        """Pose from the mesh, averaged with the pose of the mirrored crop's mesh (mirror-equivariant).

        A single mesh's small left-right errors move a frontal face's yaw by up to ~8 degrees between a photo
        and its mirror (identities/obama/obama.jpg); averaging the crop and its mirror cancels them.
        """
        height, width = rgb.shape[:2]
        yaw, pitch, roll = solve_pose(mesh[list(MESH_POSE_POINTS), :2], (width, height))
        mirrored = self._mediapipe.mesh(rgb, box, mirrored=True)
        if mirrored is None:
            return yaw, pitch, roll
        yaw_m, pitch_m, roll_m = solve_pose(mirrored[list(MESH_POSE_POINTS), :2], (width, height))
        return (yaw - yaw_m) / 2.0, (pitch + pitch_m) / 2.0, (roll - roll_m) / 2.0

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """Euclidean distance between two embeddings (dlib's metric)."""
        return float(np.linalg.norm(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)))

    def close(self) -> None:
        self._mediapipe.close()
