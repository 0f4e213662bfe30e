"""SAA on Flux's joint attention (`dynamicid.models.saa_flux`) against a naive oracle written from METHOD.md."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from dynamicid.models.saa import SAACall
from dynamicid.models.saa_flux import (
    FluxSAAProcessor,
    flux_saa_processors,
    flux_saa_state_dict,
    install_flux_saa,
    load_flux_saa_state_dict,
)
from dynamicid.testing import build_tiny_random_flux

GRID = (4, 6)  # packed latent tokens of a 64x96 image (one per 16x16 pixels): 4 rows, 6 columns
IMAGE_SIZE = (64, 96)
TEXT_TOKENS = 5
NUM_TOKENS = 4


def _randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


@pytest.fixture
def block_attn():
    """A random double-stream attention of the tiny Flux (2 heads of 16) with an SAA processor, LoRA rank 4."""
    base = build_tiny_random_flux(seed=3, with_image_encoder=False)
    transformer = base.denoiser
    install_flux_saa(transformer, rank=4, num_tokens=NUM_TOKENS)
    attn = transformer.transformer_blocks[0].attn
    _randomise(attn, seed=7)  # every weight random: Flux's, the ID projections and both LoRA factors
    return attn


def _inputs(seed: int, num_ids: int = 2):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(2, GRID[0] * GRID[1], 32, generator=generator)
    text = torch.randn(2, TEXT_TOKENS, 32, generator=generator)
    ids = torch.randn(1, num_ids * NUM_TOKENS, 32, generator=generator)
    return image, text, ids


def _rms_norm(x: torch.Tensor, norm: torch.nn.RMSNorm) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _oracle_id_branch(attn, processor, image, ids, boxes, boost, id_scale):
    """METHOD.md's ID branch, gating, box routing and boost, one loop per person over an explicit mask."""
    heads, head_dim = attn.heads, attn.head_dim
    q_lora = processor.to_q_lora.up.weight @ processor.to_q_lora.down.weight
    q = image @ (attn.to_q.weight + q_lora).T + attn.to_q.bias
    q = _rms_norm(q.view(*q.shape[:2], heads, head_dim), attn.norm_q)
    ids = ids.expand(image.shape[0], -1, -1)
    k = (ids @ processor.to_k_id.weight.T + processor.to_k_id.bias).view(*ids.shape[:2], heads, head_dim)
    v = (ids @ processor.to_v_id.weight.T + processor.to_v_id.bias).view(*ids.shape[:2], heads, head_dim)
    logits = torch.einsum("bqhd,bnhd->bhnq", q, k) / head_dim**0.5
    # a(q): sum over heads and ID tokens, min-max over the queries of each image, < 0.3 -> 0.
    a = logits.sum(dim=(1, 2))
    a = (a - a.min(dim=1, keepdim=True).values) / (
        a.max(dim=1, keepdim=True).values - a.min(dim=1, keepdim=True).values
    )
    a = torch.where(a < 0.3, torch.zeros_like(a), a)
    rows, cols = GRID
    a = a / (boost + 1)
    for person, (y0, x0, y1, x1) in enumerate(boxes):
        inside = torch.zeros(rows * cols, dtype=torch.bool)
        for r in range(int(y0 * rows), int(y1 * rows)):
            for c in range(int(x0 * cols), int(x1 * cols)):
                inside[r * cols + c] = True
        a = torch.where(inside, a * (boost + 1) + boost, a)
        for token in range(logits.shape[2]):
            if token // NUM_TOKENS != person:
                logits[:, :, token, inside] = float("-inf")
    probs = logits.softmax(dim=2)
    out = torch.einsum("bhnq,bnhd->bqhd", probs, v) * a[:, :, None, None] * id_scale
    return out.flatten(2)


@pytest.mark.parametrize("boost", [0.0, 2.0])
def test_id_branch_gating_routing_and_boost_match_the_naive_oracle(block_attn, boost):
    image, text, ids = _inputs(seed=1)
    boxes = ((0.0, 0.0, 1.0, 0.5), (0.25, 0.5, 0.75, 1.0))  # person 2's box leaves background above and below
    call = SAACall(num_ids=2, id_scale=0.7, boxes=boxes, boost=boost, image_size=IMAGE_SIZE)
    with torch.no_grad():
        image_out, _, id_out = block_attn(image, text, saa=call, id_tokens=ids)
        processor = block_attn.processor
        expected = _oracle_id_branch(block_attn, processor, image, ids, boxes, boost, id_scale=0.7)
    assert id_out.shape == image_out.shape == (2, GRID[0] * GRID[1], 32)
    assert torch.allclose(id_out, expected, atol=1e-5, rtol=0)
    assert id_out.abs().amax() > 0.1  # the oracle compares something


def test_flux_attention_itself_is_unchanged_by_the_id_branch():
    """Fresh LoRA (up = 0): the image and text outputs are FluxAttnProcessor's, bit for bit, with or without IDs."""
    base = build_tiny_random_flux(seed=3, with_image_encoder=False)
    attn = base.denoiser.transformer_blocks[0].attn
    image, text, ids = _inputs(seed=2)
    with torch.no_grad():
        reference = FluxAttnProcessor()(attn, image, text)
        install_flux_saa(base.denoiser, rank=4)
        with_ids = attn(image, text, saa=SAACall(num_ids=2, image_size=IMAGE_SIZE), id_tokens=ids)
    assert torch.equal(with_ids[0], reference[0]) and torch.equal(with_ids[1], reference[1])


def test_person_1_tokens_reach_person_2_box_only_through_the_global_gate(block_attn):
    """Boxes tile the image. Changing person 1's tokens leaves the ID attention of every query in person 2's box
    unchanged (probabilities on person 2's tokens only); the output there changes only through the gate a(q),
    which METHOD.md min-max normalises over the whole image, so it stays a per-query multiple of the old one."""
    image, text, ids = _inputs(seed=4)
    boxes = ((0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0))
    call = SAACall(num_ids=2, boxes=boxes, boost=2.0, image_size=IMAGE_SIZE, return_activation_maps=True)
    changed = ids.clone()
    changed[:, :NUM_TOKENS] = torch.randn(1, NUM_TOKENS, 32, generator=torch.Generator().manual_seed(9))
    processor = block_attn.processor
    runs = []
    with torch.no_grad():
        for tokens in (ids, changed):
            out = block_attn(image, text, saa=call, id_tokens=tokens)[2]
            runs.append((out, processor.activation_map.flatten(1), processor.id_attention_probs))
    (old, gate_old, probs_old), (new, gate_new, probs_new) = runs
    box_2 = torch.zeros(GRID, dtype=torch.bool)
    box_2[:, GRID[1] // 2 :] = True
    box_2 = box_2.flatten()
    assert torch.equal(probs_old[:, :, box_2], probs_new[:, :, box_2])
    assert probs_new[:, :, box_2, :NUM_TOKENS].abs().max() == 0
    cross_old = old[:, box_2] * gate_new[:, box_2, None]
    cross_new = new[:, box_2] * gate_old[:, box_2, None]
    assert torch.allclose(cross_old, cross_new, atol=1e-5, rtol=0)
    assert not torch.allclose(old[:, ~box_2], new[:, ~box_2], atol=1e-3)  # person 1's own box does change


@pytest.mark.parametrize(
    "kwargs",
    [
        {"saa": SAACall(num_ids=2, id_scale=0.0, image_size=IMAGE_SIZE), "id_tokens": "ids"},
        {"saa": SAACall(num_ids=0)},
        {},
    ],
    ids=["id_scale_0", "no_people", "no_saa_inputs"],
)
def test_transformer_equals_flux_with_id_scale_0_or_no_people(kwargs):
    base = build_tiny_random_flux(seed=5, with_image_encoder=False)
    transformer = base.denoiser
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 24, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, 7, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(24, 3),
        "txt_ids": torch.zeros(7, 3),
        "return_dict": False,
    }
    with torch.no_grad():
        reference = transformer(**inputs)[0]
        install_flux_saa(transformer, rank=8)
        _randomise(flux_saa_processors(transformer)["transformer_blocks.0.attn.processor"].to_k_id, seed=1)
        if kwargs.get("id_tokens") == "ids":
            kwargs = kwargs | {"id_tokens": torch.randn(1, 8, 32, generator=generator)}
        result = transformer(**inputs, joint_attention_kwargs=kwargs)[0]
    assert torch.equal(result, reference)


def test_install_copies_the_text_key_value_projections_and_round_trips_its_weights():
    base = build_tiny_random_flux(seed=1, with_image_encoder=False)
    install_flux_saa(base.denoiser, rank=4)
    processors = flux_saa_processors(base.denoiser)
    assert list(processors) == ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"]
    attn = base.denoiser.transformer_blocks[1].attn
    assert torch.equal(processors["transformer_blocks.1.attn.processor"].to_v_id.bias, attn.add_v_proj.bias)
    install_flux_saa(base.denoiser, rank=4)  # same settings: nothing happens
    with pytest.raises(ValueError, match="already installed"):
        install_flux_saa(base.denoiser, rank=8)

    for processor in processors.values():
        _randomise(processor, seed=2)
    saved = flux_saa_state_dict(base.denoiser)
    other = build_tiny_random_flux(seed=1, with_image_encoder=False)
    install_flux_saa(other.denoiser, rank=4)
    load_flux_saa_state_dict(other.denoiser, saved)
    assert all(torch.equal(v, flux_saa_state_dict(other.denoiser)[k]) for k, v in saved.items())
    with pytest.raises(ValueError, match="name no double-stream attention"):
        load_flux_saa_state_dict(other.denoiser, {"transformer_blocks.9.attn.processor.to_k_id.weight": torch.zeros(1)})


def test_wrong_id_token_count_names_the_argument(block_attn):
    image, text, ids = _inputs(seed=1, num_ids=1)
    with pytest.raises(ValueError, match=r"expects 8 ID tokens.*id_tokens"):
        block_attn(image, text, saa=SAACall(num_ids=2, image_size=IMAGE_SIZE), id_tokens=ids)
    assert isinstance(block_attn.processor, FluxSAAProcessor)


def test_tiny_random_flux_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first, second = build_tiny_random_flux(seed=4), build_tiny_random_flux(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(first.modules(), second.modules(), strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(build_tiny_random_flux(seed=5).denoiser.x_embedder.weight, first.denoiser.x_embedder.weight)
    assert first.denoiser.config.guidance_embeds and first.vae.config.latent_channels == 16
    ids = first.tokenizer_2(["a smiling face"]).input_ids[0]
    assert ids[-1] == first.tokenizer_2.eos_token_id and first.tokenizer_2.unk_token_id not in ids


def test_id_projections_and_lora_train_through_a_checkpointed_transformer():
    """Gradients reach the SAA weights (and only the ID / LoRA weights are trained) with gradient checkpointing."""
    base = build_tiny_random_flux(seed=2, with_image_encoder=False)
    transformer = base.denoiser
    install_flux_saa(transformer, rank=4)
    transformer.enable_gradient_checkpointing()
    trainable = [p for processor in flux_saa_processors(transformer).values() for p in processor.parameters()]
    for parameter in trainable:
        parameter.requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    out = transformer(
        hidden_states=torch.randn(1, 24, 64, generator=generator),
        encoder_hidden_states=torch.randn(1, 7, 32, generator=generator),
        pooled_projections=torch.randn(1, 32, generator=generator),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=torch.zeros(24, 3),
        txt_ids=torch.zeros(7, 3),
        joint_attention_kwargs={
            "saa": SAACall(num_ids=1, image_size=IMAGE_SIZE, boxes=((0.0, 0.0, 1.0, 1.0),)),
            "id_tokens": torch.randn(1, 4, 32, generator=generator),
        },
        return_dict=False,
    )[0]
    out.square().mean().backward()
    processor = flux_saa_processors(transformer)["transformer_blocks.0.attn.processor"]
    for parameter in (processor.to_k_id.weight, processor.to_v_id.weight, processor.to_q_lora.up.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in transformer.transformer_blocks[0].attn.to_q.parameters())


def test_family_denoise_packs_calls_the_transformer_and_unpacks():
    """FLUX's training prediction: latents (B, 16, h, w) in and out; equal to the transformer on the packed latents."""
    from diffusers import FluxPipeline

    from dynamicid.models.families.flux import FLUX

    base = build_tiny_random_flux(seed=6, with_image_encoder=False)
    transformer = base.denoiser
    install_flux_saa(transformer, rank=4)
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 16, 8, 12, generator=generator)
    text = torch.randn(2, 7, 32, generator=generator)
    condition = {"pooled_projections": torch.randn(2, 32, generator=generator), "txt_ids": torch.zeros(7, 3)}
    ids = torch.randn(1, 4, 32, generator=generator)
    call = SAACall(num_ids=1, boxes=((0.0, 0.0, 1.0, 1.0),), image_size=(64, 96))
    with torch.no_grad():
        prediction = FLUX.denoise(transformer, noisy, torch.tensor([300.0, 700.0]), text, ids, condition, call)
        packed = transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, 2, 16, 8, 12),
            timestep=torch.tensor([0.3, 0.7]),
            guidance=torch.tensor([3.5, 3.5]),
            pooled_projections=condition["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=condition["txt_ids"],
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 6, noisy.device, noisy.dtype),
            joint_attention_kwargs={"saa": call, "id_tokens": ids},
            return_dict=False,
        )[0]
    assert prediction.shape == noisy.shape
    # patch (row 1, column 2) of the packed prediction is latents [:, :, 2:4, 4:6], channels laid out (c, 2, 2)
    assert torch.allclose(prediction[:, :, 2:4, 4:6].flatten(1), packed[:, 1 * 6 + 2], atol=1e-6)
