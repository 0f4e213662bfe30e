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
        # The LoRA weights may be kept in float32 under a half-precision base model.
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)
