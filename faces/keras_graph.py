"""Run a small Keras 2 functional model stored in HDF5 with PyTorch (no TensorFlow).

The graph and weights come from `keras_model.read_keras`. Layers run channels-last semantics on NCHW tensors;
"same" padding follows TensorFlow (the extra row/column goes bottom/right).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dynamicid.faces.keras_model import read_keras, same_padding


def _pad_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], value: float = 0.0) -> torch.Tensor:
    top, bottom = same_padding(x.shape[2], kernel[0], stride[0])
    left, right = same_padding(x.shape[3], kernel[1], stride[1])
    return F.pad(x, (left, right, top, bottom), value=value)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda x: x,
    "relu": F.relu,
    "softmax": lambda x: F.softmax(x, dim=1),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


class KerasGraph(torch.nn.Module):
    """A Keras functional model from an .hdf5 file; `forward` takes NCHW and returns the output layer."""

    def __init__(self, path: str | Path):
        super().__init__()
        model = read_keras(path)
        self.path = model.path
        self.layers = model.layers
        self.input_name = model.input_name
        self.output_name = model.output_name
        self.params = torch.nn.ParameterDict(
            {
                key: torch.nn.Parameter(torch.from_numpy(array.copy()), requires_grad=False)
                for key, array in model.params.items()
            }
        )

    def _run(self, layer: dict, inputs: list[torch.Tensor]) -> torch.Tensor:
        kind, cfg, name = layer["class_name"], layer["config"], layer["name"]
        p = self.params
        x = inputs[0]
        if kind == "Conv2D" or kind == "SeparableConv2D":
            stride = tuple(cfg["strides"])
            kernel = tuple(cfg["kernel_size"])
            if cfg["padding"] == "same":
                x = _pad_same(x, kernel, stride)
            if kind == "Conv2D":
                x = F.conv2d(x, p[f"{name}__weight"], p.get(f"{name}__bias"), stride=stride)
            else:
                x = F.conv2d(x, p[f"{name}__depthwise"], stride=stride, groups=x.shape[1])
                x = F.conv2d(x, p[f"{name}__pointwise"], p.get(f"{name}__bias"))
            return _ACTIVATIONS[cfg["activation"]](x)
        if kind == "BatchNormalization":
            return x * p[f"{name}__scale"].view(1, -1, 1, 1) + p[f"{name}__shift"].view(1, -1, 1, 1)
        if kind == "Activation":
            return _ACTIVATIONS[cfg["activation"]](x)
        if kind == "MaxPooling2D":
            kernel, stride = tuple(cfg["pool_size"]), tuple(cfg["strides"] or cfg["pool_size"])
            if cfg["padding"] == "same":
                x = _pad_same(x, kernel, stride, value=float("-inf"))
            return F.max_pool2d(x, kernel, stride)
        if kind == "Add":
            return torch.stack(inputs).sum(0)
        if kind == "GlobalAveragePooling2D":
            return x.mean(dim=(2, 3))
        if kind == "Dense":
            return _ACTIVATIONS[cfg["activation"]](F.linear(x, p[f"{name}__weight"], p.get(f"{name}__bias")))
        if kind in ("Dropout", "InputLayer"):
            return x
        raise NotImplementedError(f"{self.path}: layer type {kind} ({name}) is not supported")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {self.input_name: x}
        for layer in self.layers:
            if layer["class_name"] == "InputLayer":
                continue
            inbound = [values[node[0]] for node in layer["inbound_nodes"][0]]
            values[layer["name"]] = self._run(layer, inbound)
        return values[self.output_name]
