"""Face alignment: the FFHQ-style training crop, the ArcFace 5-point crop, and the 96x96 landmark map.

All warps are single affine transforms (cv2.warpAffine) whose 2x3 matrices map source pixels to crop pixels,
so any point (boxes, keypoints, landmarks) can follow the image with `transform_points`.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from dynamicid.faces.face import Face

# The ArcFace/insightface 112x112 template: left eye, right eye, nose tip, left and right mouth corners.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

_BORDERS = {"reflect": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT, "replicate": cv2.BORDER_REPLICATE}


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to (N, 2) points."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    matrix = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
    return (points @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of the inverse transform (crop pixels -> source pixels)."""
    return cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64).reshape(2, 3)).astype(np.float32)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src points onto dst (Umeyama)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    rotation = u @ np.diag(sign) @ vt
    scale = (singular * sign).sum() / src_c.var(0).sum()
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]]).astype(np.float32)


def warp(image: Image.Image | np.ndarray, matrix: np.ndarray, size: int, border: str = "reflect") -> np.ndarray:
    """Warp to a size x size crop; large shrinks go through an area resize first so they do not alias."""
    pixels = _as_array(image)
    matrix = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if scale < 0.5:
        shrink = min(1.0, 2.0 * scale)  # leave a factor 2 for warpAffine's bilinear filter
        small = cv2.resize(pixels, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
        actual = np.array([small.shape[1] / pixels.shape[1], small.shape[0] / pixels.shape[0]])
        matrix = matrix.copy()
        matrix[:, 0] /= actual[0]
        matrix[:, 1] /= actual[1]
        pixels = small
    if border not in _BORDERS:
        raise ValueError(f"border must be one of {', '.join(_BORDERS)}, got {border!r}")
    return cv2.warpAffine(pixels, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=_BORDERS[border])


def arcface_matrix(kps5: np.ndarray, size: int = 112) -> np.ndarray:
    """The 2x3 matrix mapping source pixels onto the ArcFace template scaled to size x size."""
    return similarity_transform(np.asarray(kps5).reshape(5, 2), ARCFACE_TEMPLATE_112 * (size / 112.0))


def arcface_align(image: Image.Image | np.ndarray, kps5: np.ndarray, size: int = 112) -> Image.Image:
    """The face aligned by its 5 keypoints onto the ArcFace template at size x size (224 for CLIP)."""
    return Image.fromarray(warp(image, arcface_matrix(kps5, size), size, border="constant"))


def ffhq_matrix(kps5: np.ndarray, size: int = 512) -> np.ndarray:
    """The FFHQ recipe (eye-to-eye and eye-to-mouth vectors) as a source -> crop 2x3 similarity matrix."""
    kps5 = np.asarray(kps5, dtype=np.float64).reshape(5, 2)
    eye_left, eye_right, _, mouth_left, mouth_right = kps5
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (mouth_left + mouth_right) * 0.5 - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    center = eye_avg + eye_to_mouth * 0.1
    top_left, bottom_left, top_right = center - x - y, center - x + y, center + x - y
    source = np.float32([top_left, top_right, bottom_left])
    target = np.float32([[0, 0], [size, 0], [0, size]])
    return cv2.getAffineTransform(source, target).astype(np.float32)


def ffhq_align(
    image: Image.Image | np.ndarray, face_or_kps5: Face | np.ndarray, size: int = 512, border: str = "ffhq"
) -> tuple[Image.Image, np.ndarray]:
    """FFHQ-style size x size crop with context (hair, chin), and its source -> crop 2x3 float32 matrix.

    `border="ffhq"` fills what lies outside the photo as the FFHQ recipe does: reflected, blurred, and faded to
    the crop's median colour with the distance from the photo's edge (a plain reflection puts mirror images of
    the face at the borders of tightly cropped photos). Any `warp` border name is accepted too.
    """
    kps5 = face_or_kps5.kps5 if isinstance(face_or_kps5, Face) else face_or_kps5
    matrix = ffhq_matrix(kps5, size)
    if border != "ffhq":
        return Image.fromarray(warp(_as_array(image), matrix, size, border=border)), matrix
    return ffhq_crop(image, matrix, size), matrix


def ffhq_crop(image: Image.Image | np.ndarray, matrix: np.ndarray, size: int) -> Image.Image:
    """`ffhq_align`'s crop for a matrix it returned (reflected, blurred and faded padding outside the photo)."""
    pixels = _as_array(image)
    crop = warp(pixels, matrix, size, border="reflect")
    outside = _outside_mask(pixels.shape[:2], matrix, size)
    if not outside.any():
        return Image.fromarray(crop)
    return Image.fromarray(_fade_padding(crop, outside))


def _outside_mask(source_shape: tuple[int, int], matrix: np.ndarray, size: int) -> np.ndarray:
    """Crop pixels whose source position lies outside the photo (the photo maps to a convex quadrilateral)."""
    height, width = source_shape
    corners = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], dtype=np.float32)
    inside = np.zeros((size, size), dtype=np.uint8)
    cv2.fillConvexPoly(inside, np.round(transform_points(corners, matrix) * 16).astype(np.int32), 1, shift=4)
    return inside == 0


def _fade_padding(crop: np.ndarray, outside: np.ndarray) -> np.ndarray:
    size = crop.shape[0]
    mask = outside.astype(np.uint8)
    distance = cv2.distanceTransform(mask, cv2.DIST_L2, 5)  # px from the photo
    fade = np.clip(distance / (0.1 * size), 0.0, 1.0)
    pixels = crop.astype(np.float32)
    small = cv2.resize(pixels, (size // 4, size // 4), interpolation=cv2.INTER_AREA)  # a wide blur, made cheap
    blurred = cv2.resize(cv2.GaussianBlur(small, (0, 0), sigmaX=0.005 * size), (size, size))
    median = np.median(small.reshape(-1, 3), axis=0)
    # OpenCV's element-wise float32 arithmetic: the same values as numpy's, without numpy's slow last axis of 3.
    cv2.add(pixels, cv2.subtract(blurred, pixels), dst=pixels, mask=mask)  # blurred outside the photo
    towards = cv2.subtract((*map(float, median), 0.0), pixels)  # a 4-tuple is a per-channel scalar
    cv2.add(pixels, cv2.multiply(towards, cv2.merge((fade, fade, fade))), dst=pixels)  # faded to the median
    pixels += 0.5
    return np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)


def render_landmark_map(points: np.ndarray, image_size: int = 512, map_size: int = 96) -> np.ndarray:
    """The keypoint encoder's input: +1 dots at the scaled landmarks on a -1 canvas (METHOD.md "Landmark map").

    `points` are pixels of a square image_size x image_size face image; each is scaled by map_size/image_size
    and set at (int(y), int(x)); points outside the map are skipped.
    """
    canvas = np.zeros((map_size, map_size), dtype=np.float32)
    scaled = np.asarray(points, dtype=np.float64).reshape(-1, 2) * (map_size / image_size)
    inside = (scaled >= 0).all(1) & (scaled < map_size).all(1)
    columns, rows = scaled[inside, 0].astype(int), scaled[inside, 1].astype(int)
    canvas[rows, columns] = 1.0
    return (canvas - 0.5) / 0.5
