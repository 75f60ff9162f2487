"""Synthetic benchmark models: VGG-like and ResNet-like nets full of Conv -> BatchNormalization.

A model kind is ``ARCH`` or ``ARCH-STYLE``:

* ARCH ``vgg``: stages of Conv(3x3, pad 1) -> BN -> Relu with MaxPool between them, then
  Flatten -> Gemm -> BN (over features, optional) -> Relu -> Gemm.
* ARCH ``resnet``: a stem Conv -> BN -> Relu, then basic blocks
  Conv -> BN -> Relu -> Conv -> BN, + shortcut (identity or 1x1 Conv -> BN), Add -> Relu,
  then GlobalAveragePool -> Flatten -> Gemm.
* STYLE ``qat``: float weight -> QuantizeLinear -> DequantizeLinear (per-channel int8, axis 0, zero
  point 0, scale = max|W| / 127 per output channel), and a per-tensor Q/DQ on each Conv/Gemm input.
* STYLE ``int``: int8 weight initializer -> DequantizeLinear (per-channel) and the same per-tensor
  Q/DQ on each Conv/Gemm input.

Channel widths are scaled so that the initializers add up to about the requested size in MB.
Weights and BN statistics are drawn from a seeded generator, so a (kind, size, seed) triple always
gives the same file. BN statistics look trained: positive variances, some negative gammas.

Usage: ``python make_models.py vgg-qat 100 -o vgg-qat-100mb.onnx``
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; older tools accept it
INPUT_SHAPE = (1, 3, 32, 32)
NUM_CLASSES = 10
ARCHS = ("vgg", "resnet")
STYLES = ("float", "qat", "int")
KINDS = ("vgg", "resnet", "vgg-qat", "vgg-int", "resnet-qat", "resnet-int")
MAX_MB = 1900  # a ModelProto must serialise to less than 2 GB

ACT_SCALE = 8.0 / 127  # per-tensor activation quantizer: int8 over about [-8, 8]
NEGATIVE_GAMMA_FRACTION = 0.1
BN_EPSILON = 1e-5


def parse_kind(kind: str) -> tuple[str, str]:
    """Split ``"vgg-qat"`` into ``("vgg", "qat")``; a bare arch gets style ``"float"``."""
    arch, _, style = kind.partition("-")
    style = style or "float"
    if arch not in ARCHS or style not in STYLES:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")
    return arch, style


class GraphBuilder:
    """Accumulates nodes and initializers; each layer method returns its output tensor name."""

    def __init__(self, style: str, seed: int):
        self.style = style
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counts: dict[str, int] = {}

    # -- plumbing ---------------------------------------------------------------------------

    def _name(self, prefix: str) -> str:
        n = self._counts.get(prefix, 0)
        self._counts[prefix] = n + 1
        return f"{prefix}{n}"

    def _const(self, prefix: str, array: np.ndarray) -> str:
        name = self._name(prefix)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def _node(self, op: str, inputs: list[str], prefix: str | None = None, **attrs) -> str:
        out = self._name(prefix or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    # -- quantization -----------------------------------------------------------------------

    def _quantize_input(self, x: str) -> str:
        """Per-tensor int8 Q/DQ on an activation (quantized styles only)."""
        if self.style == "float":
            return x
        scale = self._const("act_scale", np.array(ACT_SCALE, dtype=np.float32))
        zero = self._const("act_zp", np.array(0, dtype=np.int8))
        q = self._node("QuantizeLinear", [x, scale, zero], "act_q")
        return self._node("DequantizeLinear", [q, scale, zero], "act_dq")

    def _weight(self, w: np.ndarray) -> str:
        """The weight input of a Conv/Gemm whose output channels are on axis 0."""
        if self.style == "float":
            return self._const("w", w)
        max_abs = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        scale_values = (np.maximum(max_abs, 1e-8) / 127).astype(np.float32)
        scale = self._const("w_scale", scale_values)
        zero = self._const("w_zp", np.zeros(w.shape[0], dtype=np.int8))
        if self.style == "qat":
            q = self._node("QuantizeLinear", [self._const("w", w), scale, zero], "w_q", axis=0)
        else:
            per_channel = scale_values.reshape((-1,) + (1,) * (w.ndim - 1))
            q = self._const("w_int8", np.clip(np.rint(w / per_channel), -127, 127).astype(np.int8))
        return self._node("DequantizeLinear", [q, scale, zero], "w_dq", axis=0)

    def _he_normal(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        std = math.sqrt(2.0 / fan_in)
        return self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    # -- layers -----------------------------------------------------------------------------

    def conv(self, x: str, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> str:
        w = self._he_normal((cout, cin, kernel, kernel), cin * kernel * kernel)
        pad = kernel // 2
        return self._node(
            "Conv",
            [self._quantize_input(x), self._weight(w)],
            kernel_shape=[kernel, kernel],
            pads=[pad] * 4,
            strides=[stride, stride],
        )

    def gemm(self, x: str, fin: int, fout: int) -> str:
        w = self._he_normal((fout, fin), fin)
        b = self._const("fc_b", (self.rng.standard_normal(fout) * 0.1).astype(np.float32))
        return self._node("Gemm", [self._quantize_input(x), self._weight(w), b], transB=1)

    def bn(self, x: str, channels: int, gamma_scale: float = 1.0) -> str:
        """BatchNormalization with trained-looking statistics."""
        rng = self.rng
        gamma = rng.uniform(0.5, 1.5, channels) * gamma_scale
        gamma[rng.random(channels) < NEGATIVE_GAMMA_FRACTION] *= -1
        params = [
            gamma,
            rng.normal(0.0, 0.2, channels),  # beta
            rng.normal(0.0, 0.2, channels),  # running mean
            rng.uniform(0.5, 2.0, channels),  # running var
        ]
        names = [self._const(f"bn_{p}", v.astype(np.float32))
                 for p, v in zip(("scale", "bias", "mean", "var"), params)]
        return self._node("BatchNormalization", [x, *names], "bn", epsilon=BN_EPSILON)

    def conv_bn(self, x: str, cin: int, cout: int, kernel: int = 3, stride: int = 1,
                relu: bool = True, gamma_scale: float = 1.0) -> str:
        y = self.bn(self.conv(x, cin, cout, kernel, stride), cout, gamma_scale)
        return self.relu(y) if relu else y

    def relu(self, x: str) -> str:
        return self._node("Relu", [x])

    def maxpool(self, x: str) -> str:
        return self._node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])

    def add(self, a: str, b: str) -> str:
        return self._node("Add", [a, b])

    def global_avg_pool(self, x: str) -> str:
        return self._node("GlobalAveragePool", [x], "gap")

    def flatten(self, x: str) -> str:
        return self._node("Flatten", [x], axis=1)

    def output(self, x: str) -> None:
        self.nodes.append(helper.make_node("Identity", [x], ["output"], name="output"))


# -- architectures --------------------------------------------------------------------------

VGG_STAGES = (1, 2, 4, 8, 8)  # channel multipliers of the width; a MaxPool after all but the last
VGG_CONVS_PER_STAGE = 2
RESNET_STAGES = (1, 2, 4, 8)  # the first block of each later stage halves H and W
RESNET_BLOCKS_PER_STAGE = 2


def build_vgg(b: GraphBuilder, x: str, width: int, fc_bn: bool = True) -> str:
    cin, size = INPUT_SHAPE[1], INPUT_SHAPE[2]
    for i, mult in enumerate(VGG_STAGES):
        cout = mult * width
        for _ in range(VGG_CONVS_PER_STAGE):
            x = b.conv_bn(x, cin, cout)
            cin = cout
        if i < len(VGG_STAGES) - 1:
            x = b.maxpool(x)
            size //= 2
    hidden = VGG_STAGES[-1] * width
    x = b.gemm(b.flatten(x), cin * size * size, hidden)
    if fc_bn:
        x = b.bn(x, hidden)
    return b.gemm(b.relu(x), hidden, NUM_CLASSES)


def _basic_block(b: GraphBuilder, x: str, cin: int, cout: int, stride: int) -> str:
    y = b.conv_bn(x, cin, cout, stride=stride)
    y = b.conv_bn(y, cout, cout, relu=False, gamma_scale=0.3)  # keeps the residual sum tame
    shortcut = x if stride == 1 and cin == cout else b.conv_bn(x, cin, cout, 1, stride, relu=False)
    return b.relu(b.add(y, shortcut))


def build_resnet(b: GraphBuilder, x: str, width: int, fc_bn: bool = True) -> str:
    del fc_bn  # the ResNet head has no BN
    cin = width
    x = b.conv_bn(x, INPUT_SHAPE[1], cin)
    for i, mult in enumerate(RESNET_STAGES):
        cout = mult * width
        for j in range(RESNET_BLOCKS_PER_STAGE):
            stride = 2 if i > 0 and j == 0 else 1
            x = _basic_block(b, x, cin, cout, stride)
            cin = cout
    return b.gemm(b.flatten(b.global_avg_pool(x)), cin, NUM_CLASSES)


ARCH_BUILDERS: dict[str, Callable[..., str]] = {"vgg": build_vgg, "resnet": build_resnet}


# -- models ---------------------------------------------------------------------------------

def build_model(kind: str, width: int, seed: int = 0, fc_bn: bool = True) -> onnx.ModelProto:
    """The model of ``kind`` with base channel width ``width``."""
    arch, style = parse_kind(kind)
    b = GraphBuilder(style, seed)
    b.output(ARCH_BUILDERS[arch](b, "input", width, fc_bn=fc_bn))
    graph = helper.make_graph(
        b.nodes,
        f"{kind}_w{width}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(INPUT_SHAPE))],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [INPUT_SHAPE[0], NUM_CLASSES])],
        initializer=b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="qdqfold-bench")
    model.ir_version = IR_VERSION
    return model


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def width_for_size(kind: str, size_mb: float, fc_bn: bool = True) -> int:
    """The base width whose initializers come closest to ``size_mb`` megabytes (1 MB = 1e6 bytes).

    Every weight is (a multiple of width) x (a multiple of width) or (a constant) x (a multiple of
    width), so the initializer size is exactly a quadratic in the width: measure three tiny
    models, fit the quadratic and solve it.
    """
    widths = np.array([1.0, 2.0, 3.0])
    sizes = [initializer_bytes(build_model(kind, int(w), fc_bn=fc_bn)) for w in widths]
    a, b, c = np.polyfit(widths, sizes, 2)
    target = size_mb * 1e6
    root = (-b + math.sqrt(max(0.0, b * b - 4 * a * (c - target)))) / (2 * a)
    candidates = {max(1, math.floor(root)), max(1, math.ceil(root))}
    return min(candidates, key=lambda w: abs(a * w * w + b * w + c - target))


def make_model(kind: str, size_mb: float, seed: int = 0, fc_bn: bool = True) -> onnx.ModelProto:
    """A model of ``kind`` whose initializers total about ``size_mb`` MB."""
    if size_mb > MAX_MB:
        raise ValueError(f"{size_mb} MB is over the {MAX_MB} MB limit of a single-file model")
    return build_model(kind, width_for_size(kind, size_mb, fc_bn), seed, fc_bn)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("size_mb", type=float, help="target initializer size in MB (1e6 bytes)")
    parser.add_argument("-o", "--output", required=True, help="where to save the .onnx file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fc-bn", dest="fc_bn", action="store_false",
                        help="VGG only: no BatchNormalization after the first Gemm")
    args = parser.parse_args(argv)
    model = make_model(args.kind, args.size_mb, args.seed, args.fc_bn)
    onnx.save(model, args.output)
    bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    print(f"{args.output}: {initializer_bytes(model) / 1e6:.1f} MB of initializers, "
          f"{len(model.graph.node)} nodes, {bn} BatchNormalization")


if __name__ == "__main__":
    main()
