"""DynamicIDFluxPipeline on the tiny-random-flux FAKE base with random FAKE DynamicID weights and real photos.

The weights are random (`dynamicid.testing`), so the images are noise: these tests check parity with diffusers'
FluxPipeline when the identity branch is off, that two people in boxes with two expressions generate, the
conditioning against FluxPipeline's own text encoding, that weights of another family are refused, and the
diffusers round trips: save_pretrained / from_pretrained (ours and FluxPipeline's) and from_pipe both ways.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from safetensors.torch import load_file

from dynamicid.infer import Person, pipeline_for
from dynamicid.infer.pipeline_flux import DynamicIDFluxPipeline
from dynamicid.models.base import load_base_model
from dynamicid.models.conditioning_flux import FluxConditioner
from dynamicid.models.families import detect_family
from dynamicid.models.families.flux import FLUX
from dynamicid.models.saa_flux import flux_saa_processors
from dynamicid.testing import build_tiny_random_flux, random_parts, save_random_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = {"height": 64, "width": 96}  # not square: 4 x 6 packed latent tokens
SETTINGS = {**SIZE, "num_inference_steps": 3, "guidance_scale": 3.5, "max_sequence_length": 32}


@pytest.fixture(scope="module")
def photos(shared_faces):
    identities = shared_faces / "identities"
    return {"obama": identities / "obama" / "obama.jpg", "biden": identities / "biden" / "biden.jpg"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory, reference_analyzer):
    parts = random_parts(build_tiny_random_flux(), reference_analyzer, imr_dim=64)
    assert parts.metadata.base_family == "flux" and parts.metadata.cross_attention_dim == 32
    return save_random_weights(parts, tmp_path_factory.mktemp("flux") / "dynamicid-flux.safetensors")


@pytest.fixture(scope="module")
def pipe(weights, reference_analyzer):
    pipe = pipeline_for(load_base_model("tiny-random-flux"))  # through the base-family registry
    assert isinstance(pipe, DynamicIDFluxPipeline)
    pipe.load_dynamicid(weights, face_analyzer=reference_analyzer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_flux(base) -> FluxPipeline:
    return FluxPipeline(**base.components(), scheduler=base.noise_scheduler)


def _plain_flux_images(seed: int, **options) -> np.ndarray:
    plain = plain_flux(build_tiny_random_flux())
    plain.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return plain("a photo of two people", generator=generator, output_type="np", **SETTINGS, **options).images


def _pipe_with_zero_lora(weights, reference_analyzer) -> DynamicIDFluxPipeline:
    """The pipeline whose SAA LoRA updates are zero: at id_scale 0 it computes what Flux computes."""
    pipe = DynamicIDFluxPipeline.from_base(build_tiny_random_flux())
    pipe.load_dynamicid(weights, face_analyzer=reference_analyzer)
    pipe.set_progress_bar_config(disable=True)
    for processor in flux_saa_processors(pipe.transformer).values():
        for lora in (processor.to_q_lora, processor.to_k_lora, processor.to_v_lora, processor.to_out_lora):
            torch.nn.init.zeros_(lora.up.weight)
    return pipe


def test_id_scale_zero_with_zero_lora_equals_diffusers_flux_pipeline_pixel_for_pixel(
    weights, reference_analyzer, photos
):
    pipe = _pipe_with_zero_lora(weights, reference_analyzer)
    expected = _plain_flux_images(seed=3)
    people = [Person(photos["obama"], box=(0.1, 0.0, 0.9, 0.5)), Person(photos["biden"], box=(0.1, 0.5, 0.9, 1.0))]
    got = pipe(
        "a photo of two people",
        people,
        id_scale=0.0,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
        **SETTINGS,
    ).images
    assert got.shape == expected.shape == (1, 64, 96, 3)
    assert np.array_equal(got, expected)


def test_true_cfg_with_id_scale_zero_and_zero_lora_equals_flux_pipeline_and_guides(weights, reference_analyzer, photos):
    pipe = _pipe_with_zero_lora(weights, reference_analyzer)
    guided = {"negative_prompt": "blurry", "true_cfg_scale": 4.0, "num_images_per_prompt": 2}
    expected = _plain_flux_images(seed=2, **guided)
    generator = torch.Generator().manual_seed(2)
    people = [Person(photos["obama"])]
    got = pipe(
        "a photo of two people", people, id_scale=0.0, generator=generator, output_type="np", **guided, **SETTINGS
    )
    assert got.images.shape == (2, 64, 96, 3) and np.array_equal(got.images, expected)
    assert not np.allclose(expected, _plain_flux_images(seed=2, num_images_per_prompt=2), atol=1e-3)


def test_two_people_in_boxes_with_two_expressions_generate(pipe, photos):
    people = [
        Person(photos["obama"], expression="happy", box=(0.0, 0.0, 1.0, 0.5)),
        Person(photos["biden"], expression="surprised", pose="front view", box=(0.0, 0.5, 1.0, 1.0)),
    ]
    generator = torch.Generator().manual_seed(1)
    out = pipe("two friends", people, generator=generator, output_type="np", return_activation_maps=True, **SETTINGS)
    plain = _plain_flux_images(seed=1)
    assert out.images.shape == (1, 64, 96, 3) and np.isfinite(out.images).all()
    assert np.abs(out.images - plain).max() > 1e-3  # the identity branch reaches the image
    assert [p["edited"] for p in out.people] == [True, True]
    assert out.people[1]["target_face_prompt"] == "the expression is surprised, the face is front view"
    assert out.saa["boost"] == 2.0 and out.saa["num_ids"] == 2
    maps = out.activation_maps  # each person's tokens are hidden in the other's box: their map lies in their half
    assert maps.shape == (1, 2, 64, 96)
    assert maps[0, 0, :, :40].mean() > 5 * maps[0, 0, :, 56:].mean()
    assert maps[0, 1, :, 56:].mean() > 5 * maps[0, 1, :, :40].mean()


def test_conditioner_encodes_text_as_flux_pipeline_does():
    base = build_tiny_random_flux(with_image_encoder=False)
    plain = plain_flux(base)
    prompt_embeds, pooled, text_ids = plain.encode_prompt("a cat", None, max_sequence_length=32)
    conditioner = FluxConditioner.from_parts(base, max_sequence_length=32)
    states, inputs = conditioner.text_condition(conditioner.token_ids(["a cat"]))
    assert torch.equal(states, prompt_embeds) and torch.equal(inputs["pooled_projections"], pooled)
    assert torch.equal(inputs["txt_ids"], text_ids)
    assert torch.equal(conditioner.face_prompt_vectors(["a cat"]), pooled)  # the IMR's text = Flux's pooled CLIP


def test_from_pretrained_loads_a_saved_flux_folder_and_a_single_file_transformer(tmp_path):
    base = build_tiny_random_flux(with_image_encoder=False)
    plain_flux(base).save_pretrained(tmp_path / "flux")
    assert detect_family(tmp_path / "flux") is FLUX
    pipe = DynamicIDFluxPipeline.from_pretrained(tmp_path / "flux")
    assert torch.equal(pipe.transformer.proj_out.weight, base.denoiser.proj_out.weight)
    single = tmp_path / "flux" / "transformer" / "diffusion_pytorch_model.safetensors"
    loaded = FLUX.load(tmp_path / "flux", transformer=single)
    assert torch.equal(loaded.denoiser.x_embedder.weight, base.denoiser.x_embedder.weight)
    index = json.loads((tmp_path / "flux" / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"holds Stable Diffusion 1\.5 .*not FLUX\.1.*DynamicIDPipeline"):
        DynamicIDFluxPipeline.from_pretrained(tmp_path / "flux")


def _two_people(photos) -> list[Person]:
    return [Person(photos["obama"], expression="happy"), Person(photos["biden"])]


def _images(pipe, people, seed: int = 4, **options) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe("a photo of two people", people, generator=generator, output_type="np", **SETTINGS, **options).images


def test_save_pretrained_reloads_the_same_images_and_flux_pipeline_reads_the_folder(pipe, photos, tmp_path):
    expected = _images(pipe, _two_people(photos))
    pipe.save_pretrained(tmp_path / "saved")
    transformer_keys = load_file(tmp_path / "saved" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not [k for k in transformer_keys if ".processor." in k or "_id." in k or "lora" in k]
    adapter_keys = load_file(tmp_path / "saved" / "id_adapter" / "diffusion_pytorch_model.safetensors")
    assert any(k.startswith("saa.") and "to_k_id" in k for k in adapter_keys)
    assert {k.split(".")[0] for k in adapter_keys} == {"face_encoder", "imr", "keypoint_encoder", "saa"}

    loaded = DynamicIDFluxPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    loaded.reference_analyzer = pipe.reference_analyzer  # face analysis is not a component
    np.testing.assert_allclose(_images(loaded, _two_people(photos)), expected, atol=1e-5)  # float32 rounding

    # diffusers' own FluxPipeline reads the folder as the base Flux it holds: its images are tiny-random-flux's.
    plain = FluxPipeline.from_pretrained(tmp_path / "saved", local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(3)
    got = plain("a photo of two people", generator=generator, output_type="np", **SETTINGS).images
    np.testing.assert_allclose(got, _plain_flux_images(seed=3), atol=1e-5)


def test_from_pipe_both_ways_shares_the_parts_and_keeps_the_images(weights, reference_analyzer, photos):
    plain = plain_flux(build_tiny_random_flux())
    pipe = DynamicIDFluxPipeline.from_pipe(plain)
    assert pipe.transformer is plain.transformer and pipe.id_adapter is None
    pipe.load_dynamicid(weights, face_analyzer=reference_analyzer)
    pipe.set_progress_bar_config(disable=True)
    people = _two_people(photos)
    with_identity, without = _images(pipe, people), _images(pipe, people, id_scale=0.0)
    assert not np.allclose(with_identity, without, atol=1e-3)

    # Back to FluxPipeline over the same parts: the transformer keeps SAA's LoRA, and without ID tokens it
    # computes what DynamicID computes at id_scale 0.
    back = FluxPipeline.from_pipe(pipe)
    back.set_progress_bar_config(disable=True)
    assert back.transformer is pipe.transformer and "id_adapter" not in back.components
    generator = torch.Generator().manual_seed(4)
    assert np.array_equal(
        back("a photo of two people", generator=generator, output_type="np", **SETTINGS).images, without
    )
    again = DynamicIDFluxPipeline.from_pipe(pipe)  # a DynamicID pipeline's adapter and face analysis carry over
    again.set_progress_bar_config(disable=True)
    assert again.id_adapter is pipe.id_adapter and np.array_equal(_images(again, people), with_identity)


def test_weights_of_another_family_are_refused_in_one_line(reference_analyzer, tmp_path):
    sd_weights = save_random_weights(
        random_parts(load_base_model("tiny-random"), reference_analyzer), tmp_path / "sd.safetensors"
    )
    pipe = DynamicIDFluxPipeline.from_base(build_tiny_random_flux())
    with pytest.raises(ValueError, match=r"made for Stable Diffusion 1.5 .* but the base model is FLUX.1") as error:
        pipe.load_dynamicid(sd_weights, face_analyzer=reference_analyzer)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="no SAA processors"):
        flux_saa_processors(pipe.transformer)  # nothing was installed before the refusal


def test_cli_generates_two_people_on_tiny_random_flux(tmp_path, weights, photos):
    from click.testing import CliRunner

    from dynamicid.infer.cli import main

    out = tmp_path / "friends.png"
    args = ["generate", "--base-model", "tiny-random-flux", "--weights", str(weights), "--face-backend", "embedded"]
    args += ["--prompt", "two friends", "--steps", "2", "--size", "96x64", "--seed", "7", "--activation-maps"]
    for photo, expression, box in ((photos["obama"], "happy", "0,0,1,0.5"), (photos["biden"], "sad", "0,0.5,1,1")):
        args += ["--person", str(photo), "--expression", expression, "--box", box]
    result = CliRunner().invoke(main, [*args, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    sidecar = json.loads(result.stdout)
    settings = sidecar["settings"]
    assert settings["guidance_scale"] == 3.5 and settings["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert settings["saa"]["boost_steps"] == 7 and [p["target_expression"] for p in sidecar["people"]] == [
        "happy",
        "sad",
    ]
    assert Image.open(out).size == (96, 64) and len(list(tmp_path.glob("*.saa.png"))) == 2


def test_cli_batch_runs_a_manifest_on_tiny_random_flux(tmp_path, weights, photos):
    from click.testing import CliRunner

    from dynamicid.infer.cli import main

    rows = [
        {"id": "solo", "prompt": "a portrait", "seed": 3, "people": [{"references": [str(photos["obama"])]}]},
        {
            "id": "duo",
            "prompt": "two friends",
            "seed": 4,
            "people": [
                {"references": [str(photos["obama"])], "expression": "happy", "box": [0, 0, 1, 0.5]},
                {"references": [str(photos["biden"])], "box": [0, 0.5, 1, 1]},
            ],
        },
    ]
    manifest = tmp_path / "bench.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    args = ["batch", "--manifest", str(manifest), "--out-dir", str(tmp_path / "out"), "--weights", str(weights)]
    args += ["--base-model", "tiny-random-flux", "--face-backend", "embedded", "--steps", "2", "--size", "96x64"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("wrote ") == 2
    images = sorted((tmp_path / "out").rglob("*.png"))
    assert images and all(Image.open(p).size == (96, 64) for p in images)
