"""Keypoint encoder: a 96x96 landmark map -> one embedding_dim vector (release names `blocks.i.j.conv_block`)."""

from __future__ import annotations

import torch
from torch import nn


class ConvUnit(nn.Module):
    """Conv2d + BatchNorm2d (`conv_block.0`, `conv_block.1`), optional residual add, then ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, padding: int, residual: bool = False):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout))
        self.residual = residual
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


def _group(cin: int, cout: int, kernel_size: int, stride: int, padding: int, residual_units: int) -> nn.Sequential:
    units = [ConvUnit(cin, cout, kernel_size, stride, padding)]
    units += [ConvUnit(cout, cout, 3, 1, 1, residual=True) for _ in range(residual_units)]
    return nn.Sequential(*units)


class KeypointEncoder(nn.Module):
    """(N, 1, 96, 96) landmark maps in [-1, 1] -> (N, embedding_dim, 1, 1).

    `width`: the first block's channels, doubled by each of the next five (the release's 16 -> 512); smaller
    widths fit small bases such as tiny-random.
    """

    def __init__(self, embedding_dim: int = 768, width: int = 16):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.width = width
        w = width
        self.blocks = nn.ModuleList(
            [
                _group(1, w, 7, 1, 3, 0),
                _group(w, 2 * w, 3, 2, 1, 2),
                _group(2 * w, 4 * w, 3, 2, 1, 3),
                _group(4 * w, 8 * w, 3, 2, 1, 2),
                _group(8 * w, 16 * w, 3, 2, 1, 2),
                _group(16 * w, 32 * w, 3, 2, 1, 1),
                nn.Sequential(ConvUnit(32 * w, 32 * w, 3, 1, 0), ConvUnit(32 * w, embedding_dim, 1, 1, 0)),
            ]
        )

    def forward(self, landmark_map: torch.Tensor) -> torch.Tensor:
        x = landmark_map
        for block in self.blocks:
            x = block(x)
        return x
