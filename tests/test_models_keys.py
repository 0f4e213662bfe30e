"""SD 1.5 sizes: our modules have exactly the release's key names and shapes (../shared/spec/official-keys-sd15.tsv).

Everything is built on the meta device: SD 1.5's UNet config, no weights, nothing downloaded.
"""

from pathlib import Path

import pytest
import torch
from torch import nn

from dynamicid.models import IMR, SD15_UNET_CONFIG, FaceEncoder, KeypointEncoder, install_saa

KEYS = Path(__file__).resolve().parents[1].parent / "shared" / "spec" / "official-keys-sd15.tsv"


def official_rows(prefix: str) -> dict[str, tuple[int, ...]]:
    if not KEYS.is_file():
        pytest.fail(f"the official key list is required: {KEYS}")
    rows = {}
    for line in KEYS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        if key.startswith(prefix):
            rows[key[len(prefix) :]] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    assert rows, f"no rows starting with {prefix!r} in {KEYS}"
    return rows


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_saa_on_sd15_unet_has_the_release_keys_and_shapes():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    install_saa(unet, rank=128, num_tokens=4)
    release_layout = nn.ModuleList(unet.attn_processors.values())  # how the release saved SAA_module
    assert shapes(release_layout) == official_rows("SAA_module.")
    order = [line.split(" = ")[1] for line in KEYS.read_text().splitlines() if line.startswith("# index")]
    assert list(unet.attn_processors) == order


@pytest.mark.parametrize(
    ("prefix", "build"),
    [
        ("proj_module.", FaceEncoder),
        ("IMR(depth=1).", lambda: IMR(depth=1)),
        ("key_point_encoder.", KeypointEncoder),
    ],
)
def test_modules_at_release_sizes_have_the_release_keys_and_shapes(prefix, build):
    with torch.device("meta"):
        module = build()
    assert shapes(module) == official_rows(prefix)
