"""`Captioner`: a local BLIP or SmolVLM folder captions photos in batches; bad folders are one clear error.

The models are a tiny random BLIP and SmolVLM (`dynamicid.testing`), built from a transformers config and a
tokenizer made in code (no hub).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dynamicid.curation.captioner import Captioner, CaptionerError
from dynamicid.schemas.prompts import CAPTION_INSTRUCTION
from dynamicid.testing import CAPTION_WORDS, save_tiny_blip, save_tiny_smolvlm


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("captioner") / "tiny-blip")


@pytest.fixture(scope="module")
def tiny_smolvlm(tmp_path_factory):
    return save_tiny_smolvlm(tmp_path_factory.mktemp("captioner") / "tiny-smolvlm")


def _photos(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def test_batches_caption_each_photo_as_alone(tiny_blip):
    photos = _photos(5)
    batched = Captioner(tiny_blip, batch_size=4).caption(photos)
    alone = Captioner(tiny_blip, batch_size=1)
    assert batched == [alone.caption([photo])[0] for photo in photos]
    assert all(caption and set(caption.split()) <= set(CAPTION_WORDS) for caption in batched)


def test_the_model_name_changes_with_its_files(tiny_blip):
    before = Captioner(tiny_blip).model
    assert before.startswith("blip:tiny-blip:")
    config = tiny_blip / "generation_config.json"
    config.write_text(config.read_text() + "\n")
    assert Captioner(tiny_blip).model != before


def test_folders_that_are_no_supported_captioner_are_one_line(tmp_path, tiny_blip):
    with pytest.raises(CaptionerError, match="no readable config") as error:
        Captioner(tmp_path)
    assert "\n" not in str(error.value)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CaptionerError, match="'bert' is not a supported captioner; supported: blip"):
        Captioner(tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(CaptionerError, match="no CUDA GPU"):
            Captioner(tiny_blip, device="cuda")


def test_a_vlm_captions_each_photo_as_alone_with_its_instruction(tiny_smolvlm):
    photos = _photos(3)
    batched = Captioner(tiny_smolvlm, batch_size=2)
    assert batched.prompt == CAPTION_INSTRUCTION and batched.model.startswith("idefics3:tiny-smolvlm:")
    captions = batched.caption(photos)
    alone = Captioner(tiny_smolvlm, batch_size=1)
    assert captions == [alone.caption([photo])[0] for photo in photos]  # left padding changes nothing
    words = set(CAPTION_WORDS) | {"User", "Assistant"}  # the tiny tokenizer's words ('.' and ':' glue on)
    assert all(caption and set(caption.replace(".", " ").replace(":", " ").split()) <= words for caption in captions)
    other = Captioner(tiny_smolvlm, prompt="a photo of")
    assert other.prompt == "a photo of" and other.spec.key != batched.spec.key


def test_a_vlm_folder_without_a_chat_template_is_one_line(tmp_path):
    folder = save_tiny_smolvlm(tmp_path / "no-template")
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(CaptionerError, match="no chat template") as error:
        Captioner(folder)
    assert "\n" not in str(error.value)
