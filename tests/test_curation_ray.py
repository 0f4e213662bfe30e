"""`--engine ray` on a local Ray (2 CPUs, small object store): the local engine's dataset, also after a kill."""

import dataclasses
import shutil
import sys

import pytest
from test_curation_runs import kill_at_first_detect_batch, row_hashes, side_tables

from dynamicid.curation import build_dataset
from dynamicid.curation.config import CurationConfig
from dynamicid.curation.detect import DetectStage
from dynamicid.curation.engines.ray_engine import RayEngine
from dynamicid.curation.pipeline import open_run, run_stage
from dynamicid.curation.stages import StageContext, StageSetupError

IDENTITIES = ("obama", "kit_harington", "John_Salley")
RUN_SETTINGS = ("engine", "workers", "ray_address")  # the settings of a run, not of its result (see README)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, shared_faces):
    root = tmp_path_factory.mktemp("ray") / "photos"
    for identity in IDENTITIES:
        shutil.copytree(shared_faces / "identities" / identity, root / identity)
    return root


@pytest.fixture(scope="module")
def local(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    return out, build_dataset(photos, out, face_backend="embedded", progress=False)


def result(summary: dict) -> dict:
    """summary.json without what describes the run (folder, timings, engine settings)."""
    config = {k: v for k, v in summary["config"].items() if k not in RUN_SETTINGS}
    return {**{k: v for k, v in summary.items() if k not in ("out_dir", "stages")}, "config": config}


def test_killed_ray_build_reruns_to_the_local_engines_dataset(photos, local, ray_cluster, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dynamicid.curation.cli", "build", str(photos), str(out), "--engine", "ray"]
    command += ["--ray-address", ray_cluster, "--workers", "2", "--face-backend", "embedded", "--no-progress"]
    kill_at_first_detect_batch(command, out)

    summary = build_dataset(photos, out, face_backend="embedded", engine="ray", workers=2, progress=False)
    assert summary["stages"]["detect"]["reused"] > 0  # what the killed run had finished
    local_out, local_summary = local
    assert row_hashes(out) == row_hashes(local_out)
    assert side_tables(out) == side_tables(local_out)
    assert result(summary) == result(local_summary)

    again = build_dataset(photos, out, face_backend="embedded", engine="ray", workers=2, progress=False)
    assert all(s["computed"] == 0 for s in again["stages"].values())


def test_a_worker_that_cannot_build_its_models_stops_the_run_with_one_line(photos, ray_cluster, tmp_path):
    config = CurationConfig(face_backend="embedded", engine="ray")
    run = open_run(photos, tmp_path / "out", config, progress=False)
    run_stage(run, "scan")
    empty_pack = tmp_path / "empty_pack"  # FAKE: a model folder without models, seen only by the Ray workers
    empty_pack.mkdir()
    backend = dataclasses.replace(run.backend, name="insightface", root=str(empty_pack))
    stage = DetectStage(StageContext(photos, run.work.root, config, backend))
    engine = RayEngine(workers=2, progress=False)
    with pytest.raises(StageSetupError) as error:
        engine.run_stage(stage, run.work.table_path("scan"), tmp_path / "detect.parquet", "fingerprint")
    message = str(error.value)
    assert "\n" not in message and str(empty_pack) in message
    assert not (tmp_path / "detect.parquet").exists()


def test_an_unreachable_ray_address_stops_the_build_before_anything_is_written(photos, tmp_path):
    from click.testing import CliRunner

    from dynamicid.curation.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["build", str(photos), str(out), "--engine", "ray", "--ray-address", "127.0.0.1:1"]
    )
    assert result.exit_code == 2
    assert "127.0.0.1:1" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()
