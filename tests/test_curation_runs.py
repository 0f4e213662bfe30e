"""Resume after SIGKILL, no repeated work, and identical output across workers and shards (small real subset)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dynamicid.curation import build_dataset
from dynamicid.curation.config import CurationConfig
from dynamicid.curation.crop import crop_store
from dynamicid.curation.merge import merge_datasets
from dynamicid.curation.pipeline import STAGES, open_run, run_stage
from dynamicid.curation.shards import write_shard

IDENTITIES = ("obama", "kit_harington", "John_Salley")  # 19 photos: more than one cache batch (16)


def row_hashes(out_dir):
    """One hash per dataset row (every column, image bytes included), in file order."""
    table = pq.read_table(out_dir / "data")
    return [
        hashlib.sha256(json.dumps(row, sort_keys=True, default=lambda b: b.hex()).encode()).hexdigest()
        for row in table.to_pylist()
    ]


def side_tables(out_dir):
    return [pq.read_table(out_dir / name).to_pylist() for name in ("identities.parquet", "rejects.parquet")]


def kill_at_first_detect_batch(command: list[str], out) -> None:
    """Start `command` (a build into `out`) and SIGKILL it as soon as its first detect batch is stored."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stores = out / ".work" / "stores"
    deadline = time.monotonic() + 600
    while not any(stores.glob("detect-*/part-*.parquet")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the build finished (or failed) before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "summary.json").exists()


@pytest.fixture(scope="module")
def photos(identity_photos):
    return identity_photos(*IDENTITIES)


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory):
    """One uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    summary = build_dataset(photos, out, face_backend="embedded", progress=False)
    assert summary["kept"] > 0
    return out


def test_sigkilled_build_resumes_without_redoing_work_and_matches(photos, reference, tmp_path):
    out = tmp_path / "out"
    code = (
        "from dynamicid.curation import build_dataset; "
        f"build_dataset({str(photos)!r}, {str(out)!r}, face_backend='embedded', progress=False)"
    )
    kill_at_first_detect_batch([sys.executable, "-c", code], out)

    resumed = build_dataset(photos, out, face_backend="embedded", progress=False)
    detect = resumed["stages"]["detect"]
    assert detect["reused"] >= 16  # the batch written before the kill
    assert detect["computed"] + detect["reused"] == sum(1 for p in photos.rglob("*") if p.is_file())
    assert row_hashes(out) == row_hashes(reference)
    assert side_tables(out) == side_tables(reference)

    again = build_dataset(photos, out, face_backend="embedded", progress=False)
    assert all(s["computed"] == 0 for s in again["stages"].values())


def test_with_workers_the_driver_builds_no_face_models_and_arrow_gives_memory_back(photos, reference, tmp_path):
    """The workers resolve the backend and keep the models; the CLI puts Arrow's C++ code on the C allocator."""
    out = tmp_path / "out"
    code = (  # the pool is read before the build, which also sets pyarrow's own default
        "import dynamicid.curation.cli, pyarrow; from dynamicid.curation import build_dataset, backend; "
        "pool = pyarrow.default_memory_pool().backend_name; "
        f"build_dataset({str(photos)!r}, {str(out)!r}, face_backend='embedded', workers=2, progress=False); "
        "print(len(backend._ANALYZERS), pool)"
    )
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["0", "system"]
    assert row_hashes(out) == row_hashes(reference)


def test_two_workers_give_the_same_rows_as_one(photos, reference, tmp_path):
    """Also when the workers write the shards: several files, several row groups each, written two at a time."""
    out = tmp_path / "out"
    summary = build_dataset(
        photos, out, face_backend="embedded", workers=2, progress=False, rows_per_file=3, rows_per_row_group=2
    )
    assert summary["stages"]["detect"]["computed"] > 0
    assert row_hashes(out) == row_hashes(reference)
    assert side_tables(out) == side_tables(reference)
    report = (out / "report.html").read_text()  # the rejected photos' thumbnails made by the workers
    assert report == (reference / "report.html").read_text()
    assert report.count("<figure class='reject'><img src='data:image/jpeg") >= 1
    count = -(-summary["kept"] // 3)
    assert count >= 2
    names = [f"data/train-{index:05d}-of-{count:05d}.parquet" for index in range(count)]
    assert summary["files"] == [*names, "identities.parquet", "rejects.parquet"]
    assert sorted(p.relative_to(out).as_posix() for p in (out / "data").iterdir()) == names
    for name in names:
        metadata = pq.read_metadata(out / name)
        rows = 3 if name != names[-1] else summary["kept"] - 3 * (count - 1)
        assert metadata.num_rows == rows
        groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        assert groups == [min(2, rows - start) for start in range(0, rows, 2)]


def test_shards_store_the_crops_as_they_are_and_compress_the_rest(reference):
    """PNG bytes neither compress nor repeat: no compression, dictionary or statistics for them."""
    metadata = pq.read_metadata(next((reference / "data").glob("train-*.parquet")))
    columns = {c.path_in_schema: c for c in map(metadata.row_group(0).column, range(metadata.num_columns))}
    image = columns.pop("image.bytes")
    assert image.compression == "UNCOMPRESSED" and image.statistics is None
    assert "RLE_DICTIONARY" not in image.encodings
    assert {c.compression for c in columns.values()} == {"ZSTD"}
    assert "RLE_DICTIONARY" in columns["identity"].encodings


def test_a_shard_whose_crop_is_missing_names_it_and_leaves_no_file(reference, tmp_path):
    rows = pq.read_table(next((reference / "data").glob("train-*.parquet"))).slice(0, 2)
    path = tmp_path / "train-00000-of-00001.parquet"
    with pytest.raises(RuntimeError, match=r"512-missing.*--no-resume"):
        write_shard(path, rows, ["512-missing", "512-also-missing"], reference / ".work", 64)
    assert list(tmp_path.iterdir()) == []


def test_shards_find_crops_stored_after_an_earlier_shard_was_written(reference, tmp_path):
    """A worker keeps its crop store reader across shards, and reads the store again when its parts change."""
    work = tmp_path / "work"
    shutil.copytree(reference / ".work" / "stores" / "crops", work / "stores" / "crops")
    rows = pq.read_table(next((reference / "data").glob("train-*.parquet"))).slice(0, 1)
    stored = pq.read_table(next((work / "stores" / "crops").glob("part-*.parquet"))).slice(0, 1)
    assert write_shard(tmp_path / "a.parquet", rows, stored.column("key").to_pylist(), work, 64) == 1
    crop_store(work).put(pa.table({"key": ["512-new"], "png": stored.column("png")}))
    assert write_shard(tmp_path / "b.parquet", rows, ["512-new"], work, 64) == 1
    image = pq.read_table(tmp_path / "b.parquet").column("image").to_pylist()
    assert image == [{"bytes": stored.column("png")[0].as_py(), "path": None}]


def test_two_shards_merged_equal_one_run(photos, reference, tmp_path):
    parts = []
    for index in range(2):
        part = tmp_path / f"part{index}"
        build_dataset(photos, part, face_backend="embedded", shard=(index, 2), progress=False)
        parts.append(part)
    merged = merge_datasets(parts, tmp_path / "merged")
    assert merged["scanned"] == json.loads((reference / "summary.json").read_text())["scanned"]
    assert row_hashes(tmp_path / "merged") == row_hashes(reference)
    assert side_tables(tmp_path / "merged") == side_tables(reference)


def test_a_kept_photo_gone_before_write_is_rejected_and_the_rest_written(identity_photos, reference, tmp_path):
    """Kept faces of identities over their quota are cropped in `write`: one whose photo was deleted after
    `select` costs only itself."""
    photos = identity_photos(*IDENTITIES)
    out = tmp_path / "out"
    run = open_run(photos, out, CurationConfig(face_backend="embedded", per_identity=2), progress=False)
    try:
        for step in STAGES[:-1]:
            run_stage(run, step)
        selected = pq.read_table(run.work.table_path("select")).to_pylist()
        over = {r["identity"] for r in selected if r["reason"] == "over_quota"}
        kept = [r["source_path"] for r in selected if r["reason"] is None]
        lost = next(r["source_path"] for r in selected if r["reason"] is None and r["identity"] in over)
        (photos / lost).unlink()
        assert run_stage(run, "write") == len(kept) - 1
    finally:
        run.engine.close()
    summary = json.loads((out / "summary.json").read_text())
    gone = {r["source_path"]: r for r in side_tables(out)[1]}[lost]
    assert gone["reason"] == "unreadable" and "vanished since it was aligned" in gone["detail"]
    assert summary["rejected_by_stage"]["write"] == 1 and summary["kept"] + summary["rejected"] == summary["scanned"]
    assert pq.read_table(out / "data").column("source_path").to_pylist() == [p for p in kept if p != lost]


def test_no_resume_recomputes_from_scratch(photos, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    summary = build_dataset(photos, out, face_backend="embedded", resume=False, progress=False, min_per_identity=6)
    assert summary["stages"]["detect"]["computed"] > 0
    assert summary["rejected_by_reason"]["too_few_images"] >= 3  # kit_harington has 3 photos
    assert row_hashes(out) != row_hashes(reference)


def test_demo_curates_the_installed_sample_photos(tmp_path):
    import datasets
    from click.testing import CliRunner

    from dynamicid.curation.cli import main

    result = CliRunner().invoke(main, ["demo", str(tmp_path / "demo"), "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["kept"] + summary["rejected"] == summary["scanned"]
    for name in ("README.md", "report.html", "summary.json", "identities.parquet", "rejects.parquet"):
        assert (tmp_path / "demo" / name).exists(), name
    ds = datasets.load_dataset(str(tmp_path / "demo"), split="train")
    assert ds.num_rows == summary["kept"]
    # The mirrored, smaller astronaut the demo adds is rejected as a duplicate of the original, which is kept.
    rejects = {r["source_path"]: r for r in pq.read_table(tmp_path / "demo" / "rejects.parquet").to_pylist()}
    copy = rejects["eileen_collins/astronaut_mirrored_small.jpg"]
    assert (copy["stage"], copy["reason"]) == ("dedupe", "duplicate_of:eileen_collins/astronaut.png")
    assert "eileen_collins/astronaut.png" in ds["source_path"]
