"""Pattern 11 (tests/test_exporters_ortq.py): Conv -> Q -> DQ -> BN -> Relu -> Q -> DQ (onnx-neural-compressor)."""

from __future__ import annotations

import numpy as np
from onnx import helper as h
from onnx import numpy_helper as nh


def with_relu_after_bn(case):
    """Conv -> Q -> DQ -> BN -> Relu -> Q -> DQ (onnx-neural-compressor's layout)."""
    m = case.model
    for n in m.graph.node:
        if n.op_type == "BatchNormalization":
            n.output[0] = "bn_out"
    m.graph.node.append(h.make_node("Relu", ["bn_out"], ["relu_out"], name="relu"))
    m.graph.node.extend([h.make_node("QuantizeLinear", ["relu_out", "r_scale", "r_zero"], ["rq"], name="relu_Q"),
                         h.make_node("DequantizeLinear", ["rq", "r_scale", "r_zero"], ["out"], name="relu_DQ")])
    m.graph.initializer.extend([nh.from_array(np.array(0.05, np.float32), "r_scale"),
                                nh.from_array(np.array(0, np.uint8), "r_zero")])
    return case
