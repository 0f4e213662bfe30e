"""Who appears in the picture: one `Person` per identity, and the checks on their layout boxes."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dynamicid.models.saa import covered_box, default_boxes
from dynamicid.schemas.labels import check_expression, check_pose

ImageSource = str | Path | Image.Image
Box = tuple[float, float, float, float]  # (y0, x0, y1, x1), fractions of the image height / width


class DynamicIDWarning(UserWarning):
    """A setting or reference that works but probably not as intended (overlapping boxes, several faces)."""


@dataclass
class Person:
    """One identity to place in the image.

    Args:
        image: reference photo (path or PIL image), whose largest face is used, or an analysed
            `dynamicid.infer.references.Reference` (e.g. a curated crop: `Reference.from_crop`).
        expression: target expression from `dynamicid.schemas.EXPRESSIONS`; None keeps the reference's.
        pose: target pose-bin name from `dynamicid.schemas.POSE_BINS`; None keeps the reference's.
        landmark_image: a photo whose face gives the target landmarks (and labels, unless given as text).
        box: where the person goes, (y0, x0, y1, x1) in [0, 1]; None for every person means equal vertical strips.
    """

    image: ImageSource
    expression: str | None = None
    pose: str | None = None
    landmark_image: ImageSource | None = None
    box: Box | None = None

    @property
    def wants_edit(self) -> bool:
        """Whether the IMR rewrites this person's tokens."""
        return self.expression is not None or self.pose is not None or self.landmark_image is not None


def describe_source(source: ImageSource | None) -> str:
    """How a reference is named in messages and the sidecar."""
    if source is None:
        return "-"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.width}x{source.height}>"
    if hasattr(source, "clip_face"):  # an analysed Reference (dynamicid.infer.references)
        return source.source
    return str(source)


def check_box(box: Box, index: int) -> Box:
    """A valid (y0, x0, y1, x1) box in [0, 1], or a ValueError naming the person and what is wrong."""
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError) as error:
        raise ValueError(f"box of person {index + 1} must be 4 numbers (y0, x0, y1, x1), got {box!r}") from error
    if len(values) != 4:
        raise ValueError(f"box of person {index + 1} must be 4 numbers (y0, x0, y1, x1), got {len(values)}")
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"box of person {index + 1} {values} is outside [0, 1]: coordinates are image fractions")
    y0, x0, y1, x1 = values
    if y0 >= y1 or x0 >= x1:
        raise ValueError(f"box of person {index + 1} {values} is empty: it needs y0 < y1 and x0 < x1")
    return values  # type: ignore[return-value]


def resolve_boxes(people: list[Person]) -> list[Box]:
    """The boxes of all people: each checked, or strips when none is given; warns when two boxes overlap."""
    given = [p.box for p in people if p.box is not None]
    if not given:
        return list(default_boxes(len(people)))
    if len(given) != len(people):
        raise ValueError(
            f"{len(given)} box(es) for {len(people)} people: give one box per person, or none for equal strips"
        )
    boxes = [check_box(p.box, i) for i, p in enumerate(people)]  # type: ignore[arg-type]
    covered = covered_box(boxes)
    if covered is not None:
        i, j = covered
        raise ValueError(
            f"the box of person {i + 1} {boxes[i]} lies inside the box of person {j + 1} {boxes[j]}, who is in front: "
            f"person {i + 1} would not appear; list people back to front (the later one is in front)"
        )
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            if overlap_area(boxes[i], boxes[j]) > 0:
                warnings.warn(
                    f"boxes of person {i + 1} {boxes[i]} and person {j + 1} {boxes[j]} overlap; "
                    f"person {j + 1} is in front where they overlap (later people are in front)",
                    DynamicIDWarning,
                    stacklevel=3,
                )
    return boxes


def overlap_area(a: Box, b: Box) -> float:
    height = min(a[2], b[2]) - max(a[0], b[0])
    width = min(a[3], b[3]) - max(a[1], b[1])
    return max(height, 0.0) * max(width, 0.0)


def check_person_labels(person: Person, index: int) -> None:
    """Expression and pose from the vocabularies (the error lists the valid ones)."""
    try:
        if person.expression is not None:
            check_expression(person.expression)
        if person.pose is not None:
            check_pose(person.pose)
    except ValueError as error:
        raise ValueError(f"person {index + 1}: {error}") from error
