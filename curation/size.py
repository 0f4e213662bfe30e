"""Stage `size` (step `identify`): is the chosen face large enough for the training crop?

The FFHQ-style crop maps source pixels to crop pixels with a similarity matrix; its scale (crop pixels per
source pixel, `quality.upscale` in the dataset) above 1 means the face is enlarged. A face the crop would
enlarge more than `max_upscale` times is `too_small` for `crop_size`, decided from the 5 keypoints alone (the
matrix `align` then crops with), before dedupe and align: no crop is made for it, and near-duplicates of it
are reported as too small themselves rather than as copies of a rejected photo.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from dynamicid.curation.config import MIN_CROP_SIZE, CurationConfig
from dynamicid.curation.dedupe import CARRIED
from dynamicid.curation.stages import Stage, photo_schema
from dynamicid.schemas import RejectReason


def upscale_factor(matrix: list[float] | np.ndarray) -> float:
    """Crop pixels per source pixel of a source -> crop 2x3 matrix (above 1: the source is enlarged)."""
    m = np.asarray(matrix, np.float64).reshape(2, 3)
    return float(np.sqrt(abs(np.linalg.det(m[:, :2]))))


def crop_matrix(kps5: list[float], size: int) -> list[float]:
    """The matrix `analysis.align_face` crops with, without reading the photo."""
    from dynamicid.faces.align import ffhq_matrix

    return np.asarray(ffhq_matrix(np.asarray(kps5, np.float32).reshape(5, 2), size), np.float32).ravel().tolist()


def too_upscaled(c: CurationConfig, matrix: list[float]) -> str | None:
    """Why the face is too small for `crop_size` (the detail of a too_small reject), or None."""
    factor = upscale_factor(matrix)
    if factor <= c.max_upscale:
        return None
    fitting = int(c.crop_size * c.max_upscale / factor) // 8 * 8  # a multiple of 8, as SD's VAE needs
    smaller = f", --crop-size {fitting}" if fitting >= MIN_CROP_SIZE else ""
    return (
        f"the {c.crop_size} px crop would enlarge the face {factor:.2f}x (it covers {c.crop_size / factor:.0f} px "
        f"of the photo), above --max-upscale {c.max_upscale:g}: use a larger photo{smaller} or "
        f"--max-upscale {math.ceil(factor * 100) / 100:g}"
    )


class SizeStage(Stage):
    """Per photo (cheap, in the driver): too_small when the chosen face's crop would be enlarged too much."""

    name = "size"
    input_columns = ("source_path", "identity", "sha256", "face")
    carry_columns = CARRIED

    def output_schema(self) -> pa.Schema:
        return photo_schema()

    def process(self, batch: pa.Table) -> pa.Table:
        rows = []
        for p in batch.to_pylist():
            problem = too_upscaled(self.config, crop_matrix(p["face"]["kps5"], self.config.crop_size))
            rows.append(
                {
                    **{k: p[k] for k in ("source_path", "identity", "sha256")},
                    "reason": None if problem is None else RejectReason.TOO_SMALL.value,
                    "detail": problem,
                }
            )
        return pa.Table.from_pylist(rows, schema=photo_schema())
