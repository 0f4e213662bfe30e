"""Label vocabularies: expressions and head-pose bins.

Head-pose sign convention (used by every backend, stored in the dataset in degrees):
- yaw   > 0: the person turns to THEIR OWN left, so the nose points towards the image's right edge.
- pitch > 0: the person looks up.
- roll  > 0: the head tilts so that the eye line rotates clockwise in the image (y axis pointing down),
  i.e. the eye on the image's right is lower than the eye on the image's left.
A horizontally mirrored photo therefore has the opposite yaw and roll and the same pitch.
"""

from __future__ import annotations

from dataclasses import dataclass

# Order matters: it is the ClassLabel order in the dataset and the order of `expression_scores`.
EXPRESSIONS: tuple[str, ...] = ("afraid", "angry", "disgusted", "happy", "neutral", "sad", "surprised")

# FER-2013 class names (index order of the FER-2013 classifiers) -> our vocabulary.
FER2013_CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FER2013_TO_EXPRESSION: dict[str, str] = {
    "angry": "angry",
    "disgust": "disgusted",
    "fear": "afraid",
    "happy": "happy",
    "sad": "sad",
    "surprise": "surprised",
    "neutral": "neutral",
}

# Label words of public expression photo sets (the Yale Face Database, the LFW legend of muxspace/facial_expressions,
# as in ../shared/data/faces/expressions/labels.csv) -> our vocabulary. Every word gets a class; the words of
# APPROXIMATE_SOURCE_EXPRESSIONS name an expression we have no class for and take the nearest one a person would
# give the photo: a sleepy face (eyes closed, relaxed) is neutral, contempt is nearest disgust, and Yale's winks
# mostly come with a smile. Calibration fits on the other words only; the confusion matrix shows all of them.
SOURCE_EXPRESSIONS: dict[str, str] = {
    **{e: e for e in EXPRESSIONS},
    "anger": "angry",
    "disgust": "disgusted",
    "fear": "afraid",
    "happiness": "happy",
    "sadness": "sad",
    "surprise": "surprised",
    "contempt": "disgusted",
    "sleepy": "neutral",
    "wink": "happy",
}
APPROXIMATE_SOURCE_EXPRESSIONS: frozenset[str] = frozenset({"contempt", "sleepy", "wink"})

# An expression label whose calibrated probability (`expression_confidence`) is below this is "unsure": flagged in
# report.html and `dynamicid-curate inspect`, and `select` fills a grid cell with a sure label when it has one.
EXPRESSION_CONFIDENCE_LOW = 0.5


def unsure_expression(confidence: float) -> bool:
    """Whether an expression label of this confidence is unsure (see EXPRESSION_CONFIDENCE_LOW)."""
    return confidence < EXPRESSION_CONFIDENCE_LOW


# |yaw| below YAW_FRONT_LIMIT is a front view; below YAW_SLIGHT_LIMIT "slightly turned"; above it "fully turned".
YAW_FRONT_LIMIT = 15.0
YAW_SLIGHT_LIMIT = 45.0


@dataclass(frozen=True)
class PoseBin:
    """One of the five KDEF-style head-pose bins; yaw in degrees, [yaw_min, yaw_max)."""

    name: str
    yaw_min: float
    yaw_max: float


# Order matters: it is the ClassLabel order in the dataset. Names are the face-prompt wording.
POSE_BINS: tuple[PoseBin, ...] = (
    PoseBin("fully turned to the left", YAW_SLIGHT_LIMIT, float("inf")),
    PoseBin("fully turned to the right", float("-inf"), -YAW_SLIGHT_LIMIT),
    PoseBin("slightly turned to the left", YAW_FRONT_LIMIT, YAW_SLIGHT_LIMIT),
    PoseBin("slightly turned to the right", -YAW_SLIGHT_LIMIT, -YAW_FRONT_LIMIT),
    PoseBin("front view", -YAW_FRONT_LIMIT, YAW_FRONT_LIMIT),
)
POSE_NAMES: tuple[str, ...] = tuple(b.name for b in POSE_BINS)


def pose_bin_for_yaw(yaw: float) -> str:
    """The pose-bin name for a yaw in degrees (sign convention in this module's docstring)."""
    for pose in POSE_BINS:
        if pose.yaw_min <= yaw < pose.yaw_max:
            return pose.name
    raise ValueError(f"yaw must be a finite number of degrees, got {yaw!r}")


def check_expression(expression: str) -> str:
    """Return `expression` if it is in the vocabulary, else raise a ValueError listing the valid ones."""
    if expression not in EXPRESSIONS:
        raise ValueError(f"unknown expression {expression!r}; valid: {', '.join(EXPRESSIONS)}")
    return expression


def check_pose(pose: str) -> str:
    """Return `pose` if it is a pose-bin name, else raise a ValueError listing the valid ones."""
    if pose not in POSE_NAMES:
        raise ValueError(f"unknown pose {pose!r}; valid: {', '.join(POSE_NAMES)}")
    return pose
