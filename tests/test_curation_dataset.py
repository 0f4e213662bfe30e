"""One real curated dataset (session fixture) built from ../shared/data/faces, and the properties it must have.

The photo folder mixes identities with near-duplicate groups, photos of another person, group photos,
files without faces, broken files, odd formats and hostile files (symlink loop, pipe, decompression bomb,
text file, empty folder). The real embedded face models run once for the whole module.
"""

import csv
import json
import os
import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from dynamicid.curation import build_dataset
from dynamicid.curation.card import card_metadata
from dynamicid.curation.cli import main
from dynamicid.curation.imagehash import face_thumbnail, hamming, phash_pair
from dynamicid.curation.select import grid_cells
from dynamicid.faces import FaceAnalyzer, load_image, transform_points
from dynamicid.faces.align import invert_affine
from dynamicid.schemas import EXPRESSION_CONFIDENCE_LOW, EXPRESSIONS, POSE_BINS, dataset_features, face_prompt

NEAR_DUPLICATE_FOLDERS = {
    "obama_official_portrait": "obama/nd_portrait",
    "obama_podium": "obama/nd_podium",
    "deepface_mirrored": "deepface_person_01/nd_mirror",
}
ODD_FORMATS = ("hopper.heif", "hopper_16bit.pgm", "hopper.gif", "hopper.psd", "pil_sample_cmyk.jpg")
# Other people's photos salted into identity folders: (folder, source identity, file).
SALT = [
    ("biden", "Hugo_Chavez", "Hugo_Chavez_0001.jpg"),
    ("biden", "Hugo_Chavez", "Hugo_Chavez_0002.jpg"),
    ("kit_harington", "Serena_Williams", "Serena_Williams_0001.jpg"),
    ("Colin_Powell", "Junichiro_Koizumi", "Junichiro_Koizumi_0001.jpg"),
]
# The group photos' faces are small (kit_with_rose.jpg: a 3.2x enlargement for a 512 crop), and the checks of
# which face a group photo keeps need them in the dataset.
SETTINGS = {"face_backend": "embedded", "max_upscale": 4.0}


def png_bomb(path: Path, side: int = 40000) -> None:
    """A tiny PNG whose header declares side x side pixels (far over Pillow's bomb limit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def compose_photos(faces: Path, photos: Path) -> dict[str, str]:
    """Arrange the test photos; returns source_path -> true identity for every face photo copied."""
    truth = {}
    with open(faces / "identities" / "labels.csv") as f:
        labels = {row["file"]: row["identity"] for row in csv.DictReader(f)}
    for identity in ("Colin_Powell", "obama", "deepface_person_01", "biden", "kit_harington"):
        shutil.copytree(faces / "identities" / identity, photos / identity)
        for file in (faces / "identities" / identity).iterdir():
            truth[f"{identity}/{file.name}"] = labels[f"{identity}/{file.name}"]
    for group, target in NEAR_DUPLICATE_FOLDERS.items():
        shutil.copytree(faces / "near_duplicates" / group, photos / target)
        for file in (faces / "near_duplicates" / group).iterdir():
            truth[f"{target}/{file.name}"] = target.split("/")[0]
    for folder, identity, name in SALT:
        shutil.copyfile(faces / "identities" / identity / name, photos / folder / name)
        truth[f"{folder}/{name}"] = identity
    shutil.copyfile(faces / "group_photos" / "two_people.jpg", photos / "biden" / "two_people.jpg")
    shutil.copyfile(faces / "group_photos" / "kit_with_rose.jpg", photos / "kit_harington" / "kit_with_rose.jpg")
    (photos / "grace_hopper" / "exif").mkdir(parents=True)
    for name in ODD_FORMATS:
        shutil.copyfile(faces / "odd_formats" / "formats" / name, photos / "grace_hopper" / name)
    for name in ("hopper_orientation_6.jpg", "hopper_orientation_6.webp"):
        shutil.copyfile(faces / "odd_formats" / "exif_orientation" / name, photos / "grace_hopper" / "exif" / name)
    shutil.copyfile(
        faces / "odd_formats" / "animated_gif" / "elon-musk-smoke.gif", photos / "grace_hopper" / "animated.gif"
    )
    shutil.copytree(faces / "no_face", photos / "no_face_folder")
    shutil.copytree(faces / "broken", photos / "broken_folder")
    hostile = photos / "broken_folder"
    png_bomb(hostile / "bomb.png")
    os.symlink("loop_b.jpg", hostile / "loop_a.jpg")
    os.symlink("loop_a.jpg", hostile / "loop_b.jpg")
    os.mkfifo(hostile / "pipe.jpg")
    (hostile / "notes.txt").write_text("not a photo\n")
    (photos / "empty_person").mkdir()
    return truth


def count_files(photos: Path) -> int:
    return sum(
        len(files) + sum(1 for d in dirs if (Path(root) / d).is_symlink()) for root, dirs, files in os.walk(photos)
    )


@pytest.fixture(scope="module")
def curated(tmp_path_factory, shared_faces):
    root = tmp_path_factory.mktemp("curated")
    photos = root / "photos"
    photos.mkdir()
    truth = compose_photos(shared_faces, photos)
    out = root / "out"
    summary = build_dataset(photos, out, progress=False, **SETTINGS)
    return {"photos": photos, "out": out, "summary": summary, "truth": truth}


@pytest.fixture(scope="module")
def rows(curated):
    return pq.read_table(curated["out"] / "data").to_pylist()


@pytest.fixture(scope="module")
def rejects(curated):
    return {r["source_path"]: r for r in pq.read_table(curated["out"] / "rejects.parquet").to_pylist()}


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer(backend="embedded")


def test_every_file_is_kept_or_rejected_with_a_reason(curated, rows, rejects):
    summary = curated["summary"]
    scanned = count_files(curated["photos"])
    assert summary["scanned"] == scanned
    assert summary["kept"] == len(rows) and summary["rejected"] == len(rejects)
    assert len(rows) + len(rejects) == scanned
    kept_paths = {r["source_path"] for r in rows}
    assert not kept_paths & set(rejects)
    for r in rejects.values():
        assert r["stage"] in ("scan", "detect", "identify", "dedupe", "align", "select")
        assert r["detail"] and "\n" not in r["detail"]


def test_broken_no_face_and_hostile_files_are_rejected_with_their_reason(shared_faces, rejects):
    for file in (shared_faces / "broken").iterdir():
        if file.suffix != ".csv":
            assert rejects[f"broken_folder/{file.name}"]["reason"] == "undecodable", file.name
    for file in (shared_faces / "no_face").iterdir():
        if file.suffix != ".csv":
            assert rejects[f"no_face_folder/{file.name}"]["reason"] in ("no_face", "too_small"), file.name
    assert rejects["broken_folder/bomb.png"]["reason"] == "undecodable"
    assert "bomb" in rejects["broken_folder/bomb.png"]["detail"]
    assert rejects["broken_folder/loop_a.jpg"]["reason"] == "unreadable"
    assert "loop" in rejects["broken_folder/loop_a.jpg"]["detail"]
    assert rejects["broken_folder/pipe.jpg"]["reason"] == "unreadable"
    assert rejects["broken_folder/notes.txt"]["reason"] == "undecodable"
    assert rejects["grace_hopper/hopper.heif"]["reason"] == "undecodable"


def test_load_dataset_offline_gives_pil_images_and_class_labels(curated, rows):
    import datasets
    from PIL import Image

    for ds in (
        datasets.load_dataset(str(curated["out"]), split="train"),
        datasets.load_dataset("parquet", data_dir=str(curated["out"] / "data"), split="train"),
    ):
        assert ds.num_rows == len(rows)
        assert ds.features == dataset_features()
        assert isinstance(ds.features["expression"], datasets.ClassLabel)
        first = ds[0]
        assert isinstance(first["image"], Image.Image) and first["image"].size == (512, 512)
        assert ds.features["pose_bin"].int2str(first["pose_bin"]) in [p.name for p in POSE_BINS]


def test_dataset_card_yaml_comes_from_the_schema(curated):
    text = (curated["out"] / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    assert front["dataset_info"]["features"] == dataset_features()._to_yaml_list()
    assert front["dataset_info"]["splits"][0]["num_examples"] == curated["summary"]["kept"]


def test_card_header_is_what_the_hugging_face_helpers_write():
    """The card's YAML is made without `datasets`; it must be what `datasets`' and `huggingface_hub`'s own card
    helpers make of the same features, configs and split."""
    import datasets
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    info = datasets.DatasetInfo(
        features=dataset_features(),
        splits=datasets.SplitDict({"train": datasets.SplitInfo("train", num_bytes=98765, num_examples=321)}),
    )
    card_data = DatasetCardData()
    MetadataConfigs({"default": {"data_files": [{"split": "train", "path": "data/train-*"}]}}).to_dataset_card_data(
        card_data
    )
    theirs = {**card_data.to_dict(), "dataset_info": info._to_yaml_dict(), "tags": ["faces", "dynamicid"]}
    assert card_metadata(321, 98765) == theirs
    assert yaml.safe_dump(card_metadata(321, 98765), sort_keys=False) == yaml.safe_dump(theirs, sort_keys=False)


def test_kept_faces_are_the_folders_person(curated, rows, rejects, analyzer):
    truth = curated["truth"]
    for row in rows:
        if row["source_path"] in truth:
            assert truth[row["source_path"]] == row["identity"], row["source_path"]
    for folder, _, name in SALT:
        assert rejects[f"{folder}/{name}"]["reason"] == "other_person", name
    # In the group photos, the face kept is the folder's person, not the other one.
    by_identity = {}
    for row in rows:
        if row["source_path"] in truth:
            by_identity.setdefault(row["identity"], []).append(np.asarray(row["embedding"]))
    kept = [r for r in rows if r["source_path"] == "kit_harington/kit_with_rose.jpg"]
    assert kept, "the group photo should keep Kit Harington's face"
    embedding = np.asarray(kept[0]["embedding"])
    own = min(analyzer.distance(embedding, e) for e in by_identity["kit_harington"])
    assert own < analyzer.same_person_threshold
    assert own < min(analyzer.distance(embedding, e) for e in by_identity["biden"])
    # biden.jpg is a crop of two_people.jpg: the face chosen there is Biden's, found as the same shot.
    assert rejects["biden/two_people.jpg"]["reason"] == "duplicate_of:biden/biden.jpg"


def test_near_duplicate_groups_collapse_to_one_kept_copy(shared_faces, rows, rejects):
    kept = {r["source_path"] for r in rows}
    with open(shared_faces / "near_duplicates" / "groups.csv") as f:
        groups = {}
        for row in csv.DictReader(f):
            groups.setdefault(row["group"], []).append(row["file"].split("/", 1)[1])
    for group, files in groups.items():
        paths = [f"{NEAR_DUPLICATE_FOLDERS[group]}/{name}" for name in files]
        assert sum(p in kept for p in paths) <= 1, group
        for p in paths:
            if p not in kept:  # a copy too small for the crop (427x240) is rejected as such before dedupe
                assert rejects[p]["reason"].startswith("duplicate_of:") or rejects[p]["reason"] in (
                    "low_quality",
                    "too_small",
                ), p
    # The half face at the photo's edge is not a usable copy at all.
    assert "cut off" in rejects["obama/nd_portrait/obama_partial_face.jpg"]["detail"]
    # The identities/ copy of obama.jpg is byte-identical to the portrait group's: one of them is a duplicate.
    assert not {"obama/obama.jpg", "obama/nd_portrait/obama.jpg"} <= kept
    mirrored = [
        p
        for p in (
            "deepface_person_01/nd_mirror/img11.jpg",
            "deepface_person_01/nd_mirror/img11_reflection.jpg",
            "deepface_person_01/img11.jpg",
        )
    ]
    assert sum(p in kept for p in mirrored) == 1
    for p in mirrored:
        if p not in kept:
            kept_copy = rejects[p]["reason"].split(":", 1)[1]
            assert kept_copy in kept


def test_no_two_kept_images_of_an_identity_are_near_duplicates(rows, analyzer, curated):
    config = curated["summary"]["config"]
    dup_distance = config["dup_embedding_fraction"] * analyzer.same_person_threshold
    by_identity = {}
    for row in rows:
        # The hash curation compares: the aligned inner face of the source photo (keypoints mapped back from
        # the crop), so the test can keep curation's own bound.
        to_source = invert_affine(np.asarray(row["crop_transform"], np.float32).reshape(2, 3))
        kps5 = transform_points(np.asarray(row["kps5"], np.float32), to_source)
        photo = load_image(curated["photos"] / row["source_path"])
        hashes = phash_pair(face_thumbnail(photo, kps5))
        by_identity.setdefault(row["identity"], []).append((row, hashes))
    for items in by_identity.values():
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                (a, ha), (b, hb) = items[i], items[j]
                # A near-duplicate is close by both: no two kept faces are.
                distance = analyzer.distance(np.asarray(a["embedding"]), np.asarray(b["embedding"]))
                bits = min(hamming(ha[0], hb[0]), hamming(ha[0], hb[1]))
                assert distance >= dup_distance or bits > config["phash_max_distance"], (
                    a["source_path"],
                    b["source_path"],
                )


def test_quota_keeps_35_covering_more_cells_than_random_choices(curated, rows, rejects):
    powell = [r for r in rows if r["identity"] == "Colin_Powell"]
    assert len(powell) == 35
    over = [p for p, r in rejects.items() if r["reason"] == "over_quota"]
    assert over and all(p.startswith("Colin_Powell/") for p in over)
    candidates = [
        r
        for r in pq.read_table(curated["out"] / ".work" / "label.parquet").to_pylist()
        if r["identity"] == "Colin_Powell" and r["reason"] is None
    ]
    assert len(candidates) == 35 + len(over)
    ours = grid_cells(
        [{"expression": EXPRESSIONS[r["expression"]], "pose_bin": POSE_BINS[r["pose_bin"]].name} for r in powell]
    )
    rng = random.Random(0)
    random_cells = [grid_cells(rng.sample(candidates, 35)) for _ in range(200)]
    assert ours == grid_cells(candidates)  # every cell present is covered
    assert ours >= max(random_cells)
    assert ours > sum(random_cells) / len(random_cells)


def test_grid_cells_get_a_sure_expression_label_when_there_is_one(curated):
    work = curated["out"] / ".work"
    candidates = [r for r in pq.read_table(work / "label.parquet").to_pylist() if r["reason"] is None]
    grid = {r["source_path"] for r in pq.read_table(work / "select.parquet").to_pylist() if r["selection"] == "grid"}
    cells: dict[tuple, list[dict]] = {}
    for r in candidates:
        cells.setdefault((r["identity"], r["expression"], r["pose_bin"]), []).append(r)
    unsure_cells = 0
    for members in cells.values():
        chosen = [r for r in members if r["source_path"] in grid]
        assert len(chosen) == 1
        if chosen[0]["expression_confidence"] < EXPRESSION_CONFIDENCE_LOW:
            unsure_cells += 1
            assert all(r["expression_confidence"] < EXPRESSION_CONFIDENCE_LOW for r in members)
    print(f"{len(cells)} grid cells, {unsure_cells} filled with an unsure label (no sure one there)")


def test_labels_are_in_crop_coordinates_and_consistent(rows):
    for row in rows:
        expression = EXPRESSIONS[row["expression"]]
        pose = POSE_BINS[row["pose_bin"]]
        assert pose.yaw_min <= row["yaw"] < pose.yaw_max
        assert row["face_prompt"] == face_prompt(expression, pose.name)
        assert expression in row["caption"]
        scores = np.asarray(row["expression_scores"])
        assert scores.sum() == pytest.approx(1.0, abs=1e-3) and EXPRESSIONS[int(scores.argmax())] == expression
        assert row["expression_confidence"] == pytest.approx(scores.max(), abs=1e-6)
        landmarks = np.asarray(row["landmarks"])
        assert len(landmarks) >= 68
        assert np.median(landmarks, axis=0) == pytest.approx([256, 256], abs=90)
        kps5 = np.asarray(row["kps5"])
        assert kps5.shape == (5, 2) and kps5[0, 0] < kps5[1, 0]  # left eye left of right eye in the upright crop
        matrix = np.asarray(row["crop_transform"]).reshape(2, 3)
        x0, y0, x1, y1 = row["face_bbox"]
        centre = matrix[:, :2] @ [(x0 + x1) / 2, (y0 + y1) / 2] + matrix[:, 2]
        assert centre == pytest.approx([256, 256], abs=120)
        assert np.linalg.norm(row["embedding"]) == pytest.approx(1.0, abs=1e-3)
        assert row["embedding_model"] == "dlib-resnet-128"
        assert row["quality"]["face_size"] >= 40 and row["quality"]["sharpness"] > 0
        assert row["quality"]["upscale"] <= SETTINGS["max_upscale"]
        assert row["quality"]["upscale"] == pytest.approx(np.sqrt(abs(np.linalg.det(matrix[:, :2]))), rel=1e-5)


def test_rows_are_sorted_and_identities_table_adds_up(curated, rows, rejects):
    keys = [(r["identity"], r["source_path"]) for r in rows]
    assert keys == sorted(keys)
    identities = {r["identity"]: r for r in pq.read_table(curated["out"] / "identities.parquet").to_pylist()}
    for name, info in identities.items():
        kept = [r for r in rows if r["identity"] == name]
        assert info["num_images"] == len(kept)
        assert info["num_scanned"] == info["num_images"] + info["num_rejected"]
        if kept:
            assert np.linalg.norm(info["mean_embedding"]) == pytest.approx(1.0, abs=1e-3)
    assert "empty_person" not in identities or identities["empty_person"]["num_scanned"] == 0


def test_report_shows_thumbnails_labels_grid_and_rejects(curated, rows):
    text = (curated["out"] / "report.html").read_text()
    assert text.count("data:image/jpeg;base64,") >= len(rows)
    assert "Colin_Powell" in text and "over_quota" in text and "other_person" in text
    assert "front view" in text and 'class="grid"' in text
    unsure = [r for r in rows if r["expression_confidence"] < EXPRESSION_CONFIDENCE_LOW]
    assert text.count('<figure class="unsure">') == len(unsure)  # each unsure label flagged on the sheet
    for row in rows:  # every label with its confidence
        assert f"{EXPRESSIONS[row['expression']]} {row['expression_confidence']:.2f}" in text


def test_work_folder_holds_the_crops_of_kept_faces_only(curated, rows, rejects):
    """`align` measures every candidate's crop and keeps those of identities within their quota; the kept faces of
    the others (cut by `select`) are cropped in `write`: each kept face is cropped once, and only those."""
    crops = pq.read_table(curated["out"] / ".work" / "stores" / "crops", columns=["key"]).column("key").to_pylist()
    assert len(crops) == len(set(crops)) == len(rows)
    over = {p.split("/")[0] for p, r in rejects.items() if r["reason"] == "over_quota"}  # aligned, labelled, cut
    assert over and curated["summary"]["stages"]["write"]["computed"] == sum(r["identity"] in over for r in rows)
    aligned = pq.read_table(curated["out"] / ".work" / "stores" / "align", columns=["key"]).num_rows
    assert aligned > len(rows)


def test_report_thumbnails_made_by_the_workers_equal_the_datasets_images(curated, tmp_path):
    """`build` writes report.html from the crop stage's thumbnails; `report` makes them from the dataset."""
    built = (curated["out"] / "report.html").read_text()
    copy = tmp_path / "out"
    shutil.copytree(curated["out"], copy, ignore=shutil.ignore_patterns(".work"))
    assert CliRunner().invoke(main, ["report", str(copy)]).exit_code == 0
    assert (copy / "report.html").read_text() == built


def test_second_run_on_unchanged_input_does_no_work(curated):
    again = build_dataset(curated["photos"], curated["out"], progress=False, **SETTINGS)
    for stage, stats in again["stages"].items():
        assert stats["computed"] == 0, stage
        if stage != "scan":
            assert stats["skipped"], stage
    assert again["fingerprint"] == curated["summary"]["fingerprint"]


def test_inspect_and_report_commands_read_the_folder(curated, rows):
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(curated["out"]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["rows"] == len(rows)
    assert sum(report["expression"].values()) == len(rows)
    confidence = report["expression_confidence"]
    unsure = sorted(r["expression_confidence"] for r in rows if r["expression_confidence"] < confidence["threshold"])
    assert confidence["unsure"] == sum(e["unsure"] for e in confidence["by_expression"].values()) == len(unsure)
    assert [r["confidence"] for r in confidence["least_confident"]] == [round(c, 3) for c in unsure[:20]]
    text = runner.invoke(main, ["inspect", str(curated["out"])]).output
    assert "expression confidence" in text and text.count("UNSURE") == min(len(unsure), 20)
    assert report["identities"]["Colin_Powell"]["images"] == 35
    (curated["out"] / "report.html").unlink()
    result = runner.invoke(main, ["report", str(curated["out"])])
    assert result.exit_code == 0 and (curated["out"] / "report.html").exists()
