"""The face record every backend returns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from dynamicid.schemas.labels import pose_bin_for_yaw

if TYPE_CHECKING:
    from dynamicid.faces.expression_calibration import ExpressionLabel


@dataclass
class Face:
    """One face in one image, in that image's pixel coordinates.

    `kps5` rows: left eye, right eye, nose tip, left mouth corner, right mouth corner, where "left" means
    the image's left. Pose angles follow the sign convention of `dynamicid.schemas.labels`. `models` maps
    each filled field to the model that produced it; `backend` names the backend. `detect()` fills bbox,
    score and kps5; `describe()` the rest. `landmarks` stay None when the landmark model finds no face inside
    the box; then `kps5` keeps the detector's points and `models["pose"]` names the coarser 5-point pose.
    """

    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float
    kps5: np.ndarray  # float32 (5, 2)
    landmarks: np.ndarray | None = None  # float32 (N, 2)
    yaw: float | None = None
    pitch: float | None = None
    roll: float | None = None
    expression: str | None = None
    expression_scores: dict[str, float] | None = None  # calibrated probabilities (faces.expression_calibration)
    expression_confidence: float | None = None  # the calibrated probability of `expression`
    embedding: np.ndarray | None = None  # float32 (D,), L2-normalised
    backend: str = ""
    models: dict[str, str] = field(default_factory=dict)

    @property
    def width(self) -> float:
        return self.bbox[2] - self.bbox[0]

    @property
    def height(self) -> float:
        return self.bbox[3] - self.bbox[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def pose_bin(self) -> str | None:
        """The pose-bin name of `yaw` (None before the face is described)."""
        return None if self.yaw is None else pose_bin_for_yaw(self.yaw)

    def described(
        self,
        *,
        landmarks: np.ndarray | None,
        pose: tuple[float, float, float],
        label: ExpressionLabel,
        embedding: np.ndarray,
        backend: str,
        models: dict[str, str],
        kps5: np.ndarray | None = None,
    ) -> Face:
        """This detected face with what `describe()` adds (`kps5` replaced where the landmark model refines it)."""
        yaw, pitch, roll = pose
        return dataclasses.replace(
            self,
            kps5=self.kps5 if kps5 is None else kps5,
            landmarks=landmarks,
            yaw=yaw,
            pitch=pitch,
            roll=roll,
            expression=label.expression,
            expression_scores=label.scores,
            expression_confidence=label.confidence,
            embedding=embedding,
            backend=backend,
            models=models,
        )
