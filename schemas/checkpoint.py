"""Metadata stored in the header of the project's safetensors weights (all values strings on disk)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

CHECKPOINT_FORMAT_VERSION = 1

# Tensor-name prefixes of each part inside a weights file.
PART_PREFIXES: dict[str, str] = {
    "face_encoder": "face_encoder.",
    "saa": "saa.",
    "imr": "imr.",
    "keypoint_encoder": "keypoint_encoder.",
}

# Metadata fields that describe one part; the others (base_family, cross_attention_dim) describe the whole file.
# When the files of several stages are merged, a part's fields come from the file that holds that part.
PART_FIELDS: dict[str, tuple[str, ...]] = {
    "face_encoder": ("id_embed_model", "id_embed_dim", "clip_embed_dim", "num_tokens", "face_proj_dim"),
    "saa": ("lora_rank", "num_tokens"),
    "imr": ("imr_depth", "imr_dim", "num_tokens"),
    "keypoint_encoder": ("keypoint_dim",),
}


@dataclass
class CheckpointMetadata:
    """What a weights file was made for; a loader compares these against the model it fills."""

    format_version: int = CHECKPOINT_FORMAT_VERSION
    parts: list[str] = field(default_factory=list)  # subset of PART_PREFIXES
    base_family: str = "sd15"  # a name in dynamicid.models.families.FAMILIES
    # What the SAA UNet was trained to predict (dynamicid.models.objectives.PREDICTION_TYPES); files written
    # before it was recorded were all trained with epsilon.
    prediction_type: str = "epsilon"
    cross_attention_dim: int = 768
    lora_rank: int = 128
    num_tokens: int = 4
    id_embed_model: str = "arcface-buffalo_l"
    id_embed_dim: int = 512
    clip_embed_dim: int = 1280
    face_proj_dim: int | None = None  # the face encoder's MLP hidden width; None: 2 x id_embed_dim (the release's)
    imr_depth: int = 1
    imr_dim: int = 1024
    keypoint_dim: int = 768
    source: str = ""  # what the weights started from (a file hash, "release", "ip-adapter-faceid", "random")

    def to_header(self) -> dict[str, str]:
        """The safetensors `metadata` dict (str -> str)."""
        return {k: json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_header(cls, header: dict[str, str]) -> CheckpointMetadata:
        known = {f.name for f in fields(cls)}
        values = {k: json.loads(v) for k, v in header.items() if k in known}
        if "format_version" not in values:
            raise ValueError("not a DynamicID weights file: its safetensors metadata has no 'format_version'")
        if values["format_version"] > CHECKPOINT_FORMAT_VERSION:
            raise ValueError(
                f"weights format_version {values['format_version']} is newer than this toolkit's "
                f"{CHECKPOINT_FORMAT_VERSION}; upgrade dynamicid"
            )
        return cls(**values)
