"""Curation on GPUs: `--device` reaches the face models, and asking for CUDA where there is none stops the build."""

from __future__ import annotations

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
    assert model_stages == {"detect", "describe"}
    with_gpus, without = _assigned_gpus(2, 0)
    assert {name for name, share in with_gpus.items() if share > 0} == model_stages
    assert all(with_gpus[name] == 1.0 for name in model_stages)  # 2 GPUs over 2 workers: one each
    assert set(without.values()) == {0.0}


class FakeOutOfMemory:
    """FAKE: a GPU that runs out of memory on any batch of several photos (no GPU here); else the real models."""

    def __init__(self, analyzer):
        self.analyzer = analyzer
        self.embedding_model = analyzer.embedding_model

    def describe_batch(self, images, faces):
        if len(images) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.analyzer.describe_batch(images, faces)

    def describe(self, image, face):
        return self.analyzer.describe(image, face)


def test_a_batch_the_gpu_cannot_hold_goes_on_face_by_face_and_says_so_once(shared_faces, caplog):
    from dynamicid.curation.analysis import describe_photos, detect_photo
    from dynamicid.faces import FaceAnalyzer

    analyzer = FaceAnalyzer("embedded", device="cpu")
    paths = [str(shared_faces / "group_photos" / name) for name in ("two_people.jpg", "obama_and_biden.jpg")]
    jobs = [(str(i), path, detect_photo(analyzer, str(i), path)["faces"], None) for i, path in enumerate(paths)]
    expected = describe_photos(analyzer, jobs)
    with caplog.at_level("WARNING"):
        for _ in range(2):
            got = describe_photos(FakeOutOfMemory(analyzer), jobs)
            for row, want in zip(got, expected, strict=True):  # the same faces, embeddings within 1e-5
                assert [f["face_index"] for f in row["faces"]] == [f["face_index"] for f in want["faces"]]
                for face, wanted in zip(row["faces"], want["faces"], strict=True):
                    assert max(abs(a - b) for a, b in zip(face["embedding"], wanted["embedding"], strict=True)) < 1e-5
    said = [r.getMessage() for r in caplog.records if "failed on a batch" in r.getMessage()]
    assert said == ["the face models failed on a batch of 2 photos (RuntimeError); going on face by face"]
    assert sum(len(row["faces"]) for row in expected) >= 3
