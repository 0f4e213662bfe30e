"""Contracts shared by every stage: vocabularies, the dataset row schema, prompts, checkpoint metadata.

This package imports only the standard library at import time; `pyarrow` and `datasets` are imported
inside the functions that build their schema objects.
"""

from dynamicid.schemas.checkpoint import CHECKPOINT_FORMAT_VERSION, CheckpointMetadata
from dynamicid.schemas.dataset import (
    DATASET_COLUMNS,
    IDENTITY_COLUMNS,
    REJECT_COLUMNS,
    Column,
    dataset_arrow_schema,
    dataset_feature_dicts,
    dataset_features,
    identities_arrow_schema,
    rejects_arrow_schema,
)
from dynamicid.schemas.labels import (
    APPROXIMATE_SOURCE_EXPRESSIONS,
    EXPRESSION_CONFIDENCE_LOW,
    EXPRESSIONS,
    FER2013_TO_EXPRESSION,
    POSE_BINS,
    SOURCE_EXPRESSIONS,
    YAW_FRONT_LIMIT,
    YAW_SLIGHT_LIMIT,
    PoseBin,
    pose_bin_for_yaw,
    unsure_expression,
)
from dynamicid.schemas.prompts import (
    ANCHOR_CAPTION_TEMPLATE,
    FACE_PROMPT_TEMPLATE,
    RECONFIGURE_UNET_PROMPT,
    anchor_caption,
    face_prompt,
    parse_face_prompt,
)
from dynamicid.schemas.rejects import RejectReason

__all__ = [
    "ANCHOR_CAPTION_TEMPLATE",
    "APPROXIMATE_SOURCE_EXPRESSIONS",
    "CHECKPOINT_FORMAT_VERSION",
    "DATASET_COLUMNS",
    "EXPRESSIONS",
    "EXPRESSION_CONFIDENCE_LOW",
    "FACE_PROMPT_TEMPLATE",
    "FER2013_TO_EXPRESSION",
    "IDENTITY_COLUMNS",
    "POSE_BINS",
    "RECONFIGURE_UNET_PROMPT",
    "REJECT_COLUMNS",
    "SOURCE_EXPRESSIONS",
    "YAW_FRONT_LIMIT",
    "YAW_SLIGHT_LIMIT",
    "CheckpointMetadata",
    "Column",
    "PoseBin",
    "RejectReason",
    "anchor_caption",
    "dataset_arrow_schema",
    "dataset_feature_dicts",
    "dataset_features",
    "face_prompt",
    "identities_arrow_schema",
    "parse_face_prompt",
    "pose_bin_for_yaw",
    "rejects_arrow_schema",
    "unsure_expression",
]
