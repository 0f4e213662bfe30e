"""Stage `label`: the dataset row of each aligned face (labels in crop coordinates, prompt, caption, quality)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dynamicid.curation.describe_store import describe_store, face_landmarks
from dynamicid.curation.size import upscale_factor
from dynamicid.curation.stages import Stage, photo_schema
from dynamicid.faces.align import transform_points
from dynamicid.schemas import DATASET_COLUMNS, anchor_caption, dataset_arrow_schema, face_prompt, pose_bin_for_yaw

# The dataset's own columns (minus the image: its crop is in the crop store under `crop_key`; minus
# `caption_model`: the `caption` stage's) plus the photo bookkeeping columns.
_DATASET = dataset_arrow_schema()
LABEL_SCHEMA = photo_schema(
    *[
        (c.name, _DATASET.field(c.name).type)
        for c in DATASET_COLUMNS
        if c.name not in ("identity", "image", "source_path", "source_sha256", "caption_model")
    ],
    ("crop_key", pa.string()),
)
_STRING_CLASS_COLUMNS = ("expression", "pose_bin")


def label_schema() -> pa.Schema:
    """ClassLabel columns are stored as their names here; the writer turns them into ClassLabel ids."""
    fields = []
    for field in LABEL_SCHEMA:
        fields.append(pa.field(field.name, pa.string()) if field.name in _STRING_CLASS_COLUMNS else field)
    return pa.schema(fields)


def crop_landmarks(points: list[np.ndarray | None], matrices: list[np.ndarray]) -> pa.Array:
    """The dense landmarks of each row in crop pixels (an empty list where the mesh failed), built in Arrow:
    as Python lists, 478 points a row cost more than the rest of the label."""
    moved = [
        transform_points(p, m) if p is not None else np.zeros((0, 2), np.float32)
        for p, m in zip(points, matrices, strict=True)
    ]
    offsets = np.r_[0, np.cumsum([len(m) for m in moved])].astype(np.int32)
    flat = np.concatenate(moved).reshape(-1) if moved else np.zeros(0, np.float32)
    pairs = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), 2)
    return pa.ListArray.from_arrays(pa.array(offsets), pairs).cast(LABEL_SCHEMA.field("landmarks").type)


def label_row(photo: dict, matrix: np.ndarray) -> dict:
    """Every column but `landmarks` (`crop_landmarks`)."""
    face, detection = photo["face"], photo["detection"]
    pose = pose_bin_for_yaw(face["yaw"])
    x0, y0, x1, y1 = detection["bbox"]
    return {
        **{k: photo[k] for k in ("source_path", "identity", "sha256", "reason", "detail", "crop_key")},
        "face_bbox": detection["bbox"],
        "crop_transform": photo["matrix"],
        "embedding": face["embedding"],
        "embedding_model": face["embedding_model"],
        "kps5": transform_points(np.asarray(face["kps5"], np.float32).reshape(5, 2), matrix).tolist(),
        "yaw": face["yaw"],
        "pitch": face["pitch"],
        "roll": face["roll"],
        "pose_bin": pose,
        "expression": face["expression"],
        "expression_scores": face["expression_scores"],
        "expression_confidence": face["expression_confidence"],
        "face_prompt": face_prompt(face["expression"], pose),
        "caption": anchor_caption(face["expression"], pose),
        "quality": {
            "det_score": detection["score"],
            "face_size": min(x1 - x0, y1 - y0),
            "sharpness": photo["crop_sharpness"],
            "brightness": photo["crop_brightness"],
            "upscale": upscale_factor(photo["matrix"]),
        },
    }


class LabelStage(Stage):
    """Labels in crop coordinates (the dense landmarks come back from the describe store), prompt, caption."""

    name = "label"
    input_columns = (
        "source_path",
        "identity",
        "sha256",
        "reason",
        "detail",
        "face_index",
        "face",
        "detection",
        "describe_key",
        "crop_key",
        "matrix",
        "crop_sharpness",
        "crop_brightness",
    )

    def output_schema(self) -> pa.Schema:
        return label_schema()

    def setup(self) -> None:
        self.store = describe_store(self)

    def process(self, batch: pa.Table) -> pa.Table:
        photos = batch.to_pylist()
        matrices = [np.asarray(p["matrix"], np.float32).reshape(2, 3) for p in photos]
        points = face_landmarks(self.store, [p["describe_key"] for p in photos], [p["face_index"] for p in photos])
        schema = label_schema()
        landmarks = schema.get_field_index("landmarks")
        rows = [label_row(photo, matrix) for photo, matrix in zip(photos, matrices, strict=True)]
        table = pa.Table.from_pylist(rows, schema=schema.remove(landmarks))
        return table.add_column(landmarks, schema.field(landmarks), crop_landmarks(list(points), matrices))
