"""The LoRA layer of the SAA processors (diffusers' LoRALinearLayer is deprecated; this keeps its key names)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

    def adapt(self, base: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """base(x) + up(down(x)), computed the cheaper way.

        Over many tokens, when no gradient is wanted for the LoRA weights, the update is merged into the base
        weight first (one matmul per token instead of three); the result is the same up to float rounding.
        """
        in_features, out_features = base.in_features, base.out_features
        tokens = x.numel() // in_features
        wants_grad = torch.is_grad_enabled() and self.up.weight.requires_grad
        if wants_grad or tokens * (in_features + out_features) <= in_features * out_features:
            return base(x) + self(x)
        delta = (self.up.weight @ self.down.weight).to(base.weight.dtype)
        return F.linear(x, base.weight + delta, base.bias)
