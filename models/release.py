"""The authors' release: its constructor arguments and checkpoint layouts, mapped onto this project's modules.

The release's modules use the same parameter names as ours, so only prefixes and constructor arguments differ:
- face encoder: `proj_module.` (DynamicID SAA file), `image_proj.` (IP-Adapter FaceID checkpoints),
  `image_proj_model.` (IP-Adapter training state);
- SAA processors: `SAA_module.<i>.`, `adapter_modules.<i>.`, `ip_adapter.<i>.` with i the index in
  `unet.attn_processors` order;
- IMR: `IMR.`/`imr.` or unprefixed; keypoint encoder: `key_point_encoder.`/`keypoint_encoder.` or unprefixed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dynamicid.models.face_encoder import FaceEncoder
from dynamicid.models.families import denoiser_family
from dynamicid.models.imr import IMR
from dynamicid.models.keypoint_encoder import KeypointEncoder
from dynamicid.models.saa import saa_processors
from dynamicid.models.state_dicts import load_strict

RELEASE_KINDS = ("face_encoder", "imr", "keypoint_encoder")

# Key prefixes each part is found under in the release's and IP-Adapter's files (first match wins).
RELEASE_PREFIXES: dict[str, tuple[str, ...]] = {
    "face_encoder": ("proj_module.", "image_proj.", "image_proj_model."),
    "saa": ("SAA_module.", "adapter_modules.", "ip_adapter."),
    "imr": ("IMR.", "imr."),
    "keypoint_encoder": ("key_point_encoder.", "keypoint_encoder."),
}


def _count_layers(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def _imr_kwargs(release_kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(release_kwargs)
    erase, drive = kwargs.pop("erase_layer_num", None), kwargs.pop("drive_layer_num", None)
    depths = {d for d in (erase, drive, kwargs.get("depth")) if d is not None}
    if len(depths) > 1:
        raise ValueError(
            f"IMR depths differ (erase_layer_num={erase}, drive_layer_num={drive}, depth={kwargs.get('depth')}); "
            "this project's IMR uses one depth for both halves"
        )
    if depths:
        kwargs["depth"] = depths.pop()
    return kwargs


def release_kwargs_from_state_dict(kind: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Constructor arguments read off a module-relative state dict's shapes (the release's files carry none).

    The IMR's head split is not visible in its shapes: 64-wide heads are assumed, as in the release.
    """
    if kind == "face_encoder":
        proj0, proj2 = state_dict["proj.0.weight"], state_dict["proj.2.weight"]
        cross_attention_dim = state_dict["norm.weight"].shape[0]
        return {
            "cross_attention_dim": cross_attention_dim,
            "id_embeddings_dim": proj0.shape[1],
            "clip_embeddings_dim": state_dict["perceiver_resampler.proj_in.weight"].shape[1],
            "num_tokens": proj2.shape[0] // cross_attention_dim,
        }
    if kind == "imr":
        dim, embedding_dim = state_dict["proj_in.weight"].shape
        inner_dim = state_dict["disentangleNet.0.0.to_q.weight"].shape[0]
        return {
            "dim": dim,
            "dim_head": 64,
            "heads": inner_dim // 64,
            "num_queries": state_dict["feature_fusion.4.weight"].shape[0] // dim,
            "embedding_dim": embedding_dim,
            "txt_dim": state_dict["feature_fusion.1.weight"].shape[1] - embedding_dim,
            "ff_mult": state_dict["disentangleNet.0.2.1.weight"].shape[0] // dim,
            "depth": _count_layers(state_dict, "disentangleNet."),
        }
    if kind == "keypoint_encoder":
        return {
            "embedding_dim": state_dict["blocks.6.1.conv_block.0.weight"].shape[0],
            "width": state_dict["blocks.0.0.conv_block.0.weight"].shape[0],
        }
    raise ValueError(f"unknown release module kind {kind!r}; expected one of {RELEASE_KINDS}")


def from_release(kind: str, state_dict: Mapping[str, torch.Tensor], **release_kwargs: Any) -> nn.Module:
    """Build our module from the release's constructor arguments and load its state dict strictly (eval mode).

    `kind` is one of `face_encoder` (release class ProjPlusModel), `imr` (IMR; `erase_layer_num` and
    `drive_layer_num` become our `depth`) or `keypoint_encoder` (KeyPointEncoder). `state_dict` holds
    module-relative keys. Arguments not given are read off the tensor shapes.
    """
    if kind not in RELEASE_KINDS:
        raise ValueError(f"unknown release module kind {kind!r}; expected one of {RELEASE_KINDS}")
    kwargs = release_kwargs_from_state_dict(kind, state_dict)
    if kind == "imr":
        release_kwargs = _imr_kwargs(release_kwargs)
        inner_dim = kwargs["heads"] * kwargs["dim_head"]  # keep the width the file has when one of them is given
        if "dim_head" in release_kwargs and "heads" not in release_kwargs:
            kwargs["heads"] = inner_dim // release_kwargs["dim_head"]
        if "heads" in release_kwargs and "dim_head" not in release_kwargs:
            kwargs["dim_head"] = inner_dim // release_kwargs["heads"]
    kwargs.update(release_kwargs)
    module: nn.Module = {"face_encoder": FaceEncoder, "imr": IMR, "keypoint_encoder": KeypointEncoder}[kind](**kwargs)
    load_strict(module, state_dict, what=f"release {kind}")
    return module.eval()


def load_release_saa(unet: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load the release's index-keyed `SAA_module` (i = position in `unet.attn_processors`) strictly.

    Keys may carry one of the release prefixes (`SAA_module.`, `adapter_modules.`, `ip_adapter.`) or none.
    SAA must be installed with the file's rank and token count.
    """
    processors = list(saa_processors(unet).items())
    state_dict = strip_prefix(state_dict, RELEASE_PREFIXES["saa"])
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        index, _, param = key.partition(".")
        if not index.isdigit():
            raise ValueError(f"release SAA key {key!r} does not start with a processor index")
        by_index.setdefault(int(index), {})[param] = tensor
    if sorted(by_index) != list(range(len(processors))):
        raise ValueError(
            f"the release SAA weights hold {len(by_index)} processors (indices {min(by_index, default=None)}.."
            f"{max(by_index, default=None)}) but this {denoiser_family(unet).describe()} UNet has "
            f"{len(processors)} attention layers: they were made for another base model"
        )
    for index, (name, processor) in enumerate(processors):
        load_strict(processor, by_index[index], what=f"release SAA_module.{index} ({name})")


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Drop the first of `prefixes` that every key carries (keys without any are returned as they are)."""
    for prefix in prefixes:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)
