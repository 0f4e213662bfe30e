"""SAA stays on its UNet: the UNet's own attention switches keep the SAA processors instead of replacing them.

diffusers' `UNet2DConditionModel` knows only its own processors: `set_default_attn_processor` refuses SAA's,
while `set_attention_slice` and `fuse_qkv_projections` replace every processor, so the identity branch would
vanish with no more than a log line. `keep_saa(unet)` (called by `install_saa`) rebinds those methods on that
UNet instance so that each does its job with SAA in place:

- `set_default_attn_processor()`: SAA has one implementation, its default; slicing and fusion are turned off.
- `set_attention_slice(size)`: diffusers' own rules pick the per-layer slice sizes ("auto", "max", int, list);
  each SAA processor then runs its text branch in slices of that many heads (None: all at once).
- `fuse_qkv_projections()` / `unfuse_qkv_projections()`: the layers get diffusers' fused `to_qkv` / `to_kv`
  and SAA reads q, k, v from them (the LoRA updates still added per projection); unfusing goes back.

Anything else that replaces the processors (`unet.set_attn_processor(...)`) is the caller's choice; the
pipelines check before each generation that SAA is still on every layer (`saa_processors`).
"""

from __future__ import annotations

import types

from diffusers.models.attention_processor import Attention
from torch import nn

from dynamicid.models.saa import saa_processors


def keep_saa(unet: nn.Module) -> None:
    """Rebind the UNet's default-processor, attention-slicing and QKV-fusion methods to SAA-keeping ones."""
    for name, method in _METHODS.items():
        setattr(unet, name, types.MethodType(method, unet))


def _set_default_attn_processor(unet: nn.Module) -> None:
    for processor in saa_processors(unet).values():
        processor.slice_size, processor.fused = None, False


def _set_attention_slice(unet: nn.Module, slice_size: str | int | list[int] | None = "auto") -> None:
    saa = saa_processors(unet)
    type(unet).set_attention_slice(unet, slice_size)  # diffusers' checks and per-layer sizes (it swaps processors)
    sizes = {name: getattr(processor, "slice_size", None) for name, processor in unet.attn_processors.items()}
    for name, processor in saa.items():
        processor.slice_size = sizes[name]
    unet.set_attn_processor(saa)


def _fuse_qkv_projections(unet: nn.Module) -> None:
    saa = saa_processors(unet)
    for module in unet.modules():
        if isinstance(module, Attention):
            module.fuse_projections(fuse=True)
    for processor in saa.values():
        processor.fused = True


def _unfuse_qkv_projections(unet: nn.Module) -> None:
    for processor in saa_processors(unet).values():
        processor.fused = False


_METHODS = {
    "set_default_attn_processor": _set_default_attn_processor,
    "set_attention_slice": _set_attention_slice,
    "fuse_qkv_projections": _fuse_qkv_projections,
    "unfuse_qkv_projections": _unfuse_qkv_projections,
}
