"""`DynamicIDXLPipeline`: DynamicID on the tiny-random-sdxl FAKE base with random FAKE weights (`dynamicid.testing`).

The images are noise; the tests check what the SDXL sibling shares with diffusers' own SDXL pipeline and with
`DynamicIDPipeline`, on the real reference photos.
"""

import numpy as np
import pytest
import torch

from dynamicid.infer import DynamicIDPipeline, DynamicIDXLPipeline, Person, pipeline_for
from dynamicid.models import saa_processors
from dynamicid.models.base import load_base_model
from dynamicid.testing import plain_images, random_parts, save_random_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 2
PROMPT = "two friends in a cafe"


@pytest.fixture(scope="module")
def weights(tmp_path_factory, reference_analyzer):
    parts = random_parts(load_base_model("tiny-random-sdxl"), reference_analyzer)
    return save_random_weights(parts, tmp_path_factory.mktemp("weights") / "sdxl.safetensors")


@pytest.fixture(scope="module")
def people(shared_faces):
    faces = shared_faces / "identities"
    return [Person(faces / "obama" / "obama.jpg", expression="happy"), Person(faces / "biden" / "biden.jpg")]


def make_pipeline(weights, reference_analyzer) -> DynamicIDXLPipeline:
    pipe = pipeline_for(load_base_model("tiny-random-sdxl"))
    pipe.load_dynamicid(weights, face_analyzer=reference_analyzer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, people, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(PROMPT, people, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)


def test_pipeline_for_picks_the_family_sibling_and_refuses_the_other():
    assert isinstance(pipeline_for(load_base_model("tiny-random-sdxl")), DynamicIDXLPipeline)
    assert isinstance(pipeline_for(load_base_model("tiny-random")), DynamicIDPipeline)
    with pytest.raises(ValueError, match="DynamicIDXLPipeline"):
        DynamicIDPipeline.from_base(load_base_model("tiny-random-sdxl"))
    with pytest.raises(ValueError, match="use DynamicIDPipeline"):
        DynamicIDXLPipeline.from_base(load_base_model("tiny-random"))


def test_id_scale_zero_with_zero_lora_equals_plain_sdxl(weights, reference_analyzer, people):
    """With the ID branch off and LoRA at zero, the SDXL sibling computes diffusers' SDXL pipeline: same text
    states, pooled text, size ids, guidance and sampler."""
    pipe = make_pipeline(weights, reference_analyzer)
    for processor in saa_processors(pipe.unet).values():
        for lora in (processor.to_q_lora, processor.to_k_lora, processor.to_v_lora, processor.to_out_lora):
            torch.nn.init.zeros_(lora.up.weight)
    ours = generate(pipe, people, id_scale=0.0, height=64, width=96, seed=3).images

    base = load_base_model("tiny-random-sdxl")
    expected = plain_images(base, pipe.scheduler, PROMPT, height=64, width=96, steps=STEPS, seed=3)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    with_id = generate(pipe, people, height=64, width=96, seed=3).images
    assert np.abs(with_id - expected).max() > 1e-3


def test_two_people_each_shape_the_image_and_the_imr_edit_runs(weights, reference_analyzer, people):
    pipe = make_pipeline(weights, reference_analyzer)
    out = generate(pipe, people, height=64, width=64, return_activation_maps=True)
    assert out.images.shape == (1, 64, 64, 3)
    assert [p["edited"] for p in out.people] == [True, False]
    assert out.people[0]["target_face_prompt"] == "the expression is happy, the face is front view"
    assert out.activation_maps.shape == (1, 2, 64, 64)
    # Each person's identity goes to its own half (default strips): left person left, right person right.
    left, right = out.activation_maps[0, :, :, :32].sum((1, 2)), out.activation_maps[0, :, :, 32:].sum((1, 2))
    assert left[0] > right[0] and right[1] > left[1]
    swapped = generate(pipe, people[::-1], height=64, width=64).images
    assert not np.array_equal(out.images, swapped)


def test_face_prompt_vectors_are_the_second_encoders_pooled_output(weights, reference_analyzer):
    pipe = make_pipeline(weights, reference_analyzer)
    prompts = ["the expression is happy, the face is front view"]
    ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    expected = pipe.text_encoder_2(ids).text_embeds
    torch.testing.assert_close(pipe.conditioner.face_prompt_vectors(prompts), expected, rtol=0, atol=0)
    assert expected.shape[-1] == pipe.dynamicid.imr.txt_dim


def test_sd15_weights_on_the_sdxl_pipeline_are_refused_in_one_line(reference_analyzer, tmp_path):
    sd15 = save_random_weights(
        random_parts(load_base_model("tiny-random"), reference_analyzer), tmp_path / "sd15.safetensors"
    )
    pipe = pipeline_for(load_base_model("tiny-random-sdxl"))
    with pytest.raises(ValueError, match=r"Stable Diffusion 1\.5 .*'sd15'.* SDXL .*'sdxl'") as error:
        pipe.load_dynamicid(sd15, face_analyzer=reference_analyzer)
    assert "\n" not in str(error.value) and str(sd15) in str(error.value)


def test_from_pretrained_reads_an_sdxl_folder_and_the_sd15_sibling_refuses_it(tmp_path):
    base = load_base_model("tiny-random-sdxl")
    folder = tmp_path / "sdxl"
    DynamicIDXLPipeline.from_base(base).save_pretrained(folder)
    pipe = DynamicIDXLPipeline.from_pretrained(folder)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert all(torch.equal(t, pipe.unet.state_dict()[k]) for k, t in base.unet.state_dict().items())
    with pytest.raises(ValueError, match=r"holds SDXL .*use DynamicIDXLPipeline"):
        DynamicIDPipeline.from_pretrained(folder)
