"""The single source of truth: vocabularies, pose bins, prompts, dataset schema."""

import math
import subprocess
import sys

import pytest

from dynamicid import schemas
from dynamicid.schemas.labels import POSE_NAMES


def test_expression_vocabulary_covers_fer2013_classes():
    assert len(schemas.EXPRESSIONS) == 7
    assert set(schemas.FER2013_TO_EXPRESSION.values()) == set(schemas.EXPRESSIONS)


@pytest.mark.parametrize(
    ("yaw", "expected"),
    [
        (0.0, "front view"),
        (14.9, "front view"),
        (-14.9, "front view"),
        (15.0, "slightly turned to the left"),
        (-20.0, "slightly turned to the right"),
        (45.0, "fully turned to the left"),
        (-80.0, "fully turned to the right"),
    ],
)
def test_pose_bins_partition_the_yaw_axis(yaw, expected):
    assert schemas.pose_bin_for_yaw(yaw) == expected


def test_pose_bin_rejects_nan():
    with pytest.raises(ValueError, match="yaw"):
        schemas.pose_bin_for_yaw(math.nan)


def test_face_prompt_grammar_and_vocabulary_check():
    assert schemas.face_prompt("happy", "front view") == "the expression is happy, the face is front view"
    assert len({schemas.face_prompt(e, p) for e in schemas.EXPRESSIONS for p in POSE_NAMES}) == 35
    with pytest.raises(ValueError, match="afraid, angry"):
        schemas.face_prompt("smiling", "front view")


def test_features_and_arrow_schema_come_from_one_definition():
    features = schemas.dataset_features()
    arrow = schemas.dataset_arrow_schema()
    assert list(features) == [c.name for c in schemas.DATASET_COLUMNS] == arrow.names
    assert features["expression"].names == list(schemas.EXPRESSIONS)
    assert features["pose_bin"].names == list(POSE_NAMES)
    assert b"huggingface" in arrow.metadata
    assert schemas.rejects_arrow_schema().names == ["source_path", "stage", "reason", "detail"]


def test_arrow_schemas_are_what_datasets_makes_of_the_features():
    """The schemas are built with pyarrow alone; `datasets` must see them as its own (types and metadata)."""
    import datasets

    for columns, schema in [
        (schemas.DATASET_COLUMNS, schemas.dataset_arrow_schema()),
        (schemas.dataset.IDENTITY_COLUMNS, schemas.identities_arrow_schema()),
        (schemas.dataset.REJECT_COLUMNS, schemas.rejects_arrow_schema()),
    ]:
        features = datasets.Features.from_arrow_schema(schema)
        assert list(features) == [c.name for c in columns]
        assert features.arrow_schema.equals(schema, check_metadata=True)
    assert datasets.Features.from_arrow_schema(schemas.dataset_arrow_schema()) == schemas.dataset_features()


def test_the_schemas_and_the_card_are_made_without_importing_datasets():
    """A build writes Parquet with these schemas and a card from them; importing `datasets` for that cost each
    process about half a CPU-second."""
    code = (
        "import sys; from dynamicid import schemas; schemas.dataset_arrow_schema(); schemas.rejects_arrow_schema(); "
        "schemas.identities_arrow_schema(); import dynamicid.curation.pipeline; "
        "from dynamicid.curation.card import card_metadata; card_metadata(1, 1); print('datasets' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_checkpoint_metadata_round_trips_through_a_header():
    meta = schemas.CheckpointMetadata(parts=["saa", "face_encoder"], lora_rank=4, id_embed_dim=128)
    header = meta.to_header()
    assert all(isinstance(v, str) for v in header.values())
    assert schemas.CheckpointMetadata.from_header(header) == meta
    with pytest.raises(ValueError, match="format_version"):
        schemas.CheckpointMetadata.from_header({"lora_rank": "4"})


def test_face_prompts_read_back_to_their_labels():
    """The 7 x 5 grid round-trips; a caption that is not a face prompt is refused."""
    for expression in schemas.EXPRESSIONS:
        for pose in POSE_NAMES:
            assert schemas.parse_face_prompt(schemas.face_prompt(expression, pose)) == (expression, pose)
    with pytest.raises(ValueError):
        schemas.parse_face_prompt("a photo of a person, happy expression, front view")
