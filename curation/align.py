"""Stage `align`: the FFHQ-style crop with context of the chosen face, its transform, and crop quality.

A face the crop would enlarge more than `max_upscale` times is `too_small` for the training resolution and is
not cropped at all (its matrix comes from the keypoints alone). Crops are written once, into the content-keyed
crop store (key: the photo's bytes, the 5 keypoints and the crop size), and referenced by `crop_key` afterwards;
`write` streams them into the dataset shards.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa

from dynamicid.curation.analysis import align_face
from dynamicid.curation.config import MIN_CROP_SIZE, CurationConfig
from dynamicid.curation.dedupe import CARRIED
from dynamicid.curation.stages import COMPUTED, Stage, photo_schema
from dynamicid.curation.store import ResultStore, fetch_or_compute
from dynamicid.curation.tables import digest
from dynamicid.schemas import RejectReason

CROP_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("png", pa.binary()),
        ("matrix", pa.list_(pa.float32(), 6)),
        ("sharpness", pa.float32()),
        ("brightness", pa.float32()),
        ("error", pa.string()),  # why no crop could be made (then the photo is rejected)
    ]
)
ALIGN_SCHEMA = photo_schema(
    ("crop_key", pa.string()),
    ("matrix", pa.list_(pa.float32(), 6)),
    ("crop_sharpness", pa.float32()),
    ("crop_brightness", pa.float32()),
)
CROP_ROW_GROUP = 4  # crops per Parquet row group: reading one crop back reads at most 4


def crop_store(work_dir) -> ResultStore:
    return ResultStore(work_dir / "stores" / "crops", CROP_SCHEMA, row_group_rows=CROP_ROW_GROUP)


def crop_key(sha256: str, kps5: list[float], size: int) -> str:
    """The crop store's key: the photo's bytes, the 5 keypoints the crop is aligned on, the crop size."""
    return digest(sha256, json.dumps(kps5), str(size))


def upscale_factor(matrix: list[float] | np.ndarray) -> float:
    """Crop pixels per source pixel of a source -> crop 2x3 matrix (above 1: the source is enlarged)."""
    m = np.asarray(matrix, np.float64).reshape(2, 3)
    return float(np.sqrt(abs(np.linalg.det(m[:, :2]))))


def crop_matrix(kps5: list[float], size: int) -> list[float]:
    """The matrix `align_face` crops with, without reading the photo."""
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


def quality_problem(c: CurationConfig, sharp: float, bright: float) -> str | None:
    if sharp < c.min_sharpness:
        return f"blurred: crop sharpness {sharp:.1f} < {c.min_sharpness}"
    if not c.min_brightness <= bright <= c.max_brightness:
        return f"exposure: crop brightness {bright:.2f} outside [{c.min_brightness}, {c.max_brightness}]"
    return None


class AlignStage(Stage):
    name = step = "align"
    settings = ("crop_size", "max_upscale", "min_sharpness", "min_brightness", "max_brightness")
    input_columns = ("source_path", "identity", "sha256", "face")
    carry_columns = CARRIED
    pooled = True

    def output_schema(self) -> pa.Schema:
        return ALIGN_SCHEMA.append(pa.field(COMPUTED, pa.bool_()))

    def setup(self) -> None:
        self.store = crop_store(self.context.work_dir)

    def finish(self) -> None:
        crop_store(self.context.work_dir).compact()

    def process(self, batch: pa.Table) -> pa.Table:
        photos = batch.to_pylist()
        size = self.config.crop_size
        job = {}
        for p in photos:
            kps5 = p["face"]["kps5"]
            p["crop_key"] = crop_key(p["sha256"], kps5, size)
            p["matrix"] = crop_matrix(kps5, size)
            p["too_small"] = too_upscaled(self.config, p["matrix"])
            if p["too_small"] is None:
                job.setdefault(p["crop_key"], (self.source(p["source_path"]), kps5))
        found, computed = fetch_or_compute(self.store, list(job), lambda k: align_face(k, *job[k], size))
        rows = []
        for p in photos:
            row = {k: p[k] for k in ("source_path", "identity", "sha256", "crop_key", "matrix")}
            if p["too_small"] is not None:
                rows.append({**row, "reason": RejectReason.TOO_SMALL.value, "detail": p["too_small"], COMPUTED: False})
                continue
            crop = found[p["crop_key"]]
            face = p["face"]
            problem = quality_problem(self.config, crop["sharpness"], crop["brightness"])
            if crop["error"] is not None:
                problem = f"no aligned crop could be made ({crop['error']})"
            elif face["yaw"] is None or not face["has_landmarks"] or face["expression"] is None:
                problem = (
                    "no dense landmarks, pose or expression: the face mesh found no face inside the detector's box"
                )
            rows.append(
                {
                    **row,
                    "reason": None if problem is None else RejectReason.LOW_QUALITY.value,
                    "detail": problem,
                    "matrix": crop["matrix"],
                    "crop_sharpness": crop["sharpness"],
                    "crop_brightness": crop["brightness"],
                    COMPUTED: p["crop_key"] in computed,
                }
            )
            computed.discard(p["crop_key"])
        return pa.Table.from_pylist(rows, schema=self.output_schema())
