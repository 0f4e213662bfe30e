"""FAKE models for smoke runs, tests and benchmarks: seeded, randomly initialised, tiny, never downloaded.

- `build_tiny_random(name)`: the tiny-random base of the family whose `tiny_name` is `name` (each family's
  `build_tiny` composes it from the pieces here, e.g. `tiny_unet_base` with `TINY_SD15_UNET`).
- `build_tiny_random("tiny-random")`: a base with SD 1.5's structure (8x VAE, cross-attention UNet, one CLIP
  text tower, CLIP vision tower) but tiny widths.
- `build_tiny_random("tiny-random-sdxl")`: a base with SDXL's structure: two CLIP text towers (the second with
  a projection) whose states are concatenated, a UNet with SDXL's block layout (no attention in the first block,
  several transformer layers per attention block, linear projections) that also takes the pooled text and the
  size ids (`added_cond_kwargs`).
- `build_tiny_random_flux()` (`tiny-random-flux`): a base with FLUX.1-dev's structure: a
  Flux transformer with double- and single-stream blocks and guidance embeds, CLIP (pooled) and T5 text towers
  with tokenizers built in code, a 16-channel VAE, the flow-matching scheduler.
- `random_parts(base, analyzer)`: DynamicID modules (SAA in the base's UNet, face encoder, IMR, keypoint
  encoder) with the widths of a base and a face backend; `save_random_weights` / `save_release_layout` /
  `save_ip_adapter_faceid` write them in our format, the release's `.bin` layout, or IP-Adapter FaceID-PlusV2's
  layout (`image_proj` + index-keyed `ip_adapter`, the layout of its SD 1.5 and SDXL files alike).
- `save_tiny_blip(folder)` / `save_tiny_smolvlm(folder)`: captioner folders (BLIP; SmolVLM, an Idefics3 with its
  chat template) with tokenizers made in code, for `dynamicid-curate build --captioner`.

They produce noise, never images of anyone; `load_base_model` builds a tiny base only when asked for by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from dynamicid.models import IMR, FaceEncoder, KeypointEncoder, saa_processors
from dynamicid.models.base import CLIP_IMAGE_SIZE, BaseModel
from dynamicid.models.checkpoints import identity_processors, save_dynamicid
from dynamicid.models.families import FAMILIES, tiny_names
from dynamicid.models.families.flux import FLUX, T5_MAX_LENGTH
from dynamicid.schemas import CheckpointMetadata

# ---- tiny bases ----

TINY_TEXT_WIDTH = 32


def _byte_level_alphabet() -> list[str]:
    """GPT-2/CLIP byte-to-unicode alphabet: one printable character per byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def build_tiny_tokenizer() -> Any:
    """A CLIP tokenizer with a character-level vocabulary (no merges): real tokenization, no downloaded files."""
    from transformers import CLIPTokenizer

    alphabet = _byte_level_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


# The tiny UNets (diffusers `UNet2DConditionModel` arguments) of the UNet families' FAKEs.
_TINY_UNET_SHARED = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "norm_num_groups": 8}
TINY_SD15_UNET: dict[str, Any] = {
    **_TINY_UNET_SHARED,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": TINY_TEXT_WIDTH,
    "attention_head_dim": 8,
}
# SDXL's layout at tiny widths (diffusers' own SDXL test components): the states of both text encoders side by
# side, text_embeds (pooled, projected) + 6 size ids of addition_time_embed_dim (8) each.
TINY_SDXL_UNET: dict[str, Any] = {
    **_TINY_UNET_SHARED,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "cross_attention_dim": 2 * TINY_TEXT_WIDTH,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": TINY_TEXT_WIDTH + 6 * 8,
}


def _vocabulary_config(tokenizer: Any) -> dict[str, Any]:
    """The text-config fields a tiny text encoder takes from its tokenizer."""
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _tiny_text_encoder(tokenizer: Any, with_projection: bool) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=TINY_TEXT_WIDTH,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        projection_dim=TINY_TEXT_WIDTH,
        **_vocabulary_config(tokenizer),
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _tiny_vae(**overrides: Any) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        **({"latent_channels": 4} | overrides),
    )


def _tiny_image_encoder() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=48,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=3,
            image_size=CLIP_IMAGE_SIZE,
            patch_size=32,
            projection_dim=32,
        )
    )


def build_tiny_random(name: str = "tiny-random", *, seed: int = 0, with_image_encoder: bool = True) -> BaseModel:
    """The tiny-random FAKE base `name` (one per family, `families.tiny_names()`), seeded, global RNG untouched."""
    for family in FAMILIES.values():
        if family.tiny_name == name:
            return family.build_tiny(seed=seed, with_image_encoder=with_image_encoder)
    raise ValueError(f"unknown tiny base {name!r}; expected one of {tiny_names()}")


def tiny_unet_base(
    name: str, unet_config: dict[str, Any], *, two_text_encoders: bool, seed: int = 0, with_image_encoder: bool = True
) -> BaseModel:
    """A tiny UNet-family base: `unet_config`'s UNet, the tiny 8x VAE, one or two tiny CLIP text encoders (the
    second with a projection), the DDPM training scheduler of SD 1.5 / SDXL."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = _tiny_vae()
        text_encoder = _tiny_text_encoder(tokenizer, with_projection=False)
        text_encoder_2 = _tiny_text_encoder(tokenizer, with_projection=True) if two_text_encoders else None
        image_encoder = _tiny_image_encoder() if with_image_encoder else None
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )
    return BaseModel(
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        image_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer if two_text_encoders else None,
        name=name,
    )


def build_tiny_t5_tokenizer() -> Any:
    """A T5 tokenizer (Unigram, as T5's) over single characters, built in code: no downloaded files."""
    from transformers import T5Tokenizer

    pieces = ["▁", *(chr(c) for c in range(ord("!"), ord("~") + 1))]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((p, -1.0) for p in pieces)]
    vocab += [("▁" + p, -1.5) for p in pieces[1:]]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def build_tiny_random_flux(*, seed: int = 0, with_image_encoder: bool = True) -> BaseModel:
    """The tiny-random-flux FAKE: FLUX.1-dev's structure (double- and single-stream blocks, guidance embeds,
    CLIP pooled + T5 text, 16-channel VAE with shift/scaling factors, flow-matching scheduler with dynamic
    shifting) at tiny widths; seeded, global RNG untouched."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            in_channels=64,  # 16 latent channels packed 2x2
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TINY_TEXT_WIDTH,
            pooled_projection_dim=TINY_TEXT_WIDTH,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        )
        vae = _tiny_vae(
            latent_channels=16,
            shift_factor=0.1159,
            scaling_factor=0.3611,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        text_encoder = _tiny_text_encoder(tokenizer, with_projection=False)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                d_model=TINY_TEXT_WIDTH,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                **_vocabulary_config(tokenizer_2),
            )
        )
        image_encoder = _tiny_image_encoder() if with_image_encoder else None
    # FLUX.1-dev's scheduler config.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    base = BaseModel(
        transformer,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        image_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        name=FLUX.tiny_name,
    )
    for module in base.modules():
        module.requires_grad_(False).eval()  # frozen, as load_base_model leaves every base (T5 has dropout)
    return base


# ---- random DynamicID weights ----


@dataclass
class RandomParts:
    """Randomly initialised DynamicID modules; SAA lives in `unet`'s processors (the base's denoiser)."""

    face_encoder: FaceEncoder
    unet: nn.Module
    imr: IMR
    keypoint_encoder: KeypointEncoder
    metadata: CheckpointMetadata


def random_parts(
    base: BaseModel, analyzer: Any, *, lora_rank: int = 4, imr_dim: int = 64, seed: int = 0
) -> RandomParts:
    """Install SAA on `base.unet` (a Flux base: its transformer; LoRA `up` weights random, not zero, so the LoRA path is exercised) and build
    the rest with the widths of `base` (pooled text, CLIP, cross-attention) and of `analyzer`'s ID embedding
    (a `dynamicid.faces.FaceAnalyzer`).

    The IMR uses 64-wide heads, as the release's files imply, so these parts also round-trip through the
    release layout.
    """
    unet, clip_dim, cross_attention_dim = base.denoiser, base.clip_dim, base.cross_attention_dim
    id_embed_dim, id_embed_model = analyzer.embedding_dim, analyzer.embedding_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base.base_family.install_identity_attention(unet, rank=lora_rank, num_tokens=4)
        for processor in identity_processors(unet).values():
            for lora in (processor.to_q_lora, processor.to_k_lora, processor.to_v_lora, processor.to_out_lora):
                nn.init.normal_(lora.up.weight, std=0.02)
        face_encoder = FaceEncoder(
            cross_attention_dim=cross_attention_dim,
            id_embeddings_dim=id_embed_dim,
            clip_embeddings_dim=clip_dim,
            num_tokens=4,
        )
        imr = IMR(
            dim=imr_dim,
            dim_head=64,
            heads=max(1, imr_dim // 64),
            embedding_dim=cross_attention_dim,
            txt_dim=base.pooled_dim,
            ff_mult=2,
            depth=1,
        )
        keypoint_encoder = KeypointEncoder(cross_attention_dim)
    metadata = CheckpointMetadata(
        base_family=base.family,
        prediction_type=base.base_family.objective(base.noise_scheduler).name,
        cross_attention_dim=cross_attention_dim,
        lora_rank=lora_rank,
        num_tokens=4,
        id_embed_model=id_embed_model,
        id_embed_dim=id_embed_dim,
        clip_embed_dim=clip_dim,
        imr_depth=1,
        imr_dim=imr_dim,
        keypoint_dim=cross_attention_dim,
        source="random",
    )
    return RandomParts(face_encoder.eval(), unet, imr.eval(), keypoint_encoder.eval(), metadata)


def save_random_weights(parts: RandomParts, path: str | Path) -> Path:
    """Our safetensors format, all four parts in one file."""
    return save_dynamicid(
        path,
        metadata=parts.metadata,
        face_encoder=parts.face_encoder,
        unet=parts.unet,
        imr=parts.imr,
        keypoint_encoder=parts.keypoint_encoder,
    )


def index_keyed_saa(unet: nn.Module) -> dict[str, torch.Tensor]:
    """SAA weights keyed `<i>.<param>` with i the position in `unet.attn_processors` (the release's and
    IP-Adapter's `torch.nn.ModuleList(unet.attn_processors.values())` layout)."""
    return {
        f"{index}.{key}": tensor
        for index, processor in enumerate(saa_processors(unet).values())
        for key, tensor in processor.state_dict().items()
    }


def save_release_layout(parts: RandomParts, folder: str | Path) -> dict[str, Path]:
    """The release's three `.bin` files: SAA (`SAA_module` index-keyed in attn_processors order + `proj_module`,
    nested dicts), IMR (`IMR.` keys) and keypoint encoder (`key_point_encoder.` keys)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "saa": (
            folder / "SAA.bin",
            {"SAA_module": index_keyed_saa(parts.unet), "proj_module": parts.face_encoder.state_dict()},
        ),
        "imr": (folder / "IMR.bin", {f"IMR.{k}": v for k, v in parts.imr.state_dict().items()}),
        "keypoint_encoder": (
            folder / "KPE.bin",
            {f"key_point_encoder.{k}": v for k, v in parts.keypoint_encoder.state_dict().items()},
        ),
    }
    for path, state in files.values():
        torch.save(state, path)
    return {role: path for role, (path, _) in files.items()}


def save_ip_adapter_faceid(unet: nn.Module, face_encoder: FaceEncoder, path: str | Path) -> Path:
    """An IP-Adapter FaceID-Plus(V2) checkpoint of SAA-carrying `unet` and `face_encoder`: `image_proj.*` (the
    ProjPlus model) and `ip_adapter.<i>.*` (LoRA + IP processors in attn_processors order), as its `.bin`
    (nested dicts) or `.safetensors` (flat prefixed keys) files hold them. Its SDXL files have this layout with
    the SDXL UNet's processors and cross_attention_dim 2048."""
    path = Path(path)
    image_proj = {k: v.detach().clone().contiguous() for k, v in face_encoder.state_dict().items()}
    ip_adapter = {k: v.detach().clone().contiguous() for k, v in index_keyed_saa(unet).items()}
    if path.suffix == ".safetensors":
        flat = {f"image_proj.{k}": v for k, v in image_proj.items()} | {
            f"ip_adapter.{k}": v for k, v in ip_adapter.items()
        }
        save_file(flat, str(path))
    else:
        torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, path)
    return path


def plain_pipeline(base: BaseModel, scheduler: Any | None = None) -> Any:
    """diffusers' own pipeline of `base`'s family over its parts, without DynamicID."""
    return base.base_family.plain_pipeline(base.components() | {"scheduler": scheduler or base.noise_scheduler})


def plain_images(
    base: BaseModel, scheduler: Any, prompt: str, *, height: int, width: int, steps: int, seed: int
) -> Any:
    """Images (N, H, W, 3) of `plain_pipeline` at guidance 5 (the release's): what a DynamicID pipeline computes
    with the ID branch off and the LoRA weights at zero."""
    pipe = plain_pipeline(base, scheduler)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    settings = {"height": height, "width": width, "num_inference_steps": steps, "guidance_scale": 5.0}
    return pipe(prompt, **settings, generator=generator, output_type="np").images


# Tiny random captioners (`dynamicid-curate build --captioner DIR`), saved with save_pretrained like a real one.
CAPTION_WORDS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "man", "in", "red", "shirt")
CAPTION_WORDS += ("park", "light")


def save_tiny_blip(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random BLIP captioner folder (model and processor saved with save_pretrained), seeded."""
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True)
    vocab = folder.parent / f"{folder.name}-vocab.txt"
    vocab.write_text("\n".join(CAPTION_WORDS))
    text = dict(vocab_size=len(CAPTION_WORDS), hidden_size=32, intermediate_size=37, num_hidden_layers=2)
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


def save_tiny_smolvlm(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random SmolVLM (Idefics3) folder: a Llama text model and a SigLIP-style vision tower of 2 layers,
    a word-level tokenizer over CAPTION_WORDS made here, SmolVLM's chat template; one 32 px image = 4 image
    tokens. Greedy captions end at the first '.'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        PreTrainedTokenizerFast,
    )

    words = [*SMOLVLM_SPECIAL, *CAPTION_WORDS[5:], "User", "Assistant", ":", "."]
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


if __name__ == "__main__":  # python -m dynamicid.testing OUT.safetensors [tiny-random|tiny-random-sdxl|...]
    import sys

    from dynamicid.faces import FaceAnalyzer
    from dynamicid.models.base import load_base_model

    if len(sys.argv) not in (2, 3) or (sys.argv[2:] and sys.argv[2] not in tiny_names()):
        sys.exit(f"usage: python -m dynamicid.testing OUT.safetensors [{'|'.join(tiny_names())}]")
    name = sys.argv[2] if len(sys.argv) == 3 else tiny_names()[0]
    out = save_random_weights(random_parts(load_base_model(name), FaceAnalyzer("embedded")), sys.argv[1])
    print(f"wrote {out}: random FAKE DynamicID weights for --base-model {name} (smoke runs; images are noise)")
