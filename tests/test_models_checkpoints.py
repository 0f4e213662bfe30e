"""Checkpoint I/O: our safetensors format, the release's .bin files, IP-Adapter FaceID-Plus files.

Modules are tiny and randomly initialised (fakes standing in for trained weights, which cannot be downloaded);
the release-layout files are written from the golden vectors' weights.
"""

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dynamicid.models import (
    IMR,
    FaceEncoder,
    KeypointEncoder,
    SAACall,
    install_saa,
    saa_state_dict,
)
from dynamicid.models.checkpoints import (
    convert_release,
    load_dynamicid,
    load_ip_adapter_faceid,
    load_release_checkpoint,
    save_dynamicid,
)
from dynamicid.schemas.checkpoint import CheckpointMetadata

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "official"
CASES = json.loads((GOLDEN / "cases.json").read_text())
TINY_UNET = CASES["unet_saa"]["unet_config"]  # cross_attention_dim 32
TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET).eval()


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Random values in every tensor (LoRA `up` included), so a round trip cannot pass by zeros."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return module


def tiny_metadata(**overrides) -> CheckpointMetadata:
    values = {
        "cross_attention_dim": 32,
        "lora_rank": 4,
        "num_tokens": 4,
        "id_embed_dim": 16,
        "clip_embed_dim": 24,
        "imr_depth": 2,
        "imr_dim": 64,
        "keypoint_dim": 32,
        "source": "random",
    }
    return CheckpointMetadata(**{**values, **overrides})


@pytest.fixture
def tiny_parts():
    unet = tiny_unet()
    install_saa(unet, rank=4, num_tokens=4)
    for processor in unet.attn_processors.values():
        randomise(processor, 1)
    return {
        "face_encoder": randomise(FaceEncoder(cross_attention_dim=64, id_embeddings_dim=16, clip_embeddings_dim=24), 2),
        "unet": unet,
        "imr": randomise(IMR(dim=64, dim_head=16, heads=4, embedding_dim=32, txt_dim=32, ff_mult=2, depth=2), 3),
        "keypoint_encoder": randomise(KeypointEncoder(32), 4).eval(),
    }


def test_our_format_round_trips_bit_exactly(tmp_path, tiny_parts):
    metadata = tiny_metadata(cross_attention_dim=64)  # the face encoder and IMR are checked against it
    with pytest.raises(ValueError, match="cross_attention_dim"):  # the UNet's is 32
        save_dynamicid(tmp_path / "w.safetensors", metadata=metadata, **tiny_parts)
    encoder = FaceEncoder(cross_attention_dim=32, id_embeddings_dim=16, clip_embeddings_dim=24)
    randomise(encoder, 5)
    imr = randomise(IMR(dim=64, dim_head=16, heads=4, embedding_dim=32, txt_dim=32, ff_mult=2, depth=2), 3)
    parts = {**tiny_parts, "face_encoder": encoder, "imr": imr}
    path = save_dynamicid(tmp_path / "w.safetensors", metadata=tiny_metadata(), **parts)

    weights = load_dynamicid(path, lora_rank=4, num_tokens=4)
    assert weights.metadata.parts == ["face_encoder", "saa", "imr", "keypoint_encoder"]
    assert weights.imr_config == imr.config
    rebuilt = {
        "face_encoder": weights.build_face_encoder(),
        "imr": weights.build_imr(),
        "keypoint_encoder": weights.build_keypoint_encoder(),
    }
    for name, module in rebuilt.items():
        original = parts[name].state_dict()
        assert all(torch.equal(original[k], v) for k, v in module.state_dict().items()), name
    fresh = tiny_unet(seed=7)
    weights.load_saa_into(fresh)  # installs SAA with the file's rank and token count
    original = saa_state_dict(parts["unet"])
    assert all(torch.equal(original[k], v) for k, v in saa_state_dict(fresh).items())
    assert set(saa_state_dict(fresh)) == set(original)


def test_stage_files_merge_and_refuse_each_other_when_made_for_other_bases(tmp_path, tiny_parts):
    # The anchor file's keypoint_dim describes no part it holds: the reconfiguration file's value wins.
    anchor = save_dynamicid(
        tmp_path / "anchor.safetensors", metadata=tiny_metadata(keypoint_dim=768), unet=tiny_parts["unet"]
    )
    reconf = save_dynamicid(
        tmp_path / "reconf.safetensors", metadata=tiny_metadata(), keypoint_encoder=tiny_parts["keypoint_encoder"]
    )
    merged = load_dynamicid([anchor, reconf])
    assert merged.metadata.parts == ["saa", "keypoint_encoder"]
    assert merged.metadata.keypoint_dim == 32
    other = save_dynamicid(
        tmp_path / "other.safetensors",
        metadata=tiny_metadata(base_family="sdxl"),
        keypoint_encoder=tiny_parts["keypoint_encoder"],
    )
    with pytest.raises(ValueError, match="base_family"):
        load_dynamicid([anchor, other])


@pytest.mark.parametrize(
    ("field", "target"),
    [("lora_rank", "rank 8 SAA"), ("num_tokens", "16-token SAA"), ("cross_attention_dim", "48-wide UNet")],
)
def test_loading_into_another_rank_token_count_or_dim_names_the_field(tmp_path, tiny_parts, field, target):
    path = save_dynamicid(tmp_path / "w.safetensors", metadata=tiny_metadata(), unet=tiny_parts["unet"])
    weights = load_dynamicid(path)
    if field == "cross_attention_dim":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(**{**TINY_UNET, "cross_attention_dim": 48})
    else:
        unet = tiny_unet()
        install_saa(unet, rank=8 if field == "lora_rank" else 4, num_tokens=16 if field == "num_tokens" else 4)
    with pytest.raises(ValueError, match=field):
        weights.load_saa_into(unet)
    with pytest.raises(ValueError, match=f"{field}="):
        load_dynamicid(path, **{field: 999})


def test_missing_part_and_foreign_file_are_named(tmp_path, tiny_parts):
    path = save_dynamicid(tmp_path / "w.safetensors", metadata=tiny_metadata(), unet=tiny_parts["unet"])
    with pytest.raises(ValueError, match="hold no imr"):
        load_dynamicid(path).build_imr()
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(ValueError, match="not a DynamicID weights file"):
        load_dynamicid(foreign)


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_bin_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "SAA.bin"
    torch.save({"SAA_module": {"0.to_q_lora.down.weight": torch.zeros(1)}, "hook": RunsCodeWhenUnpickled(marker)}, evil)
    with pytest.raises(ValueError, match="refused"):
        load_release_checkpoint(saa_bin=evil)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # what the refusal protects against, shown without running it
        torch.load(evil, weights_only=True)


def golden_part(name: str, prefix: str) -> dict:
    tensors = load_file(GOLDEN / f"{name}.safetensors")
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def test_release_files_are_reported_converted_and_reproduce_the_golden_unet(tmp_path):
    saa_bin, imr_bin = tmp_path / "SAA.bin", tmp_path / "IMR.bin"
    torch.save({"SAA_module": golden_part("unet_saa", "SAA_module.")}, saa_bin)  # as released: no proj_module
    torch.save(
        {"IMR": golden_part("imr", "weights."), "key_point_encoder": golden_part("keypoint_encoder", "weights.")},
        imr_bin,
    )
    release = load_release_checkpoint(saa_bin=saa_bin, imr_bin=imr_bin)
    assert release.present == ["saa", "imr", "keypoint_encoder"]
    assert release.missing == ["face_encoder"]
    assert "face_encoder: missing (no proj_module" in release.report()

    out = convert_release(
        saa_bin, imr_bin, out=tmp_path / "dynamicid.safetensors", unet_config=TINY_UNET, imr_kwargs={"dim_head": 16}
    )
    weights = load_dynamicid(out)
    assert weights.metadata.source == "release"
    assert (weights.metadata.lora_rank, weights.metadata.imr_depth) == (4, 2)
    assert weights.imr_config["heads"] == 4

    tensors = load_file(GOLDEN / "unet_saa.safetensors")
    unet = tiny_unet()
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    weights.load_saa_into(unet)
    case = CASES["unet_saa"]["cases"]["two_ids"]
    first_step = SAACall(  # boosted: the first of the release's infer_end steps
        num_ids=2, id_scale=case["id_scale"], boxes=case["bbox_ymin_xmin_ymax_xmax"], boost=case["infer_scale"]
    )
    states = torch.cat([tensors["input.text_embeds"], tensors["input.id_tokens_two"]], dim=1)
    with torch.no_grad():
        sample = unet(
            tensors["input.latents"],
            tensors["input.timestep"],
            encoder_hidden_states=states,
            cross_attention_kwargs={"saa": first_step},
        ).sample
    torch.testing.assert_close(sample, tensors["output.two_ids.call0"], **TOLERANCE)

    imr_inputs = golden_part("imr", "input.")
    with torch.no_grad():
        tokens = weights.build_imr()(
            *(imr_inputs[k] for k in ("face_tokens", "src_landmark", "tgt_landmark")),
            *(imr_inputs[k] for k in ("src_text", "tgt_text")),
        )
    torch.testing.assert_close(tokens, golden_part("imr", "output")[""], **TOLERANCE)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_ip_adapter_faceid_layout_loads_into_face_encoder_and_saa(tmp_path, suffix):
    """A FaceID-Plus file written in that adapter's layout (random tensors) fills our modules exactly."""
    source_unet = tiny_unet()
    install_saa(source_unet, rank=4, num_tokens=4)
    adapter = nn.ModuleList(source_unet.attn_processors.values())  # how IP-Adapter indexes its processors
    randomise(adapter, 11)
    image_proj = randomise(FaceEncoder(cross_attention_dim=64, id_embeddings_dim=16, clip_embeddings_dim=24), 12)
    path = tmp_path / f"ip-adapter-faceid-plusv2_sd15{suffix}"
    if suffix == ".bin":
        torch.save({"image_proj": image_proj.state_dict(), "ip_adapter": adapter.state_dict()}, path)
    else:
        flat = {f"image_proj.{k}": v for k, v in image_proj.state_dict().items()}
        flat |= {f"ip_adapter.{k}": v.contiguous() for k, v in adapter.state_dict().items()}
        save_file(flat, str(path))

    checkpoint = load_ip_adapter_faceid(path)
    encoder = checkpoint.build_face_encoder()
    assert all(torch.equal(image_proj.state_dict()[k], v) for k, v in encoder.state_dict().items())
    unet = tiny_unet(seed=3)
    checkpoint.load_saa_into(unet)
    expected = saa_state_dict(source_unet)
    assert all(torch.equal(expected[k], v) for k, v in saa_state_dict(unet).items())

    not_faceid = tmp_path / "other.safetensors"
    save_file({"image_proj.x": torch.zeros(1)}, str(not_faceid))
    with pytest.raises(ValueError, match="no 'ip_adapter' tensors"):
        load_ip_adapter_faceid(not_faceid)
