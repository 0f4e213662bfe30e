"""An IP-Adapter FaceID-PlusV2 file at SD 1.5 sizes, written here from ../shared/spec/official-keys-sd15.tsv, loads
strictly into an SD 1.5-shaped UNet and face encoder: through `load_ip_adapter_faceid`, `--init-from` and
`convert-release`.

IP-Adapter saves `{"image_proj": ProjPlusModel state, "ip_adapter": ModuleList(unet.attn_processors.values())
state}`; the release key table has the same modules under `proj_module.` / `SAA_module.`, so renaming the prefixes
gives that layout. SAA tensors are stored as one constant per key (a stride-0 tensor: a tiny file), different
for every processor and key, so a processor loaded at the wrong index is seen. The UNet is built on the meta
device with only its SAA processors given real memory. The face encoder gets small real weights chosen so that
its output has a closed form (METHOD.md "Face encoder"): the perceiver's weights are zero, so the resampler
returns `norm_out.bias` and `shortcut=True` adds it to LayerNorm(proj(id)).
"""

import oracles
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from dynamicid.models import SD15_UNET_CONFIG, load_dynamicid, load_ip_adapter_faceid, saa_processors
from dynamicid.models.saa import install_saa
from dynamicid.train.anchor import read_init

RENAMES = {"proj_module.": "image_proj", "SAA_module.": "ip_adapter"}


def saa_constant(index: int, key_number: int) -> float:
    return index + key_number / 100


@pytest.fixture(scope="module")
def official():
    return oracles.official_keys()


@pytest.fixture(scope="module")
def faceid_file(tmp_path_factory, official):
    """ip-adapter-faceid-plusv2_sd15.bin as IP-Adapter writes it (nested image_proj / ip_adapter dicts)."""
    shapes, _ = official
    generator = torch.Generator().manual_seed(0)
    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key_number, (key, shape) in enumerate(shapes.items()):
        prefix = next((p for p in RENAMES if key.startswith(p)), None)
        if prefix is None:
            continue  # IMR and keypoint encoder: not part of an IP-Adapter file
        name = key[len(prefix) :]
        if prefix == "SAA_module.":
            value = torch.full((), saa_constant(int(name.split(".")[0]), key_number)).expand(shape)
        elif name.startswith(("proj.", "norm.")) or name == "perceiver_resampler.norm_out.bias":
            value = torch.randn(shape, generator=generator) * 0.05
        else:
            value = torch.zeros(()).expand(shape)  # the rest of the perceiver: zero
        state[RENAMES[prefix]][name] = value
    path = tmp_path_factory.mktemp("faceid") / "ip-adapter-faceid-plusv2_sd15.bin"
    torch.save(state, path)
    assert path.stat().st_size < 20 * 2**20  # stride-0 constants, real values only for the projection
    return path, state


def sd15_unet_with_real_saa():
    """SD 1.5's UNet on the meta device; its SAA processors (rank 128, 4 tokens) in real memory."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)  # its layout is pinned by test_models_keys.py
    install_saa(unet, rank=128, num_tokens=4)
    for processor in unet.attn_processors.values():
        processor.to_empty(device="cpu")
    return unet


def check_saa(unet, official, state):
    """Processor i (in the key table's index order) holds exactly the file's ip_adapter.<i>.* constants."""
    _, order = official
    processors = saa_processors(unet)
    assert list(processors) == order
    for index, name in enumerate(order):
        own = processors[name].state_dict()
        expected = {k.split(".", 1)[1]: v for k, v in state["ip_adapter"].items() if k.split(".")[0] == str(index)}
        assert sorted(own) == sorted(expected), name
        for key, value in expected.items():
            assert torch.equal(own[key], value), f"{name}.{key}"


def check_face_encoder(encoder, state):
    """Strict load, and PlusV2's shortcut=True against the closed form."""
    proj = state["image_proj"]
    assert (encoder.cross_attention_dim, encoder.id_embeddings_dim, encoder.clip_embeddings_dim) == (768, 512, 1280)
    assert encoder.num_tokens == 4
    own = encoder.state_dict()
    assert sorted(own) == sorted(proj)
    assert all(torch.equal(own[k], v) for k, v in proj.items())

    generator = torch.Generator().manual_seed(1)
    id_embeds = torch.randn(2, 512, generator=generator)
    clip = torch.randn(2, 257, 1280, generator=generator)
    hidden = F.gelu(id_embeds @ proj["proj.0.weight"].T + proj["proj.0.bias"])
    tokens = (hidden @ proj["proj.2.weight"].T + proj["proj.2.bias"]).reshape(2, 4, 768)
    tokens = F.layer_norm(tokens, (768,), proj["norm.weight"], proj["norm.bias"])
    resampled = proj["perceiver_resampler.norm_out.bias"].expand(2, 4, 768)
    with torch.no_grad():
        torch.testing.assert_close(encoder(id_embeds, clip), resampled, rtol=1e-5, atol=1e-5)
        for scale in (1.0, 0.5):
            got = encoder(id_embeds, clip, shortcut=True, scale=scale)
            torch.testing.assert_close(got, tokens + scale * resampled, rtol=1e-4, atol=1e-5)


def test_faceid_plusv2_file_loads_strictly_into_sd15_modules(faceid_file, official):
    path, state = faceid_file
    checkpoint = load_ip_adapter_faceid(path)
    assert checkpoint.present == ["face_encoder", "saa"] and not checkpoint.unrecognised
    check_face_encoder(checkpoint.build_face_encoder(), state)
    unet = sd15_unet_with_real_saa()
    checkpoint.load_saa_into(unet)
    check_saa(unet, official, state)


def test_a_faceid_file_with_a_missing_or_extra_tensor_is_refused(faceid_file, tmp_path):
    _, state = faceid_file
    for change, message in (("drop", "missing"), ("add", "unexpected")):
        adapter = dict(state["ip_adapter"])
        if change == "drop":
            del adapter["5.to_k_ip.weight"]
        else:
            adapter["4.to_k_ip.weight"] = torch.zeros(()).expand(640, 768)  # attn1 layers have no ID branch
        path = tmp_path / f"{change}.bin"
        torch.save({"image_proj": state["image_proj"], "ip_adapter": adapter}, path)
        with pytest.raises(ValueError, match=message):
            load_ip_adapter_faceid(path).load_saa_into(sd15_unet_with_real_saa())


def test_init_from_reads_the_faceid_file_into_sd15_modules(faceid_file, official):
    path, state = faceid_file
    init = read_init(path, num_tokens=4)
    assert init.source.startswith(f"ip-adapter-faceid:{path.name}:")
    assert sorted(init.parts) == ["face_encoder", "saa"]
    check_face_encoder(init.loader.build_face_encoder(), state)
    unet = sd15_unet_with_real_saa()
    init.loader.load_saa_into(unet)
    check_saa(unet, official, state)


def test_convert_release_rewrites_the_faceid_file_by_processor_name(faceid_file, official, tmp_path):
    from dynamicid.models.checkpoints import convert_release

    path, state = faceid_file
    out = convert_release(path, out=tmp_path / "converted.safetensors")
    weights = load_dynamicid(out, cross_attention_dim=768, lora_rank=128, num_tokens=4)
    assert (weights.metadata.id_embed_dim, weights.metadata.clip_embed_dim) == (512, 1280)
    check_face_encoder(weights.build_face_encoder(), state)
    _, order = official
    saa = weights.state_dicts["saa"]
    expected = {
        f"{order[int(k.split('.')[0])]}.{k.split('.', 1)[1]}": v.contiguous() for k, v in state["ip_adapter"].items()
    }
    assert sorted(saa) == sorted(expected)
    assert all(torch.equal(saa[k], v) for k, v in expected.items())
    unet = sd15_unet_with_real_saa()
    weights.load_saa_into(unet)
    check_saa(unet, official, state)
