"""The curated dataset's tables, defined once.

Each column is declared here with a small type word; `dataset_features()` turns the declaration into
`datasets.Features` (the dataset card and `load_dataset` typing come from it) and `dataset_arrow_schema()`
into the pyarrow schema the writer uses: the same as `Features.arrow_schema` (tested), which carries the
features as metadata so Parquet files reload with Image and ClassLabel intact, but made with pyarrow alone.

Type words: "string", "int32", "float32", "image", "float32[]" (any length), "float32[N]" (fixed length),
"float32[][2]" (list of points), "class:expression", "class:pose", "struct:quality".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dynamicid.schemas.labels import EXPRESSIONS, POSE_NAMES

if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import Features


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    doc: str


QUALITY_FIELDS: tuple[tuple[str, str], ...] = (
    ("det_score", "face detector confidence, 0..1"),
    ("face_size", "short side of the face box in the source image, pixels"),
    ("sharpness", "variance of the Laplacian of the aligned grey crop (higher is sharper)"),
    ("brightness", "mean grey level of the aligned crop, 0..1"),
    (
        "upscale",
        "source -> crop scale factor, crop pixels per source pixel (above 1: the face was enlarged; at most "
        "--max-upscale)",
    ),
)

DATASET_COLUMNS: tuple[Column, ...] = (
    Column("identity", "string", "the person: the name of the photo folder (or cluster id with --cluster)"),
    Column("image", "image", "FFHQ-style square aligned face crop with context (--crop-size, 512 px), encoded PNG"),
    Column("source_path", "string", "path of the source photo, relative to PHOTOS_DIR, '/' separated"),
    Column("source_sha256", "string", "sha256 of the source file's bytes"),
    Column("face_bbox", "float32[4]", "face box in the source image (after EXIF orientation): x0, y0, x1, y1 pixels"),
    Column(
        "crop_transform",
        "float32[6]",
        "2x3 affine matrix, row-major, mapping source-image pixels to crop pixels (invert it to map back)",
    ),
    Column("embedding", "float32[]", "identity embedding of the face (L2-normalised)"),
    Column("embedding_model", "string", "which model made `embedding` (e.g. dlib-resnet-128, arcface-buffalo_l)"),
    Column("landmarks", "float32[][2]", "dense face landmarks in crop pixels (x, y)"),
    Column("kps5", "float32[][2]", "5 keypoints in crop pixels: eyes, nose, mouth corners, image left to right"),
    Column("yaw", "float32", "head yaw in degrees (sign convention: dynamicid.schemas.labels)"),
    Column("pitch", "float32", "head pitch in degrees"),
    Column("roll", "float32", "head roll in degrees"),
    Column("pose_bin", "class:pose", "one of the five yaw bins"),
    Column("expression", "class:expression", "the most likely of the seven expressions"),
    Column(
        "expression_scores",
        "float32[7]",
        "probabilities of the seven expressions (calibrated expression model), in vocabulary order",
    ),
    Column(
        "expression_confidence",
        "float32",
        "probability of `expression` under the calibrated expression model, 0..1 (below "
        "schemas.labels.EXPRESSION_CONFIDENCE_LOW the label is unsure)",
    ),
    Column("face_prompt", "string", "'the expression is {expression}, the face is {pose}'"),
    Column(
        "caption",
        "string",
        "caption for the anchoring stage: a scene caption of the crop by `caption_model`, else the template "
        "'a photo of a person, {expression} expression, {pose}'",
    ),
    Column("caption_model", "string", "which captioner wrote `caption` (type:folder:files digest); null: the template"),
    Column("quality", "struct:quality", "quality figures: " + "; ".join(f"{n}: {d}" for n, d in QUALITY_FIELDS)),
)

IDENTITY_COLUMNS: tuple[Column, ...] = (
    Column("identity", "string", "the person"),
    Column("num_images", "int32", "rows of this identity in the dataset"),
    Column("num_scanned", "int32", "photo files scanned in this identity's folder"),
    Column("num_rejected", "int32", "photo files of this folder in rejects.parquet"),
    Column("grid_cells_covered", "int32", "distinct (expression, pose_bin) cells among the kept images, of 35"),
    Column("mean_embedding", "float32[]", "L2-normalised mean of the kept images' embeddings"),
    Column("embedding_model", "string", "which model made the embeddings"),
)

REJECT_COLUMNS: tuple[Column, ...] = (
    Column("source_path", "string", "path of the photo, relative to PHOTOS_DIR"),
    Column("stage", "string", "the stage that rejected it (scan, detect, identify, dedupe, align, label, select)"),
    Column("reason", "string", "reason code (dynamicid.schemas.rejects.RejectReason), e.g. no_face"),
    Column("detail", "string", "one line a person can act on"),
)


def _value(dtype: str) -> dict:
    return {"dtype": dtype, "_type": "Value"}


def _column_type(type_word: str) -> tuple[pa.DataType, dict]:
    """A type word's pyarrow type and its `datasets` feature, serialised as `Features.to_dict` writes it."""
    import pyarrow as pa

    float32 = (pa.float32(), _value("float32"))
    if type_word in ("string", "int32", "float32"):
        return getattr(pa, type_word)(), _value(type_word)
    if type_word == "image":
        return pa.struct([("bytes", pa.binary()), ("path", pa.string())]), {"_type": "Image"}
    if type_word == "float32[]":
        return pa.list_(float32[0]), {"feature": float32[1], "_type": "List"}
    if type_word == "float32[][2]":
        point = {"feature": float32[1], "length": 2, "_type": "List"}
        return pa.list_(pa.list_(float32[0], 2)), {"feature": point, "_type": "List"}
    if type_word.startswith("float32[") and type_word.endswith("]"):
        length = int(type_word[len("float32[") : -1])
        return pa.list_(float32[0], length), {"feature": float32[1], "length": length, "_type": "List"}
    if type_word in ("class:expression", "class:pose"):
        names = EXPRESSIONS if type_word == "class:expression" else POSE_NAMES
        return pa.int64(), {"names": list(names), "_type": "ClassLabel"}
    if type_word == "struct:quality":
        return pa.struct([(name, float32[0]) for name, _ in QUALITY_FIELDS]), {
            name: float32[1] for name, _ in QUALITY_FIELDS
        }
    raise ValueError(f"unknown column type word {type_word!r}")


def _feature_dicts(columns: tuple[Column, ...]) -> dict[str, dict]:
    return {c.name: _column_type(c.type)[1] for c in columns}


def _arrow_schema(columns: tuple[Column, ...]) -> pa.Schema:
    """What `Features.arrow_schema` gives for these columns, made without importing `datasets` (about half a
    CPU-second per process: the curation workers and driver need the schema, not the library)."""
    import pyarrow as pa

    types = {c.name: _column_type(c.type) for c in columns}
    metadata = {"huggingface": json.dumps({"info": {"features": {name: t[1] for name, t in types.items()}}})}
    return pa.schema([(name, t[0]) for name, t in types.items()], metadata=metadata)


def dataset_feature_dicts() -> dict[str, dict]:
    """The features of a curated dataset row as `datasets.Features.to_dict()` writes them (no `datasets` import)."""
    return _feature_dicts(DATASET_COLUMNS)


def dataset_features() -> Features:
    """`datasets.Features` of a curated dataset row."""
    import datasets as ds

    return ds.Features.from_dict(dataset_feature_dicts())


def dataset_arrow_schema() -> pa.Schema:
    """The pyarrow schema of the dataset's Parquet shards, with the HF features in its metadata."""
    return _arrow_schema(DATASET_COLUMNS)


def identities_arrow_schema() -> pa.Schema:
    return _arrow_schema(IDENTITY_COLUMNS)


def rejects_arrow_schema() -> pa.Schema:
    return _arrow_schema(REJECT_COLUMNS)
