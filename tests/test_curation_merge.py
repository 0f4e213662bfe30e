"""`merge` of N shard builds equals one build, also when identical files sit in folders of different shards."""

import json
import shutil

import pytest
from test_curation_runs import row_hashes, side_tables

from dynamicid.curation import CurationError, build_dataset
from dynamicid.curation.inputs import MARKER
from dynamicid.curation.merge import merge_datasets
from dynamicid.curation.scan import shard_of

# Keys of summary.json that describe the run rather than the result (see the README).
RUN_KEYS = ("out_dir", "fingerprint", "stages", "merged_from")
MODEL_STORES = ("detect-*", "describe-*")  # crops (align) are left to each shard on purpose


def second_folder_name() -> str:
    """A folder name that lands in another shard than `obama` for 2 and for 3 shards."""
    for suffix in range(100):
        name = f"obama_press_{suffix}"
        if all(shard_of(name, n) != shard_of("obama", n) for n in (2, 3)):
            return name
    raise AssertionError("no such folder name")


@pytest.fixture(scope="module")
def photos(tmp_path_factory, shared_faces):
    """obama/ and kit_harington/, a second obama folder holding byte-identical copies of two of obama/'s photos
    plus a smaller version of one of them (a near-duplicate of a copy), and a file outside any folder."""
    root = tmp_path_factory.mktemp("copies") / "photos"
    for identity in ("obama", "kit_harington"):
        shutil.copytree(shared_faces / "identities" / identity, root / identity)
    second = root / second_folder_name()
    second.mkdir()
    for name in ("obama.jpg", "obama2.jpg"):
        shutil.copyfile(root / "obama" / name, second / name)
    shutil.copyfile(
        shared_faces / "near_duplicates" / "obama_official_portrait" / "obama-480p.jpg", second / "480p.jpg"
    )
    shutil.copyfile(
        root / "kit_harington" / sorted(p.name for p in (root / "kit_harington").iterdir())[0], root / "stray.jpg"
    )
    return root


@pytest.fixture(scope="module")
def single(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    build_dataset(photos, out, face_backend="embedded", progress=False)
    return out


def result_summary(out_dir) -> dict:
    summary = json.loads((out_dir / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in RUN_KEYS}


def test_single_build_rejects_the_copies_in_the_second_folder(photos, single):
    second = second_folder_name()
    rejects = {r["source_path"]: r for r in side_tables(single)[1]}
    for name in ("obama.jpg", "obama2.jpg"):
        assert rejects[f"{second}/{name}"]["reason"].startswith("duplicate_of:obama/")
    assert rejects["stray.jpg"]["reason"] == "no_identity"


@pytest.mark.parametrize("count", [1, 2, 3])
def test_merged_shards_equal_the_single_build(photos, single, tmp_path, count):
    parts = []
    for index in range(count):
        part = tmp_path / f"part{index}"
        for pattern in MODEL_STORES:  # face-model results by file content: only to save test time
            for store in (single / ".work" / "stores").glob(pattern):
                shutil.copytree(store, part / ".work" / "stores" / store.name)
        shutil.copyfile(single / MARKER, part / MARKER)  # so the build accepts the folder holding them
        build_dataset(photos, part, face_backend="embedded", shard=(index, count), progress=False)
        parts.append(part)
    merged = tmp_path / "merged"
    hidden = photos.rename(photos.with_name("elsewhere"))  # merge runs where the photos are not
    try:
        merge_datasets(parts, merged)
    finally:
        hidden.rename(photos)
    assert row_hashes(merged) == row_hashes(single)
    assert side_tables(merged) == side_tables(single)
    assert result_summary(merged) == result_summary(single)
    assert (merged / "report.html").exists() and (merged / "README.md").read_text() == (
        single / "README.md"
    ).read_text()


def test_merge_refuses_shards_built_with_other_settings(tmp_path):
    for index, per_identity in enumerate((35, 20)):
        part = tmp_path / f"part{index}"
        part.mkdir()
        config = {"per_identity": per_identity, "workers": 1, "shard_index": index, "shard_count": 2}
        summary = {
            "tool": "dynamicid-curate",
            "shard": f"{index}/2",
            "backend": "embedded",
            "embedding_model": "m",
            "backend_info": {},
            "config": config,
        }
        (part / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(CurationError, match="per_identity"):
        merge_datasets([tmp_path / "part0", tmp_path / "part1"], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
