"""Training crops at native resolution on the real photos: `quality.upscale`, `--max-upscale`, `--crop-size`.

One folder of small photos (the 92x112 face-database photos, 150x150 news crops) and large ones, built with the
defaults, with `--max-upscale 8` and with `--crop-size 256` (reruns into one OUT_DIR: the face models run once;
that a rerun equals a fresh run is `test_curation_caches`' job).
"""

import io
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from dynamicid.curation import build_dataset
from dynamicid.curation.cli import main
from dynamicid.curation.inspect_dataset import UPSCALE_BINS, UPSCALE_EDGES

IDENTITIES = ("orl_s01", "orl_s02", "John_Salley", "obama")
FACE_DATABASE = ("orl_s01/", "orl_s02/")  # 92x112 photos
SMALL = (*FACE_DATABASE, "John_Salley/")  # 150x150 and smaller
BUILDS = {"default": {}, "max_upscale_8": {"max_upscale": 8.0}, "crop_256": {"crop_size": 256}}


def source_scale(row: dict) -> float:
    """Crop pixels per source pixel of the row's source -> crop matrix, from the matrix itself."""
    matrix = np.asarray(row["crop_transform"], np.float64).reshape(2, 3)
    return float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))


def small(path: str) -> bool:
    return path.startswith(SMALL)


@pytest.fixture(scope="module")
def builds(identity_photos, tmp_path_factory):
    """name -> (summary, kept rows, rejects by path, inspect --json, report.html text, first image size)."""
    photos, out = identity_photos(*IDENTITIES), tmp_path_factory.mktemp("upscale") / "out"
    found = {}
    for name, settings in BUILDS.items():
        summary = build_dataset(photos, out, face_backend="embedded", progress=False, **settings)
        table = pq.read_table(out / "data")
        image = table.column("image")[0].as_py()["bytes"]
        rows = table.drop_columns(["image"]).to_pylist()
        rejects = {r["source_path"]: r for r in pq.read_table(out / "rejects.parquet").to_pylist()}
        inspected = CliRunner().invoke(main, ["inspect", str(out), "--json"])
        assert inspected.exit_code == 0, inspected.output
        size = Image.open(io.BytesIO(image)).size
        report = (out / "report.html").read_text()
        found[name] = (summary, rows, rejects, json.loads(inspected.output), report, size)
    return found


def test_every_kept_row_of_a_default_build_is_enlarged_at_most_2x(builds):
    summary, rows, _, _, _, size = builds["default"]
    assert summary["config"]["max_upscale"] == 2.0 and size == (512, 512)
    assert rows and all(r["quality"]["upscale"] <= 2.0 for r in rows)
    for row in rows:
        assert row["quality"]["upscale"] == pytest.approx(source_scale(row), rel=1e-5)


def test_face_database_photos_are_too_small_by_default_and_kept_with_max_upscale_8(builds):
    _, rows, rejects, _, _, _ = builds["default"]
    _, rows_8, rejects_8, _, _, _ = builds["max_upscale_8"]
    upscale_8 = {r["source_path"]: r["quality"]["upscale"] for r in rows_8}
    assert not any(r["source_path"].startswith(FACE_DATABASE) for r in rows)
    database = sorted(p for p in rejects if p.startswith(FACE_DATABASE))
    assert len(database) == 20
    for path in database:
        assert rejects[path]["reason"] == "too_small", path
        factor = float(re.search(r"enlarge the face (\d+\.\d+)x", rejects[path]["detail"]).group(1))
        assert factor > 2.0
        if path in upscale_8:  # kept with --max-upscale 8, with the factor the detail named
            assert upscale_8[path] == pytest.approx(factor, abs=0.006)
        else:  # or a near-duplicate of a kept one there
            assert rejects_8[path]["reason"].split(":", 1)[1] in upscale_8
    assert len([p for p in database if p in upscale_8]) >= 10


def test_a_256_dataset_keeps_more_small_photos_than_a_512_one(builds):
    _, rows_512, _, _, _, _ = builds["default"]
    _, rows_256, rejects_256, _, _, size = builds["crop_256"]
    assert size == (256, 256)
    kept_512 = sum(small(r["source_path"]) for r in rows_512)
    kept_256 = sum(small(r["source_path"]) for r in rows_256)
    assert kept_256 > kept_512
    assert all(r["quality"]["upscale"] <= 2.0 for r in rows_256)
    # The same faces at half the crop size: half the enlargement.
    by_path = {r["source_path"]: r["quality"]["upscale"] for r in builds["max_upscale_8"][1]}
    for row in rows_256:
        if row["source_path"] in by_path:
            assert row["quality"]["upscale"] == pytest.approx(by_path[row["source_path"]] / 2, rel=1e-3)
    for reject in rejects_256.values():
        if reject["reason"] == "too_small" and reject["stage"] == "align":
            assert "256 px crop" in reject["detail"]


def test_inspect_and_report_show_the_upscale_histogram(builds):
    for name in BUILDS:
        summary, rows, _, inspected, report, _ = builds[name]
        expected = dict.fromkeys(UPSCALE_BINS, 0)
        for row in rows:  # a bin holds (previous edge, edge]; the last one everything above
            upscale = row["quality"]["upscale"]
            expected[UPSCALE_BINS[next((i for i, e in enumerate(UPSCALE_EDGES) if upscale <= e), -1)]] += 1
        assert inspected["upscale"] == expected, name
        assert "Upscale of the kept crops" in report and f"--max-upscale {summary['config']['max_upscale']:g}" in report
        assert all(f"{r['quality']['upscale']:.2f}x" in report for r in rows)
    assert any(r["quality"]["upscale"] > 2.0 for r in builds["max_upscale_8"][1])
    text = CliRunner().invoke(main, ["inspect", builds["crop_256"][0]["out_dir"]]).output
    assert "upscale:" in text and all(label in text for label in UPSCALE_BINS)
