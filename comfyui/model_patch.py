"""SAA on a ComfyUI MODEL: a ModelPatcher clone whose attention runs DynamicID's identity attention.

- LoRA: every attention layer's q/k/v/out LoRA goes in as a weight patch (`add_patches`, ComfyUI's LoRA adapter),
  so ComfyUI merges and restores it as it does for any LoRA; the input MODEL is never touched.
- Cross-attention: one `attn2` replace patch per layer (`SAAPatch`): ComfyUI's own attention over the text,
  then the project's ID branch (`SAAProcessor.add_id_branch`: gating, box routing, boost, id_scale).
- The layers are found by walking the model: a diffusers UNet skeleton (meta device) built from the MODEL's
  UNet config gives the SAA processor names the weights files use, ComfyUI's own diffusers-to-ComfyUI key map
  gives each one's module, and every attention module of the MODEL must have one.
- FLUX.1 MODELs: `flux_patch` (the double-stream blocks); `patch_model` is the entry point for every family.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange

from dynamicid.models import SAACall, boost_for_step
from dynamicid.models.checkpoints import identity_processors
from dynamicid.models.families import denoiser_family
from dynamicid.models.lora import LoRALinear
from dynamicid.models.saa import SAAProcessor

LATENT_SCALE = 8  # SD and Flux latents are 1/8 of the image: the SAA query grid is set in image pixels
_ATTENTION = re.compile(r"^(?P<layer>.+\.transformer_blocks\.\d+\.attn[12])\.to_q\.weight$")
# ComfyUI's UNet names its blocks ("input", i), ("middle", 0), ("output", i) while it runs them.
_BLOCK = re.compile(
    r"^(?:(?P<kind>input|output)_blocks\.(?P<id>\d+)|middle_block)\.\d+\.transformer_blocks\.(?P<index>\d+)\."
)


def model_family(model: Any) -> str:
    """`sd15`, `sdxl` or `flux` for a ComfyUI MODEL (ModelPatcher), or a ValueError naming what it is."""
    import comfy.model_base
    import comfy.supported_models

    config = model.model.model_config
    if isinstance(model.model, comfy.model_base.SDXL):
        return "sdxl"
    if isinstance(config, comfy.supported_models.SD15):
        return "sd15"
    if isinstance(config, comfy.supported_models.Flux):  # dev, schnell, fill (Chroma is another class)
        return "flux"
    raise ValueError(f"DynamicID runs on SD 1.5, SDXL and FLUX.1 models; this MODEL is {type(config).__name__}")


def unet_skeleton(model: Any) -> torch.nn.Module:
    """A diffusers UNet (meta device, no memory) with the layout of the MODEL's UNet: the processor names and the
    `attn_processors` order that DynamicID's and the release's weights files are keyed by."""
    from diffusers import UNet2DConditionModel

    c = model.model.model_config.unet_config
    per_level = set(c["num_res_blocks"])
    if len(per_level) != 1:
        raise ValueError(f"unsupported UNet layout: {c['num_res_blocks']} res blocks per level")
    layers = per_level.pop()
    depths = [c["transformer_depth"][level * layers] for level in range(len(c["channel_mult"]))]
    widths = [c["model_channels"] * m for m in c["channel_mult"]]
    heads = [c["num_heads"] if c.get("num_heads", -1) > 0 else w // c["num_head_channels"] for w in widths]
    config: dict[str, Any] = {
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"],
        "block_out_channels": widths,
        "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        "transformer_layers_per_block": [max(d, 1) for d in depths],
        "attention_head_dim": heads,
        "cross_attention_dim": c["context_dim"],
        "use_linear_projection": c.get("use_linear_in_transformer", False),
    }
    if c.get("adm_in_channels"):  # SDXL: pooled text + size ids
        config |= {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": c["adm_in_channels"],
        }
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def install_processors(skeleton: torch.nn.Module, rank: int, num_tokens: int, token_dim: int) -> None:
    """SAA processors on the skeleton (a UNet or a Flux transformer), with real (CPU) tensors for the weights
    file to fill; `token_dim`: the ID tokens' width where the denoiser lets it vary (Flux)."""
    family = denoiser_family(skeleton)
    family.install_identity_attention(skeleton, rank=rank, num_tokens=num_tokens, token_dim=token_dim)
    for processor in identity_processors(skeleton).values():
        processor.to_empty(device="cpu")


def attention_layers(model: Any, processor_names: list[str]) -> dict[str, str]:
    """SAA processor name -> the MODEL's attention module path (under `diffusion_model.`), every attention
    module of the MODEL accounted for."""
    import comfy.utils

    diffusers_to_comfy = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    layers = {}
    for diffusers_key, comfy_key in diffusers_to_comfy.items():
        match = _ATTENTION.match(diffusers_key)
        if match:
            layers[f"{match['layer']}.processor"] = comfy_key.removesuffix(".to_q.weight")
    walked = {
        name
        for name, _ in model.model.diffusion_model.named_modules()
        if re.fullmatch(r".+\.transformer_blocks\.\d+\.attn[12]", name)
    }
    if set(processor_names) != set(layers) or set(layers.values()) != walked:
        raise ValueError(
            f"this MODEL's attention layers ({len(walked)}) do not match the DynamicID weights' "
            f"({len(processor_names)}); the weights were made for another UNet"
        )
    return {name: layers[name] for name in processor_names}


def block_key(layer: str) -> tuple[str, int, int]:
    """The key ComfyUI's transformer blocks look up attention patches under: (input|middle|output, block, index)."""
    match = _BLOCK.match(layer)
    if match is None:
        raise ValueError(f"attention layer {layer} is not inside an input, middle or output block")
    if match["kind"] is None:
        return "middle", 0, int(match["index"])
    return match["kind"], int(match["id"]), int(match["index"])


def step_index(options: dict[str, Any]) -> int:
    """This call's denoising step: where the current sigma sits in the sampler's schedule (0 outside a sampler)."""
    schedule, sigmas = options.get("sample_sigmas"), options.get("sigmas")
    if schedule is None or sigmas is None or len(schedule) < 2:
        return 0
    sigma = float(sigmas.flatten()[0])
    return int((schedule[:-1].float().cpu() - sigma).abs().argmin())


def storage_only(device_or_dtype: torch.device | torch.dtype) -> bool:
    """A 1-byte float dtype: ComfyUI casts patches to the model's weight dtype (`model_patches_to`), which may be
    fp8 storage computed in another dtype; the ID branch stays in the dtype it was given (the compute dtype)."""
    return isinstance(device_or_dtype, torch.dtype) and device_or_dtype.itemsize == 1


@dataclass
class Faces:
    """Every person's ID tokens in person order, conditional and unconditional (N_id, C) each."""

    cond: torch.Tensor
    uncond: torch.Tensor

    def to(self, device_or_dtype: torch.device | torch.dtype) -> Faces:
        if storage_only(device_or_dtype):
            return self
        return Faces(self.cond.to(device_or_dtype), self.uncond.to(device_or_dtype))

    def states(self, options: dict[str, Any], batch: int) -> torch.Tensor:
        """(batch, N_id, C): the people's tokens for conditional chunks, the unconditional face's for the others."""
        chunks = options.get("cond_or_uncond") or [0]
        per_chunk = batch // len(chunks)
        tokens = [(self.uncond if c == 1 else self.cond).expand(per_chunk, -1, -1) for c in chunks]
        return torch.cat(tokens)


@dataclass
class Schedule:
    """The layout and the boost schedule: each model call's SAACall (image size, this step's boost)."""

    layout: SAACall
    boost: float
    boost_steps: int
    _calls: dict[tuple[Any, ...], SAACall] = dataclasses.field(default_factory=dict)

    def call(self, options: dict[str, Any], image_size: tuple[int, int]) -> SAACall:
        """`image_size`: (height, width) in pixels, whose shape the query grid has."""
        boost = boost_for_step(step_index(options), self.boost, self.boost_steps)
        key = (*image_size, boost)
        if key not in self._calls:
            self._calls[key] = dataclasses.replace(self.layout, image_size=image_size, boost=boost)
        return self._calls[key]


class SharedOnClone:
    """ComfyUI deep-copies a MODEL's patches on every clone; the ID branch's weights (FLUX.1: 0.7 GB in bf16) and
    the faces are read-only there, so clones share them."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.copy(self)


class SAAPatch(SharedOnClone):
    """ComfyUI `attn2` replace patch of one cross-attention layer: text attention + the DynamicID ID branch.

    Called as `patch(q, k, v, extra_options)` with q the LoRA-merged query of the image tokens and k, v those
    of the text; returns the attention output before `to_out`.
    """

    def __init__(self, processor: SAAProcessor, faces: Faces, schedule: Schedule):
        self.processor, self.faces, self.schedule = processor, faces, schedule

    def to(self, device_or_dtype: torch.device | torch.dtype) -> SAAPatch:
        """ComfyUI moves model patches with the model (`model_patches_to`)."""
        if not storage_only(device_or_dtype):
            self.processor.to(device_or_dtype)
            self.faces = self.faces.to(device_or_dtype)
        return self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> torch.Tensor:
        from comfy.ldm.modules.attention import optimized_attention

        heads, dim_head = options["n_heads"], options["dim_head"]
        weight = self.processor.to_k_ip.weight
        if weight.device != q.device or weight.dtype != q.dtype:
            self.to(q.device).to(q.dtype)
        text = optimized_attention(q, k, v, heads, attn_precision=options.get("attn_precision"))
        query = rearrange(q, "b n (h d) -> b h n d", h=heads)
        text = rearrange(text, "b n (h d) -> b h n d", h=heads)
        ids = self.faces.states(options, q.shape[0]).to(q.dtype)
        height, width = options["original_shape"][-2:]
        call = self.schedule.call(options, (height * LATENT_SCALE, width * LATENT_SCALE))
        out = self.processor.add_id_branch(query, ids, call, text, heads=heads, scale=dim_head**-0.5)
        return rearrange(out, "b h n d -> b n (h d)")


def lora_adapter(lora: LoRALinear) -> Any:
    """ComfyUI's LoRA weight adapter for one LoRA (no alpha: the scale is 1, as `LoRALinear` adds up(down(x)))."""
    from comfy.weight_adapter.lora import LoRAAdapter

    return LoRAAdapter(set(), (lora.up.weight.detach(), lora.down.weight.detach(), None, None, None, None))


def add_lora_patches(patched: Any, patches: dict[Any, Any]) -> None:
    """Add the weight patches to the clone; every one must name a weight of the MODEL."""
    if len(patched.add_patches(patches, 1.0)) != len(patches):
        raise ValueError("some DynamicID LoRA weights name no weight of this MODEL; the weights fit another model")


def lora_patches(processors: dict[str, SAAProcessor], layers: dict[str, str]) -> dict[str, Any]:
    """ComfyUI weight patches for every q/k/v/out LoRA."""
    patches = {}
    for name, processor in processors.items():
        loras = {
            "to_q": processor.to_q_lora,
            "to_k": processor.to_k_lora,
            "to_v": processor.to_v_lora,
            "to_out.0": processor.to_out_lora,
        }
        for projection, lora in loras.items():
            patches[f"diffusion_model.{layers[name]}.{projection}.weight"] = lora_adapter(lora)
    return patches


def patch_model(
    model: Any,
    processors: dict[str, Any],
    faces: Faces,
    layout: SAACall,
    boost: float,
    boost_steps: int,
) -> Any:
    """A clone of `model` (ComfyUI ModelPatcher) running SAA with `processors` (diffusers names) for `faces`:
    on a UNet's cross-attention layers, or on a FLUX.1 transformer's double-stream blocks (`flux_patch`)."""
    patched = model.clone()
    dtype = model.model.manual_cast_dtype or model.model.get_dtype()  # fp8-stored weights compute in another
    processors = {name: processor.to(dtype=dtype) for name, processor in processors.items()}
    schedule = Schedule(layout, boost, boost_steps)
    if model_family(model) == "flux":
        from .flux_patch import install_flux_saa  # imports this module

        install_flux_saa(patched, processors, faces, schedule)
    else:
        install_unet_saa(patched, processors, faces, schedule)
    return patched


def install_unet_saa(patched: Any, processors: dict[str, SAAProcessor], faces: Faces, schedule: Schedule) -> None:
    """LoRA weight patches and an `attn2` replace patch per cross-attention layer on the clone `patched`."""
    layers = attention_layers(patched, list(processors))
    add_lora_patches(patched, lora_patches(processors, layers))
    for name, processor in processors.items():
        if processor.is_cross_attention:
            patched.set_model_attn2_replace(SAAPatch(processor, faces, schedule), *block_key(layers[name]))
