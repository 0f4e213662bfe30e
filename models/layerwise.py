"""Frozen weights stored in a 1-byte float and computed in a wider one, layer by layer (diffusers' layerwise
casting): inference's `--weights-dtype float8` and training's `--base-dtype float8` both go through
`store_weights`. Importing this module loads no torch (the CLIs read `WEIGHTS_DTYPES` for their choices).
"""

from __future__ import annotations

import re
from typing import Any

WEIGHTS_DTYPES = {"float8": "float8_e4m3fn"}  # flag value -> torch storage dtype of the denoiser's layers


def store_weights(denoiser: Any, weights_dtype: str, compute_dtype: Any, *, training: bool = False) -> None:
    """Store `denoiser`'s weights in `weights_dtype` ("float8": e4m3), cast to `compute_dtype` for each layer's
    call (diffusers' `enable_layerwise_casting`, its default skips: norms, embeddings, proj_in/out).

    `training`: the gradient flows back through the stored layers, so two kinds of module keep their dtype:
    those holding parameters that require grad (SAA being trained: only frozen weights are rounded), and
    convolutions, whose backward reads the weight tensor the hook has already put back to float8 (a linear
    layer's backward reads the transposed view made in the call, so it works; a UNet's convolutions therefore
    stay in the compute dtype, Flux's transformer has none). That view holds the layer's compute-dtype weight
    until the backward pass: with gradient checkpointing only one block's are held at a time.
    """
    import torch
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    skip, skip_classes = None, None
    if training:
        trained = {name.rpartition(".")[0] for name, p in denoiser.named_parameters() if p.requires_grad}
        skip = (*DEFAULT_SKIP_MODULES_PATTERN, *(f"^{re.escape(name)}$" for name in sorted(trained)))
        skip_classes = (torch.nn.modules.conv._ConvNd,)
    denoiser.enable_layerwise_casting(
        storage_dtype=getattr(torch, WEIGHTS_DTYPES[weights_dtype]),
        compute_dtype=compute_dtype,
        skip_modules_pattern=skip,
        skip_modules_classes=skip_classes,
    )
