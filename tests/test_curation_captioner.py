"""`Captioner`: a local BLIP folder captions photos in batches; bad folders are one clear error.

The model is a tiny random BLIP built here from a transformers config and a tokenizer made in code (no hub).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynamicid.curation.captioner import Captioner, CaptionerError

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "man", "in", "red", "shirt", "park", "light"]


def make_tiny_blip(folder: Path, seed: int = 0) -> Path:
    """A tiny random BLIP captioner folder (model and processor saved with save_pretrained), seeded."""
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir(parents=True)
    vocab = folder.parent / f"{folder.name}-vocab.txt"
    vocab.write_text("\n".join(VOCAB))
    text = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=37, num_hidden_layers=2)
    text |= dict(num_attention_heads=4, max_position_embeddings=64, bos_token_id=2, sep_token_id=3, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = BlipConfig(text_config=text, vision_config=vision | dict(image_size=32, patch_size=8))
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    model.generation_config.min_new_tokens = 3  # a random model may stop at once: ask for words
    model.save_pretrained(folder)
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), BertTokenizerFast(str(vocab)))
    processor.save_pretrained(folder)
    return folder


# SmolVLM's chat template (as its checkpoints ship it in chat_template.jinja), image first.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SMOLVLM_SPECIAL = [
    "<pad>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
]


def make_tiny_smolvlm(folder: Path, seed: int = 0) -> Path:
    """A tiny random SmolVLM (Idefics3) folder: a Llama text model and a SigLIP-style vision tower of 2 layers,
    a word-level tokenizer over VOCAB made here, SmolVLM's chat template; one 32 px image = 4 image tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        PreTrainedTokenizerFast,
    )

    words = [*SMOLVLM_SPECIAL, *VOCAB[5:], "User", "Assistant", ":", "."]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()  # words joined by spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<end_of_utterance>"
    )
    images = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32}
    )
    processor = Idefics3Processor(images, tokenizer, image_seq_len=4, chat_template=SMOLVLM_CHAT_TEMPLATE)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2)
    text |= dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    text |= dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = Idefics3Config(
        text_config=text,
        vision_config=vision | dict(image_size=32, patch_size=8),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config.min_new_tokens = 3  # a random model may stop at once: ask for words
    model.generation_config.suppress_tokens = [i for i in range(len(SMOLVLM_SPECIAL)) if i != 2]  # words or the end
    model.generation_config.eos_token_id = [2, words.index(".")]  # a sentence ends a caption: short tests
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    return make_tiny_blip(tmp_path_factory.mktemp("captioner") / "tiny-blip")


@pytest.fixture(scope="module")
def tiny_smolvlm(tmp_path_factory):
    return make_tiny_smolvlm(tmp_path_factory.mktemp("captioner") / "tiny-smolvlm")


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
