"""Pattern 7 (tests/test_exporters_levit.py): MatMul(const W) -> Flatten/Reshape -> BatchNormalization (timm
LeViT's LinearNorm). RNG is shared with the tests."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

RNG = np.random.default_rng(147)
B, N, K, F = 2, 5, 8, 6


def levit_linear_norm(flatten="Flatten", axis=2, shape=(-1, F), zero_shift=False, bias=False, shape_reader=None):
    """`shape_reader` ("Shape" or "Size"): `.reshape_as(x)` as torch exports it, the back Reshape's shape read
    from the MatMul's output by a Shape node (Size: a Size node reads it too, its count an extra output)."""
    gamma = RNG.uniform(0.5, 1.5, F) * np.where(np.arange(F) % 3 == 1, -1, 1)
    beta = np.zeros(F) if zero_shift else RNG.standard_normal(F)
    mean = np.zeros(F) if zero_shift else RNG.standard_normal(F)
    inits = [nh.from_array((RNG.standard_normal((K, F)) * 0.3).astype(np.float32), "onnx::MatMul_301"),
             *[nh.from_array(v.astype(np.float32), f"blocks.0.m.c.bn.{n}") for n, v in
               (("weight", gamma), ("bias", beta), ("running_mean", mean), ("running_var", RNG.uniform(0.5, 2, F)))],
             nh.from_array(np.array([B, N, F], np.int64), "back_shape")]
    nodes = [h.make_node("MatMul", ["x", "onnx::MatMul_301"], ["/m/c/linear/MatMul_output_0"], name="/m/c/linear/MatMul")]
    if bias:  # a Linear with a bias: MatMul -> Add(c)
        nodes[0].output[0] = "/m/c/linear/MatMul_raw"
        inits.append(nh.from_array(RNG.standard_normal(F).astype(np.float32), "blocks.0.m.c.linear.bias"))
        nodes.append(h.make_node("Add", ["blocks.0.m.c.linear.bias", "/m/c/linear/MatMul_raw"],
                                 ["/m/c/linear/MatMul_output_0"], name="/m/c/linear/Add"))
    if flatten == "Flatten":
        nodes.append(h.make_node("Flatten", ["/m/c/linear/MatMul_output_0"], ["/m/c/Flatten_output_0"],
                                 name="/m/c/Flatten", axis=axis))
    else:
        inits.append(nh.from_array(np.array(shape, np.int64), "flat_shape"))
        nodes.append(h.make_node("Reshape", ["/m/c/linear/MatMul_output_0", "flat_shape"], ["/m/c/Flatten_output_0"],
                                 name="/m/c/Reshape"))
    nodes += [h.make_node("BatchNormalization", ["/m/c/Flatten_output_0"] + [f"blocks.0.m.c.bn.{n}" for n in
                                                                             ("weight", "bias", "running_mean",
                                                                              "running_var")],
                          ["/m/c/bn/BatchNormalization_output_0"], name="/m/c/bn/BatchNormalization", epsilon=1e-5),
              h.make_node("Reshape", ["/m/c/bn/BatchNormalization_output_0", "back_shape"], ["y"], name="/m/c/Reshape_1")]
    outputs = [h.make_tensor_value_info("y", T.FLOAT, [B, N, F])]
    if shape_reader:
        inits = [i for i in inits if i.name != "back_shape"]
        nodes.insert(-1, h.make_node("Shape", ["/m/c/linear/MatMul_output_0"], ["back_shape"], name="/m/c/Shape"))
    if shape_reader == "Size":
        nodes.append(h.make_node("Size", ["/m/c/linear/MatMul_output_0"], ["count"], name="/m/c/Size"))
        outputs.append(h.make_tensor_value_info("count", T.INT64, []))
    graph = h.make_graph(nodes, "main_graph", [h.make_tensor_value_info("x", T.FLOAT, [B, N, K])], outputs, inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], producer_name="pytorch")
    model.ir_version = 8
    return model
