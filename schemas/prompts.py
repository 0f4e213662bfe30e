"""Prompt templates: the face prompt of the reconfiguration stage and the anchoring caption."""

from __future__ import annotations

from dynamicid.schemas.labels import check_expression, check_pose

FACE_PROMPT_TEMPLATE = "the expression is {expression}, the face is {pose}"

# Caption of a curated image for the anchoring stage (the identity is carried by the ID tokens, not the text).
ANCHOR_CAPTION_TEMPLATE = "a photo of a person, {expression} expression, {pose}"

# The fixed UNet prompt of the reconfiguration stage's latent-consistency loss (METHOD.md, "Training").
RECONFIGURE_UNET_PROMPT = "portrait, cinematic photo, film, professional, 4k, highly detailed"


def face_prompt(expression: str, pose: str) -> str:
    """'the expression is happy, the face is front view' (both words checked against the vocabularies)."""
    return FACE_PROMPT_TEMPLATE.format(expression=check_expression(expression), pose=check_pose(pose))


def anchor_caption(expression: str, pose: str) -> str:
    """The anchoring-stage caption of a curated image."""
    return ANCHOR_CAPTION_TEMPLATE.format(expression=check_expression(expression), pose=check_pose(pose))
