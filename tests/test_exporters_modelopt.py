"""Issue 14, pattern 5 (not folded yet): ModelOpt's exports for TensorRT with custom trt:: quantizers.

FP8: float W -> trt::TRT_FP8QuantizeLinear(Constant scale) -> trt::TRT_FP8DequantizeLinear -> Conv -> BN;
INT4: float W -> trt::DequantizeLinear(scale, axis=0) -> Conv -> BN. qdqfold does not fold through these yet: the
BN is kept with `tensorrt-quantizer`, a reason that names the custom op and the standard export that folds, and the
model is left byte-identical.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native

RNG = np.random.default_rng(145)
C = 4


def trt_model(kind):
    w = nh.from_array((RNG.standard_normal((C, 3, 3, 3)) * 0.3).astype(np.float32), "conv.weight")
    bn = [nh.from_array(v.astype(np.float32), f"bn.{n}") for n, v in
          (("weight", RNG.uniform(0.5, 1.5, C)), ("bias", RNG.standard_normal(C)),
           ("running_mean", RNG.standard_normal(C)), ("running_var", RNG.uniform(0.5, 2, C)))]
    if kind == "fp8":
        scale = h.make_tensor("s", T.FLOAT, [], [0.01])
        nodes = [h.make_node("Constant", [], ["/conv/weight_quantizer/Constant_output_0"], value=scale),
                 h.make_node("TRT_FP8QuantizeLinear", ["conv.weight", "/conv/weight_quantizer/Constant_output_0"],
                             ["/conv/weight_quantizer/TRT_FP8QuantizeLinear_output_0"], domain="trt",
                             name="/conv/weight_quantizer/TRT_FP8QuantizeLinear"),
                 h.make_node("Constant", [], ["/conv/weight_quantizer/Constant_1_output_0"], value=scale),
                 h.make_node("TRT_FP8DequantizeLinear", ["/conv/weight_quantizer/TRT_FP8QuantizeLinear_output_0",
                                                         "/conv/weight_quantizer/Constant_1_output_0"],
                             ["w"], domain="trt", name="/conv/weight_quantizer/TRT_FP8DequantizeLinear")]
    else:
        scale = h.make_tensor("s", T.FLOAT, [C], RNG.uniform(0.01, 0.02, C).tolist())
        nodes = [h.make_node("Constant", [], ["/conv/weight_quantizer/Constant_output_0"], value=scale),
                 h.make_node("DequantizeLinear", ["conv.weight", "/conv/weight_quantizer/Constant_output_0"], ["w"],
                             domain="trt", name="/conv/weight_quantizer/DequantizeLinear", axis=0, block_size=0)]
    nodes += [h.make_node("Conv", ["x", "w"], ["y"], name="/conv/Conv", pads=[1, 1, 1, 1]),
              h.make_node("BatchNormalization", ["y"] + [t.name for t in bn], ["out"], name="/bn/BatchNormalization")]
    graph = h.make_graph(nodes, "main_graph", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 6, 6])],
                         [h.make_tensor_value_info("out", T.FLOAT, [1, C, 6, 6])], [w, *bn])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("trt", 1)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("kind", ["fp8", "int4"])
def test_tensorrt_custom_quantizers_are_kept_with_their_own_reason(kind):
    data = trt_model(kind).SerializeToString()
    out, report = qdqfold_native.fold_with_report(data)
    r = report["batchnorms"][0]
    assert not r["folded"] and r["code"] == "tensorrt-quantizer", r
    assert "trt::" in r["message"] and "standard" in r["message"]
    assert out == data
