"""The expensive per-photo work (decode + face models), one photo at a time; the stages batch and cache it.

Results are plain dicts in the layout of the stages' result stores. Each worker builds its own
`FaceAnalyzer` once (`backend.analyzer_for`), never shares one.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image

from dynamicid.batching import HalvingBatches, out_of_memory
from dynamicid.curation.imagehash import brightness, face_thumbnail, grey, phash_pair, sharpness
from dynamicid.schemas import EXPRESSIONS, RejectReason

LOG = logging.getLogger(__name__)
_SAID: set[str] = set()  # the batch failures this process has already reported (said once)
_DESCRIBE_BATCHES: weakref.WeakKeyDictionary[Any, HalvingBatches] = weakref.WeakKeyDictionary()

# A detected face, as the detect stage's table and store hold it (source pixels).
FACE_BOX = pa.struct(
    [("bbox", pa.list_(pa.float32(), 4)), ("kps5", pa.list_(pa.float32(), 10)), ("score", pa.float32())]
)
# Each row filtered by the one above ("up") and zlib's run-length strategy at level 1: half the CPU of Pillow's
# adaptive filters with the same zlib settings, for about as many bytes (-3 to +1.5 %); lossless (BENCHMARKS.md).
CROP_PNG = [
    cv2.IMWRITE_PNG_FILTER,
    cv2.IMWRITE_PNG_FILTER_UP,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_RLE,
    cv2.IMWRITE_PNG_COMPRESSION,
    1,
]


def _load(path: str, max_pixels: int | None) -> np.ndarray:
    """The photo as an (H, W, 3) uint8 RGB array: the face models and warps take it without another copy."""
    from dynamicid.faces import load_array

    return load_array(path, max_pixels=max_pixels)


def load_error(error: Exception) -> tuple[str, str]:
    """(reject reason, detail) of a photo that could not be loaded."""
    code = getattr(error, "code", RejectReason.UNDECODABLE)
    return str(code), getattr(error, "reason", str(error))


def detect_photo(
    analyzer: Any,
    key: str,
    path: str,
    then: Callable[[dict, np.ndarray], None] | None = None,
    max_pixels: int | None = None,
) -> dict:
    """Image size and the faces found (boxes, 5 keypoints, scores), largest first.

    `then(row, photo)`, if given, runs on the decoded photo once its faces are found: more work on the same decode.
    """
    from dynamicid.faces import ImageLoadError

    row: dict[str, Any] = {"key": key, "width": 0, "height": 0, "faces": [], "reason": None, "detail": None}
    try:
        image = _load(path, max_pixels)
    except ImageLoadError as error:
        row["reason"], row["detail"] = load_error(error)
        return row
    row["height"], row["width"] = image.shape[:2]
    try:
        faces = analyzer.detect(image)
    except Exception as error:  # a detector crash on one odd image must not stop the run
        row["reason"] = RejectReason.NO_FACE.value
        row["detail"] = f"the face detector failed on this image ({type(error).__name__}: {error})"
        return row
    row["faces"] = [
        {
            "bbox": [float(v) for v in f.bbox],
            "kps5": np.asarray(f.kps5, np.float32).ravel().tolist(),
            "score": float(f.score),
        }
        for f in faces
    ]
    if then is not None:
        then(row, image)
    return row


def _maybe_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def describe_photo(
    face_analyzer: Any,
    key: str,
    path: str,
    detected: list[dict],
    image: np.ndarray | None = None,
    max_pixels: int | None = None,
) -> dict:
    """`describe_photos` of one photo (`image`: the photo at `path` if the caller has it decoded already)."""
    return describe_photos(face_analyzer, [(key, path, detected, image)], max_pixels)[0]


def describe_photos(
    face_analyzer: Any, jobs: list[tuple[str, str, list[dict], np.ndarray | None]], max_pixels: int | None = None
) -> list[dict]:
    """Per job (key, path, detected faces, the photo decoded or None, then loaded within `max_pixels`): per
    detected face, its embedding, landmarks, pose, expression, crop hash and sharpness. The photos' faces go
    through the face models as one
    batch (`FaceAnalyzer.describe_batch`: one ResNet / ArcFace batch, what a GPU wants), in halves where the GPU
    runs out of memory (`dynamicid.batching`).

    A photo that cannot be loaded gets no faces (its error in `detail`); a face the models fail on is left out
    (and named in `detail`); the others still count.
    """
    from dynamicid.faces import ImageLoadError

    images: dict[int, np.ndarray] = {}
    results: list[dict | None] = []
    for index, (key, path, _, image) in enumerate(jobs):
        try:
            images[index] = _load(path, max_pixels) if image is None else image
            results.append(None)
        except ImageLoadError as error:  # the file changed or vanished since `detect`
            results.append({"key": key, "faces": [], "detail": str(error)})
    failures: dict[int, list[str]] = {index: [] for index in images}
    described = _describe_all(face_analyzer, images, {i: jobs[i][2] for i in images}, failures)
    for index, faces in described.items():
        results[index] = _face_rows(face_analyzer, jobs[index][0], images[index], faces, failures[index])
    return results


def _face_rows(face_analyzer: Any, key: str, image: np.ndarray, described: list[Any], failures: list[str]) -> dict:
    from dynamicid.faces.align import arcface_align

    faces = []
    for index, face in enumerate(described):
        if face is None:
            continue
        if face.embedding is None:
            failures.append(f"face {index}: no embedding")
            continue
        points = np.asarray(face.kps5, np.float32)
        small = grey(arcface_align(image, points, 112))
        hash_plain, hash_mirror = phash_pair(face_thumbnail(image, points))
        scores = face.expression_scores or {}
        faces.append(
            {
                "face_index": index,
                "embedding": np.asarray(face.embedding, np.float32).tolist(),
                "embedding_model": str(face_analyzer.embedding_model),
                "landmarks": None if face.landmarks is None else np.asarray(face.landmarks, np.float32).tolist(),
                "kps5": points.ravel().tolist(),
                "yaw": _maybe_float(face.yaw),
                "pitch": _maybe_float(face.pitch),
                "roll": _maybe_float(face.roll),
                "expression": face.expression,
                "expression_scores": [float(scores.get(e, 0.0)) for e in EXPRESSIONS],
                "expression_confidence": _maybe_float(face.expression_confidence),
                "phash": hash_plain.tolist(),
                "phash_mirror": hash_mirror.tolist(),
                "sharpness": sharpness(small),
                "backend": face.backend,
                "models": json.dumps(face.models, sort_keys=True),
            }
        )
    return {"key": key, "faces": faces, "detail": "; ".join(failures) or None}


def _describe_all(
    face_analyzer: Any, images: dict[int, np.ndarray], detected: dict[int, list[dict]], failures: dict[int, list[str]]
) -> dict[int, list[Any]]:
    """Every photo's faces described, the photos in as few batches as the GPU holds (all at once until a batch
    runs out of memory: `_batches`); a batch that fails otherwise goes face by face, so that one odd face does not
    cost the others (its failure is named in `failures` and its place is None)."""
    from dynamicid.faces import Face

    faces = {
        index: [
            Face(bbox=tuple(f["bbox"]), score=f["score"], kps5=np.asarray(f["kps5"], np.float32).reshape(5, 2))
            for f in found
        ]
        for index, found in detected.items()
    }

    def describe(indices: list[int]) -> list[list[Any]]:
        try:
            return face_analyzer.describe_batch([images[i] for i in indices], [faces[i] for i in indices])
        except Exception as error:
            if len(indices) > 1 and out_of_memory(error):
                raise  # the batches halve
            kind = type(error).__name__
            if len(indices) > 1 and kind not in _SAID:
                _SAID.add(kind)
                LOG.warning(
                    "the face models failed on a batch of %d photos (%s); going on face by face", len(indices), kind
                )
            return [_face_by_face(face_analyzer, images[i], faces[i], failures[i]) for i in indices]

    indices = list(images)
    return dict(zip(indices, _batches(face_analyzer)(describe, indices), strict=True))


def _face_by_face(face_analyzer: Any, image: np.ndarray, faces: list[Any], failures: list[str]) -> list[Any]:
    described = []
    for number, face in enumerate(faces):
        try:
            described.append(face_analyzer.describe(image, face))
        except Exception as error:
            failures.append(f"face {number}: {type(error).__name__}: {error}")
            described.append(None)
    return described


def _batches(face_analyzer: Any) -> HalvingBatches:
    """The analyzer's describe batches (one per analyzer, so per worker: the size a GPU out-of-memory error shrank
    them to stays, and is said once)."""
    if face_analyzer not in _DESCRIBE_BATCHES:
        _DESCRIBE_BATCHES[face_analyzer] = HalvingBatches(None, "photos")
    return _DESCRIBE_BATCHES[face_analyzer]


def align_face(
    key: str, path: str, kps5: list[float], size: int, max_pixels: int | None = None
) -> tuple[dict, Image.Image | None]:
    """The FFHQ-style crop's matrix and quality figures, and the crop itself (None when it could not be made).

    The row is what the align store keeps; the crop is kept only when its face is sure to be in the dataset
    (else `crop_face` makes it again for the kept faces: encoding every candidate's crop would cost CPU and disk
    for faces `select` drops)."""
    from dynamicid.faces.align import ffhq_align

    try:
        crop, matrix = ffhq_align(_load(path, max_pixels), np.asarray(kps5, np.float32).reshape(5, 2), size=size)
    except Exception as error:  # the file changed since `detect`, or degenerate keypoints
        row = {"key": key, "matrix": [0.0] * 6, "sharpness": 0.0, "brightness": 0.0, "error": str(error)}
        return row, None
    g = grey(crop)
    row = {
        "key": key,
        "matrix": np.asarray(matrix, np.float32).ravel().tolist(),
        "sharpness": sharpness(g),
        "brightness": brightness(g),
        "error": None,
    }
    return row, crop


def crop_face(path: str, matrix: list[float], size: int, max_pixels: int | None = None) -> Image.Image:
    """The crop `align_face` measured, made again from its matrix (the same pixels: the same warp and padding)."""
    from dynamicid.faces.align import ffhq_crop

    return ffhq_crop(_load(path, max_pixels), np.asarray(matrix, np.float32).reshape(2, 3), size)


def png_bytes(crop: Image.Image) -> bytes:
    rgb = np.asarray(crop if crop.mode == "RGB" else crop.convert("RGB"))
    done, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), CROP_PNG)
    if not done:
        raise RuntimeError("OpenCV could not encode a crop as PNG")
    return png.tobytes()
