"""Patterns 3 and 4 (tests/test_exporters_brevitas.py): Brevitas' QCDQ Clip between the integer weight and its
DequantizeLinear, and initializers listed as graph inputs. RNG is shared with the tests."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from helpers.qdq import Case

RNG = np.random.default_rng(144)


C = 4


def keep_initializers_as_inputs_model(ir_version=8, opset=13):
    w = nh.from_array((RNG.standard_normal((C, 3, 3, 3)) * 0.3).astype(np.float32), "conv.weight")
    b = nh.from_array(RNG.standard_normal(C).astype(np.float32), "conv.bias")
    gamma = RNG.uniform(0.5, 1.5, C) * np.array([1, -1, 1, 1])
    bn = [nh.from_array(v.astype(np.float32), f"bn.{n}") for n, v in
          (("weight", gamma), ("bias", RNG.standard_normal(C)), ("running_mean", RNG.standard_normal(C)),
           ("running_var", RNG.uniform(0.5, 2, C)))]
    inits = [w, b, *bn]
    nodes = [h.make_node("Conv", ["inp.1", "conv.weight", "conv.bias"], ["5"], name="Conv_0", pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["5", *[t.name for t in bn]], ["6"], name="BatchNormalization_1",
                         epsilon=1e-5),
             h.make_node("Relu", ["6"], ["7"], name="Relu_2")]
    # torch.onnx.export(..., keep_initializers_as_inputs=True): the data input first, then every initializer.
    inputs = [h.make_tensor_value_info("inp.1", T.FLOAT, [1, 3, 6, 6])] + [
        h.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = h.make_graph(nodes, "torch_jit", inputs, [h.make_tensor_value_info("7", T.FLOAT, [1, C, 6, 6])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], producer_name="pytorch")
    model.ir_version = ir_version
    return model


def with_clip(case: Case, lo=-127, hi=127, container=T.INT8):
    """Brevitas QCDQ: int W -> Clip(lo, hi) -> DequantizeLinear (TorchScript export), or
    W -> QuantizeLinear -> Clip -> DequantizeLinear (dynamo export); the bounds are scalars of the integer type."""
    m = case.model
    dtype = np.int8 if container == T.INT8 else np.uint8
    m.graph.initializer.extend([nh.from_array(np.array(lo, dtype), "clip_min"),
                                nh.from_array(np.array(hi, dtype), "clip_max")])
    nodes = []
    for n in m.graph.node:
        if n.name == "w_DQ":
            nodes.append(h.make_node("Clip", [n.input[0], "clip_min", "clip_max"], ["w_clipped"], name="w_Clip"))
            n.input[0] = "w_clipped"
        nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return case
