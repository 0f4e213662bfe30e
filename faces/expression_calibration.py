"""Calibrated expression labels: the FER-2013 scores combined with what the 478-point mesh measures.

The FER-2013 mini-Xception alone calls slightly smiling or side-lit neutral faces `happy`, and open-mouthed
surprise `angry` or `neutral`. The mesh measures what a person looks at: mouth opening, mouth width, lip-corner
raise, brow raise and eye opening (each in inter-ocular distances, along the face's own axes). A multinomial
logistic regression over the seven classes combines them with the FER log-probabilities:

    logit_c = fer_weight * log p_fer(c) + bias_c + sum_k weight_ck * (feature_k - mean_k) / scale_k

Its parameters are fitted (`faces/expression_fit.py`) on a documented part of the labelled photos and ship in
`expression_calibration.json` next to this module, with the list of photos they were fitted on. Where there is
no mesh (the insightface backend's 106 points, or the mesh missed the face), the `fer_only` variant of the same
fit applies (FER weight and biases only). The label's confidence is its calibrated probability.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from dynamicid.schemas.labels import EXPRESSIONS

CALIBRATION_FILE = Path(__file__).with_name("expression_calibration.json")
MESH_FEATURES = ("mouth_open", "mouth_width", "lip_corner_raise", "brow_raise", "eye_open")
FER_FLOOR = 1e-4  # log p_fer is clipped here: one near-zero FER score must not veto the mesh

# MediaPipe face-mesh indices; "a" is the image-left side of an upright, unmirrored face.
_EYE_A = {"outer": 33, "inner": 133, "upper": 159, "lower": 145}
_EYE_B = {"outer": 263, "inner": 362, "upper": 386, "lower": 374}
_BROWS = (105, 334)  # upper brow, above each eye's middle
_INNER_LIPS = (13, 14)  # upper, lower
_MOUTH_CORNERS = (61, 291)


def mesh_features(landmarks: np.ndarray) -> np.ndarray:
    """MESH_FEATURES of a 478-point mesh (image pixels), in eye-centre distances along the face's axes.

    Heights are measured along the face's "up" (perpendicular to the eye line), so head roll does not change them.
    """
    points = np.asarray(landmarks, np.float64)[:, :2]
    eye_a = points[list(_EYE_A.values())].mean(0)
    eye_b = points[list(_EYE_B.values())].mean(0)
    distance = max(float(np.linalg.norm(eye_b - eye_a)), 1e-6)
    across = (eye_b - eye_a) / distance
    up = np.array([across[1], -across[0]])  # image y points down

    def x(i: int) -> float:
        return float((points[i] - eye_a) @ across) / distance

    def y(i: int) -> float:
        return float((points[i] - eye_a) @ up) / distance

    upper_lip, lower_lip = _INNER_LIPS
    lips_mid = (y(upper_lip) + y(lower_lip)) / 2
    eye_open = np.mean(
        [
            (y(eye["upper"]) - y(eye["lower"])) / max(abs(x(eye["inner"]) - x(eye["outer"])), 1e-6)
            for eye in (_EYE_A, _EYE_B)
        ]
    )
    return np.array(
        [
            y(upper_lip) - y(lower_lip),
            x(_MOUTH_CORNERS[1]) - x(_MOUTH_CORNERS[0]),
            np.mean([y(i) for i in _MOUTH_CORNERS]) - lips_mid,
            np.mean([y(i) for i in _BROWS]) - np.mean([y(_EYE_A["upper"]), y(_EYE_B["upper"])]),
            eye_open,
        ]
    )


def _rounded(value: float | tuple) -> float | list:
    if isinstance(value, tuple):
        return [_rounded(v) for v in value]
    return float(f"{value:.6g}")


@dataclass(frozen=True)
class LogisticCalibration:
    """One fitted variant; `weights` is empty for the FER-only variant."""

    fer_weight: float
    bias: tuple[float, ...]  # per class, EXPRESSIONS order
    weights: tuple[tuple[float, ...], ...] = ()  # per class, per MESH_FEATURES
    mean: tuple[float, ...] = ()  # per feature (of the photos fitted on)
    scale: tuple[float, ...] = ()

    def probabilities(self, fer: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """Calibrated probabilities (EXPRESSIONS order) from FER scores (N, 7) and mesh features (N, 5)."""
        fer = np.atleast_2d(np.asarray(fer, np.float64))
        logits = self.fer_weight * np.log(np.clip(fer, FER_FLOOR, 1.0)) + np.asarray(self.bias)
        if self.weights:
            standard = (np.atleast_2d(features) - np.asarray(self.mean)) / np.asarray(self.scale)
            logits = logits + standard @ np.asarray(self.weights).T
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def to_json(self) -> dict:
        """Parameters rounded to 6 significant digits (the file stays small; predictions move by < 1e-5)."""
        return {k: _rounded(v) for k, v in self.__dict__.items() if v != ()}

    @classmethod
    def from_json(cls, data: dict) -> LogisticCalibration:
        weights = tuple(tuple(row) for row in data.get("weights", ()))
        return cls(
            float(data["fer_weight"]),
            tuple(data["bias"]),
            weights,
            tuple(data.get("mean", ())),
            tuple(data.get("scale", ())),
        )


@dataclass(frozen=True)
class ExpressionLabel:
    expression: str
    scores: dict[str, float]  # calibrated probabilities
    confidence: float  # the calibrated probability of `expression`
    model: str  # for Face.models["expression"]


@dataclass(frozen=True)
class ExpressionCalibration:
    version: str  # "expression-calibration-v<N>-<sha256 of the file, 8 hex>": changes whenever the file does
    mesh: LogisticCalibration
    fer_only: LogisticCalibration
    provenance: dict

    def label(self, fer_scores: dict[str, float], landmarks: np.ndarray | None) -> ExpressionLabel:
        """The calibrated label of one face; the mesh variant when the 478-point mesh is there."""
        from dynamicid.faces.expression import FER_EXPRESSION_MODEL

        fer = np.array([fer_scores[e] for e in EXPRESSIONS])
        meshed = landmarks is not None and len(landmarks) >= 468
        if meshed:
            probabilities = self.mesh.probabilities(fer, mesh_features(landmarks))[0]
        else:
            probabilities = self.fer_only.probabilities(fer)[0]
        best = int(np.argmax(probabilities))
        variant = "mediapipe-face-mesh-478" if meshed else "fer-only"
        return ExpressionLabel(
            expression=EXPRESSIONS[best],
            scores={e: float(p) for e, p in zip(EXPRESSIONS, probabilities, strict=True)},
            confidence=float(probabilities[best]),
            model=f"{FER_EXPRESSION_MODEL}+{self.version}({variant})",
        )


def read_calibration(path: Path) -> ExpressionCalibration:
    raw = path.read_bytes()
    data = json.loads(raw)
    return ExpressionCalibration(
        version=f"expression-calibration-v{data['format']}-{hashlib.sha256(raw).hexdigest()[:8]}",
        mesh=LogisticCalibration.from_json(data["mesh"]),
        fer_only=LogisticCalibration.from_json(data["fer_only"]),
        provenance=data["provenance"],
    )


@lru_cache(maxsize=1)
def shipped_calibration() -> ExpressionCalibration:
    """The calibration that ships in the package (read once per process)."""
    return read_calibration(CALIBRATION_FILE)
