"""dlib's face recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`) read as an ONNX graph (and in PyTorch,
`dlib_resnet_torch`, when ONNX Runtime is not installed).

The weights are parsed at run time from the .dat file of the face-recognition-models wheel: nothing is converted,
downloaded or stored. The network is dlib's `anet_type` (examples/dnn_face_recognition_ex.cpp): a 7x7/2 conv,
affine, relu and 3x3/2 max pool, then residual blocks of two 3x3 convs each followed by an affine layer (batch
norm folded into a per-channel scale and shift), at 32, 64, 128, 256 and 256 channels, a global average pool and
a 128-d fully connected layer without bias. dlib's conventions that matter for equal outputs:
- stride-2 convolutions and pools have no padding, stride-1 3x3 convolutions pad by 1;
- the down-sampling blocks add an unpadded 2x2/2 average pool of their input to their output, and `add_prev`
  adds tensors of different shapes by zero-filling the smaller one (channels 32 -> 64, and 3x3 + 4x4 -> 4x4 at
  the 256-channel level);
- the input is the 150x150 RGB chip, (value - channel mean) / 256 with the means stored in the file.

The file is dlib's serialization (dlib/serialize.h, dlib/dnn/core.h, layers.h, input.h, loss.h): integers as a
control byte (size | 0x80 when negative) then little-endian bytes; floats as mantissa and exponent integers;
strings as a length then bytes; bools as '0'/'1'; tensors as a version, four dimensions and raw float32. A network
writes its loss layer, then every layer wrapper's version from the output down, then the input layer and each
layer's details from the input up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CHIP_SIZE = 150


class _Reader:
    """Sequential reader of dlib's serialization primitives."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def fail(self, what: str) -> ValueError:
        return ValueError(
            f"{self.path}: not dlib's face recognition ResNet ({what} at byte {self.pos}); "
            "reinstall it with `pip install --no-deps face-recognition-models==0.3.0`"
        )

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise self.fail("the file ends early")
        self.pos += size
        return self.data[self.pos - size : self.pos]

    def int(self) -> int:
        control = self.take(1)[0]
        size = control & 0x0F
        if size == 0 or size > 8:
            raise self.fail(f"bad integer control byte {control:#x}")
        value = int.from_bytes(self.take(size), "little")
        return -value if control & 0x80 else value

    def bool(self) -> bool:
        byte = self.take(1)
        if byte not in (b"0", b"1"):
            raise self.fail(f"bad bool {byte!r}")
        return byte == b"1"

    def float(self) -> float:
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            raise self.fail("an old ASCII float")
        mantissa, exponent = self.int(), self.int()
        return math.ldexp(mantissa, exponent)

    def string(self) -> str:
        return self.take(self.int()).decode("latin-1")

    def expect(self, *names: str) -> str:
        name = self.string()
        if name not in names:
            raise self.fail(f"layer {name!r} where {' or '.join(names)} was expected")
        return name

    def version(self, *allowed: int) -> int:
        version = self.int()
        if version not in allowed:
            raise self.fail(f"version {version} where {allowed} was expected")
        return version

    def tensor(self) -> np.ndarray:
        self.version(2)
        shape = tuple(self.int() for _ in range(4))
        return np.frombuffer(self.take(4 * math.prod(shape)), dtype="<f4").reshape(shape)

    def alias_tensor(self) -> tuple[int, int, int, int]:
        self.version(1)
        return tuple(self.int() for _ in range(4))


# The network, from the input up, as dlib's template aliases spell it. `tag`/`skip`/`add_prev` carry dlib's tag id.
@dataclass(frozen=True)
class LayerSpec:
    """One layer of the network: what it is and its sizes."""

    kind: str  # con, affine, relu, max_pool, avg_pool, tag, skip, add_prev, fc
    channels: int = 0  # con / fc outputs
    size: int = 0  # con / pool window (0: the whole input)
    stride: int = 1
    tag: int = 0


def _block(channels: int, stride: int) -> list[LayerSpec]:
    return [
        LayerSpec("con", channels, 3, stride),
        LayerSpec("affine"),
        LayerSpec("relu"),
        LayerSpec("con", channels, 3, 1),
        LayerSpec("affine"),
    ]


def _ares(channels: int) -> list[LayerSpec]:
    return [LayerSpec("tag", tag=1), *_block(channels, 1), LayerSpec("add_prev", tag=1), LayerSpec("relu")]


def _ares_down(channels: int) -> list[LayerSpec]:
    return [
        LayerSpec("tag", tag=1),
        *_block(channels, 2),
        LayerSpec("tag", tag=2),
        LayerSpec("skip", tag=1),
        LayerSpec("avg_pool", size=2, stride=2),
        LayerSpec("add_prev", tag=2),
        LayerSpec("relu"),
    ]


ANET_TYPE: tuple[LayerSpec, ...] = (
    LayerSpec("con", 32, 7, 2),
    LayerSpec("affine"),
    LayerSpec("relu"),
    LayerSpec("max_pool", size=3, stride=2),
    *(_ares(32) * 3),  # alevel4
    *_ares_down(64),  # alevel3
    *(_ares(64) * 3),
    *_ares_down(128),  # alevel2
    *(_ares(128) * 2),
    *_ares_down(256),  # alevel1
    *(_ares(256) * 2),
    *_ares_down(256),  # alevel0
    LayerSpec("avg_pool", size=0, stride=1),  # avg_pool_everything
    LayerSpec("fc", 128),
)
_WRAPPERS = frozenset({"tag", "skip"})  # dlib writes no details for these, only a version


@dataclass
class _Layer:
    spec: LayerSpec
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    padding: int = 0


@dataclass
class DlibResNetWeights:
    channel_means: tuple[float, float, float]  # red, green, blue
    layers: list[_Layer] = field(default_factory=list)


def _read_details(reader: _Reader, spec: LayerSpec) -> _Layer:
    """One layer's details (its own serialize()), checked against the expected network."""
    kind = spec.kind
    if kind == "con":
        name = reader.expect("con_4", "con_5", "con_6")
        params = reader.tensor().reshape(-1)
        filters, size_y, size_x, stride_y, stride_x = (reader.int() for _ in range(5))
        pad_y, pad_x = reader.int(), reader.int()
        weight_shape, bias_shape = reader.alias_tensor(), reader.alias_tensor()
        for _ in range(4):  # learning-rate and weight-decay multipliers
            reader.float()
        use_bias = reader.bool() if name != "con_4" else True
        if name == "con_6" and reader.bool():
            raise reader.fail("a conv with a fused relu")
        if (filters, size_y, size_x, stride_y, stride_x) != (
            spec.channels,
            spec.size,
            spec.size,
            spec.stride,
            spec.stride,
        ):
            raise reader.fail(f"a {size_y}x{size_x}/{stride_y} conv of {filters} filters")
        padding = spec.size // 2 if spec.stride == 1 else 0  # dlib's default for con<>
        if (pad_y, pad_x) != (padding, padding):
            raise reader.fail(f"a conv padded by {pad_y}x{pad_x}")
        n_weight = math.prod(weight_shape)
        bias = params[n_weight : n_weight + math.prod(bias_shape)] if use_bias else np.zeros(filters, np.float32)
        return _Layer(spec, params[:n_weight].reshape(weight_shape), bias, padding)
    if kind == "affine":
        name = reader.expect("affine_", "affine_2")
        params = reader.tensor().reshape(-1)
        gamma_shape, beta_shape = reader.alias_tensor(), reader.alias_tensor()
        if reader.int() != 0:  # layer_mode: CONV_MODE is 0
            raise reader.fail("an affine layer not in convolution mode")
        if name == "affine_2" and reader.bool():
            raise reader.fail("a disabled affine layer")
        n_gamma = math.prod(gamma_shape)
        return _Layer(spec, params[:n_gamma], params[n_gamma : n_gamma + math.prod(beta_shape)])
    if kind == "relu":
        if reader.expect("relu_", "relu_2") == "relu_2" and reader.bool():
            raise reader.fail("a disabled relu")
        return _Layer(spec)
    if kind in ("max_pool", "avg_pool"):
        reader.expect(f"{kind}_2")
        size_y, size_x, stride_y, stride_x, pad_y, pad_x = (reader.int() for _ in range(6))
        if (size_y, size_x, stride_y, stride_x, pad_y, pad_x) != (spec.size, spec.size, spec.stride, spec.stride, 0, 0):
            raise reader.fail(f"a {size_y}x{size_x}/{stride_y} {kind} padded by {pad_y}")
        return _Layer(spec)
    if kind == "add_prev":
        reader.expect("add_prev_")
        return _Layer(spec)
    if kind == "fc":
        name = reader.expect("fc_2", "fc_3")
        outputs, inputs = reader.int(), reader.int()
        params = reader.tensor().reshape(-1)
        reader.alias_tensor(), reader.alias_tensor()
        if reader.int() != 1 or outputs != spec.channels:  # fc_bias_mode FC_NO_BIAS is 1
            raise reader.fail(f"an fc layer of {outputs} outputs with a bias")
        for _ in range(4):
            reader.float()
        if name == "fc_3":
            reader.bool()
        return _Layer(spec, params[: inputs * outputs].reshape(inputs, outputs))
    raise AssertionError(kind)


def read_dlib_resnet(path: Path) -> DlibResNetWeights:
    """Parse the .dat file into the layers of ANET_TYPE (input first), checking each against the expected network."""
    reader = _Reader(Path(path).read_bytes(), Path(path))
    reader.version(1)  # add_loss_layer
    if reader.expect("loss_metric_", "loss_metric_2") == "loss_metric_2":
        reader.float(), reader.float()  # margin, distance threshold: training only
    for spec in reversed(ANET_TYPE[1:]):  # wrapper versions, outermost first
        reader.version(1 if spec.kind in _WRAPPERS else 2)
    input_version = reader.version(2, 3)  # the add_layer holding the input layer
    reader.expect("input_rgb_image_sized")
    means = (reader.float(), reader.float(), reader.float())
    if (reader.int(), reader.int()) != (CHIP_SIZE, CHIP_SIZE):
        raise reader.fail(f"an input size other than {CHIP_SIZE}x{CHIP_SIZE}")
    weights = DlibResNetWeights(means)
    for index, spec in enumerate(ANET_TYPE):
        if spec.kind in _WRAPPERS:
            weights.layers.append(_Layer(spec))
            continue
        weights.layers.append(_read_details(reader, spec))
        for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, get_output_and_gradient_input_disabled
            reader.bool()
        for _ in range(3):  # x_grad, cached_output, params_grad (or grad_final): training state
            reader.tensor()
        if index == 0 and input_version == 3:
            reader.int()  # _sample_expansion_factor
    if reader.pos != len(reader.data):
        raise reader.fail(f"{len(reader.data) - reader.pos} bytes left after the network")
    return weights


def fold_affine(weights: DlibResNetWeights) -> list[_Layer]:
    """The layers with each affine folded into the conv before it (weight x gamma, bias x gamma + beta)."""
    layers = []
    for layer, after in zip(weights.layers, [*weights.layers[1:], None], strict=True):
        if layer.spec.kind == "affine":
            continue
        if layer.spec.kind == "con":
            if after is None or after.spec.kind != "affine":
                raise ValueError("dlib ResNet: every conv is followed by an affine layer")
            scale, shift = after.weight, after.bias
            layer = _Layer(
                layer.spec, layer.weight * scale[:, None, None, None], layer.bias * scale + shift, layer.padding
            )
        layers.append(layer)
    return layers


def preprocess(chips: np.ndarray, channel_means: tuple[float, float, float]) -> np.ndarray:
    """(N, 150, 150, 3) uint8 RGB chips -> the network's float32 (N, 3, 150, 150) input, as dlib's input layer."""
    x = np.asarray(chips, dtype=np.float32) - np.asarray(channel_means, dtype=np.float32)
    return np.ascontiguousarray((x / np.float32(256.0)).transpose(0, 3, 1, 2))


def onnx_model(weights: DlibResNetWeights) -> bytes:
    """The same network as an ONNX graph (input `chips`: `preprocess`ed, any batch size; output `descriptors`)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, initializers = [], []
    tags: dict[int, tuple[str, tuple[int, int, int]]] = {}
    name, shape = "chips", (3, CHIP_SIZE, CHIP_SIZE)  # the current tensor and its (C, H, W)

    def add(op: str, inputs: list[str], **attributes) -> str:
        output = f"t{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output

    def constant(array: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), f"w{len(initializers)}"))
        return initializers[-1].name

    def pooled(size: int, stride: int, padding: int = 0) -> tuple[int, int, int]:
        return (shape[0], *((side + 2 * padding - size) // stride + 1 for side in shape[1:]))

    for layer in fold_affine(weights):
        spec = layer.spec
        if spec.kind == "con":
            pads = [layer.padding] * 4
            strides = [spec.stride] * 2
            name = add("Conv", [name, constant(layer.weight), constant(layer.bias)], strides=strides, pads=pads)
            shape = (spec.channels, *pooled(spec.size, spec.stride, layer.padding)[1:])
        elif spec.kind == "relu":
            name = add("Relu", [name])
        elif spec.kind in ("max_pool", "avg_pool") and spec.size:
            op = "MaxPool" if spec.kind == "max_pool" else "AveragePool"
            name = add(op, [name], kernel_shape=[spec.size] * 2, strides=[spec.stride] * 2)
            shape = pooled(spec.size, spec.stride)
        elif spec.kind == "avg_pool":
            name, shape = add("GlobalAveragePool", [name]), (shape[0], 1, 1)
        elif spec.kind == "tag":
            tags[spec.tag] = (name, shape)
        elif spec.kind == "skip":
            name, shape = tags[spec.tag]
        elif spec.kind == "add_prev":
            other, other_shape = tags[spec.tag]
            total = tuple(max(p, q) for p, q in zip(shape, other_shape, strict=True))
            filled = []
            for tensor, size in ((name, shape), (other, other_shape)):
                if size != total:
                    ends = [0, total[0] - size[0], total[1] - size[1], total[2] - size[2]]
                    tensor = add("Pad", [tensor, constant(np.array([0, 0, 0, 0, *ends], dtype=np.int64))])
                filled.append(tensor)
            name, shape = add("Add", filled), total
        elif spec.kind == "fc":
            name = add("MatMul", [add("Flatten", [name]), constant(layer.weight)])
    nodes[-1].output[0] = "descriptors"
    graph = helper.make_graph(
        nodes,
        "dlib_face_recognition_resnet_model_v1",
        [helper.make_tensor_value_info("chips", TensorProto.FLOAT, ["n", 3, CHIP_SIZE, CHIP_SIZE])],
        [helper.make_tensor_value_info("descriptors", TensorProto.FLOAT, ["n", 128])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()
