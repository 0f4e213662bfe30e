"""The curated dataset's tables, defined once.

Each column is declared here with a small type word; `dataset_features()` turns the declaration into
`datasets.Features` (the dataset card and `load_dataset` typing come from it) and `dataset_arrow_schema()`
into the pyarrow schema the writer uses (`Features.arrow_schema`, which carries the features as metadata so
Parquet files reload with Image and ClassLabel intact).

Type words: "string", "int32", "float32", "image", "float32[]" (any length), "float32[N]" (fixed length),
"float32[][2]" (list of points), "class:expression", "class:pose", "struct:quality".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
    Column("caption", "string", "caption for the anchoring stage"),
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


def _feature(type_word: str) -> Any:
    import datasets as ds

    if type_word in ("string", "int32", "float32"):
        return ds.Value(type_word)
    if type_word == "image":
        return ds.Image()
    if type_word == "float32[]":
        return ds.List(ds.Value("float32"))
    if type_word == "float32[][2]":
        return ds.List(ds.List(ds.Value("float32"), length=2))
    if type_word.startswith("float32[") and type_word.endswith("]"):
        return ds.List(ds.Value("float32"), length=int(type_word[len("float32[") : -1]))
    if type_word == "class:expression":
        return ds.ClassLabel(names=list(EXPRESSIONS))
    if type_word == "class:pose":
        return ds.ClassLabel(names=list(POSE_NAMES))
    if type_word == "struct:quality":
        return {name: ds.Value("float32") for name, _ in QUALITY_FIELDS}
    raise ValueError(f"unknown column type word {type_word!r}")


def _features(columns: tuple[Column, ...]) -> Features:
    import datasets as ds

    return ds.Features({c.name: _feature(c.type) for c in columns})


def dataset_features() -> Features:
    """`datasets.Features` of a curated dataset row."""
    return _features(DATASET_COLUMNS)


def dataset_arrow_schema() -> pa.Schema:
    """The pyarrow schema of the dataset's Parquet shards, with the HF features in its metadata."""
    return dataset_features().arrow_schema


def identities_arrow_schema() -> pa.Schema:
    return _features(IDENTITY_COLUMNS).arrow_schema


def rejects_arrow_schema() -> pa.Schema:
    return _features(REJECT_COLUMNS).arrow_schema
