"""Near-duplicates across resolutions, crops, colour and letterboxing, against different photos of one person.

Every face goes through the curation's own `detect_photo` + `describe_photo` (the hash and embedding the dedupe
stage compares). Duplicates: each group of near_duplicates/ (its CSV), plus copies made here of each group's
original (a 96 x 96 FFHQ-aligned crop, a greyscale copy, a 16:9 letterboxed copy). Different photos: every pair
of one person's photos in identities/, except the pairs a person sees are one picture (`SAME_PICTURE`). The
figures are printed; the limits of curation/config.py must sit in the gap. Mirrored, downscaled copies (the
demo's astronaut_mirrored_small.jpg, and each person's first photo in identities/ mirrored at 0.75x and 0.5x) are
measured on their own: the face mesh's keypoints are not mirror-equivariant, so some of them stay apart.
"""

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from dynamicid.curation.analysis import describe_photo, detect_photo
from dynamicid.curation.config import CurationConfig
from dynamicid.curation.dedupe import near_duplicate_groups
from dynamicid.curation.imagehash import hamming
from dynamicid.faces import FaceAnalyzer, ffhq_align, load_image

# Pairs of identities/ that are one picture (checked by eye): byte-identical files (MANIFEST.md), the same shot
# cut twice by the source (dlib's examples/johns), and obama_small.jpg, the official portrait's face (pose,
# expression and every crease identical) with another background.
SAME_PICTURE = {
    frozenset(pair)
    for pair in (
        ("John_Shimkus/000378_02340151.jpg", "John_Shimkus/000378_03227610.jpg"),
        ("John_Shimkus/000375_03227651.jpg", "John_Shimkus/000376_02340068.jpg"),
        ("John_Salley/000189_02159361.jpg", "John_Salley/000192_02159531.jpg"),
        ("obama/obama.jpg", "obama/obama_small.jpg"),
    )
}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _copies(original: Image.Image, kps5: np.ndarray) -> dict[str, Image.Image]:
    """The copies a dataset scraped from the web holds next to the original."""
    side = max(original.size)
    return {
        "aligned96": ffhq_align(original, kps5, 96)[0],
        "grey": ImageOps.grayscale(original).convert("RGB"),
        "letterbox": ImageOps.pad(original, (side * 16 // 9, side), color=(0, 0, 0)),
    }


def _mirrored(original: Image.Image, scale: float) -> Image.Image:
    """Left-right mirrored and downscaled, as the demo's astronaut_mirrored_small.jpg (saved as JPEG by callers)."""
    size = (round(original.width * scale), round(original.height * scale))
    return ImageOps.mirror(original).resize(size, Image.Resampling.LANCZOS)


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer("embedded")


def _face(analyzer, path: Path) -> dict | None:
    """The largest face as curation describes it (hash, mirror hash, embedding, keypoints), or None."""
    found = detect_photo(analyzer, "key", str(path))
    if not found["faces"]:
        return None
    described = describe_photo(analyzer, "key", str(path), found["faces"][:1])["faces"]
    return {**described[0], "bbox": found["faces"][0]["bbox"]} if described else None


@pytest.fixture(scope="module")
def faces(shared_faces, analyzer, tmp_path_factory) -> dict[str, list[dict]]:
    """{"groups": {group: [face, ...]}, "identities": {identity: [face, ...]}} with `file` set on each face."""
    copies = tmp_path_factory.mktemp("copies")
    min_face = CurationConfig().min_face_size
    groups: dict[str, list[dict]] = {}
    folder = shared_faces / "near_duplicates"
    for row in _rows(folder / "groups.csv"):
        face = _face(analyzer, folder / row["file"])
        x0, y0, x1, y1 = face["bbox"]
        if "half face" in row["relation"]:  # rejected before dedupe: the face is cut off (test_curation_dataset)
            continue
        assert min(x1 - x0, y1 - y0) >= min_face, row["file"]
        groups.setdefault(row["group"], []).append({**face, "file": row["file"]})
        if row["relation"].startswith("original") or row["file"].endswith("img11.jpg"):
            original = load_image(folder / row["file"])
            kps5 = np.asarray(face["kps5"], np.float32).reshape(5, 2)
            for name, image in _copies(original, kps5).items():
                path = copies / f"{row['group']}-{name}.png"
                image.save(path)
                groups[row["group"]].append({**_face(analyzer, path), "file": path.name})
    identities: dict[str, list[dict]] = {}
    folder = shared_faces / "identities"
    for row in _rows(folder / "labels.csv"):
        face = _face(analyzer, folder / row["file"])
        if face is not None:
            identities.setdefault(row["identity"], []).append({**face, "file": row["file"]})
    return {"groups": groups, "identities": identities}


def _pair_figures(a: dict, b: dict) -> tuple[int, float]:
    """Hash distance (bits of 256, the mirror included) and embedding distance."""
    bits = min(hamming(a["phash"], b["phash"]), hamming(a["phash"], b["phash_mirror"]))
    return int(bits), float(np.linalg.norm(np.subtract(a["embedding"], b["embedding"])))


def _limits(analyzer) -> tuple[int, float]:
    config = CurationConfig()
    return config.phash_max_distance, config.dup_embedding_fraction * analyzer.same_person_threshold


def test_limits_sit_in_the_gap_between_copies_and_different_photos(faces, analyzer):
    copies = [
        (*_pair_figures(a, b), a["file"], b["file"])
        for group in faces["groups"].values()
        for a, b in itertools.combinations(group, 2)
    ]
    different = [
        (*_pair_figures(a, b), a["file"], b["file"])
        for group in faces["identities"].values()
        for a, b in itertools.combinations(group, 2)
        if frozenset((a["file"], b["file"])) not in SAME_PICTURE
    ]
    bits, distance = _limits(analyzer)
    worst_copy = max(copies)
    nearest = min(different)
    print(
        f"\nsame picture ({len(copies)} pairs): hash <= {worst_copy[0]} bits ({worst_copy[2]} / {worst_copy[3]}), "
        f"embedding <= {max(c[1] for c in copies):.3f}\n"
        f"different photos of one person ({len(different)} pairs): hash >= {nearest[0]} bits ({nearest[2]} / "
        f"{nearest[3]}), embedding >= {min(d[1] for d in different):.3f}\n"
        f"limits: hash <= {bits} bits and embedding < {distance:.3f}"
    )
    assert worst_copy[0] <= bits < nearest[0]
    assert max(c[1] for c in copies) < distance
    # Both tests must pass for a duplicate: no different photo passes both.
    assert not [d for d in different if d[0] <= bits and d[1] < distance]


def _rows_of(group: list[dict]) -> list[dict]:
    return [{"face": face} for face in group]


def test_every_near_duplicate_group_collapses_to_one(faces, analyzer):
    bits, distance = _limits(analyzer)
    duplicate_cos = 1 - distance**2 / 2  # Euclidean distance between unit embeddings as a cosine similarity
    for name, group in faces["groups"].items():
        labels = near_duplicate_groups(_rows_of(group), bits, duplicate_cos)
        print(f"{name}: {len(group)} copies -> {labels.max() + 1} kept")
        assert labels.max() == 0, name


def test_no_two_different_photos_of_a_person_are_called_duplicates(faces, analyzer):
    bits, distance = _limits(analyzer)
    duplicate_cos = 1 - distance**2 / 2
    for identity, group in faces["identities"].items():
        labels = near_duplicate_groups(_rows_of(group), bits, duplicate_cos)
        for a, b in itertools.combinations(range(len(group)), 2):
            if labels[a] == labels[b]:
                assert frozenset((group[a]["file"], group[b]["file"])) in SAME_PICTURE, identity


@pytest.fixture(scope="module")
def mirrored_pairs(faces, analyzer, shared_faces, tmp_path_factory) -> list[tuple[dict, dict, str]]:
    """(original, copy, name) for each person's first photo in identities/ mirrored at 0.75x and 0.5x (JPEG), whose
    copy's face is at least --min-face-size (smaller ones are `too_small` before dedupe)."""
    folder = tmp_path_factory.mktemp("mirrored")
    min_face = CurationConfig().min_face_size
    pairs = []
    for identity, group in faces["identities"].items():
        original = load_image(shared_faces / "identities" / group[0]["file"])
        for scale in (0.75, 0.5):
            path = folder / f"{identity}-{scale}.jpg"
            _mirrored(original, scale).save(path)
            copy = _face(analyzer, path)
            x0, y0, x1, y1 = copy["bbox"]
            if min(x1 - x0, y1 - y0) >= min_face:
                pairs.append((group[0], copy, path.name))
    return pairs


def test_mirrored_downscaled_copies_of_real_photos_are_duplicates(mirrored_pairs, analyzer):
    bits, distance = _limits(analyzer)
    duplicate_cos = 1 - distance**2 / 2
    caught, missed = [], []
    for original, copy, name in mirrored_pairs:
        same = near_duplicate_groups(_rows_of([original, copy]), bits, duplicate_cos).max() == 0
        x0, y0, x1, y1 = copy["bbox"]
        (caught if same else missed).append((name, round(min(x1 - x0, y1 - y0)), *_pair_figures(original, copy)))
    large = [c for c in caught + missed if c[1] >= 100]
    large_caught = [c for c in caught if c[1] >= 100]
    print(
        f"\nmirrored + downscaled copies: {len(caught)} of {len(mirrored_pairs)} caught, "
        f"{len(large_caught)} of {len(large)} with faces >= 100 px; missed (file, face px, bits, embedding): {missed}"
    )
    # Measured at the limits of curation/config.py: 36 of 42, all 29 with faces >= 100 px (the misses are small
    # faces, ORL's 92 x 112 photos among them, 16-68 bits or embeddings 0.22 apart).
    assert len(caught) >= 0.8 * len(mirrored_pairs)
    assert large_caught == large
