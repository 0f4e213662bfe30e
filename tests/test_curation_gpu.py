"""Curation on GPUs: `--device` reaches the face models, and asking for CUDA where there is none stops the build."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from dynamicid.curation.cli import main
from dynamicid.faces.threads import cuda_available


@pytest.mark.skipif(cuda_available(), reason="this machine has CUDA")
def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(identity_photos, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(identity_photos("obama")), str(out), "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "no CUDA GPU" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (out / "summary.json").exists()


# Runs in its own process: Ray starts once per process, and the session's `ray_cluster` has no GPUs.
FAKE_GPU_CLUSTER = """
import json, sys
from pathlib import Path
import ray
from dynamicid.curation.config import CurationConfig
from dynamicid.curation.engines.ray_engine import RayEngine
from dynamicid.curation.pipeline import build_stages
from dynamicid.curation.stages import BackendInfo, StageContext

backend = BackendInfo("embedded", None, "d", "m", 0.4, 0.9, 0.95)
context = StageContext(Path("/photos"), Path("/work"), CurationConfig(), backend)


@ray.remote
def assigned():
    return ray.get_runtime_context().get_assigned_resources()


found = {}
for gpus in map(float, sys.argv[1:]):
    ray.init(address="local", num_cpus=2, num_gpus=gpus, object_store_memory=150 << 20, include_dashboard=False,
             log_to_driver=False)
    engine = RayEngine(workers=2, progress=False)
    engine._connect()
    found[gpus] = {}
    for stage in build_stages(context):
        cpus, share = engine.task_resources(stage)
        found[gpus][stage.name] = ray.get(assigned.options(num_cpus=cpus, num_gpus=share).remote()).get("GPU", 0.0)
    ray.shutdown()
print(json.dumps(found))
"""


def _assigned_gpus(*gpus: float) -> list[dict[str, float]]:
    """Per cluster GPU count, per stage of the chain: the GPU share Ray assigned to a task with the Ray engine's
    resources for that stage."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", FAKE_GPU_CLUSTER, *map(str, gpus)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return list(json.loads(done.stdout.strip().splitlines()[-1]).values())


@pytest.mark.slow  # two local Rays in a fresh process: about a minute on a busy 2-core machine
def test_model_steps_get_gpus_on_a_cluster_that_has_them_and_cpu_steps_never():
    """FAKE GPUs: Ray schedules by a declared count (`num_gpus=2` on a machine without any)."""
    from dynamicid.curation.chain import CHAIN, MODEL

    model_stages = {entry.load().name for step in CHAIN for entry in step.stages if entry.resources == MODEL}
    assert model_stages == {"detect", "describe", "caption"}
    model_stages.remove("caption")  # it asks for a GPU only with --captioner (tests/test_curation_caption.py)
    with_gpus, without = _assigned_gpus(2, 0)
    assert {name for name, share in with_gpus.items() if share > 0} == model_stages
    assert all(with_gpus[name] == 1.0 for name in model_stages)  # 2 GPUs over 2 workers: one each
    assert set(without.values()) == {0.0}


def test_with_device_cpu_no_stage_asks_for_a_gpu():
    import dataclasses

    from dynamicid.curation.config import CurationConfig
    from dynamicid.curation.pipeline import build_stages
    from dynamicid.curation.stages import BackendInfo, StageContext

    context = StageContext(
        Path("/photos"), Path("/work"), CurationConfig(), BackendInfo("embedded", None, "d", "m", 0.4, 0.9, 0.95)
    )
    asking = {stage.name for stage in build_stages(context) if stage.resources.gpus > 0}
    assert asking == {"detect", "describe"}
    on_cpu = dataclasses.replace(context, config=CurationConfig(device="cpu"))
    assert all(stage.resources.gpus == 0 for stage in build_stages(on_cpu))


# Runs in its own process, on a local Ray with 2 FAKE GPUs (Ray schedules by the declared count; torch and ONNX
# Runtime see no CUDA, so the workers' face models run on the CPU with --device auto): a build, then two stages
# whose rows say where they ran, one declaring the model steps' resources and one the CPU steps'.
FAKE_GPU_BUILD = """
import json, sys
from pathlib import Path
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from dynamicid.curation import build_dataset
from dynamicid.curation.chain import CPU, MODEL
from dynamicid.curation.config import CurationConfig
from dynamicid.curation.engines.ray_engine import RayEngine
from dynamicid.curation.stages import BackendInfo, Stage, StageContext, photo_schema

photos, out = Path(sys.argv[1]), Path(sys.argv[2])
ray.init(address="local", num_cpus=2, num_gpus=2, object_store_memory=150 << 20, include_dashboard=False,
         log_to_driver=False)
summary = build_dataset(photos, out, face_backend="embedded", engine="ray", workers=2, progress=False)


class WhereItRan(Stage):
    name = "where_it_ran"
    pooled = True

    def output_schema(self):
        return photo_schema(("actor", pa.string()), ("gpus", pa.string()))

    def process(self, batch):
        context = ray.get_runtime_context()
        where = {"actor": context.get_actor_id(), "gpus": json.dumps(sorted(map(str, ray.get_gpu_ids())))}
        rows = [{**row, "reason": None, "detail": None, **where} for row in batch.to_pylist()]
        return pa.Table.from_pylist(rows, self.output_schema())


class OnModelResources(WhereItRan):
    resources = MODEL


class OnCPUResources(WhereItRan):
    resources = CPU


source = out / "where.parquet"
rows = [{"source_path": f"{i:03}.jpg", "identity": "a", "sha256": str(i), "reason": None, "detail": None}
        for i in range(64)]
pq.write_table(pa.Table.from_pylist(rows, photo_schema()), source)
backend = BackendInfo("embedded", None, "d", "m", 0.4, 0.9, 0.95)
context = StageContext(photos, out / ".work", CurationConfig(), backend)
engine = RayEngine(workers=2, progress=False)
ran = {}
for stage in (OnModelResources(context), OnCPUResources(context)):
    engine.run_stage(stage, source, out / "where_out.parquet", "fingerprint")
    table = pq.read_table(out / "where_out.parquet")
    ran[type(stage).__name__] = {"actors": sorted(set(map(str, table.column("actor").to_pylist()))),
                                 "gpus": sorted(set(table.column("gpus").to_pylist())), "rows": table.num_rows}
ray.shutdown()
print(json.dumps({"summary": summary, "ran": ran}))
"""


@pytest.mark.slow  # a local build and a Ray build in a fresh process: about 1.5 minutes on a busy 2-core machine
def test_on_a_cluster_with_gpus_the_model_steps_run_on_gpu_actors_and_the_dataset_is_the_local_one(
    identity_photos, tmp_path
):
    import json
    import subprocess
    import sys

    from test_curation_ray import result
    from test_curation_runs import row_hashes, side_tables

    from dynamicid.curation import build_dataset

    photos = identity_photos("obama", "kit_harington")
    local = build_dataset(photos, tmp_path / "local", face_backend="embedded", progress=False)
    command = [sys.executable, "-c", FAKE_GPU_BUILD, str(photos), str(tmp_path / "ray")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])

    model, cpu = found["ran"]["OnModelResources"], found["ran"]["OnCPUResources"]
    assert model["rows"] == cpu["rows"] == 64
    # Model steps: on actors (at most one per worker), each holding a whole GPU of its own (2 GPUs, 2 workers).
    assert "None" not in model["actors"] and 1 <= len(model["actors"]) <= 2
    assert all(len(json.loads(gpus)) == 1 for gpus in model["gpus"]) and len(model["gpus"]) == len(model["actors"])
    assert cpu == {"actors": ["None"], "gpus": ["[]"], "rows": 64}  # CPU steps: tasks, no GPU
    assert row_hashes(tmp_path / "ray") == row_hashes(tmp_path / "local")
    assert side_tables(tmp_path / "ray") == side_tables(tmp_path / "local")
    assert result(found["summary"]) == result(local) and local["kept"] > 0


class FakeOutOfMemory:
    """FAKE: a GPU that runs out of memory on batches of more than `most` photos (no GPU here); else the real
    models."""

    def __init__(self, analyzer, most: int):
        self.analyzer, self.most, self.refused = analyzer, most, []
        self.embedding_model = analyzer.embedding_model

    def describe_batch(self, images, faces):
        import torch

        if len(images) > self.most:
            self.refused.append(len(images))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.analyzer.describe_batch(images, faces)


def test_a_batch_the_gpu_cannot_hold_is_halved_and_said_once(shared_faces, caplog):
    from dynamicid.curation.analysis import describe_photos, detect_photo
    from dynamicid.faces import FaceAnalyzer

    analyzer = FaceAnalyzer("embedded", device="cpu")
    paths = [shared_faces / "group_photos" / name for name in ("two_people.jpg", "obama_and_biden.jpg")]
    paths += sorted((shared_faces / "identities" / "obama").glob("*.jpg"))[:2]
    jobs = [
        (str(i), str(path), detect_photo(analyzer, str(i), str(path))["faces"], None) for i, path in enumerate(paths)
    ]
    expected = describe_photos(analyzer, jobs)  # the 4 photos in one batch
    fake = FakeOutOfMemory(analyzer, most=2)
    with caplog.at_level("WARNING"):
        for _ in range(2):
            got = describe_photos(fake, jobs)
            for row, want in zip(got, expected, strict=True):  # the same faces, embeddings within 1e-5
                assert row["detail"] is None and len(row["faces"]) == len(want["faces"])
                for face, wanted in zip(row["faces"], want["faces"], strict=True):
                    assert face["face_index"] == wanted["face_index"]
                    assert max(abs(a - b) for a, b in zip(face["embedding"], wanted["embedding"], strict=True)) < 1e-5
    assert fake.refused == [4]  # the second call kept the smaller batches
    said = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert said == ["the GPU ran out of memory on a batch of 4 photos: going on in batches of 2"]
    assert sum(len(row["faces"]) for row in expected) >= 5
