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
