"""Issue 14, patterns 9 and 8: int4/uint4 tensors in int32_data, and BN parameters behind an int4 DequantizeLinear.

onnx.helper.make_tensor (and so onnxruntime's quantize_static with QInt4/QUInt4 weights) stores 4-bit tensors in
`int32_data`, two values per entry (low nibble first), not in raw_data. Every storage form the spec allows is read:
raw_data, packed int32_data, unpacked int32_data entries.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native
from helpers.exporters.int4 import as_int32_data, rewrite_as_int32_data
from helpers.onnxrt import assert_same_outputs, random_inputs, run
from helpers.qdq import Case, assert_folded_weight, assert_same, with_outputs


@pytest.mark.parametrize("qtype", [T.INT4, T.UINT4], ids=["int4", "uint4"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_int4_weights_in_int32_data_fold(qtype, per_channel, packed):
    case = Case(form="int", qtype=qtype, per_channel=per_channel)
    rewrite_as_int32_data(case.model, {"w_q", "w_zero"}, packed)
    out, report = qdqfold_native.fold_with_report(case.bytes)
    r = report["batchnorms"][0]
    assert r["folded"] and r["code"] == "qdq-layer-bn", r
    onnx.checker.check_model(onnx.load_from_string(out), full_check=True)
    assert_folded_weight(case, out)
    assert_same(case, out, r)


def test_malformed_int4_int32_data_is_a_reason_not_a_crash():
    case = Case(form="int", qtype=T.INT4)
    inits = list(case.model.graph.initializer)
    for k, i in enumerate(inits):
        if i.name == "w_q":
            bad = as_int32_data(i)
            bad.int32_data[0] = 4096  # more than one byte's worth of nibbles
            inits[k] = bad
    del case.model.graph.initializer[:]
    case.model.graph.initializer.extend(inits)
    try:
        out, report = qdqfold_native.fold_with_report(case.bytes)
    except qdqfold_native.FoldError:
        return
    r = report["batchnorms"][0]
    assert not r["folded"] and out == case.bytes


def test_bn_parameters_behind_int4_dequantize_linear_fold():
    """onnxruntime quantize_static with QInt4 weights (opset 21) quantizes BN's scale like a weight, int4 in
    int32_data; its bias as int32. Conv -> BN with float weights: conv-bn reads the dequantized parameters."""
    rng = np.random.default_rng(148)
    c = 6
    gamma_q = rng.integers(-7, 8, c)
    gamma_q[gamma_q == 0] = 3
    inits = [nh.from_array((rng.standard_normal((c, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
             h.make_tensor("bn_scale_quantized", T.INT4, [c], gamma_q.tolist()),
             nh.from_array(np.array(0.1, np.float32), "bn_scale_scale"),
             h.make_tensor("bn_scale_zero_point", T.INT4, [], [0]),
             nh.from_array(rng.integers(-500, 500, c).astype(np.int32), "bn_B_quantized"),
             nh.from_array(np.array(0.002, np.float32), "bn_B_scale"),
             nh.from_array(np.array(0, np.int32), "bn_B_zero_point"),
             nh.from_array(rng.standard_normal(c).astype(np.float32), "mean"),
             nh.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "var")]
    nodes = [h.make_node("DequantizeLinear", ["bn_scale_quantized", "bn_scale_scale", "bn_scale_zero_point"],
                         ["bn_scale"], name="bn_scale_DequantizeLinear"),
             h.make_node("DequantizeLinear", ["bn_B_quantized", "bn_B_scale", "bn_B_zero_point"], ["bn_B"],
                         name="bn_B_DequantizeLinear"),
             h.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["y", "bn_scale", "bn_B", "mean", "var"], ["out"], name="bn")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 5, 5])],
                         [h.make_tensor_value_info("out", T.FLOAT, [1, c, 5, 5])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    model.ir_version = 10
    out, report = qdqfold_native.fold_with_report(model.SerializeToString())
    r = report["batchnorms"][0]
    assert r["folded"] and r["code"] == "conv-bn", r
    folded = onnx.load_from_string(out)
    onnx.checker.check_model(folded, full_check=True)
    assert_same_outputs(model, folded)


def test_onnxruntime_qint4_layout_folds_with_drop_activation_quantizers():
    """quantize_static(QInt4 weights, opset 21): Conv(int4 W) -> Q -> DQ -> BN(gamma = DQ(int4 in int32_data),
    beta = DQ(int32)) -> Q -> DQ. With drop_activation_quantizers=True the BN folds (approximately: exactly the
    dropped quantizer's rounding, a * (y - DQ(Q(y))))."""

    case = Case(form="int", qtype=T.INT4, act_between=True, out_quant=True)
    rng = np.random.default_rng(81)
    g_q = rng.integers(-7, 8, len(case.gamma))
    g_q[g_q == 0] = 5
    g_s, b_s = np.float32(0.2), np.float32(0.001)
    b_q = rng.integers(-3000, 3000, len(case.gamma)).astype(np.int32)
    m = case.model
    inits = [i for i in m.graph.initializer if i.name not in ("gamma", "beta")]
    inits += [h.make_tensor("gamma_quantized", T.INT4, [len(g_q)], g_q.tolist()),
              nh.from_array(np.array(g_s), "gamma_scale"), h.make_tensor("gamma_zero_point", T.INT4, [], [0]),
              nh.from_array(b_q, "beta_quantized"), nh.from_array(np.array(b_s), "beta_scale"),
              nh.from_array(np.array(0, np.int32), "beta_zero_point")]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    dqs = [h.make_node("DequantizeLinear", ["gamma_quantized", "gamma_scale", "gamma_zero_point"], ["gamma"],
                       name="gamma_DequantizeLinear"),
           h.make_node("DequantizeLinear", ["beta_quantized", "beta_scale", "beta_zero_point"], ["beta"],
                       name="beta_DequantizeLinear")]
    nodes = dqs + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    gamma = g_q.astype(np.float64) * np.float64(g_s)
    a = gamma / np.sqrt(case.var.astype(np.float64) + np.float64(np.float32(1e-5)))

    out, report = qdqfold_native.fold_with_report(m.SerializeToString(), drop_activation_quantizers=True)
    r = report["batchnorms"][0]
    assert r["folded"] and not r["exact"], r
    onnx.checker.check_model(onnx.load_from_string(out), full_check=True)
    feeds = random_inputs(m)
    _, e, y, yd = (o.astype(np.float64) for o in run(with_outputs(m, "z", "y", "yd"), feeds))
    got = run(with_outputs(onnx.load_from_string(out), "z"), feeds)[1].astype(np.float64)
    predicted = e + a[None, :, None, None] * (y - yd)
    tol = 1e-5 * np.ptp(e) + dict(r["metrics"]).get("bias_requantization_error", 0.0) * (1 + 1e-6)
    assert np.abs(got - predicted).max() <= tol
