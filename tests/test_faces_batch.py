"""Batched face analysis (`detect_batch`, `describe_batch`) equals one image at a time, and `device` is checked.

The one-image path is the oracle: the same backend called with a batch of one (the networks then see batches of
one photo's faces), against batches of 16 photos (one ResNet / ArcFace batch over all their faces).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_faces_insightface import _test_image, make_fake_pack

from dynamicid.faces import Face, FaceAnalyzer, ImageLoadError, load_array
from dynamicid.faces.threads import cuda_available, pick_device

PHOTOS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "faces"
BATCH = 16


def _photos() -> list[np.ndarray]:
    """Every photo of ../shared/data/faces that decodes (broken/ holds the ones that must not)."""
    images = []
    for path in sorted(p for p in PHOTOS.rglob("*") if p.is_file()):
        try:
            images.append(load_array(path))
        except ImageLoadError:
            continue
    return images


def _assert_same(batched: list[Face], alone: list[Face]) -> None:
    assert len(batched) == len(alone)
    for a, b in zip(batched, alone, strict=True):
        assert a.bbox == b.bbox and a.score == b.score
        np.testing.assert_array_equal(a.kps5, b.kps5)
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-5, rtol=0)
        assert (a.landmarks is None) == (b.landmarks is None)
        if a.landmarks is not None:
            np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)
        np.testing.assert_allclose([a.yaw, a.pitch, a.roll], [b.yaw, b.pitch, b.roll], atol=1e-3)
        np.testing.assert_allclose(
            [a.expression_scores[k] for k in sorted(a.expression_scores)],
            [b.expression_scores[k] for k in sorted(b.expression_scores)],
            atol=1e-5,
        )
        assert a.models == b.models


@pytest.mark.slow
def test_embedded_batches_equal_one_image_on_every_photo():
    analyzer = FaceAnalyzer("embedded", device="cpu")
    images = _photos()
    assert len(images) > 300
    faces = 0
    for start in range(0, len(images), BATCH):
        chunk = images[start : start + BATCH]
        detected = analyzer.detect_batch(chunk)
        described = analyzer.describe_batch(chunk, detected)
        for image, found, batched in zip(chunk, detected, described, strict=True):
            alone_found = analyzer.detect(image)
            assert [f.bbox for f in found] == [f.bbox for f in alone_found]
            _assert_same(batched, analyzer.describe_many(image, alone_found))
            faces += len(batched)
    assert faces > 300  # the check ran on real faces, not on empty lists


def test_insightface_batches_equal_one_image(tmp_path):
    make_fake_pack(tmp_path / "models" / "tinypack")
    analyzer = FaceAnalyzer("insightface", insightface_root=tmp_path, pack="tinypack", device="cpu")
    rng = np.random.default_rng(0)
    textured = [np.maximum(_test_image(), rng.integers(0, 120, (640, 640, 3), dtype=np.uint8)) for _ in range(2)]
    images = [textured[0], np.zeros((480, 640, 3), np.uint8), np.ascontiguousarray(textured[1][::-1])]
    batched = analyzer.analyze_batch(images)
    embeddings = np.stack([face.embedding for faces in batched for face in faces])
    assert len(embeddings) > 1 and np.ptp(embeddings, axis=0).max() > 1e-3  # faces that differ, in a batch
    for image, faces in zip(images, batched, strict=True):
        _assert_same(faces, analyzer.analyze(image))


def test_describe_batch_needs_one_face_list_per_image():
    with pytest.raises(ValueError, match="2 images but 1 lists"):
        FaceAnalyzer("embedded").describe_batch([np.zeros((8, 8, 3), np.uint8)] * 2, [[]])


@pytest.mark.skipif(cuda_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(ValueError, match="no CUDA GPU") as error:
        FaceAnalyzer("embedded", device="cuda")
    assert "\n" not in str(error.value)
    assert pick_device("auto") == "cpu"
    with pytest.raises(ValueError, match="valid: auto, cpu, cuda"):
        pick_device("tpu")
