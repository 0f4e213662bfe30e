"""`--init-from` an XLabs Flux IP-Adapter file on a Flux base: strict, every tensor mapped, inference loads the result.

The file is a FAKE written here with `safetensors.torch.save_file` from the layout's tensor names and shapes, as
diffusers' `FluxIPAdapterMixin.load_ip_adapter` reads them (`double_blocks.{i}.processor.
ip_adapter_double_stream_{k,v}_proj.*`: Linear T5 width -> width, one per double-stream block;
`ip_adapter_proj_model.proj.*`: Linear CLIP ViT-L width -> num_tokens x T5 width; `ip_adapter_proj_model.norm.*`:
LayerNorm of the T5 width), scaled down: 4096 -> the base's T5 width, 3072 -> its width, 768 -> 24. Where each
tensor must land is written out below by name (not computed by the code under test). tiny-random-flux's T5 is as
wide as its transformer (32), so the tests that must tell the two widths apart use a FAKE variant whose T5 (and
the transformer's `joint_attention_dim`) is 48 wide, as FLUX.1-dev's T5 (4096) is wider than its blocks (3072).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from dynamicid.curation.pipeline import build_dataset
from dynamicid.infer import Person
from dynamicid.infer.pipeline_flux import DynamicIDFluxPipeline
from dynamicid.models import load_dynamicid
from dynamicid.testing import build_tiny_random_flux
from dynamicid.train.anchor import read_init, train_anchor
from dynamicid.train.cli import main as train
from dynamicid.train.config import AnchorConfig, ReconfigureConfig
from dynamicid.train.reconfigure import train_reconfigure

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLIP_L = 24  # stands for CLIP ViT-L's 768-wide image embedding
TOKENS = 4
WIDE_T5 = 48
QUICK = {"base_model": "tiny-random-flux", "resolution": 64, "report_to": "none", "max_steps": 1, "eval_samples": 2}


def xlabs_tensors(blocks: int, width: int, t5: int, tokens: int = TOKENS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under XLabs' names and shapes."""
    shapes = {
        "ip_adapter_proj_model.proj.weight": (tokens * t5, CLIP_L),
        "ip_adapter_proj_model.proj.bias": (tokens * t5,),
        "ip_adapter_proj_model.norm.weight": (t5,),
        "ip_adapter_proj_model.norm.bias": (t5,),
    }
    for i in range(blocks):
        for kv in "kv":
            shapes[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.weight"] = (width, t5)
            shapes[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.bias"] = (width,)
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def where_it_lands(key: str) -> tuple[str, str]:
    """(part, parameter name) each file tensor must be loaded into."""
    face_encoder = {
        "ip_adapter_proj_model.proj.weight": "proj.2.weight",
        "ip_adapter_proj_model.proj.bias": "proj.2.bias",
        "ip_adapter_proj_model.norm.weight": "norm.weight",
        "ip_adapter_proj_model.norm.bias": "norm.bias",
    }
    if key in face_encoder:
        return "face_encoder", face_encoder[key]
    _, block, _, name, param = key.split(".")
    kv = {"ip_adapter_double_stream_k_proj": "k", "ip_adapter_double_stream_v_proj": "v"}[name]
    return "saa", f"transformer_blocks.{block}.attn.processor.to_{kv}_id.{param}"


def write(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_file(tensors, str(path))
    return path


def wide_t5_flux():
    """FAKE: tiny-random-flux with a 48-wide T5 and the transformer's joint_attention_dim to match."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    base = build_tiny_random_flux()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        base.denoiser = FluxTransformer2DModel.from_config({**base.denoiser.config, "joint_attention_dim": WIDE_T5})
        base.text_encoder_2 = T5EncoderModel(T5Config(**{**base.text_encoder_2.config.to_dict(), "d_model": WIDE_T5}))
    for module in (base.denoiser, base.text_encoder_2):
        module.requires_grad_(False).eval()
    return base


def loaded_values(face_encoder, transformer) -> dict[str, dict[str, torch.Tensor]]:
    processors = {n: p for n, p in transformer.attn_processors.items() if n.startswith("transformer_blocks.")}
    saa = {f"{n}.{k}": v for n, p in processors.items() for k, v in p.state_dict().items()}
    return {"face_encoder": face_encoder.state_dict(), "saa": saa}


def test_the_xlabs_file_loads_strictly_and_maps_every_tensor(tmp_path):
    transformer = wide_t5_flux().denoiser
    tensors = xlabs_tensors(blocks=2, width=32, t5=WIDE_T5)
    path = write(tensors, tmp_path / "flux-ip-adapter.safetensors")
    init = read_init(path, num_tokens=TOKENS, lora_rank=2)
    assert init.source.startswith("xlabs-ip-adapter:flux-ip-adapter.safetensors:")
    assert sorted(init.parts) == ["face_encoder", "saa"]
    init.loader.load_saa_into(transformer)
    encoder = init.loader.build_face_encoder(id_embeddings_dim=512, clip_embeddings_dim=64)
    values = loaded_values(encoder, transformer)
    for key, tensor in tensors.items():
        part, name = where_it_lands(key)
        assert torch.equal(values[part][name], tensor), key
    assert len({where_it_lands(k) for k in tensors}) == len(tensors) == 2 * 2 * 2 + 4  # one parameter per tensor
    # ID tokens as wide as T5's states; the MLP's hidden width is CLIP's; LoRA and the rest start fresh
    processor = transformer.attn_processors["transformer_blocks.1.attn.processor"]
    assert (processor.id_dim, processor.rank) == (WIDE_T5, 2) and not processor.to_q_lora.up.weight.any()
    assert encoder.proj[0].weight.shape == (CLIP_L, 512)
    with torch.no_grad():
        assert encoder(torch.randn(1, 512), torch.randn(1, 5, 64)).shape == (1, TOKENS, WIDE_T5)
    assert "fresh: the face encoder's proj.0 and perceiver_resampler" in init.loader.report()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("extra", "unexpected tensor double_blocks.0.processor.ip_adapter_double_stream_q_proj.weight"),
        ("missing", "missing tensor double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias"),
        ("shape", r"double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight has shape \(32, 40\)"),
        ("blocks", "for 3 double-stream blocks, but the base transformer has 2"),
        ("tokens", r"16 ID tokens per face: set num_tokens=16"),
    ],
)
def test_a_file_that_does_not_fit_is_one_line_naming_file_and_tensor(change, message, tmp_path):
    tensors = xlabs_tensors(
        blocks=3 if change == "blocks" else 2, width=32, t5=32, tokens=16 if change == "tokens" else 4
    )
    if change == "extra":
        tensors["double_blocks.0.processor.ip_adapter_double_stream_q_proj.weight"] = torch.zeros(32, 32)
    elif change == "missing":
        del tensors["double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias"]
    elif change == "shape":
        tensors["double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight"] = torch.zeros(32, 40)
    path = write(tensors, tmp_path / f"{change}.safetensors")
    with pytest.raises(ValueError, match=message) as error:
        read_init(path, num_tokens=TOKENS).loader.load_saa_into(build_tiny_random_flux().denoiser)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.fixture(scope="module")
def curated(tmp_path_factory, identity_photos) -> Path:
    out = tmp_path_factory.mktemp("curated")
    build_dataset(identity_photos("obama", "biden", first=2), out, per_identity=2, progress=False)
    return out


def test_anchoring_from_xlabs_keeps_its_tensors_and_the_later_stages_and_inference_take_t5_wide_tokens(
    curated, tmp_path, shared_faces, reference_analyzer
):
    tensors = xlabs_tensors(blocks=2, width=32, t5=WIDE_T5)
    path = write(tensors, tmp_path / "flux-ip-adapter.safetensors")
    run = {"output_dir": str(tmp_path / "run"), "init_from": str(path), "lora_rank": 2, "train_batch_size": 2}
    # AdamW with lr 0 leaves every weight as loaded
    config = AnchorConfig(**QUICK, **run, dataset=str(curated), learning_rate=0.0)
    weights = load_dynamicid(train_anchor(config, base=wide_t5_flux()))
    md = weights.metadata
    assert md.source.startswith("xlabs-ip-adapter:") and md.base_family == "flux"
    assert (md.cross_attention_dim, md.face_proj_dim, md.num_tokens) == (WIDE_T5, CLIP_L, TOKENS)
    for key, tensor in tensors.items():
        part, name = where_it_lands(key)
        assert torch.equal(weights.state_dicts[part][name], tensor), key

    # cache-tokens and reconfiguration rebuild the face encoder, SAA, IMR and keypoint encoder at that width
    anchor, tokens = str(weights.paths[0]), str(tmp_path / "tokens")
    arguments = ["cache-tokens", "--base-model", "tiny-random-flux", "--anchor", anchor, "--dataset", str(curated)]
    result = CliRunner().invoke(train, [*arguments, "--output", tokens])
    assert result.exit_code == 0, result.output
    small = {"targets_per_identity": 2, "imr_dim": 32, "imr_heads": 2, "imr_dim_head": 16, "keypoint_width": 2}
    config = ReconfigureConfig(
        **QUICK, **small, dataset=str(curated), output_dir=str(tmp_path / "reconfigure"), anchor=anchor, tokens=tokens
    )
    reconfigured = load_dynamicid(train_reconfigure(config, base=wide_t5_flux()))
    assert (reconfigured.metadata.cross_attention_dim, reconfigured.metadata.keypoint_dim) == (WIDE_T5, WIDE_T5)

    pipe = DynamicIDFluxPipeline.from_base(wide_t5_flux())
    pipe.load_dynamicid([anchor, reconfigured.paths[0]], face_analyzer=reference_analyzer)
    pipe.set_progress_bar_config(disable=True)
    person = Person(shared_faces / "identities" / "obama" / "obama.jpg", expression="happy")
    out = pipe("a portrait", [person], height=32, width=32, num_inference_steps=1, max_sequence_length=16)
    assert out.images[0].size == (32, 32) and out.people[0]["edited"]
    assert pipe.id_token_width == WIDE_T5

    # save_pretrained keeps the XLabs-shaped face encoder (its MLP width) and the T5-wide SAA
    settings = {"height": 32, "width": 32, "num_inference_steps": 1, "max_sequence_length": 16, "output_type": "np"}
    expected = pipe("a portrait", [person], generator=torch.Generator().manual_seed(1), **settings).images
    pipe.save_pretrained(tmp_path / "saved")
    loaded = DynamicIDFluxPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    loaded.reference_analyzer = pipe.reference_analyzer  # face analysis is not a component
    assert loaded.id_adapter.face_encoder.proj_dim == CLIP_L
    got = loaded("a portrait", [person], generator=torch.Generator().manual_seed(1), **settings).images
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_the_cli_starts_from_xlabs_on_tiny_random_flux_and_refuses_other_bases(curated, tmp_path):
    path = write(xlabs_tensors(blocks=2, width=32, t5=32), tmp_path / "flux-ip-adapter.safetensors")
    common = [
        "anchor",
        "--dataset",
        str(curated),
        "--init-from",
        str(path),
        "--resolution",
        "64",
        "--report-to",
        "none",
    ]
    common += ["--lora-rank", "2", "--train-batch-size", "2", "--eval-samples", "2", "--max-steps", "1"]
    result = CliRunner().invoke(
        train, [*common, "--base-model", "tiny-random-flux", "--output-dir", str(tmp_path / "a")]
    )
    assert result.exit_code == 0, result.output
    assert "(XLabs Flux IP-Adapter): loaded to_k_id/to_v_id of 2 double-stream blocks" in result.output

    result = CliRunner().invoke(train, [*common, "--base-model", "tiny-random", "--output-dir", str(tmp_path / "b")])
    assert result.exit_code == 2
    error = result.output.strip().splitlines()[-1]
    assert str(path) in error and "FLUX.1" in error and "Stable Diffusion 1.5" in error


def test_a_faceid_file_is_refused_on_a_flux_base(curated, tmp_path):
    faceid = {"image_proj.norm.weight": torch.ones(32), "ip_adapter.1.to_k_ip.weight": torch.ones(32, 32)}
    path = write(faceid, tmp_path / "ip-adapter-faceid-plusv2.safetensors")
    arguments = ["anchor", "--base-model", "tiny-random-flux", "--dataset", str(curated), "--init-from", str(path)]
    result = CliRunner().invoke(train, [*arguments, "--output-dir", str(tmp_path / "run"), "--report-to", "none"])
    assert result.exit_code == 2
    error = result.output.strip().splitlines()[-1]
    assert str(path) in error and "XLabs' Flux IP-Adapter" in error
