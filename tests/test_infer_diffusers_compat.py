"""DynamicIDPipeline used as a diffusers user would: every scheduler, a user's LoRA, fp8 layerwise casting,
attention slicing and QKV fusion, save / reload, from_pipe, prompt embeddings.

Tiny-random FAKE base with random FAKE DynamicID weights and real reference photos (the embedded face backend);
the oracles are diffusers' own StableDiffusionPipeline on the same parts, or the same pipeline without the
setting under test.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from dynamicid.infer import DynamicIDPipeline, Person
from dynamicid.infer.pipeline import DEFAULT_GUIDANCE
from dynamicid.models.base import load_base_model
from dynamicid.testing import plain_pipeline, random_parts, save_random_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "two friends in a cafe"
SCHEDULERS = {
    "pndm": lambda config: PNDMScheduler.from_config(config, skip_prk_steps=True),  # SD 1.5's own settings
    "heun": lambda config: HeunDiscreteScheduler.from_config(config),
    "kdpm2": lambda config: KDPM2DiscreteScheduler.from_config(config),
    "dpm++2m-karras": lambda config: DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True),
    "euler-a": lambda config: EulerAncestralDiscreteScheduler.from_config(config),
    "unipc": lambda config: UniPCMultistepScheduler.from_config(config),
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory, reference_analyzer):
    parts = random_parts(load_base_model("tiny-random"), reference_analyzer)
    return save_random_weights(parts, tmp_path_factory.mktemp("weights") / "dynamicid.safetensors")


@pytest.fixture(scope="module")
def people(shared_faces, reference_analyzer):
    identities = shared_faces / "identities"
    return [Person(reference_analyzer.analyze(identities / name / f"{name}.jpg")) for name in ("obama", "biden")]


@pytest.fixture
def pipe(weights, reference_analyzer):
    pipe = DynamicIDPipeline.from_base(load_base_model("tiny-random"))
    pipe.load_dynamicid(weights, face_analyzer=reference_analyzer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, people, seed=0, **kwargs):
    settings = {"num_inference_steps": 2, "output_type": "np", "generator": torch.Generator().manual_seed(seed)}
    return pipe(PROMPT, people, **(settings | kwargs))


def record_boosts(unet):
    """The SAA boost of every UNet call, in order (a forward pre-hook reading its cross_attention_kwargs)."""
    boosts = []

    def hook(module, args, kwargs):
        boosts.append(kwargs["cross_attention_kwargs"]["saa"].boost)

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return boosts


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_generates_two_people(pipe, people, name):
    pipe.scheduler = SCHEDULERS[name](pipe.scheduler.config)
    boosts = record_boosts(pipe.unet)
    out = generate(pipe, people, num_inference_steps=3, boost=2.0, boost_steps=1)
    assert out.images.shape == (1, 64, 64, 3)
    assert np.isfinite(out.images).all()
    # The boost lasts the first of 3 denoising steps: the first third of the UNet calls, however many a step makes.
    calls = len(pipe.scheduler.timesteps)
    assert len(boosts) == calls
    assert boosts == [2.0 if 3 * call < calls else 0.0 for call in range(calls)]


def test_heun_boosts_both_calls_of_a_step(pipe, people):
    """Heun evaluates each step at its two ends: steps 0 and 1 of 3 make 2 calls each, the last one call."""
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    boosts = record_boosts(pipe.unet)
    generate(pipe, people, num_inference_steps=3, boost=2.0, boost_steps=2)
    assert boosts == [2.0, 2.0, 2.0, 2.0, 0.0]


def user_lora(tmp_path, unet):
    """A PEFT LoRA (rank 4, random) on the tiny UNet's attention projections, saved as diffusers saves one."""
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        unet.add_adapter(config)
    layers = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers, safe_serialization=True)
    unet.delete_adapters("default")
    return tmp_path / "pytorch_lora_weights.safetensors"


def test_a_users_lora_changes_the_image_as_much_as_for_plain_sd(tmp_path, pipe, people):
    """With the identity branch at weight 0 the SAA model is SD plus SAA's own LoRA, and the user's LoRA moves the
    image as much as it moves plain SD's (measured: 0.97-1.0x). With the branch on, the user's LoRA also moves the
    LoRA-adapted queries of the ID branch, which on these random weights doubles the change (measured: 2.0-2.2x);
    before the fix both changes were exactly 0 (the LoRA was bypassed)."""
    lora = user_lora(tmp_path, load_base_model("tiny-random").unet)
    plain = plain_pipeline(load_base_model("tiny-random"), pipe.scheduler)
    plain.set_progress_bar_config(disable=True)

    def plain_image():
        settings = {"num_inference_steps": 2, "guidance_scale": DEFAULT_GUIDANCE, "output_type": "np"}
        return plain(PROMPT, **settings, generator=torch.Generator().manual_seed(0)).images

    plain_before = plain_image()
    plain.load_lora_weights(lora)
    plain_change = np.abs(plain_image() - plain_before).mean()

    before = [generate(pipe, people, id_scale=scale).images for scale in (0.0, 1.0)]
    pipe.load_lora_weights(lora)
    after = [generate(pipe, people, id_scale=scale).images for scale in (0.0, 1.0)]
    text_only, with_identity = (np.abs(a - b).mean() for a, b in zip(after, before, strict=True))
    assert plain_change > 0.01
    assert abs(text_only - plain_change) <= 0.2 * plain_change, (text_only, plain_change)
    assert with_identity >= 0.8 * plain_change, (with_identity, plain_change)


def test_fp8_layerwise_casting_generates_close_to_bf16(pipe, people):
    pipe.to(dtype=torch.bfloat16)
    bf16 = generate(pipe, people, seed=0).images
    other_seed = generate(pipe, people, seed=1).images
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    fp8 = generate(pipe, people, seed=0).images
    assert np.isfinite(fp8).all()
    assert np.abs(fp8 - bf16).mean() < 0.25 * np.abs(other_seed - bf16).mean()


@pytest.mark.parametrize("switch", ["slicing-max", "slicing-auto", "fused-qkv"])
def test_attention_slicing_and_qkv_fusion_keep_the_identity_branch(pipe, people, switch):
    before = generate(pipe, people, return_activation_maps=True)
    if switch == "fused-qkv":
        pipe.fuse_qkv_projections()
    else:
        pipe.enable_attention_slicing(switch.removeprefix("slicing-"))
    after = generate(pipe, people, return_activation_maps=True)
    assert after.activation_maps.max() > 0
    np.testing.assert_allclose(after.activation_maps, before.activation_maps, atol=1e-4)
    np.testing.assert_allclose(after.images, before.images, atol=1e-4)


def test_replaced_attention_processors_are_refused(pipe, people):
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match=r"attention processors were replaced \(AttnProcessor2_0\)"):
        generate(pipe, people)
    pipe.id_adapter.attach(pipe.unet)
    assert generate(pipe, people).images.shape == (1, 64, 64, 3)


def test_save_pretrained_keeps_scheduler_and_dynamicid_out_of_the_unet(tmp_path, pipe, people):
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    expected = generate(pipe, people).images
    pipe.save_pretrained(tmp_path)
    unet_keys = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    assert not [k for k in unet_keys if ".processor." in k]
    assert any(k.startswith("saa.") for k in load_file(tmp_path / "id_adapter" / "diffusion_pytorch_model.safetensors"))
    loaded = DynamicIDPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is DPMSolverMultistepScheduler
    np.testing.assert_allclose(generate(loaded, people).images, expected, atol=1e-5)


def test_from_pipe_over_a_stable_diffusion_pipeline(weights, reference_analyzer, people):
    plain = plain_pipeline(load_base_model("tiny-random"))
    pipe = DynamicIDPipeline.from_pipe(plain)
    assert pipe.unet is plain.unet and pipe.id_adapter is None
    pipe.load_dynamicid(weights, face_analyzer=reference_analyzer)
    pipe.set_progress_bar_config(disable=True)
    assert generate(pipe, people).images.shape == (1, 64, 64, 3)


def test_prompt_embeddings_and_batched_prompts_as_stable_diffusion_takes_them(pipe, people):
    single = generate(pipe, people, negative_prompt="blurry").images
    embeds, negative = pipe.encode_prompt(PROMPT, pipe.device, 1, True, "blurry")
    from_embeds = pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        people=people,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    np.testing.assert_allclose(from_embeds, single, atol=1e-5)
    batch = pipe(
        [PROMPT, "two friends on a beach"],
        people,
        negative_prompt=["blurry", "dark"],
        num_inference_steps=2,
        output_type="np",
        generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)],
    ).images
    assert batch.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(batch[:1], single, atol=1e-5)
    assert np.abs(batch[1] - batch[0]).mean() > 1e-3
