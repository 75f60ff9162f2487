"""The QDQ fold inside subgraphs (Gemm here; a MatMul reading an outer-scope value: test_fold_layer_variants.py) and
model-local functions, and with float16 / bfloat16 scales and float16 QAT
weights: onnxruntime outputs (optimisations off) of original and folded agree, and the folded integers and
scales are what numpy predicts."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from helpers.build import bn_arrays
from helpers.folding import fold
from helpers.onnxrt import assert_same_outputs, run

EPS = 1e-5
CIN, COUT = 6, 5
GAMMA = np.array([1.2, -0.7, 0.9, -1.5, 0.6], np.float32)


def bn_tensors(prefix=""):
    return bn_arrays(GAMMA, prefix)


def factors():
    v = bn_tensors()["var"]
    return GAMMA.astype(np.float64) / np.sqrt(v.astype(np.float64) + np.float64(np.float32(EPS)))


Q = np.random.default_rng(0).integers(-127, 128, size=(CIN, COUT)).astype(np.int8)
SCALE = np.random.default_rng(2).uniform(0.01, 0.05, COUT).astype(np.float32)


def folded_flags(report):
    return [b["folded"] for b in report["batchnorms"]]


def test_if_branch_reading_outer_quantized_weight():
    # Outer scope: w_q, w_scale (read by both branches). The then-branch folds its BN; the outer tensors stay.
    bn = bn_tensors("t_")
    then_nodes = [h.make_node("DequantizeLinear", ["w_q", "w_scale"], ["t_w"], axis=1),
                  h.make_node("Gemm", ["x", "t_w"], ["t_y"]),
                  h.make_node("BatchNormalization", ["t_y", "t_gamma", "t_beta", "t_mean", "t_var"], ["t_out"],
                              epsilon=EPS)]
    then_g = h.make_graph(then_nodes, "then", [], [h.make_tensor_value_info("t_out", T.FLOAT, None)],
                          [nh.from_array(v, k) for k, v in bn.items()])
    else_nodes = [h.make_node("DequantizeLinear", ["w_q", "w_scale"], ["e_w"], axis=1),
                  h.make_node("MatMul", ["x", "e_w"], ["e_out"])]
    else_g = h.make_graph(else_nodes, "else", [], [h.make_tensor_value_info("e_out", T.FLOAT, None)])
    graph = h.make_graph([h.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g)], "g",
                         [h.make_tensor_value_info("cond", T.BOOL, []),
                          h.make_tensor_value_info("x", T.FLOAT, [3, CIN])],
                         [h.make_tensor_value_info("out", T.FLOAT, None)],
                         [nh.from_array(Q, "w_q"), nh.from_array(SCALE, "w_scale")])
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    m.ir_version = 8
    result = fold(m)
    assert folded_flags(result.report) == [True]
    # The outer tensors are untouched; the branch reads new ones.
    assert [t.SerializeToString() for t in result.model.graph.initializer] == [t.SerializeToString() for t in m.graph.initializer]
    then_out = result.model.graph.node[0].attribute[[a.name for a in result.model.graph.node[0].attribute].index("then_branch")].g
    assert "BatchNormalization" not in [n.op_type for n in then_out.node]
    inner = {t.name: nh.to_array(t) for t in then_out.initializer}
    dq = [n for n in then_out.node if n.op_type == "DequantizeLinear"][0]
    a = factors()
    assert dq.input[0] != "w_q" and dq.input[1] != "w_scale"
    np.testing.assert_array_equal(inner[dq.input[0]].astype(np.int64), np.where(a < 0, -Q.astype(np.int64), Q))
    np.testing.assert_array_equal(inner[dq.input[1]], (SCALE * np.abs(a)).astype(np.float32))
    x = np.random.default_rng(3).standard_normal((3, CIN)).astype(np.float32)
    for cond in (True, False):
        assert_same_outputs(m, result.model, feeds={"cond": np.array(cond), "x": x})


def test_model_local_function_with_constant_nodes():
    bn = bn_tensors()
    const = lambda name, v: h.make_node("Constant", [], [name], value=nh.from_array(v, name))  # noqa: E731
    body = [const("w_q", Q), const("w_scale", SCALE)] + [const(k, v) for k, v in bn.items()] + [
        h.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=1),
        h.make_node("Gemm", ["fx", "w"], ["y"]),
        h.make_node("BatchNormalization", ["y", "gamma", "beta", "mean", "var"], ["fy"], epsilon=EPS)]
    fn = h.make_function("local", "QLinear", ["fx"], ["fy"], body, [h.make_opsetid("", 13)])
    graph = h.make_graph([h.make_node("QLinear", ["x"], ["out"], domain="local")], "g",
                         [h.make_tensor_value_info("x", T.FLOAT, [3, CIN])],
                         [h.make_tensor_value_info("out", T.FLOAT, None)])
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 13), h.make_opsetid("local", 1)], functions=[fn])
    m.ir_version = 8
    result = fold(m)
    assert folded_flags(result.report) == [True]
    f = result.model.functions[0]
    assert "BatchNormalization" not in [n.op_type for n in f.node]
    values = {n.output[0]: nh.to_array(n.attribute[0].t) for n in f.node if n.op_type == "Constant"}
    dq = [n for n in f.node if n.op_type == "DequantizeLinear"][0]
    a = factors()
    np.testing.assert_array_equal(values[dq.input[0]].astype(np.int64), np.where(a < 0, -Q.astype(np.int64), Q))
    np.testing.assert_array_equal(values[dq.input[1]], (SCALE * np.abs(a)).astype(np.float32))
    assert_same_outputs(m, result.model)


def low_precision_model(ftype, form):
    """x -> MatMul(DQ(q) or DQ(Q(W))) -> BN with every float (scale, W, BN, x) in float16 or bfloat16."""
    np_f = {T.FLOAT16: np.float16, T.BFLOAT16: ml_dtypes.bfloat16}[ftype]
    scale = SCALE.astype(np_f)
    inits = [nh.from_array(scale, "w_scale"), nh.from_array(np.zeros(COUT, np.int8), "w_zero")]
    if form == "int":
        inits.append(nh.from_array(Q, "w_q"))
        nodes = [h.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=1)]
        q = Q.astype(np.int64)
    else:
        w = (Q.astype(np.float64) * scale.astype(np.float64)).astype(np_f)
        w.reshape(-1)[::4] = (w.reshape(-1)[::4].astype(np.float64) * 1.2).astype(np_f)  # off the grid
        inits.append(nh.from_array(w, "w_float"))
        nodes = [h.make_node("QuantizeLinear", ["w_float", "w_scale", "w_zero"], ["w_qq"], axis=1),
                 h.make_node("DequantizeLinear", ["w_qq", "w_scale", "w_zero"], ["w"], axis=1)]
        q = np.clip(np.rint(w.astype(np.float32) / scale.astype(np.float32)), -128, 127).astype(np.int64)
    nodes += [h.make_node("MatMul", ["x", "w"], ["y"]),
              h.make_node("BatchNormalization", ["y", "gamma", "beta", "mean", "var"], ["out"], epsilon=EPS)]
    bn = {k: v.astype(np_f) for k, v in bn_tensors().items()}
    inits += [nh.from_array(v, k) for k, v in bn.items()]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", ftype, [3, CIN])],
                         [h.make_tensor_value_info("out", ftype, None)], inits)
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    m.ir_version = 10
    v = bn["var"].astype(np.float64)
    a = bn["gamma"].astype(np.float64) / np.sqrt(v + np.float64(np.float32(EPS)))
    return m, scale, q, a


def as_float32(model):
    """A copy with every float16 / bfloat16 tensor and value widened (exactly) to float32, for onnxruntime's
    CPU kernels, which lack MatMul and BatchNormalization in these types."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, t in enumerate(m.graph.initializer):
        if t.data_type in (T.FLOAT16, T.BFLOAT16):
            m.graph.initializer[i].CopyFrom(nh.from_array(nh.to_array(t).astype(np.float32), t.name))
    for v in list(m.graph.input) + list(m.graph.output):
        v.type.tensor_type.elem_type = T.FLOAT
    return m


@pytest.mark.parametrize("ftype", [T.FLOAT16, T.BFLOAT16])
@pytest.mark.parametrize("form", ["int", "qat"])
def test_low_precision_scales_and_weights(ftype, form):
    m, scale, q, a = low_precision_model(ftype, form)
    result = fold(m)
    assert folded_flags(result.report) == [True], result.report
    values = {t.name: nh.to_array(t) for t in result.model.graph.initializer}
    s_new = values["w_scale"]
    assert s_new.dtype == scale.dtype
    np.testing.assert_array_equal(s_new, (scale.astype(np.float64) * np.abs(a)).astype(scale.dtype))
    q_new = np.where(a < 0, -q, q)
    if form == "int":
        np.testing.assert_array_equal(values["w_q"].astype(np.int64), q_new)
    else:
        w_new = values["w_float"]
        assert w_new.dtype == scale.dtype
        np.testing.assert_array_equal(w_new, (q_new * s_new.astype(np.float64)).astype(scale.dtype))
        # QuantizeLinear (in float32, ties to even) yields exactly the mirrored integers.
        np.testing.assert_array_equal(np.clip(np.rint(w_new.astype(np.float32) / s_new.astype(np.float32)), -128, 127),
                                      q_new)
    # Widening is exact, so the float32 copies compute the same function up to the rounding of the folded
    # bias and scale to the low-precision type (a few of its epsilons).
    assert_same_outputs(as_float32(m), as_float32(result.model), rtol_of_range=2e-3 if ftype == T.FLOAT16 else 1.5e-2)
