"""The tables `dynamicid-eval score` writes (per_person.parquet, per_image.parquet) and the figures it sums up.

Type words: "string", "int32", "float32", "bool", "float32[4]"; every column is nullable (None = not
applicable, e.g. `expression_ok` where no expression was requested).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynamicid.schemas.dataset import Column

if TYPE_CHECKING:
    import pyarrow as pa

PER_PERSON_COLUMNS: tuple[Column, ...] = (
    Column("id", "string", "the image's id (manifest row id, or the image file's stem)"),
    Column("image", "string", "the scored image file"),
    Column("person", "int32", "0-based, in manifest / --person order"),
    Column("identity", "string", "the person's identity name when the manifest gives one"),
    Column("people", "int32", "people requested in the image"),
    Column("reference_faces", "int32", "reference photos of this person in which a face was found"),
    Column("face_found", "bool", "a generated face was assigned to this person (Hungarian matching on similarity)"),
    Column(
        "face_sim",
        "float32",
        "cosine similarity of the assigned face to the person's mean reference embedding; 0 when no face",
    ),
    Column(
        "same_person", "bool", "face_sim reaches the backend's same-person threshold (as a cosine); False when no face"
    ),
    Column("face_bbox", "float32[4]", "the assigned face's box, x0, y0, x1, y1 pixels"),
    Column("in_box", "bool", "the assigned face's centre lies in the person's box (None: no box)"),
    Column("id_confused", "bool", "the assigned face is closer to another person's reference (multi-ID only)"),
    Column("max_other_sim", "float32", "highest similarity of the assigned face to another person's reference"),
    Column("copy_paste", "float32", "face_sim minus the mean similarity to held-out photos of the same person"),
    Column("expression_requested", "string", "the requested expression"),
    Column("expression_found", "string", "the assigned face's expression"),
    Column("expression_ok", "bool", "found == requested (None where none was requested; False when no face)"),
    Column("expression_changed", "bool", "the face's expression differs from the first reference's"),
    Column("pose_requested", "string", "the requested pose bin"),
    Column("pose_found", "string", "the assigned face's pose bin"),
    Column("pose_ok", "bool", "found == requested pose bin (None where none was requested; False when no face)"),
    Column("yaw_error", "float32", "|yaw - the landmark image's yaw| in degrees (with a landmark image)"),
    Column("pitch_error", "float32", "|pitch - the landmark image's pitch| in degrees (with a landmark image)"),
)

PER_IMAGE_COLUMNS: tuple[Column, ...] = (
    Column("id", "string", "the image's id"),
    Column("image", "string", "the scored image file"),
    Column("prompt", "string", "the text prompt"),
    Column("people", "int32", "people requested"),
    Column("faces_found", "int32", "faces the face backend found"),
    Column("missing", "int32", "people without a face: max(people - faces_found, 0)"),
    Column("extra", "int32", "faces beyond the people requested: max(faces_found - people, 0)"),
    Column("face_sim_mean", "float32", "mean face_sim over the image's people"),
    Column("face_sim_min", "float32", "lowest face_sim among the image's people"),
    Column("id_confused", "int32", "people whose assigned face is closer to another person's reference"),
    Column("clip_t", "float32", "cosine of the CLIP image and prompt embeddings (None without --clip-model)"),
)

# summary.json figures: name -> (table, column, how one image / person contributes). Means over images
# ("per_image") or over people ("per_person"), each with a bootstrap 95% interval over images.
SUMMARY_METRICS: dict[str, tuple[str, str]] = {
    "clip_t": ("per_image", "clip_t"),
    "face_sim": ("per_person", "face_sim"),
    "face_sim_min": ("per_image", "face_sim_min"),
    "face_found": ("per_person", "face_found"),
    "same_person": ("per_person", "same_person"),
    "in_box": ("per_person", "in_box"),
    "id_confusion": ("per_person", "id_confused"),
    "copy_paste": ("per_person", "copy_paste"),
    "expr": ("per_person", "expression_ok"),
    "expression_changed": ("per_person", "expression_changed"),
    "pose": ("per_person", "pose_ok"),
    "yaw_error": ("per_person", "yaw_error"),
    "pitch_error": ("per_person", "pitch_error"),
    "extra_faces": ("per_image", "extra"),
}

_ARROW_TYPES = {"string": "string", "int32": "int32", "float32": "float32", "bool": "bool_"}


def _arrow_type(type_word: str) -> pa.DataType:
    import pyarrow as pa

    if type_word == "float32[4]":
        return pa.list_(pa.float32(), 4)
    return getattr(pa, _ARROW_TYPES[type_word])()


def evaluation_arrow_schema(columns: tuple[Column, ...]) -> pa.Schema:
    """The pyarrow schema of per_person.parquet (PER_PERSON_COLUMNS) or per_image.parquet (PER_IMAGE_COLUMNS)."""
    import pyarrow as pa

    return pa.schema([pa.field(c.name, _arrow_type(c.type), metadata={"doc": c.doc}) for c in columns])
