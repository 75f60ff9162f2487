"""ModelOpt / pytorch_quantization INT8 QAT exports (INT8_DEFAULT_CFG, torch.onnx export), built with onnx.helper.

The layout of those exports: every Conv / Gemm has its own input quantizer, per-tensor, int8, zero point 0
(`x -> QuantizeLinear -> DequantizeLinear -> Conv`), and its weight quantizer per output channel with the float
weight kept (`W -> QuantizeLinear(axis 0) -> DequantizeLinear(axis 0) -> Conv`). No output quantizers: Conv -> BN ->
Relu / Relu6 (Clip 0..6) -> the next layer's input quantizer; residual Adds have no quantizers. Names follow
torch's exporter ("/features/features.1/conv/conv.0/conv.0.0/Conv", "features.1.conv.0.0.weight").

`mobilenet_v2_qat` is MobileNetV2's layer structure (torchvision's inverted residual settings, 52 Conv + BN,
10 residual Adds, a Gemm classifier), `width` scales the channels and `size` is the input's side.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

#: torchvision's MobileNetV2 inverted residual settings: expansion t, channels c, repeats n, stride s.
MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.convs = 0

    def const(self, name, array):
        self.inits.append(nh.from_array(np.asarray(array), name))
        return name

    def input_quantizer(self, x: str, prefix: str, amax: float) -> str:
        """x -> Q -> DQ, per-tensor int8, zero point 0, scale amax / 127 (ModelOpt's calibrated max)."""
        s = self.const(f"{prefix}/input_quantizer/scale", np.array(amax / 127, np.float32))
        z = self.const(f"{prefix}/input_quantizer/zero_point", np.array(0, np.int8))
        q = f"{prefix}/input_quantizer/QuantizeLinear"
        dq = f"{prefix}/input_quantizer/DequantizeLinear"
        self.nodes += [h.make_node("QuantizeLinear", [x, s, z], [q + "_output_0"], name=q),
                       h.make_node("DequantizeLinear", [q + "_output_0", s, z], [dq + "_output_0"], name=dq)]
        return dq + "_output_0"

    def weight_quantizer(self, name: str, prefix: str, w: np.ndarray) -> str:
        """Float W -> Q(axis 0) -> DQ(axis 0), per output channel, scale amax / 127 (symmetric)."""
        amax = np.abs(w.reshape(w.shape[0], -1)).max(1)
        self.const(name, w.astype(np.float32))
        s = self.const(f"{prefix}/weight_quantizer/scale", (amax / 127).astype(np.float32))
        z = self.const(f"{prefix}/weight_quantizer/zero_point", np.zeros(w.shape[0], np.int8))
        q = f"{prefix}/weight_quantizer/QuantizeLinear"
        dq = f"{prefix}/weight_quantizer/DequantizeLinear"
        self.nodes += [h.make_node("QuantizeLinear", [name, s, z], [q + "_output_0"], name=q, axis=0),
                       h.make_node("DequantizeLinear", [q + "_output_0", s, z], [dq + "_output_0"], name=dq, axis=0)]
        return dq + "_output_0"

    def conv_bn(self, x: str, prefix: str, weight: str, c_in: int, c_out: int, k: int, stride: int, group: int,
                act: str | None, amax: float) -> str:
        """Q/DQ -> Conv (no bias) -> BN -> Relu6 (Clip 0..6), Relu or nothing."""
        self.convs += 1
        fan_in = c_in // group * k * k
        w = self.rng.standard_normal((c_out, c_in // group, k, k)) * np.sqrt(2.0 / fan_in)
        xq = self.input_quantizer(x, prefix, amax)
        wq = self.weight_quantizer(weight, prefix, w)
        y = f"{prefix}/Conv_output_0"
        self.nodes.append(h.make_node("Conv", [xq, wq], [y], name=f"{prefix}/Conv", kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4, group=group,
                                      dilations=[1, 1]))
        bn = weight.rsplit(".", 1)[0].rsplit(".", 1)[0] + f".{int(weight.split('.')[-2]) + 1}"
        params = [self.const(f"{bn}.weight", self.rng.uniform(0.5, 1.5, c_out).astype(np.float32)),
                  self.const(f"{bn}.bias", (self.rng.standard_normal(c_out) * 0.2).astype(np.float32)),
                  self.const(f"{bn}.running_mean", (self.rng.standard_normal(c_out) * 0.2).astype(np.float32)),
                  self.const(f"{bn}.running_var", self.rng.uniform(0.5, 1.5, c_out).astype(np.float32))]
        out = f"{prefix}/BatchNormalization_output_0"
        self.nodes.append(h.make_node("BatchNormalization", [y, *params], [out],
                                      name=f"{prefix}/BatchNormalization", epsilon=1e-5, momentum=0.9))
        if act == "relu6":
            lo, hi = self.const(f"{prefix}/Constant_output_0", np.array(0, np.float32)), \
                self.const(f"{prefix}/Constant_1_output_0", np.array(6, np.float32))
            self.nodes.append(h.make_node("Clip", [out, lo, hi], [f"{prefix}/Clip_output_0"], name=f"{prefix}/Clip"))
            return f"{prefix}/Clip_output_0"
        if act == "relu":
            self.nodes.append(h.make_node("Relu", [out], [f"{prefix}/Relu_output_0"], name=f"{prefix}/Relu"))
            return f"{prefix}/Relu_output_0"
        return out

    def model(self, x_shape, y: str, y_shape, opset: int = 17) -> onnx.ModelProto:
        graph = h.make_graph(self.nodes, "main_graph", [h.make_tensor_value_info("input", T.FLOAT, x_shape)],
                             [h.make_tensor_value_info(y, T.FLOAT, y_shape)], self.inits)
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], producer_name="pytorch")
        model.ir_version = 8
        return model


def mobilenet_v2_qat(width: float = 0.5, size: int = 32, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2's structure in ModelOpt's INT8 QAT layout (see the module's docstring). Input "input"
    [1, 3, size, size], output "output" [1, classes]."""
    b = _Builder(seed)

    def ch(c):
        return max(8, int(c * width + 4) // 8 * 8)

    c_in = ch(32)
    x = b.conv_bn("input", "/features/features.0/features.0.0", "features.0.0.weight", 3, c_in, 3, 2, 1, "relu6",
                  amax=3.0)
    block = 1
    for t, c, n, s in MOBILENET_V2:
        c_out = ch(c)
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = c_in * t
            p = f"/features/features.{block}/conv"
            y, k = x, 0
            if t != 1:
                y = b.conv_bn(y, f"{p}/conv.0/conv.0.0", f"features.{block}.conv.0.0.weight", c_in, hidden, 1, 1, 1,
                              "relu6", amax=6.0 if block > 1 else 4.0)
                k = 1
            y = b.conv_bn(y, f"{p}/conv.{k}/conv.{k}.0", f"features.{block}.conv.{k}.0.weight", hidden, hidden, 3,
                          stride, hidden, "relu6", amax=6.0)
            y = b.conv_bn(y, f"{p}/conv.{k + 1}", f"features.{block}.conv.{k + 1}.weight", hidden, c_out, 1, 1, 1,
                          None, amax=6.0)
            if stride == 1 and c_in == c_out:
                add = f"/features/features.{block}/Add"
                b.nodes.append(h.make_node("Add", [x, y], [add + "_output_0"], name=add))
                y = add + "_output_0"
            x, c_in = y, c_out
            block += 1
    last = ch(1280 * max(1.0, width))  # torchvision: the last channel never shrinks
    x = b.conv_bn(x, f"/features/features.{block}/features.{block}.0", f"features.{block}.0.weight", c_in, last, 1, 1,
                  1, "relu6", amax=8.0)
    b.nodes += [h.make_node("GlobalAveragePool", [x], ["/GlobalAveragePool_output_0"], name="/GlobalAveragePool"),
                h.make_node("Flatten", ["/GlobalAveragePool_output_0"], ["/Flatten_output_0"], name="/Flatten", axis=1)]
    xq = b.input_quantizer("/Flatten_output_0", "/classifier/classifier.1", 6.0)
    w = b.rng.standard_normal((classes, last)) * np.sqrt(1.0 / last)
    wq = b.weight_quantizer("classifier.1.weight", "/classifier/classifier.1", w)
    bias = b.const("classifier.1.bias", (b.rng.standard_normal(classes) * 0.1).astype(np.float32))
    b.nodes.append(h.make_node("Gemm", [xq, wq, bias], ["output"], name="/classifier/classifier.1/Gemm",
                               alpha=1.0, beta=1.0, transB=1))
    return b.model([1, 3, size, size], "output", [1, classes])


def resnet_qat(width: float = 0.25, size: int = 32, classes: int = 10, blocks=(2, 2, 2, 2), seed: int = 0,
               amax: float = 4.0) -> onnx.ModelProto:
    """ResNet-18's structure (torchvision BasicBlock, `blocks` per stage: (2, 2, 2, 2) is ResNet-18) in
    ModelOpt's INT8 QAT layout: every conv (the downsample 1x1s too) has its own input quantizer, the residual
    Adds none; the block input feeds its convs' quantizers and, in float, the Add. Channels 64 * `width`."""
    b = _Builder(seed)
    c = max(8, int(64 * width))
    x = b.conv_bn("input", "/conv1", "conv1.0.weight", 3, c, 7, 2, 1, "relu", amax=3.0)
    b.nodes.append(h.make_node("MaxPool", [x], ["/maxpool/MaxPool_output_0"], name="/maxpool/MaxPool",
                               kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, c_in = "/maxpool/MaxPool_output_0", c
    for stage, n in enumerate(blocks):
        c_out = c * 2 ** stage
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            p = f"/layer{stage + 1}/layer{stage + 1}.{i}"
            wp = f"layer{stage + 1}.{i}"
            y = b.conv_bn(x, f"{p}/conv1", f"{wp}.conv1.0.weight", c_in, c_out, 3, stride, 1, "relu", amax=amax)
            y = b.conv_bn(y, f"{p}/conv2", f"{wp}.conv2.0.weight", c_out, c_out, 3, 1, 1, None, amax=amax)
            identity = x
            if stride != 1 or c_in != c_out:
                identity = b.conv_bn(x, f"{p}/downsample/downsample.0", f"{wp}.downsample.0.weight", c_in, c_out, 1,
                                     stride, 1, None, amax=amax)
            b.nodes += [h.make_node("Add", [y, identity], [f"{p}/Add_output_0"], name=f"{p}/Add"),
                        h.make_node("Relu", [f"{p}/Add_output_0"], [f"{p}/Relu_1_output_0"], name=f"{p}/Relu_1")]
            x, c_in = f"{p}/Relu_1_output_0", c_out
    b.nodes += [h.make_node("GlobalAveragePool", [x], ["/avgpool/GlobalAveragePool_output_0"],
                            name="/avgpool/GlobalAveragePool"),
                h.make_node("Flatten", ["/avgpool/GlobalAveragePool_output_0"], ["/Flatten_output_0"], name="/Flatten",
                            axis=1)]
    xq = b.input_quantizer("/Flatten_output_0", "/fc", amax)
    w = b.rng.standard_normal((classes, c_in)) * np.sqrt(1.0 / c_in)
    wq = b.weight_quantizer("fc.weight", "/fc", w)
    bias = b.const("fc.bias", (b.rng.standard_normal(classes) * 0.1).astype(np.float32))
    b.nodes.append(h.make_node("Gemm", [xq, wq, bias], ["output"], name="/fc/Gemm", alpha=1.0, beta=1.0, transB=1))
    return b.model([1, 3, size, size], "output", [1, classes])
