"""Test-wide settings: everything offline, caches in a temporary folder, the shared real photos located."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="dynamicid-hf-"))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_FACES = SHARED / "data" / "faces"
# What the tests read beside the clone (README "Running the tests"): photos, golden vectors, spec files, vendored
# third-party sources.
SHARED_NEEDED = ("data/faces", "golden/official", "spec/METHOD.md", "spec/official-keys-sd15.tsv", "vendor")


def pytest_configure(config):
    """One line before collection when a shared folder is missing, instead of many failures later."""
    missing = [name for name in SHARED_NEEDED if not (SHARED / name).exists()]
    if missing:
        raise pytest.UsageError(
            f"the tests read {SHARED} beside the clone; missing there: {', '.join(missing)} "
            "(README.md, 'Running the tests')"
        )


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny-model torch tests (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): a second
    thread gains nothing there, and on a busy 2-core machine OpenMP's spinning threads made them about 10x slower.
    Module-scoped on purpose: golden and curation-determinism tests run with the default thread count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def shared_faces() -> Path:
    """../shared/data/faces: the real test photos (CI fails when they are missing, see .ci/run)."""
    if not SHARED_FACES.is_dir():
        pytest.fail(f"real test photos not found at {SHARED_FACES}")
    return SHARED_FACES


@pytest.fixture(scope="module")
def reference_analyzer():
    """The pipelines' reference analysis on the real embedded face backend (module-scoped, as each module built it)."""
    from dynamicid.faces import FaceAnalyzer
    from dynamicid.infer.references import ReferenceAnalyzer

    return ReferenceAnalyzer(FaceAnalyzer("embedded"))


@pytest.fixture(scope="session")
def identity_photos(tmp_path_factory, shared_faces):
    """A function: a new PHOTOS_DIR holding copies of the named identity folders of the real test photos (`first`:
    only each folder's first photos, by name)."""
    import shutil

    def make(*identities: str, first: int | None = None) -> Path:
        root = tmp_path_factory.mktemp("photos") / "photos"
        for identity in identities:
            (root / identity).mkdir(parents=True)
            for file in sorted((shared_faces / "identities" / identity).iterdir())[:first]:
                shutil.copy(file, root / identity / file.name)
        return root

    return make


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray for `--engine ray` tests: 2 CPUs, a 150 MB object store, no dashboard; shut down at the end.

    Yields the cluster's address, for runs in other processes (`--ray-address`)."""
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=150 << 20, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
