"""`Captioner`: a local BLIP folder captions photos in batches; bad folders are one clear error.

The model is a tiny random BLIP built here from a transformers config and a tokenizer made in code (no hub).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dynamicid.curation.captioner import Captioner, CaptionerError

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "man", "in", "red", "shirt", "park", "light"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = tmp_path_factory.mktemp("captioner") / "tiny-blip"
    vocab = folder.parent / "vocab.txt"
    vocab.write_text("\n".join(VOCAB))
    text = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=37, num_hidden_layers=2)
    text |= dict(num_attention_heads=4, max_position_embeddings=64, bos_token_id=2, sep_token_id=3, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = BlipConfig(text_config=text, vision_config=vision | dict(image_size=32, patch_size=8))
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    model.generation_config.min_new_tokens = 3  # a random model may stop at once: ask for words
    model.save_pretrained(folder)
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), BertTokenizerFast(str(vocab)))
    processor.save_pretrained(folder)
    return folder


def _photos(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def test_batches_caption_each_photo_as_alone(tiny_blip):
    photos = _photos(5)
    batched = Captioner(tiny_blip, batch_size=4).caption(photos)
    alone = Captioner(tiny_blip, batch_size=1)
    assert batched == [alone.caption([photo])[0] for photo in photos]
    assert all(caption and set(caption.split()) <= set(VOCAB) for caption in batched)


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
