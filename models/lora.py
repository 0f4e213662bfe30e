"""The LoRA layer of the SAA processors (diffusers' LoRALinearLayer is deprecated; this keeps its key names)."""

from __future__ import annotations

import torch
from torch import nn


class LoRALinear(nn.Module):
    """The low-rank update up(down(x)) added to a frozen projection; `up` starts at zero, so it starts as a no-op.

    Keys `down.weight` (rank, in) and `up.weight` (out, rank), no biases, as in the release.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 128):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The LoRA weights may be kept in float32 under a half-precision base model. Under layerwise casting
        # they are stored in a 1-byte float and cast for the call by diffusers' hook: then compute in x's dtype.
        dtype = self.down.weight.dtype
        dtype = x.dtype if dtype.itemsize == 1 else dtype
        return self.up(self.down(x.to(dtype))).to(x.dtype)

    def adapt(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """base(x) + up(down(x)).

        `base` is called as a module, never read through its `.weight`, so whatever wraps it takes part: a user's
        PEFT LoRA on the same projection, diffusers' layerwise casting (fp8 storage), quantized weights.
        """
        return base(x) + self(x)
