"""The `insightface` backend: a local model pack (e.g. buffalo_l) loaded through insightface's own model zoo.

Each .onnx file of the pack goes through `insightface.model_zoo.get_model`, whose router tells the models
apart by their input/output signatures: SCRFD (boxes + 5 keypoints), the 2d106det landmark model, ArcFace
(recognition). Nothing is ever downloaded. Expression comes from the FER-2013 classifier (packs have none) with
the FER-only variant of the expression calibration (its mesh features need the 478-point mesh);
pose is solved from the 106 landmarks like the embedded backend solves it from the mesh.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dynamicid.faces.expression import ExpressionClassifier
from dynamicid.faces.expression_calibration import shipped_calibration
from dynamicid.faces.face import Face
from dynamicid.faces.pose import solve_pose
from dynamicid.faces.threads import CUDA_PROVIDER, onnxruntime_providers

# Point groups of insightface's 106-point layout (alignment/coordinate_reg 2d106markup): face contour, the
# two eyes, the mouth, the nose tip. The six pose points are picked geometrically inside the groups, so the
# result does not depend on the order of points within a group.
LANDMARK106_CONTOUR = range(0, 33)
LANDMARK106_EYES = (range(33, 43), range(87, 97))
LANDMARK106_MOUTH = range(52, 72)
LANDMARK106_NOSE_TIP = 86
DEFAULT_PACK = "buffalo_l"


def pose_points_from_106(landmarks: np.ndarray) -> np.ndarray:
    """The six pose.FACE_MODEL_3D points (nose tip, chin, outer eye corners, mouth corners; image left first)."""
    eyes = sorted((landmarks[list(group)] for group in LANDMARK106_EYES), key=lambda points: points[:, 0].mean())
    left_center, right_center = eyes[0].mean(0), eyes[1].mean(0)
    axis = (right_center - left_center) / max(float(np.linalg.norm(right_center - left_center)), 1e-6)
    eye_mid = (left_center + right_center) / 2
    outer_left = eyes[0][np.argmin((eyes[0] - eye_mid) @ axis)]
    outer_right = eyes[1][np.argmax((eyes[1] - eye_mid) @ axis)]
    mouth = landmarks[list(LANDMARK106_MOUTH)]
    # The chin: the contour point below the mouth nearest the face's midline (eyes' centre -> mouth centre).
    midline = mouth.mean(0) - eye_mid
    midline /= max(float(np.linalg.norm(midline)), 1e-6)
    contour = landmarks[list(LANDMARK106_CONTOUR)]
    offsets = contour - eye_mid
    below = offsets @ midline > np.linalg.norm(mouth.mean(0) - eye_mid)
    distance = np.abs(offsets[:, 0] * midline[1] - offsets[:, 1] * midline[0]) + np.where(below, 0.0, np.inf)
    chin = contour[np.argmin(distance)] if below.any() else contour[np.argmax(offsets @ midline)]
    return np.array(
        [
            landmarks[LANDMARK106_NOSE_TIP],
            chin,
            outer_left,
            outer_right,
            mouth[np.argmin((mouth - eye_mid) @ axis)],
            mouth[np.argmax((mouth - eye_mid) @ axis)],
        ],
        dtype=np.float64,
    )


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
        device: str = "cpu",
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
        # Everything that changes results besides the model files (curation keys its caches by it).
        self.settings = {"det_size": list(det_size), "det_thresh": det_thresh, "same_person": same_person_threshold}
        # `providers` wins over `device` ("cpu" or "cuda", `threads.pick_device`): CUDA runs SCRFD, the landmarks
        # and ArcFace on the GPU, the CPU provider takes the ops CUDA lacks.
        providers = providers or onnxruntime_providers(device)
        self.device = "cuda" if CUDA_PROVIDER in providers else "cpu"
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
        self._expression = ExpressionClassifier(device=self.device)
        self._calibration = shipped_calibration()
        self.expression_model = self._calibration.version

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

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        """`detect` per image: SCRFD's graph is exported for one image of `det_size`."""
        return [self.detect(rgb) for rgb in images]

    def describe_batch(self, images: Sequence[np.ndarray], faces: Sequence[Sequence[Face]]) -> list[list[Face]]:
        """Each face of each image described; ArcFace embeds all the images' aligned faces as one batch (the
        106-point model takes one face at a time, as insightface exports it)."""
        from insightface.utils import face_align

        crops = [
            face_align.norm_crop(np.ascontiguousarray(rgb[:, :, ::-1]), face.kps5, self._recognition.input_size[0])
            for rgb, image_faces in zip(images, faces, strict=True)
            for face in image_faces
        ]
        embeddings = iter(self._embed(crops))
        return [
            [self._describe(rgb, face, next(embeddings)) for face in image_faces]
            for rgb, image_faces in zip(images, faces, strict=True)
        ]

    def _embed(self, crops: list[np.ndarray]) -> np.ndarray:
        """ArcFace on aligned BGR crops, as one batch (in batches of the graph's batch size where it fixes one)."""
        fixed = self._recognition.session.get_inputs()[0].shape[0]
        step = fixed if isinstance(fixed, int) and fixed > 0 else max(len(crops), 1)
        parts = [self._recognition.get_feat(crops[i : i + step]) for i in range(0, len(crops), step)]
        return np.concatenate(parts) if parts else np.zeros((0, self.embedding_dim), np.float32)

    def _describe(self, rgb: np.ndarray, face: Face, embedding: np.ndarray) -> Face:
        from insightface.app.common import Face as InsightFace

        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        record = InsightFace(bbox=np.asarray(face.bbox, dtype=np.float32), kps=face.kps5, det_score=face.score)
        landmarks = np.asarray(self._landmarks.get(bgr, record), dtype=np.float32)
        embedding = np.asarray(embedding, dtype=np.float32).ravel()
        embedding /= max(float(np.linalg.norm(embedding)), 1e-12)
        height, width = rgb.shape[:2]
        yaw, pitch, roll = solve_pose(pose_points_from_106(landmarks), (width, height))
        label = self._calibration.label(self._expression.scores(rgb, face.kps5), None)
        models = dict(face.models)
        models.update(
            landmarks=self._model_name("landmarks"),
            pose=f"solvepnp-6-point({self._model_name('landmarks')})",
            expression=label.model,
            embedding=self.embedding_model,
        )
        return face.described(
            landmarks=landmarks,
            pose=(yaw, pitch, roll),
            label=label,
            embedding=embedding,
            backend=self.name,
            models=models,
        )

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """Cosine distance, 1 - cos(a, b)."""
        a = np.asarray(a, dtype=np.float32)
        b = np.asarray(b, dtype=np.float32)
        return float(1.0 - np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))
