"""Image loading for every stage: one RGB picture per file, as a person would see it, or a typed error.

EXIF orientation is applied, animated files give their first frame, and 16-bit, CMYK, palette, alpha and grey
images become 8-bit RGB. Anything that is not a whole, decodable, reasonably sized image raises
`ImageLoadError` naming the file and the reason; truncated files fail (ImageFile.LOAD_TRUNCATED_IMAGES is
never set here).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dynamicid.schemas.rejects import RejectReason

T = TypeVar("T")
# The default pixel limit: photos of every phone camera (up to 200 MP; a 108 MP one is 12000x9000) decode, a
# file declaring more is refused before any pixel is decoded (a decompression bomb). Pillow's smaller check
# (89 MP) would refuse those phone photos.
MAX_PIXELS = 200_000_000


class ImageLoadError(ValueError):
    """A file that cannot be turned into an RGB image.

    `code` is `RejectReason.UNREADABLE` when the bytes could not be read (missing file, permissions, I/O
    error) and `RejectReason.UNDECODABLE` when they were read but are not a usable image.
    """

    def __init__(self, path: str | os.PathLike, reason: str, code: RejectReason = RejectReason.UNDECODABLE):
        self.path = str(path)
        self.reason = reason
        self.code = code
        super().__init__(f"cannot load image {self.path}: {reason}")

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.path, self.reason, self.code))


def load_image(path: str | os.PathLike, *, max_pixels: int | None = None, at_least: int | None = None) -> Image.Image:
    """Decode `path` into an 8-bit RGB PIL image with its EXIF orientation applied.

    `max_pixels` (default `MAX_PIXELS`, 200 million) refuses images whose declared size is larger, before
    their pixels are decoded (decompression bombs). `at_least`: a JPEG may be decoded at 1/2, 1/4 or 1/8
    scale while both sides stay at least this many pixels (for thumbnails: several times faster).
    """
    return _decode(path, max_pixels, Image.Image.copy, at_least)  # a copy outlives the decoder's image


def load_array(path: str | os.PathLike, *, max_pixels: int | None = None) -> np.ndarray:
    """`load_image` as a read-only (H, W, 3) uint8 array, made without the PIL image copy in between."""
    return _decode(path, max_pixels, np.asarray)


def _decode(
    path: str | os.PathLike, max_pixels: int | None, keep: Callable[[Image.Image], T], at_least: int | None = None
) -> T:
    """The decoded, oriented RGB image of `path`, passed to `keep` before the decoder's image is closed."""
    path = Path(path)
    data = _read_bytes(path)
    if not data:
        raise ImageLoadError(path, "the file is empty (0 bytes)")
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit  # Pillow checks (inside Image.open) first: it must not refuse what we allow
    try:
        with warnings.catch_warnings():  # Pillow warns of sizes over its limit (set to ours) that we refuse next
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        with image:
            if limit is not None and image.width * image.height > limit:
                raise ImageLoadError(
                    path,
                    f"{image.width}x{image.height} pixels is over the {limit}-pixel limit "
                    "(possible decompression bomb); resize it or raise max_pixels",
                )
            if at_least:
                image.draft("RGB", (at_least, at_least))  # JPEG's DCT scaling; other formats ignore it
            image.load()  # Image.open sits on the first frame of animations (GIF, WebP, TIFF) and PSD's composite
            ImageOps.exif_transpose(image, in_place=True)
            return keep(_to_rgb(image))
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageLoadError(path, f"decompression bomb refused by Pillow ({error})") from error
    except UnidentifiedImageError as error:
        raise ImageLoadError(path, "not an image format Pillow can read (wrong extension or unsupported)") from error
    except OSError as error:
        # Pillow reports truncated and corrupt streams as OSError ("image file is truncated ...").
        raise ImageLoadError(path, f"corrupt or truncated image data ({error})") from error
    except Exception as error:  # decoders raise assorted types (SyntaxError, struct.error, ...) on bad input
        raise ImageLoadError(path, f"cannot decode ({type(error).__name__}: {error})") from error


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as error:
        raise ImageLoadError(path, "no such file", RejectReason.UNREADABLE) from error
    except IsADirectoryError as error:
        raise ImageLoadError(path, "is a directory, not an image file", RejectReason.UNREADABLE) from error
    except PermissionError as error:
        raise ImageLoadError(
            path, "permission denied; check the file's permissions", RejectReason.UNREADABLE
        ) from error
    except OSError as error:  # I/O errors, symlink loops, names too long
        raise ImageLoadError(
            path, f"cannot read the file ({error.strerror or error})", RejectReason.UNREADABLE
        ) from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparency is composited onto white, deep grey scaled down rather than clipped."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if values.max(initial=0) > 255 else 255.0
        grey = np.clip(values * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
