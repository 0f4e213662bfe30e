"""The base-model loader: tiny-random fake for CPU runs, and clear errors for incomplete local folders."""

import numpy as np
import oracles
import pytest
import torch

from dynamicid.models.base import CLIP_IMAGE_SIZE, load_base_model
from dynamicid.models.conditioning import Conditioner
from dynamicid.testing import build_tiny_random


@pytest.fixture(scope="module")
def tiny():
    return load_base_model("tiny-random")


def test_tiny_random_has_sd15_structure_and_runs(tiny):
    assert tiny.vae_scale_factor == 8
    ids = tiny.tokenizer(["a photo of a person"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    text = tiny.text_encoder(ids)[0]
    assert text.shape == (1, 77, tiny.text_dim)
    latents = tiny.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
    noise = tiny.unet(latents, 10, encoder_hidden_states=text).sample
    assert noise.shape == latents.shape
    assert all(not p.requires_grad for p in tiny.unet.parameters())


def test_tiny_random_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_random(seed=3)
    assert torch.equal(torch.rand(1), expected)
    b = build_tiny_random(seed=3)
    c = build_tiny_random(seed=4)
    weight = "conv_in.weight"
    assert torch.equal(a.unet.state_dict()[weight], b.unet.state_dict()[weight])
    assert not torch.equal(a.unet.state_dict()[weight], c.unet.state_dict()[weight])


def test_clip_hidden_states_are_the_penultimate_layer(tiny):
    faces = np.random.default_rng(0).integers(0, 256, (2, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE, 3), dtype=np.uint8)
    conditioner = Conditioner.from_parts(tiny)
    pixels = conditioner.clip_input(faces)
    hidden = conditioner.clip_states(pixels)
    assert hidden.shape == (2, 50, tiny.clip_dim)
    # Values: the vision tower's layers run one by one, stopping before the last (tests/oracles.py).
    torch.testing.assert_close(hidden, oracles.clip_penultimate(tiny.image_encoder, pixels), rtol=1e-5, atol=1e-5)
    assert (hidden - tiny.image_encoder(pixels).last_hidden_state).abs().max() > 1e-2, "not the last layer"
    with pytest.raises(ValueError, match="224x224"):
        conditioner.clip_input(np.zeros((1, 112, 112, 3), dtype=np.uint8))


def test_incomplete_base_folder_names_the_missing_parts(tmp_path):
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match="unet") as error:
        load_base_model(tmp_path)
    assert "tokenizer" in str(error.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_base_model(tmp_path / "nowhere")


def test_image_encoder_folder_without_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_base_model("tiny-random", image_encoder=tmp_path)
