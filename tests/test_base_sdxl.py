"""SDXL as the second base family: the tiny-random-sdxl FAKE, SDXL folders, SAA on SDXL's UNet, base_family checks
and IP-Adapter FaceID-PlusV2 SDXL weights (a FAKE file of that layout: the real weights cannot be downloaded)."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from dynamicid.faces import FaceAnalyzer
from dynamicid.infer.weights import load_modules
from dynamicid.models import (
    SD15_UNET_CONFIG,
    SDXL_UNET_CONFIG,
    install_saa,
    load_dynamicid,
    load_ip_adapter_faceid,
    saa_processors,
)
from dynamicid.models.base import load_base_model
from dynamicid.models.conditioning import Conditioner, SDXLConditioner
from dynamicid.models.families import denoiser_family
from dynamicid.models.saa import SAACall
from dynamicid.testing import (
    build_tiny_random,
    plain_pipeline,
    random_parts,
    save_ip_adapter_faceid,
    save_random_weights,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sdxl():
    return load_base_model("tiny-random-sdxl")


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer("embedded")


def test_tiny_random_sdxl_has_sdxl_structure(sdxl):
    assert sdxl.family == "sdxl" and load_base_model("tiny-random").family == "sd15"
    assert sdxl.text_encoder_2 is not None and sdxl.tokenizer_2 is not None
    config = sdxl.unet.config
    assert config.down_block_types[0] == "DownBlock2D" and config.addition_embed_type == "text_time"
    assert max(config.transformer_layers_per_block) > 1 and config.use_linear_projection
    # The UNet's text width is both encoders side by side; its added embedding takes the pooled vector + 6 ids.
    assert (
        sdxl.cross_attention_dim
        == sdxl.text_dim
        == sum(e.config.hidden_size for e in (sdxl.text_encoder, sdxl.text_encoder_2))
    )
    assert config.projection_class_embeddings_input_dim == sdxl.pooled_dim + 6 * config.addition_time_embed_dim
    assert all(not p.requires_grad for module in sdxl.modules() for p in module.parameters())


def text_condition(base, prompts, size=(64, 64)):
    conditioner = Conditioner.from_parts(base)
    return conditioner.text_condition(conditioner.token_ids(prompts), size)


def test_sdxl_conditioning_is_sdxl_pipelines_prompt_encoding_and_size_ids(sdxl):
    prompts = ["a photo of two friends", "portrait"]
    conditioner = Conditioner.from_parts(sdxl)
    assert isinstance(conditioner, SDXLConditioner)
    text, added = text_condition(sdxl, prompts, (64, 48))
    states, _, pooled, _ = plain_pipeline(sdxl).encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(text, states, rtol=0, atol=0)
    torch.testing.assert_close(added["text_embeds"], pooled, rtol=0, atol=0)
    expected_ids = plain_pipeline(sdxl)._get_add_time_ids(
        (64, 48), (0, 0), (64, 48), dtype=pooled.dtype, text_encoder_projection_dim=sdxl.pooled_dim
    )
    torch.testing.assert_close(added["time_ids"], expected_ids.expand(2, -1), rtol=0, atol=0)
    # The IMR's face-prompt vector is the same pooled vector.
    torch.testing.assert_close(conditioner.face_prompt_vectors(prompts), pooled, rtol=0, atol=0)
    latents = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    noise = sdxl.unet(latents, 10, encoder_hidden_states=text, added_cond_kwargs=added).sample
    assert noise.shape == latents.shape
    with pytest.raises(ValueError, match="image size"):
        conditioner.text_condition(conditioner.token_ids(prompts))


def test_sd15_conditioning_is_sd15_pipelines_prompt_encoding():
    base = load_base_model("tiny-random")
    pipe = plain_pipeline(base)
    states, _ = pipe.encode_prompt(["a photo"], "cpu", 1, False)
    text, added = text_condition(base, ["a photo"])
    torch.testing.assert_close(text, states, rtol=0, atol=0)
    assert added is None and type(Conditioner.from_parts(base)) is Conditioner


@pytest.mark.parametrize("name", ["tiny-random", "tiny-random-sdxl"])
def test_tiny_bases_are_seeded_and_leave_global_rng_alone(name):
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_random(name, seed=3)
    assert torch.equal(torch.rand(1), expected)
    b, c = build_tiny_random(name, seed=3), build_tiny_random(name, seed=4)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        if getattr(a, part) is None:
            continue
        first = next(iter(getattr(a, part).state_dict()))
        assert torch.equal(getattr(a, part).state_dict()[first], getattr(b, part).state_dict()[first])
        assert not torch.equal(getattr(a, part).state_dict()[first], getattr(c, part).state_dict()[first])


def test_sdxl_folder_is_recognised_and_loads_the_same_weights(sdxl, tmp_path):
    folder = tmp_path / "sdxl"
    plain_pipeline(sdxl).save_pretrained(folder)
    loaded = load_base_model(folder, image_encoder=None)
    assert loaded.family == "sdxl" and loaded.image_encoder is not None  # BASE/image_encoder by default
    for part in ("unet", "text_encoder", "text_encoder_2", "vae", "image_encoder"):
        theirs = getattr(loaded, part).state_dict()
        assert all(torch.equal(t, theirs[k]) for k, t in getattr(sdxl, part).state_dict().items())
    prompts = ["a face"]
    torch.testing.assert_close(text_condition(loaded, prompts)[0], text_condition(sdxl, prompts)[0])


def test_sdxl_folder_without_its_second_text_encoder_names_it(sdxl, tmp_path):
    folder = tmp_path / "sdxl"
    plain_pipeline(sdxl).save_pretrained(folder)
    for file in (folder / "text_encoder_2").iterdir():
        file.unlink()
    (folder / "text_encoder_2").rmdir()
    with pytest.raises(FileNotFoundError, match=r"has no text_encoder_2 subfolder.*SDXL checkpoint") as error:
        load_base_model(folder)
    assert "\n" not in str(error.value)


def _ip_adapter_hidden_size(name: str, block_out_channels: tuple[int, ...]) -> int:
    """IP-Adapter's own rule (tencent-ailab/IP-Adapter, set_ip_adapter) for a processor's width from its name."""
    if name.startswith("mid_block"):
        return block_out_channels[-1]
    if name.startswith("up_blocks"):
        return list(reversed(block_out_channels))[int(name[len("up_blocks.")])]
    return block_out_channels[int(name[len("down_blocks.")])]


@pytest.mark.parametrize("config", [SD15_UNET_CONFIG, SDXL_UNET_CONFIG], ids=["sd15", "sdxl"])
def test_saa_on_full_size_unets_has_ip_adapters_widths_per_layer(config):
    """On the meta device (no memory): SDXL's 140 attention layers get 640- or 1280-wide processors whose ID
    branch reads 2048-wide tokens, the layout of IP-Adapter FaceID-PlusV2 SDXL's `ip_adapter.<i>` keys."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    install_saa(unet, rank=128, num_tokens=4)
    processors = saa_processors(unet)
    assert len(processors) == {"sd15": 32, "sdxl": 140}[denoiser_family(unet).name]
    for name, processor in processors.items():
        assert processor.hidden_size == _ip_adapter_hidden_size(name, config["block_out_channels"])
        if name.endswith("attn2.processor"):
            assert processor.to_k_ip.weight.shape == (processor.hidden_size, config["cross_attention_dim"])
            assert processor.to_k_lora.down.weight.shape == (128, config["cross_attention_dim"])
        else:
            assert not processor.is_cross_attention
    if denoiser_family(unet).name == "sdxl":
        assert {p.hidden_size for p in processors.values()} == {640, 1280}


def test_saa_on_tiny_sdxl_changes_nothing_until_trained():
    base = build_tiny_random("tiny-random-sdxl")
    text, added = text_condition(base, ["a face"])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    before = base.unet(latents, 5, encoder_hidden_states=text, added_cond_kwargs=added).sample
    install_saa(base.unet, rank=4)
    tokens = torch.randn(1, 4, base.cross_attention_dim)
    states = torch.cat([text, tokens], dim=1)
    saa = {"saa": SAACall(num_ids=1, id_scale=0.0)}
    after = base.unet(
        latents, 5, encoder_hidden_states=states, added_cond_kwargs=added, cross_attention_kwargs=saa
    ).sample
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_face_encoder_width_follows_the_base(analyzer):
    base = build_tiny_random("tiny-random-sdxl")
    parts = random_parts(base, analyzer)
    tokens = parts.face_encoder(torch.randn(1, analyzer.embedding_dim), torch.randn(1, 50, base.clip_dim))
    assert (
        tokens.shape == (1, 4, base.cross_attention_dim) != (1, 4, load_base_model("tiny-random").cross_attention_dim)
    )
    assert parts.imr.txt_dim == base.pooled_dim and parts.keypoint_encoder.embedding_dim == base.cross_attention_dim


@pytest.fixture(scope="module")
def weights_by_family(tmp_path_factory, analyzer):
    folder = tmp_path_factory.mktemp("families")
    return {
        name: save_random_weights(random_parts(build_tiny_random(name), analyzer), folder / f"{name}.safetensors")
        for name in ("tiny-random", "tiny-random-sdxl")
    }


def test_weights_record_their_base_family(weights_by_family):
    assert load_dynamicid(weights_by_family["tiny-random"]).metadata.base_family == "sd15"
    assert load_dynamicid(weights_by_family["tiny-random-sdxl"]).metadata.base_family == "sdxl"


@pytest.mark.parametrize(
    ("weights", "base"), [("tiny-random", "tiny-random-sdxl"), ("tiny-random-sdxl", "tiny-random")]
)
def test_weights_of_the_other_family_are_refused_in_one_line(weights_by_family, weights, base):
    path = weights_by_family[weights]
    unet = build_tiny_random(base).unet
    families = {"tiny-random": "'sd15'", "tiny-random-sdxl": "'sdxl'"}
    for load in (lambda: load_modules(path, unet), lambda: load_dynamicid(path).load_saa_into(unet)):
        with pytest.raises(ValueError) as error:
            load()
        message = str(error.value)
        assert "\n" not in message and str(path) in message
        assert message.index(families[weights]) < message.index(families[base])  # the file's, then the base's
    assert not any(".processor." in k for k in unet.state_dict())  # nothing installed


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_ip_adapter_faceid_plusv2_sdxl_layout_loads_into_the_sdxl_base(analyzer, tmp_path, suffix):
    source = random_parts(build_tiny_random("tiny-random-sdxl", seed=2), analyzer, seed=3)
    path = save_ip_adapter_faceid(source.unet, source.face_encoder, tmp_path / f"ip-adapter-faceid-plusv2_sdxl{suffix}")
    found = load_ip_adapter_faceid(path)
    target = build_tiny_random("tiny-random-sdxl").unet
    install_saa(target, rank=4)
    found.load_saa_into(target)
    theirs = saa_processors(target)
    for name, processor in saa_processors(source.unet).items():
        assert all(torch.equal(v, theirs[name].state_dict()[k]) for k, v in processor.state_dict().items())
    encoder = found.build_face_encoder()
    assert encoder.cross_attention_dim == 2 * 32
    inputs = (torch.randn(1, analyzer.embedding_dim), torch.randn(1, 50, 48))
    np.testing.assert_array_equal(encoder(*inputs).detach().numpy(), source.face_encoder(*inputs).detach().numpy())
    sd15 = build_tiny_random("tiny-random").unet
    install_saa(sd15, rank=4)
    with pytest.raises(ValueError, match="another base model"):
        found.load_saa_into(sd15)


def test_mixed_precision_training_casts_every_frozen_part_the_second_text_encoder_included():
    """In bf16 training the frozen parts run in bf16 on the training device; SDXL's second text encoder too (its
    states are concatenated with the first's, so a part left behind breaks the text condition)."""
    from dynamicid.train.runner import cast_frozen

    base = build_tiny_random("tiny-random-sdxl")
    model = torch.nn.Linear(2, 2)
    cast_frozen(base, model, torch.device("cpu"), torch.bfloat16)
    frozen = {"unet": base.unet, "vae": base.vae, "text_encoder": base.text_encoder}
    frozen |= {"text_encoder_2": base.text_encoder_2, "image_encoder": base.image_encoder}
    assert {name: module.dtype for name, module in frozen.items()} == dict.fromkeys(frozen, torch.bfloat16)
    assert model.weight.dtype == torch.float32  # what is trained stays float32
    text, _ = text_condition(base, ["a face"])
    assert text.dtype == torch.bfloat16
