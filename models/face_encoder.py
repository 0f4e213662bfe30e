"""The face encoder ("ProjPlus"): an ID embedding -> num_tokens tokens, refined by a perceiver over CLIP states.

Same class layout and parameter names as the release (and IP-Adapter FaceID-Plus's projection model).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from dynamicid.models.blocks import FeedForward, PerceiverAttention


class FacePerceiverResampler(nn.Module):
    """`depth` x [PerceiverAttention, FeedForward] over the CLIP hidden states, then proj_out and norm_out."""

    def __init__(
        self, *, dim: int, depth: int, dim_head: int, heads: int, embedding_dim: int, output_dim: int, ff_mult: int
    ):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), FeedForward(dim, ff_mult)])
            for _ in range(depth)
        )

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        context = self.proj_in(context)
        for attn, ff in self.layers:
            latents = attn(latents, context) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class FaceEncoder(nn.Module):
    """ID embedding (B, id_dim) + CLIP penultimate states (B, N, clip_dim) -> face tokens (B, num_tokens, C).

    Args:
        cross_attention_dim: C, the UNet's cross-attention width (768 for SD 1.5).
        id_embeddings_dim: width of the face-recognition embedding (512 for ArcFace).
        clip_embeddings_dim: width of the CLIP image encoder's hidden states (1280 for ViT-H/14).
        num_tokens: tokens per face (4).
        proj_dim: hidden width of the `proj` MLP; None: twice id_embeddings_dim (the release's and IP-Adapter's).
            XLabs' Flux IP-Adapter start sets it to its CLIP width (768: `dynamicid.models.xlabs`).
    """

    def __init__(
        self,
        *,
        cross_attention_dim: int = 768,
        id_embeddings_dim: int = 512,
        clip_embeddings_dim: int = 1280,
        num_tokens: int = 4,
        proj_dim: int | None = None,
    ):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.id_embeddings_dim = id_embeddings_dim
        self.clip_embeddings_dim = clip_embeddings_dim
        self.num_tokens = num_tokens
        self.proj_dim = proj_dim  # as given (recorded in weights' metadata as face_proj_dim)
        hidden = proj_dim or id_embeddings_dim * 2
        self.proj = nn.Sequential(
            nn.Linear(id_embeddings_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, cross_attention_dim * num_tokens),
        )
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(
            dim=cross_attention_dim,
            depth=4,
            dim_head=64,
            heads=max(cross_attention_dim // 64, 1),  # 64-wide heads; one for tiny test widths
            embedding_dim=clip_embeddings_dim,
            output_dim=cross_attention_dim,
            ff_mult=4,
        )

    def forward(
        self, id_embeds: torch.Tensor, clip_embeds: torch.Tensor, shortcut: bool = False, scale: float = 1.0
    ) -> torch.Tensor:
        tokens = rearrange(self.proj(id_embeds), "b (n c) -> b n c", n=self.num_tokens)
        tokens = self.norm(tokens)
        out = self.perceiver_resampler(tokens, clip_embeds)
        return tokens + scale * out if shortcut else out
