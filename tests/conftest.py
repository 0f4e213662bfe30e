"""Test-wide settings: everything offline, caches in a temporary folder, the shared real photos located."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="dynamicid-hf-"))

SHARED_FACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"


@pytest.fixture(scope="session")
def shared_faces() -> Path:
    """../shared/data/faces: the real test photos (CI fails when they are missing, see .ci/run)."""
    if not SHARED_FACES.is_dir():
        pytest.fail(f"real test photos not found at {SHARED_FACES}")
    return SHARED_FACES
