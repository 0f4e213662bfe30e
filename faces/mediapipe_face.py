"""MediaPipe 0.10.21 legacy solutions: face detection (short + full range) and the 478-point face mesh.

Detection strategy (measured on ../shared/data/faces, see tests/test_faces_embedded.py):
- The full-range model on the image and, when it has a candidate there, on a 2x upscale of images whose long
  side is under `upscale_below`, merged by non-maximum suppression: finds the small faces of group photos with no
  false positives on the no-face photos. Its candidates under `sure_score` must be confirmed (below): a 0.65 box
  on the hair of a tight crop (identities/Serena_Williams/Serena_Williams_0010.jpg) is not, at the price of one
  34-pixel group-photo face of 18. The model sees the whole image at 192 px either way, so the 2x pass is a second
  look through another resampling: next to what the 1x pass sees it adds faces and better boxes (group photos;
  77 of the 174 first-pass boxes of identities/ and expressions/), but where the 1x pass sees nothing it found a
  face in 3 of the 100 such identities/ photos (two 92x112 ORL faces, a 150-pixel crop; the fallback below finds
  them too) and in none of expressions/ or no_face/, so there it is skipped (5 ms).
- Only when that confirms nothing (tight crops where the face fills the frame, tiny 92x112 faces): the
  short-range model on the image padded by 25 %; only when it confirms nothing, the full-range model on the
  image padded by half its size and the short-range model on the image, merged with it by NMS. These passes
  also fire on flowers and toys, so each of their candidates must be confirmed. The padded short-range pass
  alone finds the face of all 98 identities/ photos that get this far, with the box that the three passes
  merged gave in 86 (the other 12 and one expressions/ photo get its box of the same face; 2026-12-01). It
  spares the other two passes (8 ms) on most tight crops.
- Confirmation: the face mesh's own detector (the short-range model, the same graph options) finds a face at
  `confirm_score` on the mesh crop of the candidate (its expanded box). It is run as the short-range detector
  alone: the mesh's landmark model added nothing to the decision (the same verdict on all 349 candidate boxes
  of the shared photos) and cost 2.6 ms per candidate.
- Crowded photos (the first pass confirmed `crowd_min_faces` or more): the face mesh's own detector, which
  finds faces the two detectors miss when they are large, overlapping or cut off by the border, runs on 3 x 3
  overlapping half-size tiles, as they are and padded by `tile_pads`; a face it finds that does not overlap a
  face already found (nor a larger tile face) by more than `tile_overlap` of its box is added, its box and
  keypoints from the mesh. group_photos/selfie-many-people.jpg: 4 -> 7 of 8 faces; the annotated PASCAL
  photos keep 17 of 18 faces and no false box (tests/test_faces_embedded.py); cost in BENCHMARKS.md.
The mesh runs on a square crop of `mesh_expand` x the box, resized to `mesh_size`, and is mapped back.

Single passes, at score 0.5, for comparison: short-range alone finds a face in 204/204 identities/ photos but
also in 3 of the 7 no_face/ photos (scores 0.51-0.55) and only 33 % of the group-photo faces; full-range alone
finds 104/204 identities (it misses tight crops), 94 % of group faces; full-range on the 50 %-padded image
202/204 but a false box (0.70) on a no-face photo. The strategy above: 204/204, no false box, 17/18 group faces.
"""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass

import cv2
import numpy as np

from dynamicid.faces.quiet import QuietGraph, quiet_native_logs

# Mesh indices (refine_landmarks=True adds the irises 468..477).
MESH_IRIS_IMAGE_LEFT = 468  # the subject's right iris centre: image left in an unmirrored photo
MESH_IRIS_IMAGE_RIGHT = 473
MESH_NOSE_TIP = 1
MESH_CHIN = 152
MESH_EYE_OUTER = (33, 263)  # image-left, image-right outer eye corners
MESH_MOUTH_CORNERS = (61, 291)  # image-left, image-right
MESH_POSE_POINTS = (MESH_NOSE_TIP, MESH_CHIN, *MESH_EYE_OUTER, *MESH_MOUTH_CORNERS)  # pose.FACE_MODEL_3D order
# Bumped whenever the passes above change which boxes a photo gets (part of the backend's settings, so curation's
# caches of detections do not mix strategies). 2: the 2x pass only after a 1x candidate, and the padded short-range
# pass first on tight crops.
DETECTION_STRATEGY = 2
# The detector's six keypoints from the mesh: eye corners (averaged), nose tip, inner lips (averaged), ear tragi.
TILE_SOURCE = "mesh-tiles"  # `Detection.source` of the faces the tiled mesh pass adds
MESH_AS_DETECTION = ((33, 133), (362, 263), (1,), (13, 14), (234,), (454,))


@dataclass
class MediaPipeConfig:
    min_score: float = 0.5  # detector confidence
    sure_score: float = 0.75  # full-range candidates at or above this need no confirmation
    confirm_score: float = 0.7  # the mesh detector's confidence that confirms a candidate
    nms_iou: float = 0.3
    upscale_below: int = 1000  # long side (pixels) under which the full-range model also sees a 2x upscale
    mesh_expand: float = 2.0
    mesh_size: int = 256
    crowd_min_faces: int = 2  # faces confirmed by the first pass from which the tiled mesh pass also runs
    tile_score: float = 0.2  # the mesh detector's confidence on tiles (it confirms with its own 468 points)
    tile_pads: tuple[float, ...] = (0.0, 0.3)  # each tile as it is and padded (faces cut off by the border)
    tile_overlap: float = 0.25  # a tile face overlapping a face already kept by more of its box is that face


@dataclass
class Detection:
    box: np.ndarray  # x0, y0, x1, y1
    score: float
    keypoints: np.ndarray  # (6, 2): subject's right eye, left eye, nose tip, mouth centre, right ear, left ear
    source: str  # which pass found it


# A NormalizedLandmarkList as protobuf writes it when each landmark has x, y, z and nothing else: per landmark
# the field tag and length, then each float's tag and little-endian value.
_LANDMARK_RECORD = np.dtype(
    [
        ("tag", "u1"),
        ("size", "u1"),
        ("x_tag", "u1"),
        ("x", "<f4"),
        ("y_tag", "u1"),
        ("y", "<f4"),
        ("z_tag", "u1"),
        ("z", "<f4"),
    ]
)
_LANDMARK_TAGS = {"tag": 0x0A, "size": 15, "x_tag": 0x0D, "y_tag": 0x15, "z_tag": 0x1D}


def landmark_array(landmarks) -> np.ndarray:
    """(N, 3) float64 x, y, z of a MediaPipe NormalizedLandmarkList, the same values as reading each landmark.

    Read from the serialized message in one numpy call (the per-landmark attribute loop cost about 0.25 ms per
    mesh); any other layout (visibility or presence set) takes the loop.
    """
    data = landmarks.SerializeToString()
    if len(data) == len(landmarks.landmark) * _LANDMARK_RECORD.itemsize:
        records = np.frombuffer(data, _LANDMARK_RECORD)
        if all(np.all(records[name] == value) for name, value in _LANDMARK_TAGS.items()):
            return np.column_stack([records["x"], records["y"], records["z"]]).astype(np.float64)
    return np.array([[p.x, p.y, p.z] for p in landmarks.landmark], dtype=np.float64)


class _Deferred(types.ModuleType):
    """Stands in for a module in `sys.modules`; the first attribute asked of it imports the real one."""

    def __getattr__(self, attribute: str):
        child = sys.modules.get(f"{self.__name__}.{attribute}")
        if isinstance(child, _Deferred):  # `import package.module as name` asks the package for the module
            return child
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attribute)


def import_mediapipe() -> types.ModuleType:
    """`import mediapipe`, without importing matplotlib.pyplot for its drawing helpers (never called here).

    `mediapipe.solutions` imports `drawing_utils`, which imports matplotlib.pyplot at the top: most of the cost of
    importing mediapipe, in every process that builds the face models. While mediapipe imports, stand-ins take
    matplotlib's places in `sys.modules` (only where it is not imported yet); `drawing_utils` keeps its stand-in,
    which imports the real pyplot if it is ever used, and later imports of matplotlib get the real one.
    """
    names = [name for name in ("matplotlib", "matplotlib.pyplot") if name not in sys.modules]
    stand_ins = {name: _Deferred(name) for name in names}
    sys.modules.update(stand_ins)
    try:
        import mediapipe
    finally:
        for name, stand_in in stand_ins.items():
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]
    return mediapipe


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def box_area(box: np.ndarray) -> float:
    return float(max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0))


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over the smaller box: 1 when one box lies inside the other (a part of a face)."""
    inter = box_area(np.array([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])]))
    smaller = min(box_area(a), box_area(b))
    return inter / smaller if smaller > 0 else 0.0


def nms(detections: list[Detection], iou: float) -> list[Detection]:
    kept: list[Detection] = []
    for det in sorted(detections, key=lambda d: -d.score):
        if all(box_iou(det.box, k.box) < iou for k in kept):
            kept.append(det)
    return kept


def square_crop_matrix(box: np.ndarray, expand: float, size: int) -> np.ndarray:
    """2x3 matrix mapping image pixels to a size x size crop of the square `expand` x the box around its centre."""
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    side = max(box[2] - box[0], box[3] - box[1]) * expand
    scale = size / side
    return np.array([[scale, 0, size / 2.0 - scale * cx], [0, scale, size / 2.0 - scale * cy]], dtype=np.float64)


class MediaPipeFace:
    """The detectors and the mesh, created once (each holds a MediaPipe graph)."""

    def __init__(self, config: MediaPipeConfig | None = None):
        mp = import_mediapipe()  # heavy; imported only when the embedded backend is built
        self.config = config or MediaPipeConfig()
        solutions = mp.solutions
        with quiet_native_logs():
            self._short = QuietGraph(
                solutions.face_detection.FaceDetection(
                    model_selection=0, min_detection_confidence=self.config.min_score
                )
            )
            self._full = QuietGraph(
                solutions.face_detection.FaceDetection(
                    model_selection=1, min_detection_confidence=self.config.min_score
                )
            )

            def mesh(faces: int, refine: bool, score: float) -> QuietGraph:
                return QuietGraph(
                    solutions.face_mesh.FaceMesh(
                        static_image_mode=True,
                        max_num_faces=faces,
                        refine_landmarks=refine,
                        min_detection_confidence=score,
                    )
                )

            self._mesh = mesh(1, True, 0.5)
            self._tile_mesh = mesh(4, False, self.config.tile_score)  # up to 4 faces on a tile
            for graph in self._graphs():
                # Calculators open (and log) on the graphs' own threads: a first run waits until all have.
                graph.graph.process(np.zeros((64, 64, 3), dtype=np.uint8))

    def _graphs(self) -> tuple[QuietGraph, ...]:
        return self._short, self._full, self._mesh, self._tile_mesh

    # detection

    def _run_detector(self, detector, rgb: np.ndarray, pad: float, scale: float, source: str) -> list[Detection]:
        border = round(max(rgb.shape[:2]) * pad)
        image = rgb
        if border:
            image = cv2.copyMakeBorder(rgb, border, border, border, border, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        if scale != 1.0:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        height, width = image.shape[:2]
        found = []
        for det in detector.process(np.ascontiguousarray(image)).detections or []:
            rel = det.location_data.relative_bounding_box
            box = np.array([rel.xmin, rel.ymin, rel.xmin + rel.width, rel.ymin + rel.height]) * [
                width,
                height,
                width,
                height,
            ]
            points = np.array([[k.x * width, k.y * height] for k in det.location_data.relative_keypoints])
            found.append(Detection(box / scale - border, float(det.score[0]), points / scale - border, source))
        return found

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an RGB uint8 image, highest score first."""
        cfg = self.config
        candidates = self._run_detector(self._full, rgb, 0.0, 1.0, "full-range")
        if candidates and max(rgb.shape[:2]) < cfg.upscale_below:
            candidates += self._run_detector(self._full, rgb, 0.0, 2.0, "full-range-2x")
        found = [d for d in nms(candidates, cfg.nms_iou) if d.score >= cfg.sure_score or self._confirmed(rgb, d.box)]
        if len(found) >= cfg.crowd_min_faces:
            return found + self._crowd(rgb, found)
        if found:
            return found
        # Tight crops: the short-range model on the padded image finds the face of most of them alone, so the
        # other two passes run only when it confirms nothing, and then as before (all three merged by NMS).
        padded_short = self._run_detector(self._short, rgb, 0.25, 1.0, "short-range-padded")
        first = nms(padded_short, cfg.nms_iou)
        found = [d for d in first if self._confirmed(rgb, d.box)]
        if found:
            return found
        candidates = (
            self._run_detector(self._full, rgb, 0.5, 1.0, "full-range-padded")
            + self._run_detector(self._short, rgb, 0.0, 1.0, "short-range")
            + padded_short
        )
        rejected = {id(d) for d in first}  # confirmation already said no to these
        return [d for d in nms(candidates, cfg.nms_iou) if id(d) not in rejected and self._confirmed(rgb, d.box)]

    def _crowd(self, rgb: np.ndarray, found: list[Detection]) -> list[Detection]:
        """Faces the mesh detector finds on overlapping tiles that are none of `found` (largest first)."""
        cfg = self.config
        height, width = rgb.shape[:2]
        tile_h, tile_w = height // 2, width // 2
        candidates = []
        for y0 in (0, height // 4, height - tile_h):
            for x0 in (0, width // 4, width - tile_w):
                tile = rgb[y0 : y0 + tile_h, x0 : x0 + tile_w]
                for pad in cfg.tile_pads:
                    candidates += self._tile_faces(tile, pad, np.array([x0, y0], np.float64))
        kept = list(found)
        for det in sorted(candidates, key=lambda d: -box_area(d.box)):
            if all(overlap(det.box, k.box) <= cfg.tile_overlap for k in kept):
                kept.append(det)
        return kept[len(found) :]

    def _tile_faces(self, tile: np.ndarray, pad: float, offset: np.ndarray) -> list[Detection]:
        border = round(max(tile.shape[:2]) * pad)
        image = cv2.copyMakeBorder(tile, border, border, border, border, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        height, width = image.shape[:2]
        faces = []
        for landmarks in self._tile_mesh.process(np.ascontiguousarray(image)).multi_face_landmarks or []:
            points = landmark_array(landmarks)[:, :2] * [width, height] - border + offset
            keypoints = np.array([points[list(group)].mean(axis=0) for group in MESH_AS_DETECTION])
            box = np.r_[points.min(axis=0), points.max(axis=0)]
            faces.append(Detection(box, self.config.tile_score, keypoints, TILE_SOURCE))
        return faces

    def _confirmed(self, rgb: np.ndarray, box: np.ndarray) -> bool:
        """The face mesh's own detector (the short-range model) finds a face at `confirm_score` on the mesh crop."""
        crop, _ = self.crop(rgb, box)
        return any(det.score[0] >= self.config.confirm_score for det in self._short.process(crop).detections or [])

    # mesh

    def crop(self, rgb: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The square mesh crop around `box` (black outside the image) and its image -> crop matrix."""
        matrix = square_crop_matrix(box, self.config.mesh_expand, self.config.mesh_size)
        size = self.config.mesh_size
        crop = cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        return crop, matrix

    def mesh(self, rgb: np.ndarray, box: np.ndarray, *, mirrored: bool = False) -> np.ndarray | None:
        """(478, 3) mesh points: x, y in image pixels, z in the same pixel scale (relative depth); None if not found.

        `mirrored=True` runs the mesh on the left-right mirror of the crop and returns its points in the
        mirrored image's pixels (x -> width - x), so index 33 is still the image-left eye corner there.
        """
        crop, matrix = self.crop(rgb, box)
        if mirrored:
            crop = cv2.flip(crop, 1)  # left-right, into a new contiguous array
        result = self._mesh.process(crop)
        if not result.multi_face_landmarks:
            return None
        size = self.config.mesh_size
        points = landmark_array(result.multi_face_landmarks[0]) * size
        if mirrored:
            points[:, 0] = size - points[:, 0]
        inverse = cv2.invertAffineTransform(matrix)
        xy = points[:, :2] @ inverse[:, :2].T + inverse[:, 2]
        if mirrored:
            xy[:, 0] = rgb.shape[1] - xy[:, 0]
        z = points[:, 2] * inverse[0, 0]
        return np.column_stack([xy, z]).astype(np.float32)

    def close(self) -> None:
        for graph in self._graphs():
            graph.close()


def kps5_from_detection(det: Detection) -> np.ndarray:
    """Approximate 5 keypoints from the detector's six: mouth corners beside the mouth centre.

    The mouth is about 0.83 x the eye distance wide (the ArcFace template), along the eye line.
    """
    right_eye, left_eye, nose, mouth = det.keypoints[:4]
    eye_vector = left_eye - right_eye  # subject's right eye (image left) -> subject's left eye
    return np.array(
        [right_eye, left_eye, nose, mouth - 0.415 * eye_vector, mouth + 0.415 * eye_vector], dtype=np.float32
    )


def kps5_from_mesh(mesh: np.ndarray) -> np.ndarray:
    """5 keypoints (iris centres, nose tip, mouth corners) from the 478-point mesh."""
    indices = (MESH_IRIS_IMAGE_LEFT, MESH_IRIS_IMAGE_RIGHT, MESH_NOSE_TIP, *MESH_MOUTH_CORNERS)
    return mesh[list(indices), :2].astype(np.float32)
