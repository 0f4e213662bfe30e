"""SAA on a ComfyUI FLUX.1 MODEL: a ModelPatcher clone whose double-stream blocks add DynamicID's ID branch.

As `DynamicIDFluxPipeline` does (`dynamicid.models.saa_flux`), on every double-stream block:
- the ID branch (`FluxSAAProcessor.id_branch`: gating, box routing, boost, id_scale) reads the block's image-stream
  queries (after the q-norm, before RoPE) and its output is added to the image stream after the block;
- the LoRA on the image stream's q/k/v/out goes in as weight patches: q, k and v into their rows of ComfyUI's
  fused `img_attn.qkv` weight (ComfyUI's offset patches), out into `img_attn.proj`.
The blocks are ComfyUI's `("double_block", i)` replace patches (`patches_replace["dit"]`), each calling the block
(or a replace patch that was there before: other packs' patches keep working) and adding the ID output. A
`diffusion_model` wrapper sets each call's SAA inputs (the token grid from the latent's size, this step's boost,
the ID tokens per cond/uncond chunk) in `transformer_options`, as the pipeline passes `joint_attention_kwargs`.
The double-stream blocks are found by walking the MODEL and matched to the weights' processor names.
"""

from __future__ import annotations

import inspect
import re
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynamicid.models import SAACall
from dynamicid.models.saa_flux import FluxSAAProcessor

from .model_patch import (
    LATENT_SCALE,
    Faces,
    Schedule,
    SharedOnClone,
    add_lora_patches,
    lora_adapter,
    storage_only,
)

KEY = "dynamicid"  # the wrapper's key; each patched MODEL's call inputs sit under `dynamicid:<id>`
_DOUBLE_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.attn\.processor$")


def flux_skeleton(model: Any) -> nn.Module:
    """A diffusers FluxTransformer2DModel (meta device, no memory) with the MODEL's layout and widths: the
    processor names and widths DynamicID's Flux weights are keyed by."""
    from diffusers import FluxTransformer2DModel

    p = model.model.diffusion_model.params
    with torch.device("meta"):
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=p.in_channels * p.patch_size**2,
            num_layers=p.depth,
            num_single_layers=p.depth_single_blocks,
            attention_head_dim=p.hidden_size // p.num_heads,
            num_attention_heads=p.num_heads,
            joint_attention_dim=p.context_in_dim,
            pooled_projection_dim=p.vec_in_dim,
            guidance_embeds=p.guidance_embed,
            axes_dims_rope=tuple(p.axes_dim),
        )


def double_blocks(model: Any, processor_names: list[str]) -> dict[str, int]:
    """SAA processor name -> the index of the MODEL's double-stream block, every double block accounted for."""
    indices = {name: int(m[1]) for name in processor_names if (m := _DOUBLE_BLOCK.match(name))}
    walked = len(model.model.diffusion_model.double_blocks)
    if len(indices) != len(processor_names) or sorted(indices.values()) != list(range(walked)):
        raise ValueError(
            f"this MODEL's {walked} double-stream blocks do not match the DynamicID weights' {len(processor_names)} "
            "SAA layers; the weights were made for another Flux model"
        )
    return indices


@dataclass
class FluxStep:
    """One model call's SAA inputs, set by `FluxSAAInputs` for the block patches."""

    blocks: nn.ModuleList  # the MODEL's double-stream blocks (the patches hold no module: clones deep-copy them)
    call: SAACall
    id_tokens: torch.Tensor  # (batch, N_id, C)
    image_tokens: int  # the generated image's tokens come first (reference latents, as Kontext's, follow)


class FluxSAAInputs(SharedOnClone):
    """`diffusion_model` wrapper: this call's `FluxStep` in `transformer_options[key]`, then the model."""

    def __init__(self, key: str, faces: Faces, schedule: Schedule):
        self.key, self.faces, self.schedule = key, faces, schedule

    def to(self, device_or_dtype: torch.device | torch.dtype) -> FluxSAAInputs:
        """ComfyUI moves wrappers with the model."""
        self.faces = self.faces.to(device_or_dtype)
        return self

    def __call__(self, executor: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        flux = executor.class_obj
        bound = inspect.signature(flux._forward).bind(*args, **kwargs)
        x = bound.arguments["x"]
        options = dict(bound.arguments.get("transformer_options") or {})
        patch = flux.patch_size
        rows, cols = ((side + patch // 2) // patch for side in x.shape[-2:])  # ComfyUI pads to whole patches
        call = self.schedule.call(options, (rows * patch * LATENT_SCALE, cols * patch * LATENT_SCALE))
        ids = self.faces.states(options, x.shape[0]).to(x.device)
        options[self.key] = FluxStep(flux.double_blocks, call, ids, rows * cols)
        bound.arguments["transformer_options"] = options
        return executor(*bound.args, **bound.kwargs)


def image_queries(block: nn.Module, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """(B, Q, heads, d): the block's image-stream queries after its q-norm, before RoPE (ComfyUI's
    `DoubleStreamBlock.forward`, the query part: modulated LayerNorm, the fused qkv projection, the q RMSNorm)."""
    from comfy.ldm.flux.layers import apply_mod

    modulation, _ = block.img_mod(vec)
    modulated = apply_mod(block.img_norm1(img), 1 + modulation.scale, modulation.shift)
    qkv = block.img_attn.qkv(modulated)
    query = qkv.view(*qkv.shape[:2], 3, block.num_heads, -1)[:, :, 0]
    return block.img_attn.norm.query_norm(query).to(qkv.dtype)


class FluxSAAPatch(SharedOnClone):
    """ComfyUI `("double_block", i)` replace patch: the block (or the patch it replaces), plus the ID branch of
    `processor` added to the image stream."""

    def __init__(self, key: str, processor: FluxSAAProcessor, index: int, previous: Any | None = None):
        self.key, self.processor, self.index, self.previous = key, processor, index, previous

    def to(self, device_or_dtype: torch.device | torch.dtype) -> FluxSAAPatch:
        if not storage_only(device_or_dtype):
            self.processor.to(device_or_dtype)
        if hasattr(self.previous, "to"):
            self.previous = self.previous.to(device_or_dtype)
        return self

    def _block(self, args: dict[str, Any], extra: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.previous(args, extra) if self.previous is not None else extra["original_block"](args)

    def __call__(self, args: dict[str, Any], extra: dict[str, Any]) -> dict[str, torch.Tensor]:
        step: FluxStep | None = (args.get("transformer_options") or {}).get(self.key)
        if step is None:
            raise RuntimeError("DynamicID's Flux block patch ran without its diffusion_model wrapper (SAA inputs)")
        call = step.call
        if call.num_ids == 0 or call.id_scale == 0:
            return self._block(args, extra)
        query = image_queries(step.blocks[self.index], args["img"][:, : step.image_tokens], args["vec"])
        out = self._block(args, extra)  # after the queries: a block may update its inputs in place
        weight = self.processor.to_k_id.weight
        if weight.device != query.device or weight.dtype != query.dtype:
            self.processor.to(device=query.device, dtype=query.dtype)
        ids = self.processor.id_branch(query, step.id_tokens, call)
        img = out["img"]
        head, tail = img[:, : step.image_tokens], img[:, step.image_tokens :]
        return {**out, "img": torch.cat([head + ids, tail], dim=1)}


def flux_lora_patches(processors: dict[str, FluxSAAProcessor], blocks: dict[str, int]) -> dict[Any, Any]:
    """ComfyUI weight patches for the image stream's q/k/v/out LoRA: q, k, v on their rows of the fused
    `img_attn.qkv` weight ((key, (dim, start, length)) offset patches), out on `img_attn.proj`."""
    patches: dict[Any, Any] = {}
    for name, processor in processors.items():
        if not processor.rank:
            continue
        prefix, width = f"diffusion_model.double_blocks.{blocks[name]}.img_attn", processor.hidden_size
        for row, lora in enumerate((processor.to_q_lora, processor.to_k_lora, processor.to_v_lora)):
            patches[(f"{prefix}.qkv.weight", (0, row * width, width))] = lora_adapter(lora)
        patches[f"{prefix}.proj.weight"] = lora_adapter(processor.to_out_lora)
    return patches


def install_flux_saa(patched: Any, processors: dict[str, FluxSAAProcessor], faces: Faces, schedule: Schedule) -> None:
    """LoRA weight patches, the SAA-inputs wrapper and a replace patch per double-stream block on the clone
    `patched` of a Flux MODEL."""
    import comfy.patcher_extension

    blocks = double_blocks(patched, list(processors))
    add_lora_patches(patched, flux_lora_patches(processors, blocks))
    key = f"{KEY}:{uuid.uuid4().hex}"  # DynamicID applied twice: each patch reads its own inputs
    wrapper = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    inputs = FluxSAAInputs(key, faces, schedule)
    comfy.patcher_extension.add_wrapper_with_key(wrapper, KEY, inputs, patched.model_options, is_model_options=True)
    existing = patched.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for name, processor in processors.items():
        block = ("double_block", blocks[name])
        patched.set_model_patch_replace(FluxSAAPatch(key, processor, blocks[name], existing.get(block)), "dit", *block)
