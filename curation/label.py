"""Stage `label`: the dataset row of each aligned face (labels in crop coordinates, prompt, caption, quality)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dynamicid.curation.identify import describe_store, described_faces
from dynamicid.curation.size import upscale_factor
from dynamicid.curation.stages import Stage, photo_schema
from dynamicid.schemas import DATASET_COLUMNS, anchor_caption, dataset_arrow_schema, face_prompt, pose_bin_for_yaw

# The dataset's own columns (minus the image: its crop is in the crop store under `crop_key`) plus the photo
# bookkeeping columns.
_DATASET = dataset_arrow_schema()
LABEL_SCHEMA = photo_schema(
    *[
        (c.name, _DATASET.field(c.name).type)
        for c in DATASET_COLUMNS
        if c.name not in ("identity", "image", "source_path", "source_sha256")
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


def transform(points: list | None, matrix: np.ndarray) -> list:
    from dynamicid.faces.align import transform_points

    if not points:
        return []
    return transform_points(np.asarray(points, np.float32), matrix).tolist()


def label_row(photo: dict, landmarks: list | None) -> dict:
    face, detection = photo["face"], photo["detection"]
    matrix = np.asarray(photo["matrix"], np.float32).reshape(2, 3)
    pose = pose_bin_for_yaw(face["yaw"])
    x0, y0, x1, y1 = detection["bbox"]
    return {
        **{k: photo[k] for k in ("source_path", "identity", "sha256", "reason", "detail", "crop_key")},
        "face_bbox": detection["bbox"],
        "crop_transform": photo["matrix"],
        "embedding": face["embedding"],
        "embedding_model": face["embedding_model"],
        "landmarks": transform(landmarks, matrix),
        "kps5": transform(np.asarray(face["kps5"]).reshape(5, 2).tolist(), matrix),
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

    name = step = "label"
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
        faces = described_faces(self.store, [p["describe_key"] for p in photos])
        rows = []
        for photo, photo_faces in zip(photos, faces, strict=True):
            landmarks = next(f["landmarks"] for f in photo_faces if f["face_index"] == photo["face_index"])
            rows.append(label_row(photo, landmarks))
        return pa.Table.from_pylist(rows, schema=label_schema())
