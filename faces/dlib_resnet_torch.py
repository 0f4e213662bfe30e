"""dlib's face recognition ResNet in PyTorch (the fallback when ONNX Runtime is not installed; see dlib_resnet)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dynamicid.faces.dlib_resnet import DlibResNetWeights, fold_affine

if TYPE_CHECKING:
    from dynamicid.faces.dlib_resnet import LayerSpec


class DlibResNet(torch.nn.Module):
    """The network in PyTorch, on `preprocess`ed float32 chips."""

    def __init__(self, weights: DlibResNetWeights):
        super().__init__()
        self._ops: list[tuple[LayerSpec, int]] = []  # (spec, index into self.convs or -1)
        self.convs = torch.nn.ModuleList()
        for layer in fold_affine(weights):
            conv = -1
            if layer.spec.kind == "con":
                out_channels, in_channels, size, _ = layer.weight.shape
                module = torch.nn.Conv2d(
                    in_channels, out_channels, size, stride=layer.spec.stride, padding=layer.padding
                )
                module.weight.data, module.bias.data = torch.from_numpy(layer.weight), torch.from_numpy(layer.bias)
                self.convs.append(module)
                conv = len(self.convs) - 1
            elif layer.spec.kind == "fc":
                self.register_buffer("fc", torch.from_numpy(layer.weight.copy()))
            self._ops.append((layer.spec, conv))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tags: dict[int, torch.Tensor] = {}
        for spec, conv in self._ops:
            kind = spec.kind
            if kind == "con":
                x = self.convs[conv](x)
            elif kind == "relu":
                x = F.relu(x)
            elif kind == "max_pool":
                x = F.max_pool2d(x, spec.size, spec.stride)
            elif kind == "avg_pool":
                x = x.mean(dim=(2, 3), keepdim=True) if spec.size == 0 else F.avg_pool2d(x, spec.size, spec.stride)
            elif kind == "tag":
                tags[spec.tag] = x
            elif kind == "skip":
                x = tags[spec.tag]
            elif kind == "add_prev":
                x = _add_zero_filled(x, tags[spec.tag])
            elif kind == "fc":
                x = x.flatten(1) @ self.fc
        return x


def _add_zero_filled(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the sum over the larger of each dimension, the smaller tensor zero-filled at the end."""
    shape = [max(p, q) for p, q in zip(a.shape[1:], b.shape[1:], strict=True)]

    def fill(t: torch.Tensor) -> torch.Tensor:
        c, h, w = t.shape[1:]
        return F.pad(t, (0, shape[2] - w, 0, shape[1] - h, 0, shape[0] - c))

    return fill(a) + fill(b)
