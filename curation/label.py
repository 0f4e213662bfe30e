"""Stage `label`: the dataset row of each aligned face (labels in crop coordinates, prompt, caption, quality)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dynamicid.curation.run import Run, candidates, photo_schema
from dynamicid.schemas import DATASET_COLUMNS, anchor_caption, dataset_arrow_schema, face_prompt, pose_bin_for_yaw

# The dataset's own columns (minus the image, carried as PNG bytes) plus the photo bookkeeping columns.
_DATASET = dataset_arrow_schema()
LABEL_SCHEMA = photo_schema(
    *[
        (c.name, _DATASET.field(c.name).type)
        for c in DATASET_COLUMNS
        if c.name not in ("identity", "image", "source_path", "source_sha256")
    ],
    ("png", pa.binary()),
)
_STRING_CLASS_COLUMNS = ("expression", "pose_bin")


def label_schema() -> pa.Schema:
    """ClassLabel columns are stored as their names here; the writer turns them into ClassLabel ids."""
    fields = []
    for field in LABEL_SCHEMA:
        fields.append(pa.field(field.name, pa.string()) if field.name in _STRING_CLASS_COLUMNS else field)
    return pa.schema(fields)


def transform(points: list | None, matrix: np.ndarray) -> list:
    from dynamicid.faces.align import transform_points

    if not points:
        return []
    return transform_points(np.asarray(points, np.float32), matrix).tolist()


def label_row(photo: dict) -> dict:
    face, detection = photo["face"], photo["detection"]
    matrix = np.asarray(photo["matrix"], np.float32).reshape(2, 3)
    pose = pose_bin_for_yaw(face["yaw"])
    x0, y0, x1, y1 = detection["bbox"]
    return {
        **{k: photo[k] for k in ("source_path", "identity", "sha256", "reason", "detail", "png")},
        "face_bbox": detection["bbox"],
        "crop_transform": photo["matrix"],
        "embedding": face["embedding"],
        "embedding_model": face["embedding_model"],
        "landmarks": transform(face["landmarks"], matrix),
        "kps5": transform(np.asarray(face["kps5"]).reshape(5, 2).tolist(), matrix),
        "yaw": face["yaw"],
        "pitch": face["pitch"],
        "roll": face["roll"],
        "pose_bin": pose,
        "expression": face["expression"],
        "expression_scores": face["expression_scores"],
        "face_prompt": face_prompt(face["expression"], pose),
        "caption": anchor_caption(face["expression"], pose),
        "quality": {
            "det_score": detection["score"],
            "face_size": min(x1 - x0, y1 - y0),
            "sharpness": photo["crop_sharpness"],
            "brightness": photo["crop_brightness"],
        },
    }


def label(run: Run, align_table: pa.Table) -> pa.Table:
    with run.stage_timer("label") as stats:
        rows = [label_row(p) for p in candidates(align_table)]
        stats.computed += len(rows)
    return pa.Table.from_pylist(rows, schema=label_schema())
