"""load_image on the real odd and broken files, plus synthetic bombs and unreadable files."""

import csv
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynamicid.faces import ImageLoadError, load_array, load_image
from dynamicid.schemas.rejects import RejectReason

# Pillow cannot decode these on purpose (MANIFEST.md): they must get a typed error.
UNDECODABLE_ODD_FORMATS = {"formats/hopper.heif"}


def _labelled_files(folder: Path) -> list[str]:
    with open(folder / "labels.csv", newline="") as handle:
        return [row["file"] for row in csv.DictReader(handle)]


def test_every_odd_format_decodes_to_rgb_or_gets_a_named_error(shared_faces):
    folder = shared_faces / "odd_formats"
    files = _labelled_files(folder)
    assert len(files) >= 30
    decoded = 0
    for name in files:
        if name in UNDECODABLE_ODD_FORMATS:
            with pytest.raises(ImageLoadError) as error:
                load_image(folder / name)
            assert name.split("/")[-1] in str(error.value)
            continue
        image = load_image(folder / name)
        assert image.mode == "RGB", name
        assert min(image.size) > 0, name
        decoded += 1
    assert decoded == len(files) - len(UNDECODABLE_ODD_FORMATS)


def test_every_broken_file_gets_a_typed_error_naming_it(shared_faces):
    folder = shared_faces / "broken"
    files = _labelled_files(folder)
    assert len(files) == 3
    for name in files:
        with pytest.raises(ImageLoadError) as error:
            load_image(folder / name)
        assert isinstance(error.value, ValueError)
        assert name in str(error.value)
        assert error.value.code is RejectReason.UNDECODABLE
    truncated = next(n for n in files if "truncated" in n)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(folder / truncated)


def test_load_array_is_load_image_as_an_array(shared_faces):
    """The curation stages' decoder (no PIL copy) gives load_image's pixels, or its error, for every shared file."""
    files = sorted(p for p in shared_faces.rglob("*") if p.is_file() and p.suffix not in (".csv", ".md"))
    assert len(files) >= 250
    for path in files:
        try:
            expected = np.asarray(load_image(path))
        except ImageLoadError as error:
            with pytest.raises(ImageLoadError) as again:
                load_array(path)
            assert (again.value.code, again.value.reason) == (error.code, error.reason), path
            continue
        pixels = load_array(path)
        assert pixels.dtype == np.uint8 and pixels.shape == expected.shape and pixels.shape[2] == 3, path
        assert np.array_equal(pixels, expected), path


def test_formats_decode_to_the_same_pixels(shared_faces):
    formats = shared_faces / "odd_formats" / "formats"
    reference = np.asarray(load_image(formats / "hopper.png"), dtype=np.int16)
    for name in ("hopper.bmp", "hopper.tif", "hopper_lzw.tif", "hopper.ppm", "hopper.psd"):
        assert np.abs(np.asarray(load_image(formats / name), dtype=np.int16) - reference).mean() < 2, name
    grey8 = np.asarray(load_image(formats / "hopper_8bit.pgm"), dtype=np.int16)
    grey16 = np.asarray(load_image(formats / "hopper_16bit.pgm"), dtype=np.int16)
    assert (grey8[..., 0] == grey8[..., 2]).all()
    assert np.abs(grey16 - grey8).mean() < 2  # 16-bit scaled down, not clipped to white
    cmyk = load_image(formats / "pil_sample_cmyk.jpg")
    assert cmyk.mode == "RGB"


def test_exif_orientations_are_applied(shared_faces):
    folder = shared_faces / "odd_formats"
    upright = np.asarray(load_image(folder / "formats" / "hopper.jpg"), dtype=np.int16)
    for orientation in range(2, 9):
        oriented = np.asarray(load_image(folder / "exif_orientation" / f"hopper_orientation_{orientation}.jpg"))
        assert oriented.shape == upright.shape
        assert np.abs(oriented.astype(np.int16) - upright).mean() < 8, orientation
        raw = np.asarray(
            Image.open(folder / "exif_orientation" / f"hopper_orientation_{orientation}.jpg").convert("RGB")
        )
        assert np.abs(raw.astype(np.int16) - upright).mean() > 8, f"orientation {orientation} was already upright"


def test_animated_gif_gives_its_first_frame(shared_faces):
    path = shared_faces / "odd_formats" / "animated_gif" / "elon-musk-smoke.gif"
    with Image.open(path) as gif:
        assert gif.n_frames > 1
        first = np.asarray(gif.convert("RGB"))
    assert np.array_equal(np.asarray(load_image(path)), first)


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:4, :, :] = (255, 0, 0, 255)  # opaque red top half, transparent bottom half
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    pixels = np.asarray(load_image(path))
    assert tuple(pixels[0, 0]) == (255, 0, 0)
    assert tuple(pixels[-1, 0]) == (255, 255, 255)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and whose data is a few bytes: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(ImageLoadError, match="bomb"):
        load_image(bomb)
    small = tmp_path / "small.png"
    Image.new("RGB", (64, 64)).save(small)
    with pytest.raises(ImageLoadError, match="4095-pixel limit"):
        load_image(small, max_pixels=4095)
    assert load_image(small, max_pixels=4096).size == (64, 64)


def test_unreadable_files_are_typed_and_named(tmp_path):
    with pytest.raises(ImageLoadError) as missing:
        load_image(tmp_path / "missing.jpg")
    assert missing.value.code is RejectReason.UNREADABLE
    assert "missing.jpg" in str(missing.value)
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)
    not_a_folder = tmp_path / "file.jpg"
    not_a_folder.write_bytes(b"x")
    with pytest.raises(ImageLoadError) as through_file:
        load_image(not_a_folder / "photo.jpg")
    assert through_file.value.code is RejectReason.UNREADABLE
    loop = tmp_path / "loop.jpg"
    os.symlink(loop, loop)
    with pytest.raises(ImageLoadError) as looped:
        load_image(loop)
    assert looped.value.code is RejectReason.UNREADABLE


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied_is_typed(tmp_path):
    locked = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(locked)
    locked.chmod(0)
    with pytest.raises(ImageLoadError, match="permission"):
        load_image(locked)


def test_at_least_decodes_every_odd_format_at_a_reduced_scale_that_keeps_the_requested_size(shared_faces):
    """Thumbnails (report.html) decode JPEGs by DCT scaling: both sides stay >= the size asked, the picture's
    orientation and colours are those of the full decode, and other formats decode as without it."""
    folder = shared_faces / "odd_formats"
    reduced = 0
    for name in _labelled_files(folder):
        if name in UNDECODABLE_ODD_FORMATS:
            continue
        full, small = load_image(folder / name), load_image(folder / name, at_least=64)
        assert small.mode == "RGB", name
        assert min(small.size) >= min(64, *full.size), name
        assert abs(small.width / small.height - full.width / full.height) < 0.05, name  # EXIF orientation kept
        if small.size != full.size:
            reduced += 1
            resized = np.asarray(full.resize(small.size, Image.Resampling.BOX), np.float32)
            assert np.abs(resized - np.asarray(small, np.float32)).mean() < 6, name  # 0.5-2.9 measured
    assert reduced >= 3


def test_a_108_megapixel_photo_is_not_taken_for_a_bomb(tmp_path):
    """12000x9000 (a 108 MP phone camera) is over Pillow's 89 MP check, within ours: the file below gets as far
    as decoding its (absent) pixels, where a bomb is refused before."""
    phone = tmp_path / "phone.png"
    phone.write_bytes(_png_header_only(12000, 9000))
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        load_image(phone)
    with pytest.raises(ImageLoadError, match="over the 100000000-pixel limit"):
        load_image(phone, max_pixels=100_000_000)
