"""Curation building blocks that need no face model: neighbours, hashes, selection, scan, tables, CLI errors."""

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from PIL import Image

from dynamicid.curation.cli import main
from dynamicid.curation.config import CurationConfig
from dynamicid.curation.imagehash import HASH_WORDS, face_thumbnail, hamming, phash_pair
from dynamicid.curation.neighbors import (
    components,
    cosine_threshold,
    hash_pairs,
    similar_pairs,
)
from dynamicid.curation.scan import HASH_STORE_SCHEMA, scan
from dynamicid.curation.select import CELL_ORDER, choose
from dynamicid.curation.size import too_upscaled, upscale_factor
from dynamicid.curation.store import ResultStore
from dynamicid.schemas import EXPRESSION_CONFIDENCE_LOW, EXPRESSIONS, POSE_BINS, RejectReason


def unit_rows(n, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_similar_pairs_match_brute_force():
    x = unit_rows(300, dim=4)
    sims = x @ x.T
    brute = {(i, j) for i in range(300) for j in range(i + 1, 300) if sims[i, j] >= 0.9}
    assert {tuple(p) for p in similar_pairs(x, 0.9).tolist()} == brute


def test_hash_pairs_match_brute_force_including_mirrors():
    rng = np.random.default_rng(1)
    h = rng.integers(-(2**63), 2**63 - 1, size=(200, HASH_WORDS), dtype=np.int64)
    m = rng.integers(-(2**63), 2**63 - 1, size=(200, HASH_WORDS), dtype=np.int64)
    h[7] = h[3] ^ np.array([0b101, 0, 0, 1])  # 3 bits from 3
    m[9] = h[4]  # 9's mirror equals 4
    found = {tuple(p) for p in hash_pairs(h, m, 4).tolist()}
    assert (3, 7) in found and (4, 9) in found
    brute = {
        (i, j) for i in range(200) for j in range(i + 1, 200) if min(hamming(h[i], h[j]), hamming(h[i], m[j])) <= 4
    }
    assert found == brute


def test_hamming_counts_the_bits_of_negative_words_too():
    """Oracle: Python's own bit count of each word as 64 unsigned bits (numpy's bitwise_count on int64 counts the
    absolute value's bits: words whose sign bits differ were miscounted, and mirrored copies were kept)."""
    rng = np.random.default_rng(2)
    a = rng.integers(-(2**63), 2**63 - 1, size=(50, HASH_WORDS), dtype=np.int64)
    b = rng.integers(-(2**63), 2**63 - 1, size=(50, HASH_WORDS), dtype=np.int64)
    expected = [
        sum(bin((int(x) ^ int(y)) & (2**64 - 1)).count("1") for x, y in zip(u, v, strict=True))
        for u, v in zip(a, b, strict=True)
    ]
    assert hamming(a, b).tolist() == expected
    assert hamming(np.array([-1, 0, 0, 0]), np.zeros(4, np.int64)) == 64


def test_components_are_numbered_by_first_member():
    labels = components(6, np.array([[4, 5], [1, 3]]))
    assert labels.tolist() == [0, 1, 2, 1, 3, 3]


def test_cosine_threshold_inverts_the_backend_distance():
    def euclidean(a, b):
        return float(np.linalg.norm(a - b))

    cos = cosine_threshold(euclidean, 0.6, 128)
    assert cos == pytest.approx(1 - 0.6**2 / 2, abs=1e-6)


def test_face_hash_survives_resize_and_mirror_but_not_another_photo(shared_faces):
    """The aligned inner face hashes alike at a third of the size, its mirror hash is the mirrored face's hash;
    another person's face is far. (Mirrored copies of real photos: tests/test_curation_near_duplicates.py.)"""
    from dynamicid.faces import FaceAnalyzer

    analyzer = FaceAnalyzer("embedded")
    image = Image.open(shared_faces / "identities" / "obama" / "obama.jpg").convert("RGB")
    other = Image.open(shared_faces / "identities" / "biden" / "biden.jpg").convert("RGB")

    def hashes(photo):
        return phash_pair(face_thumbnail(photo, analyzer.analyze(photo)[0].kps5))

    plain, mirror = hashes(image)
    small = hashes(image.resize((image.width // 3, image.height // 3)))[0]
    assert plain.shape == (HASH_WORDS,) and plain.dtype == np.int64
    assert hamming(plain, small) <= 20
    thumbnail = face_thumbnail(image, analyzer.analyze(image)[0].kps5)
    assert np.array_equal(phash_pair(thumbnail[:, ::-1])[0], mirror)
    assert hamming(plain, hashes(other)[0]) > 60


def label_rows(cells, seed=0):
    x = unit_rows(len(cells), seed=seed)
    return [
        {
            "source_path": f"p/{i:03d}.jpg",
            "expression": e,
            "expression_confidence": 0.9,
            "pose_bin": p,
            "embedding": x[i].tolist(),
            "quality": {"face_size": 100.0 + i % 7, "sharpness": 50.0, "upscale": 1.0},
        }
        for i, (e, p) in enumerate(cells)
    ]


def test_select_covers_every_cell_first_then_diversity_and_is_deterministic():
    poses = [b.name for b in POSE_BINS]
    rng = np.random.default_rng(3)
    cells = [(EXPRESSIONS[0], poses[4])] * 30 + [
        (EXPRESSIONS[int(rng.integers(7))], poses[int(rng.integers(5))]) for _ in range(20)
    ]
    rows = label_rows(cells)
    chosen = choose(rows, 35)
    assert len(chosen) == 35
    distinct = {(r["expression"], r["pose_bin"]) for r in rows}
    kept_cells = {(r["expression"], r["pose_bin"]) for r in rows if r["source_path"] in chosen}
    assert kept_cells == distinct
    assert sum(v == "grid" for v in chosen.values()) == len(distinct)
    assert choose(list(reversed(rows)), 35) == chosen


def test_select_with_more_cells_than_room_prefers_rare_cells():
    poses = [b.name for b in POSE_BINS]
    cells = [(e, p) for e in EXPRESSIONS for p in poses]
    rows = label_rows([*cells, *cells[:5]])  # the first 5 cells are common (2 faces each)
    chosen = choose(rows, 30)
    kept_cells = {(r["expression"], r["pose_bin"]) for r in rows if r["source_path"] in chosen}
    assert len(kept_cells) == 30
    assert kept_cells.isdisjoint(cells[:5])
    assert len(CELL_ORDER) == 35


def test_select_fills_a_cell_with_a_sure_label_before_a_larger_unsure_one():
    poses = [b.name for b in POSE_BINS]
    rows = label_rows([(EXPRESSIONS[3], poses[4])] * 3)
    for row, confidence, size in zip(
        rows, [EXPRESSION_CONFIDENCE_LOW - 0.01, EXPRESSION_CONFIDENCE_LOW, 0.2], [500.0, 50.0, 300.0], strict=True
    ):
        row["expression_confidence"], row["quality"]["face_size"] = confidence, size  # the only sure one is smallest
    assert choose(rows, 1) == {"p/001.jpg": "grid"}
    for row in rows:  # all unsure: the largest again
        row["expression_confidence"] = EXPRESSION_CONFIDENCE_LOW / 2
    assert choose(rows, 1) == {"p/000.jpg": "grid"}


def test_farthest_point_picks_the_most_different_face():
    poses = [b.name for b in POSE_BINS]
    rows = label_rows([(EXPRESSIONS[4], poses[4])] * 4)
    base = np.eye(16, dtype=np.float32)
    for row, vector in zip(rows, [base[0], base[0] * 0.99 + base[1] * 0.14, base[2], base[0]], strict=True):
        row["embedding"] = (vector / np.linalg.norm(vector)).tolist()
        row["quality"]["face_size"] = 100.0  # equal quality: the grid pick is the first path
    chosen = choose(rows, 2)
    assert chosen == {"p/000.jpg": "grid", "p/002.jpg": "diversity"}


def test_select_grid_pick_prefers_the_least_enlarged_crop():
    poses = [b.name for b in POSE_BINS]
    rows = label_rows([(EXPRESSIONS[4], poses[4])] * 3)
    for row, upscale in zip(rows, (1.8, 1.3, 0.6), strict=True):
        row["quality"] = {"face_size": 100.0, "sharpness": 50.0, "upscale": upscale}
    assert choose(rows, 1) == {"p/002.jpg": "grid"}
    rows[2]["quality"]["upscale"] = 1.6
    assert choose(rows, 1) == {"p/001.jpg": "grid"}
    for row in rows:  # at or below native resolution they count alike: the larger face wins
        row["quality"]["upscale"] = 0.9
    rows[1]["quality"]["face_size"] = 120.0
    assert choose(rows, 1) == {"p/001.jpg": "grid"}


def test_upscale_factor_and_too_small_detail():
    c = CurationConfig(crop_size=512, max_upscale=2.0)
    rotation = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    for scale in (0.5, 2.0, 3.5):
        matrix = np.hstack([scale * rotation, [[10.0], [-4.0]]]).ravel().tolist()
        assert upscale_factor(matrix) == pytest.approx(scale)
    assert too_upscaled(c, (np.array([[2.0, 0, 0], [0, 2.0, 0]])).ravel().tolist()) is None
    detail = too_upscaled(c, (np.array([[3.5, 0, 0], [0, 3.5, 0]])).ravel().tolist())
    assert "3.50x" in detail and "--max-upscale 2" in detail and "\n" not in detail
    assert "--crop-size 288" in detail  # 512 * 2 / 3.5 = 292, a multiple of 8 below it: at most 2x there
    assert "--crop-size" not in too_upscaled(c, (np.array([[40.0, 0, 0], [0, 40.0, 0]])).ravel().tolist())


def test_scan_accounts_for_every_odd_file(tmp_path):
    photos = tmp_path / "photos"
    (photos / "alice" / "nested").mkdir(parents=True)
    (photos / "empty_person").mkdir()
    Image.new("RGB", (8, 8)).save(photos / "alice" / "a.png")
    shutil.copyfile(photos / "alice" / "a.png", photos / "alice" / "nested" / "copy.png")
    (photos / "alice" / "zero.jpg").write_bytes(b"")
    (photos / "top_level.jpg").write_bytes(b"x")
    os.symlink("loop_b", photos / "alice" / "loop_a")
    os.symlink("loop_a", photos / "alice" / "loop_b")
    os.symlink(photos / "alice", photos / "alice" / "nested" / "back_up")  # a folder link back up: walked once
    table, hashed = scan(
        photos,
        cluster=False,
        shard_index=0,
        shard_count=1,
        hash_store=ResultStore(tmp_path / "w", HASH_STORE_SCHEMA),
    )
    rows = {r["source_path"]: r for r in table.to_pylist()}
    assert set(rows) == {
        "alice/a.png",
        "alice/nested/copy.png",
        "alice/zero.jpg",
        "alice/loop_a",
        "alice/loop_b",
        "top_level.jpg",
    }
    assert rows["alice/a.png"]["sha256"] == rows["alice/nested/copy.png"]["sha256"]
    assert rows["alice/nested/copy.png"]["identity"] == "alice"
    assert rows["alice/zero.jpg"]["reason"] == "undecodable"
    assert rows["alice/loop_a"]["reason"] == "unreadable" and "loop" in rows["alice/loop_a"]["detail"]
    assert rows["top_level.jpg"]["reason"] == RejectReason.NO_IDENTITY
    assert hashed == 4  # zero.jpg is hashed too; loops are not


def test_shards_split_identities_without_overlap(tmp_path):
    photos = tmp_path / "photos"
    for name in ("ann", "bob", "cat", "dan", "eve"):
        (photos / name).mkdir(parents=True)
        (photos / name / "x.jpg").write_bytes(name.encode())
    seen = []
    for index in range(2):
        store = ResultStore(tmp_path / f"h{index}", HASH_STORE_SCHEMA)
        table, _ = scan(photos, cluster=False, shard_index=index, shard_count=2, hash_store=store)
        seen.append(set(table.column("identity").to_pylist()))
    assert seen[0] | seen[1] == {"ann", "bob", "cat", "dan", "eve"}
    assert not seen[0] & seen[1]


def test_result_store_finds_rows_by_key_across_parts_and_writers_and_compacts(tmp_path):
    schema = pa.schema([("key", pa.string()), ("value", pa.int64())])
    writers = [ResultStore(tmp_path / "s", schema), ResultStore(tmp_path / "s", schema)]  # two processes
    for i in range(40):
        writers[i % 2].put(pa.table({"key": [f"k{i}"], "value": [i]}))
    (tmp_path / "s" / ".part-9.parquet.123.tmp").write_bytes(b"half a file")  # a write cut by a kill
    (tmp_path / "s" / "part-damaged.parquet").write_bytes(b"not parquet")
    reader = ResultStore(tmp_path / "s", schema)
    found, rows = reader.get(["k39", "nope", "k0", "k39"])
    assert found.tolist() == [True, False, True, True]
    assert rows.column("value").to_pylist() == [39, 0, 39]
    reader.compact()
    assert len(list((tmp_path / "s").glob("part-*.parquet"))) == 2  # the merged part and the damaged one
    found, rows = ResultStore(tmp_path / "s", schema).get([f"k{i}" for i in range(40)])
    assert found.all() and rows.column("value").to_pylist() == list(range(40))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"per_identity": 0}, "--per-identity"),
        ({"min_per_identity": 5, "per_identity": 3}, "--min-per-identity"),
        ({"cluster": True, "shard_count": 2, "shard_index": 1}, "--cluster"),
        ({"max_upscale": 0.0}, "--max-upscale"),
        ({"max_upscale": float("inf")}, "--max-upscale"),
        ({"max_upscale": float("nan")}, "--max-upscale"),
        ({"crop_size": 32}, "--crop-size"),
    ],
)
def test_config_check_names_the_bad_setting(change, message):
    with pytest.raises(ValueError, match=message):
        CurationConfig(**change).check()


def test_cli_help_has_examples_for_every_command():
    runner = CliRunner()
    assert "Examples:" in runner.invoke(main, ["--help"]).output
    for command in (
        "build",
        "scan",
        "detect",
        "identify",
        "dedupe",
        "align",
        "label",
        "select",
        "write",
        "merge",
        "report",
        "inspect",
        "demo",
    ):
        result = runner.invoke(main, [command, "--help"])
        assert result.exit_code == 0, result.output
        assert "dynamicid-curate" in result.output, command


def test_cli_refuses_missing_photos_and_foreign_out_dir_with_exit_2(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["build", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "PHOTOS_DIR" in result.output and "nope" in result.output
    (tmp_path / "photos").mkdir()
    foreign = tmp_path / "important"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not touch")
    result = runner.invoke(main, ["build", str(tmp_path / "photos"), str(foreign)])
    assert result.exit_code == 2
    assert "did not write" in result.output
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
    result = runner.invoke(main, ["build", str(tmp_path / "photos"), str(tmp_path / "o"), "--shard", "3/2"])
    assert result.exit_code == 2
    result = runner.invoke(main, ["build", str(tmp_path / "photos"), str(tmp_path / "photos" / "out")])
    assert result.exit_code == 2 and "inside PHOTOS_DIR" in result.output
    assert not (tmp_path / "photos" / "out").exists()


def test_cli_stage_without_its_input_table_says_what_to_run(tmp_path):
    (tmp_path / "photos").mkdir()
    result = CliRunner().invoke(main, ["dedupe", str(tmp_path / "photos"), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "run the stage 'identify' before 'dedupe'" in result.output


def test_reports_of_a_path_that_is_no_dataset_exit_2(tmp_path):
    for command in ("report", "inspect"):
        result = CliRunner().invoke(main, [command, str(tmp_path)])
        assert result.exit_code == 2, result.output


def test_merge_refuses_incomplete_shard_sets(tmp_path, shared_faces):
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "a"), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert Path(tmp_path / "out").exists() is False

    photos = tmp_path / "photos" / "orl_s01"
    photos.mkdir(parents=True)
    shutil.copy(sorted((shared_faces / "identities" / "orl_s01").iterdir())[0], photos)
    part = tmp_path / "part_0"
    built = CliRunner().invoke(main, ["build", str(photos.parent), str(part), "--shard", "0/2"])
    assert built.exit_code == 0, built.output
    for shards, got in (([part], "0/2"), ([part, part], "0/2, 0/2")):
        result = CliRunner().invoke(main, ["merge", *map(str, shards), str(tmp_path / "out")])
        assert result.exit_code == 2
        assert f"merge needs every shard exactly once: expected 0/2, 1/2, got {got}" in result.output
        assert not (tmp_path / "out").exists()
