"""The ComfyUI node pack (`comfyui/`) on the real ComfyUI engine (../shared/vendor), started once for this module.

- One UNet call: the MODEL patched by the pack equals the project's diffusers UNet with SAA (same base weights,
  latents, timestep, text and face tokens) within 1e-4, for SD 1.5 and SDXL layouts; the input MODEL gives the
  same output bit for bit after the patched one ran.
- One FLUX.1 transformer call likewise: ComfyUI's Flux (loaded by ComfyUI from tiny-random-flux's diffusers
  weights) patched by the pack equals diffusers' FluxTransformer2DModel with the project's SAA.
- Workflows through ComfyUI's executor: the shipped examples (one and two people) validate and run to an image
  on a tiny FAKE checkpoint with real photos; bad input stops at the node with one line, and the next prompt runs.

The models are tiny and random (FAKE): the images are noise; the tests check the math and the plumbing.
"""

import copy
import dataclasses
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from comfyui_engine import PACK, TINY_CLIP, TINY_T5, comfy_unet_state_dict, start, tiny_unet
from safetensors.torch import save_file

from dynamicid.infer.weights import DynamicIDModules
from dynamicid.models import SAACall, load_dynamicid, load_release_checkpoint
from dynamicid.testing import (
    build_tiny_random,
    build_tiny_random_flux,
    random_parts,
    save_random_weights,
    save_release_layout,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TWO_BOXES = ((0.1, 0.1, 0.5, 0.4), (0.1, 0.6, 0.5, 0.9))
SIGMAS = torch.tensor([14.6, 9.0, 5.0, 2.5, 1.0, 0.0])  # a sampler's schedule: the boost is set by the step


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = start(tmp_path_factory.mktemp("comfyui"))
    yield engine
    engine.close()


def build_weights(family: str, folder, embedding_dim: int = 128):
    """Random DynamicID weights (our format) for the tiny `family` denoiser (a UNet with ComfyUI's norm groups,
    or tiny-random-flux's transformer); returns the diffusers denoiser carrying them (SAA installed, LoRA `up`
    random), its base weights before SAA, and the weights file."""
    if family == "flux":
        base = build_tiny_random_flux()
    else:
        base = build_tiny_random("tiny-random" if family == "sd15" else "tiny-random-sdxl")
        base = dataclasses.replace(base, denoiser=tiny_unet(family))
    plain = {k: v.clone() for k, v in base.denoiser.state_dict().items()}
    analyzer = SimpleNamespace(embedding_dim=embedding_dim, embedding_model="dlib-resnet-128")
    parts = random_parts(base, analyzer)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # ID projections unlike the layers' own to_k / to_v
        torch.manual_seed(1)
        for module in base.denoiser.attn_processors.values():
            for projection in ("to_k_ip", "to_v_ip", "to_k_id", "to_v_id"):
                if hasattr(module, projection):
                    weight = getattr(module, projection).weight
                    weight.add_(torch.randn_like(weight) * 0.1)
    path = save_random_weights(parts, folder / f"tiny-{family}.safetensors")
    return SimpleNamespace(unet=base.denoiser, plain=plain, path=path, parts=parts, base=base)


@pytest.fixture(scope="module", params=["sd15", "sdxl", "sd15-release"])
def unet_pair(request, engine, tmp_path_factory):
    """(the diffusers UNet with SAA, the ComfyUI MODEL of the same base weights, the pack's SAA processors), the
    weights read from our file, or from the release's layout (SAA index-keyed in attn_processors order)."""
    family, _, layout = request.param.partition("-")
    made = build_weights(family, tmp_path_factory.mktemp(family))
    plain_unet = tiny_unet(family)
    plain_unet.load_state_dict(made.plain)
    model = engine.sd.load_diffusion_model_state_dict(comfy_unet_state_dict(engine, plain_unet))
    identity = engine.pack_module("identity")
    modules = DynamicIDModules(made.parts.face_encoder, None, None, "dlib-resnet-128")
    weights = load_dynamicid(made.path)
    if layout == "release":
        weights = load_release_checkpoint(save_release_layout(made.parts, made.path.parent / "release")["saa"])
    parts = identity.DynamicIDParts(weights, modules, None, None, made.path.name)
    return SimpleNamespace(family=family, unet=made.unet, model=model, processors=parts.processors(model))


def unet_inputs(family: str, width: int, num_ids: int, cfg: bool, latent=(8, 8)):
    generator = torch.Generator().manual_seed(3)
    batch = 2 if cfg else 1
    inputs = SimpleNamespace(
        x=torch.randn(batch, 4, *latent, generator=generator),
        t=torch.tensor([500.0] * batch),
        text=torch.randn(batch, 77, width, generator=generator),
        cond=torch.randn(1, 4 * num_ids, width, generator=generator),
        uncond=torch.randn(1, 4 * num_ids, width, generator=generator),
        added=None,
        y=None,
    )
    if family == "sdxl":
        pooled = torch.randn(batch, 32, generator=generator)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)
        inputs.added = {"text_embeds": pooled, "time_ids": time_ids}
    return inputs


def diffusers_output(unet, inputs, call: SAACall, cfg: bool) -> torch.Tensor:
    ids = torch.cat([inputs.uncond, inputs.cond]) if cfg else inputs.cond
    states = torch.cat([inputs.text, ids], dim=1)
    with torch.no_grad():
        return unet(
            inputs.x, inputs.t, states, added_cond_kwargs=inputs.added, cross_attention_kwargs={"saa": call}
        ).sample


def comfy_output(engine, model, inputs, options: dict) -> torch.Tensor:
    """One call of the MODEL's UNet as a sampler makes it, with its weight patches applied by ComfyUI."""
    engine.model_management.load_models_gpu([model])
    transformer_options = {**copy.copy(model.model_options["transformer_options"]), **options}
    with torch.no_grad():
        return model.model.diffusion_model(
            inputs.x, timesteps=inputs.t, context=inputs.text, y=inputs.y, transformer_options=transformer_options
        )


def saa_case(layout: dict, cfg: bool, step: int | None, latent: tuple[int, int], batch: int, sigmas: torch.Tensor):
    """A test case's arguments to `patch_model` (SAACall, boost 2 for 2 steps when a sampler runs), the sampler's
    transformer_options (cond/uncond chunks, the sigma of `step`), and the SAACall the diffusers side gets for
    that step (the image size in pixels: the latent's x 8)."""
    boost, boost_steps = (2.0, 2) if step is not None else (0.0, 0)
    settings = SAACall(**layout)
    reference = dataclasses.replace(
        settings,
        image_size=(latent[0] * 8, latent[1] * 8),
        boost=boost if step is not None and step < boost_steps else 0.0,
    )
    options = {"cond_or_uncond": [1, 0] if cfg else [0]}
    if step is not None:
        options |= {"sample_sigmas": sigmas, "sigmas": sigmas[step : step + 1].expand(batch)}
    return SimpleNamespace(patch=(settings, boost, boost_steps), options=options, reference=reference)


CASES = {
    "one-person": ({"num_ids": 1}, False, None),
    "two-boxes-boost": ({"num_ids": 2, "boxes": TWO_BOXES}, True, 0),
    "two-boxes-after-boost": ({"num_ids": 2, "boxes": TWO_BOXES}, True, 3),
    "two-strips-gating-off": ({"num_ids": 2, "gating": False}, True, 0),
    "two-boxes-wide": ({"num_ids": 2, "boxes": TWO_BOXES, "id_scale": 0.7}, True, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_patched_model_equals_diffusers_saa(engine, unet_pair, case):
    layout, cfg, step = CASES[case]
    family, unet = unet_pair.family, unet_pair.unet
    latent = (8, 16) if case == "two-boxes-wide" else (8, 8)
    width = int(unet.config.cross_attention_dim)
    inputs = unet_inputs(family, width, layout["num_ids"], cfg, latent)
    if inputs.added is not None:  # SDXL: ComfyUI's `y` is the pooled text and the size ids' embeddings side by side
        time = unet.add_time_proj(inputs.added["time_ids"].flatten()).reshape(len(inputs.x), -1)
        inputs.y = torch.cat([inputs.added["text_embeds"], time], dim=-1)
    run = saa_case(layout, cfg, step, latent, len(inputs.x), SIGMAS)

    before, got = before_and_patched(engine, unet_pair.model, unet_pair.processors, inputs, run, comfy_output)
    expected = diffusers_output(unet, inputs, run.reference, cfg)

    assert (got - expected).abs().max().item() < 1e-4
    assert (got - before).abs().max().item() > 1e-3  # SAA changed the output: the comparison is not vacuous


def before_and_patched(engine, model, processors, inputs, run, output) -> tuple[torch.Tensor, torch.Tensor]:
    """`output` (one denoiser call) of the MODEL, then of the pack's patched clone; the MODEL gives the same
    output bit for bit afterwards and holds none of the clone's patches."""
    model_patch = engine.pack_module("model_patch")
    faces = model_patch.Faces(inputs.cond, inputs.uncond)
    before = output(engine, model, inputs, run.options)
    patched = model_patch.patch_model(model, processors, faces, *run.patch)
    got = output(engine, patched, inputs, run.options)
    assert torch.equal(before, output(engine, model, inputs, run.options))
    assert {"patches_replace", "wrappers"}.isdisjoint(model.model_options["transformer_options"])
    assert not model.patches
    return before, got


def test_every_cross_attention_layer_is_patched(engine, unet_pair):
    """Every attn2 module of the MODEL has a replace patch under the key its transformer block looks up."""
    model_patch = engine.pack_module("model_patch")
    faces = model_patch.Faces(torch.zeros(1, 4, 1), torch.zeros(1, 4, 1))
    patched = model_patch.patch_model(unet_pair.model, unet_pair.processors, faces, SAACall(), 0.0, 0)
    keys = set(patched.model_options["transformer_options"]["patches_replace"]["attn2"])
    walked = []
    for name, _ in unet_pair.model.model.diffusion_model.named_modules():
        if name.endswith(".attn2"):
            kind, block, *_ = name.split(".")
            index = int(name.split("transformer_blocks.")[1].split(".")[0])
            walked.append(({"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[kind],
                           0 if kind == "middle_block" else int(block), index))  # fmt: skip
    assert keys == set(walked)
    assert len(patched.patches) == 4 * len(unet_pair.processors)


# ---- FLUX.1 ----

FLUX_CASES = {  # SAACall fields, CFG (cond and uncond chunks), denoising step (None: no sampler), latent size
    "one-person": ({"num_ids": 1}, False, None, (8, 8)),
    "two-boxes-boost": ({"num_ids": 2, "boxes": TWO_BOXES}, True, 0, (8, 8)),
    "two-boxes-after-boost": ({"num_ids": 2, "boxes": TWO_BOXES}, True, 3, (8, 8)),
    "two-strips-gating-off": ({"num_ids": 2, "gating": False}, True, 0, (8, 8)),
    "two-boxes-wide": ({"num_ids": 2, "boxes": TWO_BOXES, "id_scale": 0.7}, False, 1, (8, 16)),
    "two-boxes-tall-id-scale-0": ({"num_ids": 2, "boxes": TWO_BOXES, "id_scale": 0.0}, True, 0, (12, 8)),
}


@pytest.fixture(scope="module")
def flux_pair(engine, tmp_path_factory):
    """The diffusers tiny-random-flux transformer with SAA (weights from our file), the ComfyUI MODEL that
    ComfyUI's own loader builds from the same base weights (diffusers layout, converted by ComfyUI), and the
    pack's SAA processors for it."""
    made = build_weights("flux", tmp_path_factory.mktemp("flux"))
    model = engine.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in made.plain.items()})
    modules = DynamicIDModules(made.parts.face_encoder, None, None, "dlib-resnet-128")
    parts = engine.pack_module("identity").DynamicIDParts(load_dynamicid(made.path), modules, None, None, "flux")
    return SimpleNamespace(transformer=made.unet.eval(), model=model, processors=parts.processors(model))


def flux_inputs(num_ids: int, cfg: bool, latent: tuple[int, int]):
    generator = torch.Generator().manual_seed(4)
    batch = 2 if cfg else 1
    return SimpleNamespace(
        x=torch.randn(batch, 16, *latent, generator=generator),
        t=torch.tensor([0.6] * batch),
        text=torch.randn(batch, 7, 32, generator=generator),
        pooled=torch.randn(batch, 32, generator=generator),
        guidance=torch.tensor([3.5] * batch),
        cond=torch.randn(1, 4 * num_ids, 32, generator=generator),
        uncond=torch.randn(1, 4 * num_ids, 32, generator=generator),
    )


def diffusers_flux_output(transformer, inputs, call: SAACall, cfg: bool) -> torch.Tensor:
    """The diffusers transformer on the latents packed as FluxPipeline packs them, unpacked back."""
    from diffusers import FluxPipeline

    batch, channels, height, width = inputs.x.shape
    packed = FluxPipeline._pack_latents(inputs.x, batch, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32)
    ids = torch.cat([inputs.uncond, inputs.cond]) if cfg else inputs.cond
    with torch.no_grad():
        out = transformer(
            hidden_states=packed,
            timestep=inputs.t,
            guidance=inputs.guidance,
            pooled_projections=inputs.pooled,
            encoder_hidden_states=inputs.text,
            txt_ids=torch.zeros(inputs.text.shape[1], 3),
            img_ids=image_ids,
            joint_attention_kwargs={"saa": call, "id_tokens": ids},
            return_dict=False,
        )[0]
    return FluxPipeline._unpack_latents(out, height * 8, width * 8, 8)


def comfy_flux_output(engine, model, inputs, options: dict) -> torch.Tensor:
    """One call of the MODEL's Flux as a sampler makes it, with its weight patches applied by ComfyUI (without
    gradients, as ComfyUI runs its nodes)."""
    transformer_options = {**copy.copy(model.model_options["transformer_options"]), **options}
    with torch.no_grad():
        engine.model_management.load_models_gpu([model])
        return model.model.diffusion_model(
            inputs.x, inputs.t, inputs.text, y=inputs.pooled, guidance=inputs.guidance,
            transformer_options=transformer_options,
        )  # fmt: skip


@pytest.mark.parametrize("case", list(FLUX_CASES))
def test_patched_flux_model_equals_diffusers_flux_saa(engine, flux_pair, case):
    layout, cfg, step, latent = FLUX_CASES[case]
    inputs = flux_inputs(layout["num_ids"], cfg, latent)
    run = saa_case(layout, cfg, step, latent, len(inputs.x), SIGMAS / SIGMAS[0])  # flow-matching sigmas: 1 to 0

    before, got = before_and_patched(engine, flux_pair.model, flux_pair.processors, inputs, run, comfy_flux_output)
    expected = diffusers_flux_output(flux_pair.transformer, inputs, run.reference, cfg)

    assert (got - expected).abs().max().item() < 1e-4
    assert (got - before).abs().max().item() > 1e-3  # SAA (its LoRA at least) changed the output
    if run.reference.id_scale:  # the ID branch itself counts: without it (id_scale 0) the output differs
        no_ids = diffusers_flux_output(
            flux_pair.transformer, inputs, dataclasses.replace(run.reference, id_scale=0), cfg
        )
        assert (got - no_ids).abs().max().item() > 1e-3


def test_flux_weights_with_id_tokens_of_another_width(engine, flux_pair, tmp_path):
    """Flux weights whose ID tokens are not as wide as the transformer (those started from XLabs' IP-Adapter read
    T5-wide tokens: 4096 on FLUX.1; 48 on the 32-wide tiny): the pack installs them at their width and the patched
    MODEL equals diffusers with SAA."""
    from dynamicid.models import FaceEncoder, save_dynamicid
    from dynamicid.models.saa_flux import flux_saa_processors, install_flux_saa

    made = build_weights("flux", tmp_path)
    transformer = build_tiny_random_flux().denoiser.eval()  # the base weights of flux_pair's MODEL
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        install_flux_saa(transformer, rank=4, num_tokens=4, id_dim=48)
        for processor in flux_saa_processors(transformer).values():
            for lora in (processor.to_q_lora, processor.to_k_lora, processor.to_v_lora, processor.to_out_lora):
                torch.nn.init.normal_(lora.up.weight, std=0.02)
        clip_dim = made.parts.face_encoder.clip_embeddings_dim
        encoder = FaceEncoder(cross_attention_dim=48, id_embeddings_dim=128, clip_embeddings_dim=clip_dim, num_tokens=4)
    metadata = dataclasses.replace(made.parts.metadata, cross_attention_dim=48)
    path = save_dynamicid(tmp_path / "wide.safetensors", metadata=metadata, face_encoder=encoder, unet=transformer)
    modules = DynamicIDModules(encoder, None, None, "dlib-resnet-128")
    parts = engine.pack_module("identity").DynamicIDParts(load_dynamicid(path), modules, None, None, path.name)
    processors = parts.processors(flux_pair.model)
    assert {p.id_dim for p in processors.values()} == {48}

    inputs = flux_inputs(2, True, (8, 8))
    inputs.cond, inputs.uncond = torch.randn(1, 8, 48), torch.randn(1, 8, 48)
    run = saa_case({"num_ids": 2, "boxes": TWO_BOXES}, True, 0, (8, 8), 2, SIGMAS / SIGMAS[0])
    before, got = before_and_patched(engine, flux_pair.model, processors, inputs, run, comfy_flux_output)
    expected = diffusers_flux_output(transformer, inputs, run.reference, True)
    assert (got - expected).abs().max().item() < 1e-4
    assert (got - before).abs().max().item() > 1e-3


def test_flux_id_scale_0_without_lora_equals_the_unpatched_model(engine, flux_pair):
    """SAA weights without LoRA (rank 0) at id_scale 0: the patched MODEL computes what Flux computes."""
    from dynamicid.models.saa_flux import FluxSAAProcessor

    model_patch = engine.pack_module("model_patch")
    inputs = flux_inputs(2, True, (8, 8))
    processors = {name: FluxSAAProcessor(32, rank=0) for name in flux_pair.processors}
    faces = model_patch.Faces(inputs.cond, inputs.uncond)
    options = {"cond_or_uncond": [1, 0]}
    settings = SAACall(num_ids=2, boxes=TWO_BOXES, id_scale=0.0)
    patched = model_patch.patch_model(flux_pair.model, processors, faces, settings, 2.0, 2)
    assert torch.equal(
        comfy_flux_output(engine, patched, inputs, options), comfy_flux_output(engine, flux_pair.model, inputs, options)
    )
    ids = model_patch.patch_model(
        flux_pair.model, processors, faces, dataclasses.replace(settings, id_scale=1.0), 2.0, 2
    )
    assert not torch.equal(
        comfy_flux_output(engine, ids, inputs, options), comfy_flux_output(engine, flux_pair.model, inputs, options)
    )


def test_flux_model_stored_in_fp8_keeps_the_id_branch_in_its_compute_dtype(engine, flux_pair):
    """A MODEL whose weights are stored in float8 (ComfyUI's `fp8_e4m3fn` weight dtype) computes in another dtype:
    the ID branch's weights go there unrounded, and the patched MODEL runs."""
    model_patch = engine.pack_module("model_patch")
    state = {k: v.clone() for k, v in flux_pair.model.model.diffusion_model.state_dict().items()}
    model = engine.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float8_e4m3fn})
    assert model.model.manual_cast_dtype == torch.float32
    processors = copy.deepcopy(flux_pair.processors)
    weights = {name: p.to_k_id.weight.clone() for name, p in processors.items()}
    inputs = flux_inputs(2, False, (8, 8))
    faces = model_patch.Faces(inputs.cond, inputs.uncond)
    patched = model_patch.patch_model(model, processors, faces, SAACall(num_ids=2, boxes=TWO_BOXES), 0.0, 0)
    out = comfy_flux_output(engine, patched, inputs, {})
    assert out.dtype == torch.float32 and bool(out.isfinite().all())
    replaced = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    for name, weight in weights.items():
        patch = replaced[("double_block", int(name.split(".")[1]))]
        assert torch.equal(patch.processor.to_k_id.weight, weight), name


def test_every_flux_double_block_is_patched_and_earlier_patches_still_run(engine, flux_pair):
    """Each double-stream block of the MODEL gets a replace patch, its LoRA goes to the q/k/v rows of the fused
    qkv weight and to the output projection, and a replace patch that was there before still runs."""
    model_patch = engine.pack_module("model_patch")
    calls = []

    def earlier(args, extra):
        calls.append(1)
        return extra["original_block"](args)

    base = flux_pair.model.clone()
    base.set_model_patch_replace(earlier, "dit", "double_block", 0)
    faces = model_patch.Faces(torch.zeros(1, 4, 32), torch.zeros(1, 4, 32))
    patched = model_patch.patch_model(base, flux_pair.processors, faces, SAACall(), 0.0, 0)
    blocks = len(flux_pair.model.model.diffusion_model.double_blocks)
    replaced = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    assert set(replaced) == {("double_block", i) for i in range(blocks)}
    width = flux_pair.model.model.diffusion_model.hidden_size
    for i in range(blocks):
        qkv = patched.patches[f"diffusion_model.double_blocks.{i}.img_attn.qkv.weight"]
        assert sorted(p[3] for p in qkv) == [(0, 0, width), (0, width, width), (0, 2 * width, width)]
        assert len(patched.patches[f"diffusion_model.double_blocks.{i}.img_attn.proj.weight"]) == 1
    assert len(patched.patches) == 2 * blocks
    comfy_flux_output(engine, patched, flux_inputs(1, False, (8, 8)), {})
    assert calls == [1]
    clone = patched.clone()  # clones share the ID branch's weights (ComfyUI deep-copies patches on clone)
    cloned = clone.model_options["transformer_options"]["patches_replace"]["dit"]
    assert all(cloned[key].processor is replaced[key].processor for key in replaced)


def test_apply_node_on_flux_defaults_to_the_flux_pipelines_boost(engine, flux_pair, tmp_path):
    """Apply DynamicID's boost -1 on a Flux MODEL: DynamicIDFluxPipeline's schedule with several people (its
    share of 28 steps), none with one."""
    from dynamicid.infer.pipeline import SINGLE_PERSON_BOOST
    from dynamicid.infer.pipeline_flux import DynamicIDFluxPipeline

    made = build_weights("flux", tmp_path)
    modules = DynamicIDModules(made.parts.face_encoder, None, None, "dlib-resnet-128")
    parts = engine.pack_module("identity").DynamicIDParts(load_dynamicid(made.path), modules, None, None, "flux")
    person = engine.pack_module("identity").PersonTokens(torch.randn(4, 32), torch.randn(4, 32), None, {})
    apply = engine.pack_module("nodes").ApplyDynamicID
    for people, expected in ((2, DynamicIDFluxPipeline.multi_person_boost), (1, SINGLE_PERSON_BOOST)):
        faces = {f"face_{i}": person for i in range(2, people + 1)}
        (patched,) = apply.execute(flux_pair.model, parts, person, **faces).args
        wrappers = patched.model_options["transformer_options"]["wrappers"]["diffusion_model"]["dynamicid"]
        assert (wrappers[0].schedule.boost, wrappers[0].schedule.boost_steps) == expected


# ---- workflows through ComfyUI's executor ----


@pytest.fixture(scope="module")
def workflow_files(engine, shared_faces, tmp_path_factory):
    """A tiny SD 1.5 checkpoint (UNet, CLIP, TAESD-style VAE: ComfyUI's own small decoder), a tiny FLUX.1 in
    separate files (transformer, CLIP-L, T5, VAE), DynamicID weights for them and for a tiny SDXL, the CLIP image
    encoder folders, and reference photos in ComfyUI's input folder."""
    from dynamicid.faces import FaceAnalyzer

    models = engine.base / "models"
    analyzer = FaceAnalyzer("embedded")
    sd15 = build_weights("sd15", models / "dynamicid", analyzer.embedding_dim)
    build_weights("sdxl", models / "dynamicid", analyzer.embedding_dim)
    sd15.base.image_encoder.save_pretrained(models / "dynamicid" / "image_encoder")

    plain_unet = tiny_unet("sd15")
    plain_unet.load_state_dict(sd15.plain)
    text, vae = tiny_text_encoder(), tiny_vae(latent_channels=4)
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in comfy_unet_state_dict(engine, plain_unet).items()}
    checkpoint |= {f"cond_stage_model.transformer.{k}": v for k, v in text.items()}
    checkpoint |= {f"first_stage_model.{k}": v for k, v in vae.items()}
    save_file(checkpoint, str(models / "checkpoints" / "tiny-sd15.safetensors"))

    # FLUX.1 as its users load it: the transformer (diffusers layout, converted by ComfyUI), CLIP-L, T5, the VAE
    flux = build_weights("flux", models / "dynamicid", analyzer.embedding_dim)
    flux.base.image_encoder.save_pretrained(models / "dynamicid" / "image_encoder_flux")
    save_file(
        {k: v.contiguous() for k, v in flux.plain.items()}, str(models / "diffusion_models" / "tiny-flux.safetensors")
    )
    # clip_l.safetensors' key names (this transformers version's CLIPTextModel has no `text_model.` level)
    clip_l = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text.items()}
    save_file(clip_l, str(models / "text_encoders" / "tiny-clip-l.safetensors"))
    save_file(tiny_t5(), str(models / "text_encoders" / "tiny-t5.safetensors"))
    save_file(tiny_vae(latent_channels=16), str(models / "vae" / "tiny-flux-vae.safetensors"))

    identities = shared_faces / "identities"
    for name, source in {
        "obama.jpg": identities / "obama" / "obama.jpg",
        "biden.jpg": identities / "biden" / "biden.jpg",
        "dog.jpg": shared_faces / "no_face" / "dog.jpg",
    }.items():
        shutil.copy(source, engine.base / "input" / name)
    return engine.base


def tiny_text_encoder() -> dict[str, torch.Tensor]:
    """CLIP-L's text model at ComfyUI's tiny widths (`TINY_CLIP`), seeded."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        config = {k: v for k, v in TINY_CLIP.items() if k != "hidden_act"}
        text = CLIPTextModel(CLIPTextConfig(**config, hidden_act="quick_gelu"))
    return {k: v.contiguous() for k, v in text.state_dict().items()}


def tiny_t5() -> dict[str, torch.Tensor]:
    """T5's encoder at ComfyUI's tiny widths (`TINY_T5`; transformers' key names are ComfyUI's), seeded."""
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        config = {k: v for k, v in TINY_T5.items() if k != "model_type"}
        t5 = T5EncoderModel(T5Config(**config, feed_forward_proj="gated-gelu"))
    return {k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}


def tiny_vae(latent_channels: int) -> dict[str, torch.Tensor]:
    """ComfyUI's TAESD decoder/encoder for `latent_channels`-channel latents, seeded."""
    from comfy.taesd.taesd import TAESD

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        vae = TAESD(latent_channels=latent_channels)
        with torch.no_grad():  # small weights and a mid-grey bias: as built, it decodes to inf or NaN
            for conv in (m for m in vae.modules() if isinstance(m, torch.nn.Conv2d)):
                torch.nn.init.normal_(conv.weight, std=0.05)
                if conv.bias is not None:
                    conv.bias.zero_()
            vae.taesd_decoder[-1].bias.fill_(0.5)
    return {k: v.contiguous() for k, v in vae.state_dict().items()}


FLUX_FILES = {  # the Flux example's loaders on the tiny files
    "UNETLoader": {"unet_name": "tiny-flux.safetensors"},
    "DualCLIPLoader": {"clip_name1": "tiny-clip-l.safetensors", "clip_name2": "tiny-t5.safetensors"},
    "VAELoader": {"vae_name": "tiny-flux-vae.safetensors"},
}


def example(name: str, **changes) -> dict:
    """A shipped example workflow on the tiny models: 64x64, 2 steps; `changes` set node inputs {node: {k: v}}."""
    workflow = json.loads((PACK / "workflows" / name).read_text())
    for node in workflow.values():
        inputs, kind = node["inputs"], node["class_type"]
        flux = "flux" in name
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = "tiny-sd15.safetensors"
        elif kind in FLUX_FILES:
            inputs |= FLUX_FILES[kind]
        elif kind == "LoadDynamicID":
            inputs["weights"] = "tiny-flux.safetensors" if flux else "tiny-sd15.safetensors"
            inputs["image_encoder"] = "dynamicid/image_encoder_flux" if flux else "dynamicid/image_encoder"
            inputs["face_backend"] = "embedded"
        elif kind == "LoadImage":
            inputs["image"] = "obama.jpg" if inputs["image"] == "person1.png" else "biden.jpg"
        elif kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs |= {"width": 64, "height": 64}
        elif kind == "KSampler":
            inputs["steps"] = 2
    for node, values in changes.items():
        workflow[node]["inputs"] |= values
    return workflow


def saved_image(engine, outputs: dict) -> np.ndarray:
    from PIL import Image

    images = outputs["22"]["images"]
    assert len(images) == 1
    return np.asarray(Image.open(engine.base / "output" / images[0]["subfolder"] / images[0]["filename"]))


@pytest.mark.parametrize(
    "name", ["dynamicid_one_person.json", "dynamicid_two_people.json", "dynamicid_flux_two_people.json"]
)
def test_example_workflows_validate_and_run(engine, workflow_files, name):
    valid, error, outputs = engine.run(engine.executor(), example(name))
    assert valid, error
    assert error is None, error
    image = saved_image(engine, outputs)
    assert image.shape == (64, 64, 3)
    assert image.std() > 1  # an image, not a constant
    people = [n for n in example(name).values() if n["class_type"] == "DynamicIDPerson"]
    person_previews = [outputs[k]["images"] for k, n in example(name).items() if n["class_type"] == "DynamicIDPerson"]
    assert len(person_previews) == len(people) and all(len(p) == 1 for p in person_previews)


@pytest.mark.parametrize("name", ["dynamicid_two_people.json", "dynamicid_flux_two_people.json"])
def test_patched_workflow_differs_from_plain_model(engine, workflow_files, name):
    """The two-person image with id_scale 0 (LoRA only) differs from the full SAA one: the faces reach the
    denoiser."""
    executor = engine.executor()
    _, error, with_ids = engine.run(executor, example(name))
    assert error is None, error
    first = saved_image(engine, with_ids).astype(int)
    _, error, without = engine.run(executor, example(name, **{"6": {"id_scale": 0.0}}))
    assert error is None, error
    assert np.abs(first - saved_image(engine, without).astype(int)).max() > 0


TWO, FLUX_TWO = "dynamicid_two_people.json", "dynamicid_flux_two_people.json"
SD15_PARTS = {"weights": "tiny-sd15.safetensors", "image_encoder": "dynamicid/image_encoder"}


@pytest.mark.parametrize(
    ("name", "changes", "node", "message"),
    [
        (TWO, {"12": {"image": "dog.jpg"}}, "13", "no face found in reference image"),
        (TWO, {"2": {"weights": "tiny-sdxl.safetensors"}}, "6", "holds weights made for SDXL"),
        (TWO, {"5": {"boxes": "0.1,0.1,0.5,0.4\n0.1,0.6,0.5,0.9\n0.6,0.1,0.9,0.9"}}, "6", "3 boxes for 2 people"),
        (
            FLUX_TWO,
            {"2": SD15_PARTS},
            "6",
            "holds weights made for Stable Diffusion 1.5 (base_family 'sd15') but the base model is FLUX.1",
        ),
    ],
    ids=["no-face", "other-family", "more-boxes-than-people", "sd-weights-on-flux"],
)
def test_bad_input_is_a_one_line_node_error_and_the_queue_goes_on(engine, workflow_files, name, changes, node, message):
    executor = engine.executor()
    valid, error, _ = engine.run(executor, example(name, **changes))
    assert valid
    assert error is not None and error["node_id"] == node
    assert message in error["exception_message"]
    assert "\n" not in error["exception_message"].strip()
    _, error, outputs = engine.run(executor, example(name))
    assert error is None, error
    assert saved_image(engine, outputs).shape == (64, 64, 3)
