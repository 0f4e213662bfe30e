"""Perceptual hash and quality figures of aligned face crops (numpy only, no extra dependency)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.fft import dctn

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def phash(grey_crop: np.ndarray) -> int:
    """64-bit DCT hash (the classic pHash): signs of the 8x8 lowest frequencies of a 32x32 thumbnail vs their median."""
    small = np.asarray(Image.fromarray((grey_crop * 255).astype(np.uint8)).resize((32, 32), Image.BILINEAR), np.float32)
    low = dctn(small, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])  # the DC term is left out of the median: it only carries brightness
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0].astype(np.int64))


def phash_pair(grey_crop: np.ndarray) -> tuple[int, int]:
    """Hash of the crop and of its mirror image (a mirrored copy of a photo is a duplicate too)."""
    return phash(grey_crop), phash(grey_crop[:, ::-1])


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit differences between int64 hashes (broadcasting)."""
    x = np.bitwise_xor(np.asarray(a, np.int64), np.asarray(b, np.int64))
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x).astype(np.int32)
    x = np.ascontiguousarray(np.atleast_1d(x))
    return _POPCOUNT[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1, dtype=np.int32).reshape(np.shape(a ^ b))


def sharpness(grey_crop: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian on 0..255 grey levels (blurred crops score low)."""
    g = grey_crop * 255.0
    lap = -4 * g[1:-1, 1:-1] + g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]
    return float(lap.var())


def brightness(grey_crop: np.ndarray) -> float:
    return float(grey_crop.mean())
