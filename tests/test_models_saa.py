"""SAA processor properties: what gating, boxes, scales and LoRA do, on one layer and on a tiny UNet.

The UNet is a tiny randomly initialised diffusers model (a fake standing in for SD 1.5, which cannot be
downloaded); the reference below is IP-Adapter's LoRA + IP attention written out with plain matmuls.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamicid.models import (
    LoRALinear,
    SAACall,
    SAAProcessor,
    boost_for_step,
    install_saa,
    saa_activation_maps,
    saa_id_attention_probs,
    saa_processors,
)
from dynamicid.models.saa import box_cells, query_grid

TINY_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
TEXT_TOKENS, NUM_TOKENS, WIDTH, CONTEXT = 7, 4, 32, 24


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET).eval()


def randomise_lora(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, LoRALinear):
                sub.up.weight.copy_(torch.randn(sub.up.weight.shape, generator=generator) * 0.2)


def cross_layer(seed: int) -> tuple[Attention, SAAProcessor]:
    """One cross-attention layer with an SAA processor holding random LoRA and ID weights."""
    torch.manual_seed(seed)
    attn = Attention(query_dim=WIDTH, cross_attention_dim=CONTEXT, heads=4, dim_head=8).eval()
    processor = SAAProcessor(WIDTH, CONTEXT, rank=4, num_tokens=NUM_TOKENS)
    randomise_lora(processor, seed)
    with torch.no_grad():
        processor.to_k_ip.weight.normal_(std=0.3)
        processor.to_v_ip.weight.normal_(std=0.3)
    attn.set_processor(processor)
    return attn, processor


def reference_lora_ip(attn, processor, hidden, text, ids, id_scale):
    """LoRA-adapted attention over the text plus id_scale x plain attention over the ID tokens."""

    def heads(t):
        return t.view(t.shape[0], t.shape[1], attn.heads, -1).transpose(1, 2)

    def attend(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1) @ v

    q = heads(attn.to_q(hidden) + processor.to_q_lora(hidden))
    out = attend(
        q, heads(attn.to_k(text) + processor.to_k_lora(text)), heads(attn.to_v(text) + processor.to_v_lora(text))
    )
    if ids is not None:
        out = out + id_scale * attend(q, heads(processor.to_k_ip(ids)), heads(processor.to_v_ip(ids)))
    out = out.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)
    return attn.to_out[0](out) + processor.to_out_lora(out)


def saa(**values) -> dict:
    """The UNet's `cross_attention_kwargs` for one call with these SAA inputs."""
    return {"saa": SAACall(**values)}


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 1000), num_ids=st.integers(1, 3), id_scale=st.floats(-1.0, 2.0))
@torch.no_grad()
def test_gating_off_is_lora_attention_plus_the_id_branch(seed, num_ids, id_scale):
    attn, processor = cross_layer(seed)
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 16, WIDTH, generator=generator)
    text = torch.randn(2, TEXT_TOKENS, CONTEXT, generator=generator)
    ids = torch.randn(2, NUM_TOKENS * num_ids, CONTEXT, generator=generator)
    out = attn(
        hidden,
        encoder_hidden_states=torch.cat([text, ids], dim=1),
        **saa(num_ids=num_ids, id_scale=id_scale, gating=False),
    )
    torch.testing.assert_close(out, reference_lora_ip(attn, processor, hidden, text, ids, id_scale))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), gating=st.booleans())
@torch.no_grad()
def test_id_scale_zero_is_the_lora_only_model(seed, gating):
    attn, processor = cross_layer(seed)
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 16, WIDTH, generator=generator)
    text = torch.randn(2, TEXT_TOKENS, CONTEXT, generator=generator)
    ids = torch.randn(2, 2 * NUM_TOKENS, CONTEXT, generator=generator)
    with_ids = attn(
        hidden, encoder_hidden_states=torch.cat([text, ids], dim=1), **saa(num_ids=2, id_scale=0.0, gating=gating)
    )
    text_only = attn(hidden, encoder_hidden_states=text, **saa(num_ids=0, id_scale=1.0, gating=False))
    assert torch.equal(with_ids, text_only)
    torch.testing.assert_close(text_only, reference_lora_ip(attn, processor, hidden, text, None, 0.0))


@torch.no_grad()
def test_fresh_saa_with_id_scale_zero_leaves_the_unet_unchanged():
    unet = tiny_unet()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, TEXT_TOKENS, 32, generator=generator)
    ids = torch.randn(2, 2 * NUM_TOKENS, 32, generator=generator)
    before = unet(latents, 500, encoder_hidden_states=text).sample
    install_saa(unet, rank=4, num_tokens=NUM_TOKENS)  # LoRA up weights start at zero
    assert all(float(p.to_q_lora.up.weight.abs().max()) == 0 for p in saa_processors(unet).values())
    states = torch.cat([text, ids], dim=1)
    after = unet(latents, 500, encoder_hidden_states=states, cross_attention_kwargs=saa(num_ids=2, id_scale=0.0)).sample
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def two_person_unet():
    unet = tiny_unet()
    install_saa(unet, rank=4, num_tokens=NUM_TOKENS)
    randomise_lora(unet, 5)
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(2, TEXT_TOKENS, 32, generator=generator)
    ids = torch.randn(2, 2 * NUM_TOKENS, 32, generator=generator) * 3
    return unet, torch.cat([text, ids], dim=1)


@pytest.mark.parametrize(
    ("image_size", "latent_hw", "boxes"),
    [
        (None, (16, 16), [(0.1, 0.1, 0.5, 0.4), (0.1, 0.6, 0.5, 0.9)]),  # the release's two-person layout
        ((192, 128), (24, 16), [(0.0, 0.0, 0.6, 0.25), (0.5, 0.5, 1.0, 1.0)]),  # 768x512 portrait at 1/4 size
    ],
)
@torch.no_grad()
def test_queries_in_a_box_give_the_other_person_zero_attention(two_person_unet, image_size, latent_hw, boxes):
    unet, states = two_person_unet
    call = saa(num_ids=2, boxes=boxes, boost=2.0, image_size=image_size, return_activation_maps=True)
    output = unet(torch.randn(2, 4, *latent_hw), 500, encoder_hidden_states=states, cross_attention_kwargs=call).sample
    assert torch.isfinite(output).all()
    probs = saa_id_attention_probs(unet)
    maps = saa_activation_maps(unet)
    assert len(probs) == len(maps) == 7  # every cross-attention layer of the tiny UNet
    for name, layer_probs in probs.items():
        grid = query_grid(layer_probs.shape[2], image_size)
        assert maps[name].shape == (2, *grid)
        assert grid[0] * latent_hw[1] == grid[1] * latent_hw[0]  # rows follow the image height
        own = [box_cells(box, grid, layer_probs.device) for box in boxes]
        for person, other in ((0, 1), (1, 0)):
            inside_only = own[person] & ~own[other]
            other_tokens = slice(other * NUM_TOKENS, (other + 1) * NUM_TOKENS)
            assert inside_only.any()
            assert torch.all(layer_probs[:, :, inside_only, other_tokens] == 0)  # exactly zero
            assert torch.all(layer_probs[:, :, inside_only, person * NUM_TOKENS : (person + 1) * NUM_TOKENS] > 0)
        outside = ~(own[0] | own[1])
        assert torch.all(layer_probs[:, :, outside, :] > 0)  # outside every box all tokens are seen
        # the boost lifts the gate to at least `boost` inside each box
        for cells in own:
            assert torch.all(maps[name].flatten(1)[:, cells] >= 2.0)


def literal_box_mask(box, side: int) -> torch.Tensor:
    """(side*side,) bool: METHOD.md's rows int(y0*H) .. int(y1*H), columns int(x0*W) .. int(x1*W), end-exclusive."""
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[int(box[0] * side) : int(box[2] * side), int(box[1] * side) : int(box[3] * side)] = True
    return mask.flatten()


@pytest.mark.parametrize(
    "boxes",
    [
        [(0.0, 0.0, 1.0, 0.75), (0.0, 0.25, 1.0, 1.0)],  # side by side, overlapping over the middle half
        [(0.0, 0.0, 1.0, 1.0), (0.25, 0.25, 0.75, 0.75)],  # the second person wholly inside the first one's box
    ],
    ids=["side-by-side", "nested"],
)
@torch.no_grad()
def test_where_boxes_overlap_the_later_person_is_in_front(two_person_unet, boxes):
    """In the overlap only the later person's tokens are attended (their face, not a blend, and never nobody's);
    in the rest of the earlier person's box only the earlier person's."""
    unet, states = two_person_unet
    call = saa(num_ids=2, boxes=boxes, boost=2.0, return_activation_maps=True)
    output = unet(torch.randn(2, 4, 16, 16), 500, encoder_hidden_states=states, cross_attention_kwargs=call).sample
    assert torch.isfinite(output).all()
    probs = saa_id_attention_probs(unet)
    assert len(probs) == 7
    for layer_probs in probs.values():
        side = int(layer_probs.shape[2] ** 0.5)
        behind, front = (literal_box_mask(box, side) for box in boxes)
        overlap, behind_only = behind & front, behind & ~front
        assert overlap.any() and behind_only.any()
        expected = torch.zeros(side * side, 2)
        expected[front, 1] = 1.0
        expected[behind_only, 0] = 1.0
        per_person = layer_probs.unflatten(-1, (2, NUM_TOKENS)).sum(-1)  # (B, heads, Q, persons)
        inside = behind | front
        torch.testing.assert_close(
            per_person[:, :, inside], expected[inside].expand_as(per_person[:, :, inside]), rtol=0, atol=1e-6
        )


def test_a_box_inside_a_later_persons_box_is_refused():
    """Its person would get no cell at all; the same box twice counts too. Listed the other way round, it is fine."""
    outer, inner = (0.0, 0.0, 1.0, 1.0), (0.25, 0.25, 0.75, 0.75)
    with pytest.raises(ValueError, match=r"box 0 .* lies inside box 1 .*person 0 would not appear"):
        SAACall(num_ids=2, boxes=[inner, outer])
    with pytest.raises(ValueError, match="lies inside"):
        SAACall(num_ids=2, boxes=[inner, inner])
    with pytest.raises(ValueError, match=r"box 1 .* lies inside box 2"):
        SAACall(num_ids=3, boxes=[(0.0, 0.0, 1.0, 0.3), inner, (0.2, 0.2, 0.8, 0.8)])
    SAACall(num_ids=2, boxes=[outer, inner])
    SAACall(num_ids=2, boxes=[inner], mix_scale=0.5)


def test_box_cells_follow_rows_and_columns_on_a_non_square_grid():
    grid = query_grid(96 * 64, (768, 512))  # (height, width) 768x512 -> 96 rows x 64 columns
    assert grid == (96, 64)
    cells = box_cells((0.0, 0.0, 0.5, 0.25), grid, torch.device("cpu")).view(grid)
    assert cells.sum() == 48 * 16
    assert cells[:48, :16].all() and not cells[48:].any() and not cells[:, 16:].any()
    assert query_grid(48 * 32, (768, 512)) == (48, 32)
    with pytest.raises(ValueError, match="square grid"):
        query_grid(96 * 64, None)


@torch.no_grad()
def test_constant_activation_rows_gate_to_zero_without_nan():
    attn, processor = cross_layer(3)
    with torch.no_grad():
        processor.to_k_ip.weight.zero_()  # every ID logit is 0: min == max over the queries
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, WIDTH, generator=generator)
    text = torch.randn(2, TEXT_TOKENS, CONTEXT, generator=generator)
    ids = torch.randn(2, NUM_TOKENS, CONTEXT, generator=generator)
    out = attn(
        hidden, encoder_hidden_states=torch.cat([text, ids], dim=1), **saa(num_ids=1, return_activation_maps=True)
    )
    assert torch.isfinite(out).all()
    assert torch.all(processor.activation_map == 0)
    torch.testing.assert_close(out, reference_lora_ip(attn, processor, hidden, text, None, 0.0))


@torch.no_grad()
def test_gate_is_min_max_normalised_and_thresholded():
    attn, processor = cross_layer(4)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 64, WIDTH, generator=generator)
    states = torch.randn(1, TEXT_TOKENS + NUM_TOKENS, CONTEXT, generator=generator)
    attn(hidden, encoder_hidden_states=states, **saa(num_ids=1, return_activation_maps=True))
    gate = processor.activation_map.flatten()
    assert gate.max() == 1.0 and gate.min() == 0.0
    assert torch.all((gate == 0) | (gate >= 0.3))


@torch.no_grad()
def test_hot_path_one_fused_text_attention_id_branch_on_id_tokens_only_no_maps_unless_asked():
    attn, processor = cross_layer(5)
    seen = []
    processor.to_k_ip.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    states = torch.randn(2, TEXT_TOKENS + 2 * NUM_TOKENS, CONTEXT)
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    try:
        F.scaled_dot_product_attention = counting
        attn(torch.randn(2, 16, WIDTH), encoder_hidden_states=states, **saa(num_ids=2))
    finally:
        F.scaled_dot_product_attention = original
    assert len(calls) == 1 and calls[0][2] == TEXT_TOKENS  # one fused call, over the text tokens only
    assert seen == [torch.Size([2, 2 * NUM_TOKENS, CONTEXT])]  # ID keys computed from the ID tokens only
    assert processor.activation_map is None and processor.id_attention_probs is None


def test_saa_matches_diffusers_attention_when_lora_is_zero_and_no_ids():
    unet = tiny_unet()
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    hidden = torch.randn(2, 256, 32)
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        expected = attn(hidden)
        install_saa(unet, rank=4, num_tokens=NUM_TOKENS)
        torch.testing.assert_close(attn(hidden), expected)


def test_saa_inputs_name_what_is_wrong():
    unet = tiny_unet()
    with pytest.raises(ValueError, match="install_saa"):
        saa_processors(unet)
    install_saa(unet, rank=4, num_tokens=NUM_TOKENS)
    with pytest.raises(ValueError, match="got 1 boxes for 2 person"):
        SAACall(num_ids=2, boxes=[(0, 0, 1, 1)])
    with pytest.raises(ValueError, match=r"box 1 .* \[0, 1\]"):
        SAACall(num_ids=2, boxes=[(0, 0, 1, 0.5), (0, 0.5, 1, 1.5)])
    with pytest.raises(ValueError, match=r"box 0 .* is empty"):
        SAACall(num_ids=1, boxes=[(0.5, 0, 0.2, 1)])
    with pytest.raises(ValueError, match="mix_scale"):
        SAACall(num_ids=2, mix_scale=0.5)
    with pytest.raises(ValueError, match="boost must be >= 0"):
        SAACall(boost=-1.0)
    with pytest.raises(ValueError, match="8 ID tokens"):
        unet(
            torch.randn(1, 4, 16, 16),
            1,
            encoder_hidden_states=torch.randn(1, 5, 32),
            cross_attention_kwargs=saa(num_ids=2),
        )


def test_install_is_idempotent_and_refuses_another_layout():
    unet = tiny_unet()
    install_saa(unet, rank=4, num_tokens=NUM_TOKENS)
    first = dict(saa_processors(unet))
    install_saa(unet, rank=4, num_tokens=NUM_TOKENS)
    assert all(first[name] is p for name, p in saa_processors(unet).items())
    with pytest.raises(ValueError, match="already installed"):
        install_saa(unet, rank=8, num_tokens=NUM_TOKENS)


def test_lora_and_id_weights_train():
    unet = tiny_unet()
    unet.requires_grad_(False)
    install_saa(unet, rank=4, num_tokens=NUM_TOKENS)
    trainable = [name for name, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".processor." in name for name in trainable)  # only SAA weights train
    states = torch.randn(1, TEXT_TOKENS + NUM_TOKENS, 32)
    sample = unet(torch.randn(1, 4, 16, 16), 10, encoder_hidden_states=states, cross_attention_kwargs=saa(gating=False))
    sample.sample.square().mean().backward()
    processor = next(p for p in saa_processors(unet).values() if p.is_cross_attention)
    assert processor.to_q_lora.up.weight.grad.abs().sum() > 0
    assert processor.to_k_ip.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_two_persons_blended_into_one_box_hide_nothing_and_weight_the_first(two_person_unet):
    unet, states = two_person_unet
    latents = torch.randn(2, 4, 16, 16)
    call = saa(num_ids=2, boxes=[(0.2, 0.2, 0.8, 0.8)], mix_scale=1.0, return_activation_maps=True)
    unet(latents, 500, encoder_hidden_states=states, cross_attention_kwargs=call)
    for probs in saa_id_attention_probs(unet).values():
        assert torch.all(probs > 0)  # nothing hidden: both persons' tokens are one blended face
        second = probs[..., NUM_TOKENS:]  # mix_scale 1: the second person's logits are scaled to 0
        torch.testing.assert_close(second, second[..., :1].expand_as(second))


def test_id_projections_start_as_copies_of_the_layer_keys_and_values():
    unet = tiny_unet()
    install_saa(unet, rank=4, num_tokens=NUM_TOKENS)
    for name, processor in saa_processors(unet).items():
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if processor.is_cross_attention:
            assert torch.equal(processor.to_k_ip.weight, attn.to_k.weight)
            assert torch.equal(processor.to_v_ip.weight, attn.to_v.weight)
        else:
            assert not hasattr(processor, "to_k_ip")


@torch.no_grad()
def test_half_precision_base_with_float32_lora_runs_close_to_float32(two_person_unet):
    unet, states = two_person_unet
    latents = torch.randn(2, 4, 16, 16)
    expected = unet(
        latents, 500, encoder_hidden_states=states, cross_attention_kwargs=saa(num_ids=2, gating=False)
    ).sample
    half = tiny_unet()
    install_saa(half, rank=4, num_tokens=NUM_TOKENS)
    half.load_state_dict(unet.state_dict())  # base and SAA weights (processors are submodules)
    half.to(torch.bfloat16)
    for processor in saa_processors(half).values():  # LoRA kept in float32, as training does
        for lora in (processor.to_q_lora, processor.to_k_lora, processor.to_v_lora, processor.to_out_lora):
            lora.float()
    call = saa(num_ids=2, gating=False)
    sample = half(latents.bfloat16(), 500, encoder_hidden_states=states.bfloat16(), cross_attention_kwargs=call).sample
    assert sample.dtype == torch.bfloat16
    # diffusers' own AttnProcessor2_0 UNet is ~1 % off in bfloat16 here
    assert (sample.float() - expected).norm() / expected.norm() < 0.03
    call = saa(num_ids=2, boxes=[(0.1, 0.1, 0.5, 0.4), (0.1, 0.6, 0.5, 0.9)], boost=2.0)
    assert torch.isfinite(
        half(latents.bfloat16(), 500, encoder_hidden_states=states.bfloat16(), cross_attention_kwargs=call).sample
    ).all()


def unbatched_guidance_sampler(unet, cond, uncond, layout, boost, boost_steps, steps):
    """DDIM with classifier-free guidance run as two UNet calls per step (unconditional, then conditional),
    each step passing its boost as the pipeline does. Returns the final latents and, per UNet call, whether the
    gate was boosted: a + boost inside the boxes (a in [0, 1]) rather than a <= 1."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    boosted = []
    for step, t in enumerate(scheduler.timesteps):
        call = {"saa": dataclasses.replace(layout, boost=boost_for_step(step, boost, boost_steps))}
        noise = []
        for states in (uncond, cond):
            noise.append(unet(latents, t, encoder_hidden_states=states, cross_attention_kwargs=call).sample)
            lowest = min(float(gate.min()) for gate in saa_activation_maps(unet).values())  # boxes cover the image
            highest = max(float(gate.max()) for gate in saa_activation_maps(unet).values())
            assert lowest >= boost or highest <= 1 + 1e-6
            boosted.append(lowest >= boost)
        latents = scheduler.step(noise[0] + 5.0 * (noise[1] - noise[0]), t, latents).prev_sample
    return latents, boosted


@torch.no_grad()
def test_boost_covers_the_first_boost_steps_denoising_steps_with_unbatched_guidance(two_person_unet):
    """Two UNet calls per step: both are boosted during the first 3 of 5 steps, and a second run is identical
    (nothing is counted between calls)."""
    unet, cond = two_person_unet
    uncond = torch.cat([torch.zeros_like(cond[:, :TEXT_TOKENS]), cond[:, TEXT_TOKENS:] * 0.1], dim=1)
    layout = SAACall(num_ids=2, boxes=[(0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)], return_activation_maps=True)
    latents, boosted = unbatched_guidance_sampler(unet, cond, uncond, layout, boost=2.0, boost_steps=3, steps=5)
    assert boosted == [True, True] * 3 + [False, False] * 2
    again, boosted_again = unbatched_guidance_sampler(unet, cond, uncond, layout, boost=2.0, boost_steps=3, steps=5)
    assert boosted_again == boosted and torch.equal(again, latents)
