"""Prompt templates: the face prompt of the reconfiguration stage and the anchoring caption."""

from __future__ import annotations

from dynamicid.schemas.labels import check_expression, check_pose

FACE_PROMPT_TEMPLATE = "the expression is {expression}, the face is {pose}"

# Caption of a curated image for the anchoring stage (the identity is carried by the ID tokens, not the text).
ANCHOR_CAPTION_TEMPLATE = "a photo of a person, {expression} expression, {pose}"

# The instruction an instruction-following captioner (`dynamicid-curate build --captioner DIR`) answers about each
# kept crop; `--caption-prompt` replaces it. The caption sits beside the ID tokens in the anchoring stage, so it
# should say what they need not (setting, clothing, lighting) and never who the person is.
CAPTION_INSTRUCTION = (
    "Describe this photo in one short sentence for an image generator: the setting and background, the "
    "person's clothing and accessories, and the lighting. Do not name the person or describe their face."
)

# The fixed UNet prompt of the reconfiguration stage's latent-consistency loss (METHOD.md, "Training").
RECONFIGURE_UNET_PROMPT = "portrait, cinematic photo, film, professional, 4k, highly detailed"


def face_prompt(expression: str, pose: str) -> str:
    """'the expression is happy, the face is front view' (both words checked against the vocabularies)."""
    return FACE_PROMPT_TEMPLATE.format(expression=check_expression(expression), pose=check_pose(pose))


def parse_face_prompt(prompt: str) -> tuple[str, str]:
    """(expression, pose) of a face prompt written by `face_prompt` (a ValueError names a prompt it did not write)."""
    head, _, pose = prompt.partition(", the face is ")
    expression = head.removeprefix("the expression is ")
    if face_prompt(expression, pose) != prompt:
        raise ValueError(f"{prompt!r} is not a face prompt ({FACE_PROMPT_TEMPLATE!r})")
    return expression, pose


def anchor_caption(expression: str, pose: str) -> str:
    """The anchoring-stage caption of a curated image."""
    return ANCHOR_CAPTION_TEMPLATE.format(expression=check_expression(expression), pose=check_pose(pose))


# Benchmark prompt lists (package data `schemas/benchmark/<kind>.txt`): one template per line, `{subject}`
# becomes BENCHMARK_SUBJECTS[number of people]; lines starting with '#' are comments.
BENCHMARK_PROMPT_LISTS = ("single", "multi")
BENCHMARK_SUBJECTS = {1: "a person", 2: "two people", 3: "three people", 4: "four people", 5: "five people"}


def benchmark_prompts(kind: str) -> list[str]:
    """The templates of a shipped prompt list ("single" or "multi")."""
    from importlib.resources import files

    if kind not in BENCHMARK_PROMPT_LISTS:
        raise ValueError(f"unknown prompt list {kind!r}; valid: {', '.join(BENCHMARK_PROMPT_LISTS)} or a file")
    return parse_prompt_list(files("dynamicid.schemas").joinpath("benchmark", f"{kind}.txt").read_text("utf-8"))


def parse_prompt_list(text: str) -> list[str]:
    """Template lines of a prompt-list file (blank lines and '#' comments skipped)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def benchmark_prompt(template: str, people: int) -> str:
    """A template with `{subject}` filled for `people` people (templates without it are used as they are)."""
    if people not in BENCHMARK_SUBJECTS:
        raise ValueError(f"{people} people: benchmark prompts cover 1 to {max(BENCHMARK_SUBJECTS)}")
    return template.replace("{subject}", BENCHMARK_SUBJECTS[people])
