"""Blocks shared by the face encoder and the IMR: one definition each, the release's parameter names.

Facts in ../shared/spec/METHOD.md ("Building blocks"). Residuals are added at the call site.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn


def FeedForward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm, Linear up, GELU, Linear down (no biases); state-dict indices 0, 1, 3 as in the release."""
    inner_dim = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner_dim, bias=False),
        nn.GELU(),
        nn.Linear(inner_dim, dim, bias=False),
    )


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention with q and k each scaled by dim_head^-1/4 and the softmax in float32.

    (b, n, h*d) inputs, heads kept on their own axis (the golden vectors' layout), (b, n_q, h*d) out.
    """
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    scale = q.shape[-1] ** -0.25
    weight = torch.einsum("b h i d, b h j d -> b h i j", q * scale, k * scale)
    weight = weight.float().softmax(dim=-1).to(weight.dtype)
    out = torch.einsum("b h i j, b h j d -> b h i d", weight, v)
    return rearrange(out, "b h n d -> b n (h d)")


class PerceiverAttention(nn.Module):
    """Latent queries attend to [context ; latents]; returns the update for the latents."""

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)  # context
        self.norm2 = nn.LayerNorm(dim)  # latents (queries)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        context, latents = self.norm1(context), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((context, latents), dim=-2)).chunk(2, dim=-1)
        return self.to_out(attend(q, k, v, self.heads))


class MultAttention(nn.Module):
    """Self-attention over the tokens (IMR); returns the update for the tokens."""

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        k, v = self.to_kv(x).chunk(2, dim=-1)
        return self.to_out(attend(self.to_q(x), k, v, self.heads))
