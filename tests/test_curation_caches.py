"""Caches that cannot go stale: a rerun into the same OUT_DIR with other settings or another backend equals a
fresh run with them; face models that cannot start stop the run with one line, never a hang."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_curation_runs import row_hashes, side_tables
from test_faces_insightface import make_fake_pack

from dynamicid.curation import CurationError, build_dataset
from dynamicid.curation.config import CurationConfig
from dynamicid.curation.engines.local import LocalEngine
from dynamicid.curation.stages import BackendInfo, Stage, StageContext, StageSetupError, photo_schema
from dynamicid.curation.tables import TableWriter
from dynamicid.faces import INSIGHTFACE_ROOT_ENV
from dynamicid.schemas import EXPRESSIONS

IDENTITIES = ("obama", "kit_harington")


@pytest.fixture(scope="module")
def reused(identity_photos, tmp_path_factory):
    """PHOTOS_DIR, and one OUT_DIR that every rerun below goes into, first built with the default settings."""
    photos, out = identity_photos(*IDENTITIES), tmp_path_factory.mktemp("reused") / "out"
    build_dataset(photos, out, face_backend="embedded", progress=False)
    return photos, out


def assert_same_dataset(a, b):
    assert row_hashes(a) == row_hashes(b)
    assert side_tables(a) == side_tables(b)


@pytest.mark.parametrize(
    "settings",
    [{"min_face_size": 150.0}, {"per_identity": 2}, {"max_upscale": 1.5}, {"crop_size": 256}],
    ids=["min_face_size", "per_identity", "max_upscale", "crop_size"],
)
def test_rerun_with_other_settings_equals_a_fresh_run(reused, tmp_path, settings):
    photos, reused = reused
    before = side_tables(reused)
    again = build_dataset(photos, reused, face_backend="embedded", progress=False, **settings)
    fresh = build_dataset(photos, tmp_path / "fresh", face_backend="embedded", progress=False, **settings)
    assert side_tables(reused) != before  # the setting matters on these photos
    assert again["rejected_by_reason"] == fresh["rejected_by_reason"]
    assert_same_dataset(reused, tmp_path / "fresh")
    assert again["stages"]["detect"]["computed"] == 0  # the face models' results were reused, not recomputed


def test_rerun_with_another_thumbnail_size_makes_the_thumbnails_from_the_stored_crops(reused, tmp_path):
    photos, reused = reused
    again = build_dataset(photos, reused, face_backend="embedded", progress=False, thumbnail_size=64)
    assert again["stages"]["write"]["computed"] == 0  # no crop made again, only thumbnails of the stored ones
    build_dataset(photos, tmp_path / "fresh", face_backend="embedded", progress=False, thumbnail_size=64)
    assert (reused / "report.html").read_text() == (tmp_path / "fresh" / "report.html").read_text()
    assert_same_dataset(reused, tmp_path / "fresh")


def test_rerun_after_the_auto_backend_resolves_elsewhere_equals_a_fresh_run(reused, tmp_path, monkeypatch):
    """`auto` with $DYNAMICID_INSIGHTFACE_ROOT set between runs: no result of the other models is reused."""
    photos, reused = reused
    monkeypatch.delenv(INSIGHTFACE_ROOT_ENV, raising=False)
    build_dataset(photos, reused, face_backend="auto", progress=False)  # embedded
    monkeypatch.setenv(INSIGHTFACE_ROOT_ENV, str(make_fake_pack(tmp_path / "pack")))
    again = build_dataset(photos, reused, face_backend="auto", progress=False)
    fresh = build_dataset(photos, tmp_path / "fresh", face_backend="auto", progress=False)
    assert again["backend"] == fresh["backend"] == "insightface"
    assert again["stages"]["detect"]["computed"] > 0
    assert_same_dataset(reused, tmp_path / "fresh")


def test_the_cache_key_changes_with_the_detection_settings():
    """Detections and descriptions are stored under the backend's digest: other detection settings, other key."""
    from dynamicid.curation.backend import backend_digest
    from dynamicid.faces import FaceAnalyzer
    from dynamicid.faces.backends import BACKENDS

    files = BACKENDS["embedded"].model_files(None)
    default = backend_digest("embedded", FaceAnalyzer("embedded"), files)
    assert backend_digest("embedded", FaceAnalyzer("embedded"), files) == default
    for option in ({"min_score": 0.6}, {"nms_iou": 0.5}, {"upscale_below": 500}, {"same_person_threshold": 0.4}):
        assert backend_digest("embedded", FaceAnalyzer("embedded", **option), files) != default, option


def test_rerun_after_the_expression_calibration_changed_equals_a_fresh_run(reused, tmp_path, monkeypatch):
    """Another expression calibration (another version) is never served the old labels from the caches."""
    from dynamicid.faces import embedded
    from dynamicid.faces.expression_calibration import CALIBRATION_FILE, read_calibration

    photos, reused = reused
    data = json.loads(CALIBRATION_FILE.read_text())
    data["mesh"]["bias"][EXPRESSIONS.index("sad")] += 20.0  # a calibration that calls every meshed face sad
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(embedded, "shipped_calibration", lambda: read_calibration(path))
    again = build_dataset(photos, reused, face_backend="embedded", progress=False)
    build_dataset(photos, tmp_path / "fresh", face_backend="embedded", progress=False)
    assert again["stages"]["identify"]["computed"] > 0
    assert_same_dataset(reused, tmp_path / "fresh")
    labels = pq.read_table(reused / "data", columns=["expression"]).column("expression").to_pylist()
    assert labels and set(labels) == {EXPRESSIONS.index("sad")}


def test_bad_model_folder_with_two_workers_exits_2_with_one_line(identity_photos, tmp_path):
    photos = identity_photos(*IDENTITIES)
    empty = tmp_path / "empty_pack"
    empty.mkdir()
    command = [
        sys.executable,
        "-m",
        "dynamicid.curation.cli",
        "build",
        str(photos),
        str(tmp_path / "out"),
        "--face-backend",
        "insightface",
        "--workers",
        "2",
        "--no-progress",
    ]
    env = {**os.environ, INSIGHTFACE_ROOT_ENV: str(empty)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "insightface" in lines[0] and str(empty) in lines[0], result.stderr
    assert not (tmp_path / "out" / "summary.json").exists()


class FakeBrokenModelStage(Stage):
    """FAKE: a model stage whose models cannot load in the workers (the driver's check passed)."""

    name = step = "detect"
    uses_models = pooled = True

    def output_schema(self) -> pa.Schema:
        return photo_schema()

    def setup(self) -> None:
        raise StageSetupError("the fake face backend cannot start: model folder vanished")

    def process(self, batch: pa.Table) -> pa.Table:
        return batch


def test_a_worker_that_cannot_start_stops_the_run_instead_of_hanging(tmp_path):
    backend = BackendInfo("embedded", None, "digest", "model", 0.5, 0.9, 0.99)
    stage = FakeBrokenModelStage(StageContext(tmp_path, tmp_path, CurationConfig(), backend))
    source = tmp_path / "scan.parquet"
    rows = [{"source_path": f"a/{i}.jpg", "identity": "a", "sha256": str(i)} for i in range(40)]
    with TableWriter(source, photo_schema()) as writer:
        writer.write(pa.Table.from_pylist(rows, schema=photo_schema()))
    with pytest.raises(StageSetupError, match="model folder vanished"):
        LocalEngine(workers=2, progress=False).run_stage(stage, source, tmp_path / "detect.parquet", "f")
    assert not (tmp_path / "detect.parquet").exists()


def test_errors_of_the_backend_are_curation_errors(identity_photos, tmp_path, monkeypatch):
    photos = identity_photos(*IDENTITIES)
    monkeypatch.setenv(INSIGHTFACE_ROOT_ENV, str(tmp_path / "missing"))
    with pytest.raises(CurationError, match="insightface"):
        build_dataset(photos, tmp_path / "out", face_backend="insightface", progress=False)


def test_a_worker_resolves_the_backend_with_the_drivers_model_folder_setting(tmp_path, monkeypatch):
    """A Ray worker on a cluster has its own environment: the driver's $DYNAMICID_INSIGHTFACE_ROOT must decide."""
    from dynamicid.curation.backend import resolve_backend

    worker_folder = tmp_path / "worker_pack"  # the worker's own setting: a model folder without models
    worker_folder.mkdir()
    monkeypatch.setenv(INSIGHTFACE_ROOT_ENV, str(worker_folder))
    with pytest.raises(StageSetupError, match="worker_pack"):
        resolve_backend("auto", CurationConfig().dup_embedding_fraction)  # this process's setting counts
    driver_unset = resolve_backend("auto", CurationConfig().dup_embedding_fraction, environment={})
    assert driver_unset.name == "embedded" and driver_unset.root is None
