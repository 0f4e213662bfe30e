"""Perceptual hash and quality figures of aligned face crops (numpy, OpenCV and scipy only).

The near-duplicate hash compares every face at one common scale: the inner face (the ArcFace template zoomed
`HASH_ZOOM` x about the face centre, so little background and few pixels outside the photo) is aligned on its
5 keypoints to `HASH_SIDE` pixels, whatever the source resolution, and its lowest 16 x 16 DCT frequencies are
signed against their median: 256 bits in 4 int64 words. A 96 x 96 aligned crop and the 1000 px photo it was cut
from then hash alike, and 256 bits (not the classic 64) tell apart two shots of one sitting (the ORL faces of
identities/); see curation/config.py for the measured distances.

The mirror hash flips the thumbnail, which equals the thumbnail of the mirrored photo only when the alignment
target is mirror-symmetric about the right line. The ArcFace template's own axis sits half a thumbnail pixel (2 %
of the eye distance) off the grid's centre line, x = (side - 1) / 2, and the face mesh is not mirror-equivariant:
the 5 keypoints of a mirrored copy, mapped back, sit on average 1.2 % of the eye distance to the image-left (23
identities/ photos mirrored at 0.75x and 0.5x). `HASH_TEMPLATE` is the template made symmetric, with its axis
`MIRROR_AXIS_OFFSET` pixels right of the grid's centre line to offset that bias (0 to 0.5 px tried; 0.25 left the
fewest copies apart): mirrored, downscaled copies within the limit went from 22 to 38 of 46, other copies and
different photos unchanged (<= 16 and >= 28 bits). Tests: test_curation_near_duplicates.py.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from dynamicid.faces.align import ARCFACE_TEMPLATE_112, similarity_transform, warp

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
HASH_ZOOM = 1.2  # >1 crops tighter than the ArcFace 112 crop (1.0 hashes the background of tight crops too)
HASH_SIDE = 32  # the common scale: the hashed thumbnail's side, pixels
HASH_FREQUENCIES = 16  # 16 x 16 DCT coefficients = 256 bits
HASH_WORDS = HASH_FREQUENCIES**2 // 64
HASH_VERSION = "2"  # part of the describe store's keys: bump when a face's hash changes for the same photo
_TEMPLATE_CENTRE = np.array([56.0, 66.0], np.float32)  # between the eyes and the mouth of the 112 template
_MIRROR = [1, 0, 2, 4, 3]  # the template's points seen in a mirror: the eyes and the mouth corners swap
MIRROR_AXIS_OFFSET = 0.25  # pixels of the 2 x HASH_SIDE warp (1 % of the eye distance); chosen on the copies above


def _hash_template(side: int) -> np.ndarray:
    """The ArcFace template zoomed HASH_ZOOM x about the face centre, in side x side pixels, made mirror-symmetric
    about (nearly) the centre line of the pixel grid, so that flipping the thumbnail is mirroring the photo."""
    points = (ARCFACE_TEMPLATE_112 - _TEMPLATE_CENTRE) * HASH_ZOOM * (side / 112.0)
    x = (points[:, 0] - points[_MIRROR, 0]) / 2 + (side - 1) / 2 + MIRROR_AXIS_OFFSET * side / (2 * HASH_SIDE)
    y = (points[:, 1] + points[_MIRROR, 1]) / 2 + _TEMPLATE_CENTRE[1] * side / 112.0
    return np.stack([x, y], axis=1).astype(np.float32)


HASH_TEMPLATE = _hash_template(2 * HASH_SIDE)  # the thumbnail is warped at 2x, then area-filtered


def grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def face_thumbnail(image: Image.Image | np.ndarray, kps5: np.ndarray) -> np.ndarray:
    """The inner face aligned on its 5 keypoints, grey 0..1, HASH_SIDE x HASH_SIDE (area-filtered from 2x)."""
    side = 2 * HASH_SIDE
    matrix = similarity_transform(np.asarray(kps5, np.float32).reshape(5, 2), HASH_TEMPLATE)
    # Replicated edges: a face near the border of one copy and inside the other (a crop) still hash alike.
    crop = warp(image, matrix, side, border="replicate")
    grey_crop = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0  # float: 8-bit rounding flips bits
    return cv2.resize(grey_crop, (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA)


def phash(grey_crop: np.ndarray) -> np.ndarray:
    """256-bit DCT hash (4 int64 words) of a grey crop: signs of its lowest frequencies vs their median."""
    from scipy.fft import dctn  # here, not at import: a build's driver hashes nothing (0.17 s less to start)

    small = cv2.resize(np.asarray(grey_crop, np.float32), (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA)
    low = dctn(small, norm="ortho")[:HASH_FREQUENCIES, :HASH_FREQUENCIES].ravel()
    bits = low > np.median(low[1:])
    bits[0] = False  # the DC term only carries brightness
    return np.packbits(bits).view(">u8").astype(np.int64)


def phash_pair(grey_crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hash of the crop and of its mirror image (a mirrored copy of a photo is a duplicate too)."""
    return phash(grey_crop), phash(grey_crop[:, ::-1])


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit differences between hashes of HASH_WORDS int64 words (broadcasting over the leading axes)."""
    # As uint64: numpy's bitwise_count counts the bits of a signed integer's absolute value (-1 has 1 bit, not 64)
    x = np.bitwise_xor(np.asarray(a, np.int64), np.asarray(b, np.int64)).view(np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x).sum(axis=-1, dtype=np.int32)
    x = np.ascontiguousarray(x)
    return _POPCOUNT[x.view(np.uint8)].reshape(*x.shape[:-1], -1).sum(axis=-1, dtype=np.int32)


def sharpness(grey_crop: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian on 0..255 grey levels (blurred crops score low)."""
    g = grey_crop * 255.0
    lap = -4 * g[1:-1, 1:-1] + g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]
    return float(lap.var())


def brightness(grey_crop: np.ndarray) -> float:
    return float(grey_crop.mean())
