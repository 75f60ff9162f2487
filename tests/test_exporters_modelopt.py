"""Issue 14, pattern 5: ModelOpt's exports for TensorRT with custom trt:: quantizers.

INT4: float W -> trt::DequantizeLinear(scale, axis=0) -> Conv -> BN. TensorRT quantizes W to int4 and dequantizes it
in that one node: the QAT form with the node as its own quantizer, folded like it (s' = s * |a|, the float weight
snapped to the mirrored integers). onnxruntime cannot run trt ops, so the tests compare the models with that node
rewritten to the standard opset-21 QuantizeLinear -> DequantizeLinear (int4 zero point 0), for the comparison only.

FP8: float W -> trt::TRT_FP8QuantizeLinear(Constant scale) -> trt::TRT_FP8DequantizeLinear -> Conv -> BN is not
folded: the BN is kept with `tensorrt-quantizer`, a reason that names the custom op, and the model is left
byte-identical.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native
from helpers.onnxrt import assert_same_outputs, run
from qdqfold.trt_compat import TrtCompatError, has_trt_quantizers, standard_qdq

RNG = np.random.default_rng(145)
C = 4


TRT_SCALE = {True: RNG.uniform(0.05, 0.1, C).astype(np.float32), False: np.array(0.08, np.float32)}


def trt_model(kind, per_channel=True, opset=17):
    w = nh.from_array((RNG.standard_normal((C, 3, 3, 3)) * 0.3).astype(np.float32), "conv.weight")
    bn = [nh.from_array(v.astype(np.float32), f"bn.{n}") for n, v in
          (("weight", RNG.uniform(0.5, 1.5, C)), ("bias", RNG.standard_normal(C)),
           ("running_mean", RNG.standard_normal(C)), ("running_var", RNG.uniform(0.5, 2, C)))]
    gamma_sign = np.where(np.arange(C) % 2 == 1, -1.0, 1.0)
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
        s = TRT_SCALE[per_channel]
        scale = nh.from_array(s, "s")
        # ModelOpt's scale is amax / 7: the weight lies within [-7, 7] steps.
        steps = RNG.integers(-7, 8, (C, 3, 3, 3)) + RNG.uniform(-0.45, 0.45, (C, 3, 3, 3))
        w = nh.from_array((steps * np.broadcast_to(s, [C]).reshape(-1, 1, 1, 1)).astype(np.float32), "conv.weight")
        nodes = [h.make_node("Constant", [], ["/conv/weight_quantizer/Constant_output_0"], value=scale),
                 h.make_node("DequantizeLinear", ["conv.weight", "/conv/weight_quantizer/Constant_output_0"], ["w"],
                             domain="trt", name="/conv/weight_quantizer/DequantizeLinear", axis=0, block_size=0)]
        bn[0] = nh.from_array((RNG.uniform(0.5, 1.5, C) * gamma_sign).astype(np.float32), "bn.weight")
    nodes += [h.make_node("Conv", ["x", "w"], ["y"], name="/conv/Conv", pads=[1, 1, 1, 1]),
              h.make_node("BatchNormalization", ["y"] + [t.name for t in bn], ["out"], name="/bn/BatchNormalization")]
    graph = h.make_graph(nodes, "main_graph", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 6, 6])],
                         [h.make_tensor_value_info("out", T.FLOAT, [1, C, 6, 6])], [w, *bn])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset), h.make_opsetid("trt", 1)])
    model.ir_version = 8
    return model


def test_tensorrt_fp8_quantizers_are_kept_with_their_own_reason():
    data = trt_model("fp8").SerializeToString()
    out, report = qdqfold_native.fold_with_report(data)
    r = report["batchnorms"][0]
    assert not r["folded"] and r["code"] == "tensorrt-quantizer", r
    assert "trt::TRT_FP8DequantizeLinear" in r["message"] and "per-tensor" in r["message"]
    assert out == data


def as_standard_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.load_from_string(standard_qdq(model.SerializeToString()))


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_tensorrt_int4_weight_folds_like_a_qat_pair(per_channel):
    model = trt_model("int4", per_channel=per_channel, opset=21)
    out, report = qdqfold_native.fold_with_report(model.SerializeToString())
    r = report["batchnorms"][0]
    assert r["folded"] and r["code"] == "qdq-layer-bn", r
    folded = onnx.load_from_string(out)
    dq = next(n for n in folded.graph.node if n.op_type == "DequantizeLinear")
    assert dq.domain == "trt" and "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    # The snapped weight re-quantizes to exactly the mirrored integers on the new scale.
    consts = {i.name: nh.to_array(i) for i in folded.graph.initializer}
    consts.update({o: nh.to_array(a.t) for c in folded.graph.node if c.op_type == "Constant" for o in c.output
                   for a in c.attribute})
    w0 = nh.to_array(next(i for i in model.graph.initializer if i.name == "conv.weight")).astype(np.float64)
    s0 = np.broadcast_to(np.asarray(TRT_SCALE[per_channel], np.float64).reshape(-1, 1, 1, 1), w0.shape)
    q0 = np.clip(np.round(w0 / s0), -8, 7)
    gamma, var = (nh.to_array(next(i for i in model.graph.initializer if i.name == n)).astype(np.float64)
                  for n in ("bn.weight", "bn.running_var"))
    a = gamma / np.sqrt(var + np.float64(np.float32(1e-5)))
    s1 = consts[dq.input[1]].astype(np.float32).reshape(-1, 1, 1, 1)
    np.testing.assert_array_equal(s1.reshape(-1), (np.broadcast_to(s0[:, 0, 0, 0], [C]) * np.abs(a)).astype(np.float32))
    q1 = np.clip(np.round(consts[dq.input[0]].astype(np.float32) / s1), -8, 7)
    np.testing.assert_array_equal(q1, np.where((a < 0)[:, None, None, None], -q0, q0))
    assert_same_outputs(as_standard_qdq(model), as_standard_qdq(folded))


def test_standard_qdq_rewrites_trt_weights_for_onnxruntime():
    """The rewrite for comparisons: trt ops on weights become the constants they compute (FP8: float8 e4m3fn
    values of W / s, saturated, times s); the model then runs in onnxruntime."""
    import ml_dtypes

    model = trt_model("fp8")
    data = model.SerializeToString()
    assert has_trt_quantizers(data)
    rewritten = onnx.load_from_string(standard_qdq(data))
    assert not any(n.domain == "trt" for n in rewritten.graph.node)
    w = nh.to_array(next(i for i in rewritten.graph.initializer if i.name == "w"))
    w0 = nh.to_array(next(i for i in model.graph.initializer if i.name == "conv.weight"))
    expected = np.clip(w0 / np.float32(0.01), -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(w, expected * np.float32(0.01))
    x = np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32)
    assert run(rewritten, {"x": x})[0].shape == (1, C, 6, 6)


def test_standard_qdq_refuses_an_activation_quantizer_below_its_opset():
    model = trt_model("fp8")
    q = next(n for n in model.graph.node if n.op_type == "TRT_FP8QuantizeLinear")
    q.input[0] = "x"  # quantizing the activation instead
    with pytest.raises(TrtCompatError, match="opset 19"):
        standard_qdq(model.SerializeToString())


def test_verify_compares_through_the_standard_rewrite_and_says_so():
    from qdqfold.verify import verify

    model = trt_model("int4", per_channel=True, opset=21)
    out, report = qdqfold_native.fold_with_report(model.SerializeToString())
    result = verify(model, out, report=report, input_sets=1, levels=("off",))
    assert result.verdict == "exact" and "trt::" in result.rewritten
    assert verify(model, model, input_sets=1, levels=("off",), twin=False, certificates=False).rewritten
