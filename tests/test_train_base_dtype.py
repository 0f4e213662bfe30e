"""`--base-dtype float8`: the frozen denoiser's weights are stored in float8 (diffusers layerwise casting, the helper
inference's `--weights-dtype` uses), the trained SAA and face encoder stay float32, and training steps run and
move them (the gradient reaches the face encoder through the float8-stored layers). Its effect on the loss is
measured in benchmarks/train_fp8.py (BENCHMARKS.md)."""

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dynamicid.curation.pipeline import build_dataset
from dynamicid.models.base import load_base_model
from dynamicid.train import runner
from dynamicid.train.anchor import train_anchor
from dynamicid.train.cli import main
from dynamicid.train.config import AnchorConfig
from dynamicid.train.runner import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def curated(tmp_path_factory, shared_faces) -> Path:
    photos = tmp_path_factory.mktemp("photos")
    for identity in ("obama", "kit_harington"):
        (photos / identity).mkdir()
        for file in sorted((shared_faces / "identities" / identity).iterdir())[:2]:
            shutil.copy(file, photos / identity / file.name)
    out = tmp_path_factory.mktemp("curated")
    build_dataset(photos, out, per_identity=2, progress=False, crop_size=256)
    return out


@pytest.mark.parametrize("family", ["tiny-random", "tiny-random-sdxl", "tiny-random-flux"])
def test_frozen_denoiser_is_stored_in_float8_and_the_trained_parts_train_in_float32(
    family, curated, tmp_path, monkeypatch
):
    bases = []
    monkeypatch.setattr(runner, "load_base_model", lambda *a, **k: bases.append(load_base_model(*a, **k)) or bases[-1])
    settings = {"base_model": family, "dataset": str(curated), "resolution": 64, "report_to": "none"}
    settings |= {"train_batch_size": 2, "eval_samples": 2, "lora_rank": 4, "max_steps": 2, "learning_rate": 1e-2}
    config = AnchorConfig(**settings, output_dir=str(tmp_path / "run"), base_dtype="float8", checkpointing_steps=1)
    weights = train_anchor(config)

    denoiser = bases[0].denoiser
    frozen = {name: p.dtype for name, p in denoiser.named_parameters() if not p.requires_grad}
    trained = {name: p.dtype for name, p in denoiser.named_parameters() if p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}  # SAA's LoRA and ID projections
    assert all(".processor." in name for name in trained)
    projections = [name for name in frozen if name.endswith(("to_q.weight", "to_k.weight", "ff.net.2.weight"))]
    assert projections and all(frozen[name] == torch.float8_e4m3fn for name in projections)
    convolutions = [n for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(frozen[f"{name}.weight"] == torch.float32 for name in convolutions)  # (models/layerwise.py: why)

    losses = [row["loss"] for row in read_metrics(tmp_path / "run") if "loss" in row]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    after_one, after_two = (
        load_file(str(tmp_path / "run/checkpoints/checkpoint-1/weights.safetensors")),
        load_file(str(weights)),
    )
    assert all(t.dtype == torch.float32 for t in after_two.values())
    for part in ("face_encoder.", "saa."):  # step 2 moved both: the gradient crossed the float8-stored layers
        names = [k for k in after_two if k.startswith(part)]
        assert names and any(not torch.equal(after_one[k], after_two[k]) for k in names), part


def test_an_unknown_base_dtype_is_refused_naming_the_flag(curated, tmp_path):
    arguments = ["anchor", "--base-model", "tiny-random", "--dataset", str(curated), "--output-dir", str(tmp_path)]
    result = CliRunner().invoke(main, [*arguments, "--base-dtype", "int4"])
    assert result.exit_code == 2 and "--base-dtype 'int4'; valid: float8" in result.output
