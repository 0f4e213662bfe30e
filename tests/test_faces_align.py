"""Alignment geometry: the ArcFace template, the FFHQ crop, point transforms and the landmark map."""

import numpy as np
import pytest
from PIL import Image

from dynamicid.faces import (
    arcface_align,
    arcface_matrix,
    ffhq_align,
    invert_affine,
    render_landmark_map,
    transform_points,
)
from dynamicid.faces.align import ARCFACE_TEMPLATE_112, ffhq_matrix, similarity_transform

RNG = np.random.default_rng(0)


def _rotated_face(angle_deg: float, scale: float, offset: tuple[float, float]) -> np.ndarray:
    """The ArcFace template moved by a known similarity (a face placed somewhere in a photo)."""
    angle = np.radians(angle_deg)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return (ARCFACE_TEMPLATE_112 - 56) @ rotation.T + np.array(offset)


def test_similarity_transform_recovers_a_known_similarity():
    kps = _rotated_face(25.0, 3.0, (400.0, 300.0))
    matrix = similarity_transform(kps, ARCFACE_TEMPLATE_112)
    assert np.allclose(transform_points(kps, matrix), ARCFACE_TEMPLATE_112, atol=1e-3)
    back = transform_points(ARCFACE_TEMPLATE_112, invert_affine(matrix))
    assert np.allclose(back, kps, atol=1e-2)


@pytest.mark.parametrize("size", [112, 224])
def test_arcface_align_puts_marked_keypoints_on_the_template(size):
    kps = _rotated_face(-30.0, 2.5, (300.0, 250.0))
    image = np.zeros((500, 600, 3), dtype=np.uint8)
    for x, y in kps.round().astype(int):  # a white dot on each keypoint
        image[y - 2 : y + 3, x - 2 : x + 3] = 255
    crop = np.asarray(arcface_align(Image.fromarray(image), kps, size=size))
    assert crop.shape == (size, size, 3)
    template = ARCFACE_TEMPLATE_112 * size / 112
    for x, y in template.round().astype(int):
        assert crop[y, x].max() > 100
    assert np.allclose(transform_points(kps, arcface_matrix(kps, size)), template, atol=1e-2)


def test_ffhq_crop_is_centered_upright_and_has_context():
    kps = _rotated_face(40.0, 2.0, (320.0, 240.0))
    image = RNG.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    crop, matrix = ffhq_align(image, kps, size=512)
    assert crop.size == (512, 512) and matrix.shape == (2, 3) and matrix.dtype == np.float32
    mapped = transform_points(kps, matrix)
    left_eye, right_eye, _, left_mouth, right_mouth = mapped
    assert abs(left_eye[1] - right_eye[1]) < 1.0  # eye line horizontal after alignment
    assert left_eye[0] < 256 < right_eye[0]
    eye_mid_x = (left_eye[0] + right_eye[0]) / 2
    assert abs(eye_mid_x - 256) < 1.0
    # FFHQ proportions: eyes in the upper half, mouth below the centre, face about a quarter of the width.
    assert 150 < left_eye[1] < 256 and 256 < (left_mouth[1] + right_mouth[1]) / 2 < 400
    assert 0.15 < (right_eye[0] - left_eye[0]) / 512 < 0.35
    # The matrix maps the source exactly: warping a point's pixel lands where transform_points says.
    x, y = kps[2].round().astype(int)
    marked = np.zeros_like(image)
    marked[y - 1 : y + 2, x - 1 : x + 2] = 255
    warped, _ = ffhq_align(marked, kps, size=512, border="constant")
    peak = np.unravel_index(np.asarray(warped)[..., 0].argmax(), (512, 512))
    expected = transform_points(np.array([[x, y]], dtype=np.float32), matrix)[0]
    assert abs(peak[1] - expected[0]) < 4 and abs(peak[0] - expected[1]) < 4


def test_ffhq_matrix_is_a_similarity_scaled_with_the_face():
    small = ffhq_matrix(_rotated_face(0.0, 1.0, (200.0, 200.0)))
    large = ffhq_matrix(_rotated_face(0.0, 4.0, (200.0, 200.0)))
    for matrix in (small, large):
        a, b = matrix[0, :2], matrix[1, :2]
        assert abs(np.dot(a, b)) < 1e-4 and abs(np.linalg.norm(a) - np.linalg.norm(b)) < 1e-4
    assert np.linalg.norm(small[0, :2]) / np.linalg.norm(large[0, :2]) == pytest.approx(4.0, rel=1e-4)


def test_ffhq_downscale_does_not_alias():
    stripes = np.zeros((2000, 2000, 3), dtype=np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: pure aliasing if sampled without filtering
    kps = _rotated_face(0.0, 12.0, (1000.0, 1000.0))
    crop, _ = ffhq_align(stripes, kps, size=256)
    assert np.asarray(crop).std() < 20  # averaged to grey, not a moiré of black and white


def test_landmark_map_follows_method_md():
    points = np.array([[0.0, 0.0], [511.0, 511.0], [256.0, 128.0], [600.0, 10.0], [-3.0, 50.0]])
    landmark_map = render_landmark_map(points, image_size=512, map_size=96)
    assert landmark_map.shape == (96, 96) and landmark_map.dtype == np.float32
    assert set(np.unique(landmark_map)) == {-1.0, 1.0}
    expected = {(0, 0), (int(511 * 96 / 512), int(511 * 96 / 512)), (int(128 * 96 / 512), int(256 * 96 / 512))}
    assert {tuple(p) for p in np.argwhere(landmark_map == 1.0)} == expected  # (row, col); outside points skipped


def test_ffhq_padding_outside_a_tight_photo_is_faded_not_mirrored():
    kps = _rotated_face(0.0, 2.5, (100.0, 100.0))  # the face fills a 200x200 photo: the crop reaches far outside
    image = RNG.integers(0, 255, (200, 200, 3), dtype=np.uint8)
    faded = np.asarray(ffhq_align(image, kps, size=512)[0]).astype(np.float32)
    mirrored = np.asarray(ffhq_align(image, kps, size=512, border="reflect")[0]).astype(np.float32)
    corner = (slice(0, 40), slice(0, 40))  # far from the photo
    assert mirrored[corner].std() > 30  # the reflection repeats the photo's texture
    assert faded[corner].std() < 3  # faded to one colour
    centre = (slice(236, 276), slice(236, 276))  # inside the photo: untouched
    assert np.array_equal(faded[centre], mirrored[centre])
