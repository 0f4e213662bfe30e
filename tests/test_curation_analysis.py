"""The per-photo work of the curation stages (curation/analysis.py) on real photos with the embedded backend."""

import numpy as np
import pytest

from dynamicid.curation.analysis import align_face, crop_face, describe_photo, detect_photo, png_bytes
from dynamicid.curation.imagehash import brightness, grey, sharpness
from dynamicid.faces import FaceAnalyzer, load_image


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return FaceAnalyzer("embedded")


def test_a_face_the_models_fail_on_costs_only_itself(analyzer, shared_faces):
    """A photo's faces are described as one batch; when one face breaks it, the others are still described."""
    path = str(shared_faces / "group_photos" / "obama_and_biden.jpg")
    found = detect_photo(analyzer, "key", path)["faces"][:2]
    assert len(found) == 2
    broken = {**found[1], "bbox": [float("nan")] * 4}  # dlib cannot place a chip in a box without coordinates
    alone = describe_photo(analyzer, "key", path, found[:1])
    both = describe_photo(analyzer, "key", path, [found[0], broken])
    assert [f["face_index"] for f in both["faces"]] == [0]
    assert both["detail"].startswith("face 1: ValueError")
    assert alone["detail"] is None
    cosine = np.dot(alone["faces"][0]["embedding"], both["faces"][0]["embedding"])
    assert cosine == pytest.approx(1.0, abs=1e-6)
    assert both["faces"][0]["landmarks"] == alone["faces"][0]["landmarks"]


def test_detect_and_align_read_the_photo_as_a_person_sees_it(analyzer, shared_faces):
    path = shared_faces / "identities" / "obama" / "obama.jpg"
    row = detect_photo(analyzer, "key", str(path))
    width, height = load_image(path).size
    assert (row["width"], row["height"]) == (width, height) and row["faces"]
    aligned, measured = align_face("key", str(path), row["faces"][0]["kps5"], 512)
    assert aligned["error"] is None
    # `crop` makes the kept faces' crops again from align's matrix: the very crop align measured.
    crop = crop_face(str(path), aligned["matrix"], 512)
    assert np.array_equal(np.asarray(crop), np.asarray(measured))
    assert aligned["sharpness"] == sharpness(grey(crop)) and aligned["brightness"] == brightness(grey(crop))
    assert png_bytes(crop).startswith(b"\x89PNG") and crop.size == (512, 512)
