"""The base-family registry: recognising tiny names, diffusers folders, single-file checkpoints and denoisers;
the layering it promises (product code never imports the FAKEs, the registry never imports torch)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from dynamicid.models.base import load_base_model
from dynamicid.models.families import (
    FAMILIES,
    denoiser_family,
    detect_family,
    family_label,
    family_named,
    folder_family,
    tiny_names,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tiny_names_pick_their_family_and_build_it():
    assert tiny_names() == ("tiny-random", "tiny-random-sdxl", "tiny-random-flux")
    for name, family in (("tiny-random", "sd15"), ("tiny-random-sdxl", "sdxl"), ("tiny-random-flux", "flux")):
        assert detect_family(name).name == family
        base = load_base_model(name)
        assert base.family == family and denoiser_family(base.denoiser) is FAMILIES[family]
        denoiser = FAMILIES[family].denoiser_name
        assert base.components()[denoiser] is base.denoiser
        if denoiser == "unet":
            assert base.unet is base.denoiser


def _index(folder, class_name, **components):
    folder.mkdir()
    entries = {"_class_name": class_name, "_diffusers_version": "0.30.0", "force_zeros_for_empty_prompt": True}
    entries |= {name: ["diffusers", "X"] for name in components} | {"safety_checker": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(entries))
    return folder


@pytest.mark.parametrize(
    ("class_name", "components", "family"),
    [
        ("StableDiffusionPipeline", {"unet", "text_encoder"}, "sd15"),
        ("StableDiffusionXLPipeline", {"unet"}, "sdxl"),  # the class name decides
        ("StableDiffusionXLImg2ImgPipeline", {"unet", "text_encoder_2"}, "sdxl"),  # the refiner
        ("DynamicIDXLPipeline", {"unet", "text_encoder", "text_encoder_2"}, "sdxl"),  # saved by this toolkit
        ("SomeFineTunePipeline", {"unet", "text_encoder", "text_encoder_2"}, "sdxl"),  # by its components
        ("SomeFineTunePipeline", {"unet", "text_encoder"}, "sd15"),
        ("FluxPipeline", {"transformer", "text_encoder", "text_encoder_2"}, "flux"),
        ("SomeFluxFineTunePipeline", {"transformer", "text_encoder", "text_encoder_2"}, "flux"),
    ],
)
def test_folder_family_reads_model_index(tmp_path, class_name, components, family):
    folder = _index(tmp_path / "base", class_name, **dict.fromkeys(components))
    assert folder_family(folder).name == detect_family(folder).name == family


def test_folder_without_model_index_is_told_by_its_subfolders(tmp_path):
    for name in ("unet", "text_encoder", "text_encoder_2"):
        (tmp_path / name).mkdir()
    assert detect_family(tmp_path).name == "sdxl"
    (tmp_path / "unet").rename(tmp_path / "transformer")
    assert detect_family(tmp_path).name == "flux"
    (tmp_path / "text_encoder_2").rmdir()
    (tmp_path / "transformer").rename(tmp_path / "unet")
    assert detect_family(tmp_path).name == "sd15"


def test_bad_model_index_and_missing_folder_are_one_line_errors(tmp_path):
    (tmp_path / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"model_index\.json is not a diffusers model index"):
        detect_family(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"does not exist.*'tiny-random' / 'tiny-random-sdxl' / 'tiny-random-flux'"
    ):
        detect_family(tmp_path / "nowhere")


def test_single_file_checkpoints_are_told_by_their_tensor_names(tmp_path):
    """FAKE single-file checkpoints holding only a few tensors under the original (LDM) names of each family."""
    tiny = np.zeros(1, dtype=np.float32)
    files = {
        "sd15": {
            "model.diffusion_model.input_blocks.0.0.weight": tiny,
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": tiny,
        },
        "sdxl": {
            "model.diffusion_model.input_blocks.0.0.weight": tiny,
            "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": tiny,
            "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": tiny,
        },
        "flux": {"double_blocks.0.img_attn.qkv.weight": tiny, "single_blocks.0.linear1.weight": tiny},  # BFL's
    }
    for family, tensors in files.items():
        path = tmp_path / f"{family}.safetensors"
        save_file(tensors, str(path))
        assert detect_family(path).name == family
        with pytest.raises(ValueError, match=f"single-file {FAMILIES[family].label} checkpoint.*diffusers folder"):
            load_base_model(path)
    other = tmp_path / "other.safetensors"
    save_file({"lora_unet_down.weight": tiny}, str(other))
    with pytest.raises(ValueError, match="not a single-file checkpoint of a known base family"):
        detect_family(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        detect_family(garbage)


def test_names_and_labels():
    assert family_named("sdxl") is FAMILIES["sdxl"]
    assert family_label("sdxl") == "SDXL (base_family 'sdxl')"
    assert family_label("sd3") == "sd3 (base_family 'sd3')"
    with pytest.raises(ValueError, match="unknown base family 'sd3'; known: sd15, sdxl, flux"):
        family_named("sd3")
    with pytest.raises(ValueError, match="denoiser of no known base family"):
        denoiser_family(object())


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return set(result.stdout.split())


def test_product_code_does_not_import_the_fakes():
    modules = _imported_after(
        "import dynamicid.models.base, dynamicid.infer.pipeline, dynamicid.train.anchor, dynamicid.train.reconfigure"
    )
    assert "dynamicid.infer.pipeline" in modules and "dynamicid.testing" not in modules


def test_registry_and_training_config_load_without_torch():
    modules = _imported_after("import dynamicid.models.families, dynamicid.train.config, dynamicid.train.cli")
    assert "dynamicid.models.families.sdxl" in modules and "torch" not in modules
