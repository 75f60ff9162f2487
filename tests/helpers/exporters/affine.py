"""Pattern 2 (tests/test_exporters_affine.py): per-channel affines written as Mul / Add by a constant
(torchvision's FrozenBatchNorm2d). RNG is the one the tests draw from too, so their models stay as they were."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


RNG = np.random.default_rng(142)


C = 6


def make_model(nodes, inits, x_shape, out_shape, opset=17):
    graph = h.make_graph(nodes, "main_graph", [h.make_tensor_value_info("input", T.FLOAT, x_shape)],
                         [h.make_tensor_value_info("output", T.FLOAT, out_shape)], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], producer_name="pytorch")
    model.ir_version = 8
    return model


def conv_layer(x, y, name="/backbone/conv1/Conv", pads=1, cin=3):
    w = nh.from_array((RNG.standard_normal((C, cin, 3, 3)) * 0.3).astype(np.float32), f"{name}.weight")
    return h.make_node("Conv", [x, w.name], [y], name=name, pads=[pads] * 4, kernel_shape=[3, 3]), w


def constant(name, values, shape):
    return nh.from_array(np.asarray(values, np.float32).reshape(shape), name)


def frozen_bn(shape=(1, C, 1, 1), scale_first=False):
    """torchvision FrozenBatchNorm2d after a bias-free conv: x * scale + bias (negative scales included)."""
    conv, w = conv_layer("input", "/backbone/conv1/Conv_output_0")
    scale = RNG.uniform(0.5, 1.5, C) * np.where(np.arange(C) % 3 == 1, -1, 1)
    s, b = constant("onnx::Mul_501", scale, shape), constant("onnx::Add_502", RNG.standard_normal(C), shape)
    mul_in = [s.name, "/backbone/conv1/Conv_output_0"] if scale_first else ["/backbone/conv1/Conv_output_0", s.name]
    nodes = [conv, h.make_node("Mul", mul_in, ["/backbone/bn1/Mul_output_0"], name="/backbone/bn1/Mul"),
             h.make_node("Add", ["/backbone/bn1/Mul_output_0", b.name], ["/backbone/bn1/Add_output_0"],
                         name="/backbone/bn1/Add"),
             h.make_node("Relu", ["/backbone/bn1/Add_output_0"], ["output"], name="/backbone/relu/Relu")]
    return make_model(nodes, [w, s, b], [1, 3, 8, 8], [1, C, 8, 8])
