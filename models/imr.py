"""IMR, the identity-motion reconfigurator: rewrites face tokens from a source expression/pose to targets.

Release parameter names (`feature_fusion`, `disentangleNet`, `entangleNet`); facts in METHOD.md ("IMR").
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import nn

from dynamicid.models.blocks import FeedForward, MultAttention, PerceiverAttention


def _stage(*, dim: int, dim_head: int, heads: int, ff_mult: int, depth: int) -> nn.ModuleList:
    return nn.ModuleList(
        nn.ModuleList(
            [
                PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads),
                MultAttention(dim=dim, dim_head=dim_head, heads=heads),
                FeedForward(dim, ff_mult),
            ]
        )
        for _ in range(depth)
    )


def _run_stage(stage: nn.ModuleList, x: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    for cross_attn, self_attn, ff in stage:
        x = cross_attn(x, motion) + x
        x = self_attn(x) + x
        x = ff(x) + x
    return x


class IMR(nn.Module):
    """Face tokens of one source image -> one token set per target (landmark vector + face-prompt vector).

    Args:
        dim: inner width; dim_head, heads: attention layout; num_queries: motion latents per image (and tokens);
        embedding_dim: width of the face tokens and of the landmark vectors; txt_dim: width of the pooled text
        vector; ff_mult: feed-forward expansion; depth: layers in each half (disentangle, entangle).
    """

    def __init__(
        self,
        *,
        dim: int = 1024,
        dim_head: int = 64,
        heads: int = 16,
        num_queries: int = 4,
        embedding_dim: int = 768,
        txt_dim: int = 768,
        ff_mult: int = 4,
        depth: int = 1,
    ):
        super().__init__()
        self.dim = dim
        self.dim_head = dim_head
        self.heads = heads
        self.ff_mult = ff_mult
        self.num_queries = num_queries
        self.embedding_dim = embedding_dim
        self.txt_dim = txt_dim
        self.depth = depth
        fused_dim = embedding_dim + txt_dim
        self.feature_fusion = nn.Sequential(
            nn.LayerNorm(fused_dim),
            nn.Linear(fused_dim, dim),
            nn.GELU(),
            nn.LayerNorm(dim),
            nn.Linear(dim, num_queries * dim),
            nn.GELU(),
        )
        self.norm_in = nn.LayerNorm(embedding_dim)
        self.proj_in = nn.Linear(embedding_dim, dim)
        layout = {"dim": dim, "dim_head": dim_head, "heads": heads, "ff_mult": ff_mult, "depth": depth}
        self.disentangleNet = _stage(**layout)
        self.entangleNet = _stage(**layout)
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, embedding_dim)

    @property
    def config(self) -> dict[str, int]:
        """The constructor arguments (what a checkpoint needs to rebuild this module)."""
        names = ("dim", "dim_head", "heads", "num_queries", "embedding_dim", "txt_dim", "ff_mult", "depth")
        return {name: getattr(self, name) for name in names}

    def motion_latents(self, landmark: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(N, emb) landmark vectors + (N, txt) text vectors -> (N, num_queries, dim)."""
        fused = self.feature_fusion(torch.cat([landmark, text], dim=-1))
        return rearrange(fused, "n (q d) -> n q d", q=self.num_queries)

    def forward(
        self,
        face_tokens: torch.Tensor,
        src_landmark: torch.Tensor,
        tgt_landmark: torch.Tensor,
        src_text: torch.Tensor,
        tgt_text: torch.Tensor,
    ) -> torch.Tensor:
        """face_tokens (1, tokens, emb), src_* (1, .), tgt_* (T, .) -> (T, tokens, emb)."""
        if face_tokens.shape[0] != 1 or src_landmark.shape[0] != 1 or src_text.shape[0] != 1:
            raise ValueError(
                f"IMR rewrites one source face at a time: got face_tokens {tuple(face_tokens.shape)}, "
                f"src_landmark {tuple(src_landmark.shape)}, src_text {tuple(src_text.shape)} (batch must be 1)"
            )
        if tgt_landmark.shape[0] != tgt_text.shape[0]:
            raise ValueError(
                f"tgt_landmark has {tgt_landmark.shape[0]} rows but tgt_text has {tgt_text.shape[0]}: one each per target"
            )
        x = self.proj_in(self.norm_in(face_tokens))
        x = _run_stage(self.disentangleNet, x, self.motion_latents(src_landmark, src_text))
        x = repeat(x, "1 n d -> t n d", t=tgt_landmark.shape[0])
        x = _run_stage(self.entangleNet, x, self.motion_latents(tgt_landmark, tgt_text))
        return self.proj_out(self.norm_out(x))
