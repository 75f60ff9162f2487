"""Layer -> BatchNormalization folds through quantized weights (qdq-layer-bn).

Every case builds a small graph with onnx.helper, folds it, asserts the folded integers, scales and zero points
directly against numpy, and compares onnxruntime's outputs (optimisations off) of the original and the folded
model.
"""

from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from helpers import folding
from helpers.folding import fold
from helpers.onnxrt import random_inputs, run
from helpers.qdq import (EPS, FLOAT8, Case, assert_folded_weight, assert_same, constants, expected_integers,
                         folded_weight, mid_zero, quantized_units, with_outputs)

# ------------------------------------------------------------------------------------------------ checks


def fold_and_check(case, **options):
    result = fold(case.bytes, **options)
    r = result.records["bn"]
    assert r["folded"], r
    assert r["code"] == "qdq-layer-bn"
    assert r["direction"] == "backward"
    assert r["into"] == ["layer"]
    assert "BatchNormalization" not in [n.op_type for n in onnx.load_from_string(result.bytes).graph.node]
    onnx.checker.check_model(onnx.load_from_string(result.bytes), full_check=True)
    assert_same(case, result.bytes, r)
    return result.bytes, r


def assert_kept(case, code, *words, **options):
    return folding.assert_kept(case.bytes, code, *words, node="bn", **options)


# ------------------------------------------------------------------------------------------------ forms


@pytest.mark.parametrize("form", ["int", "qat"])
@pytest.mark.parametrize("qtype", [T.INT8, T.UINT8, T.INT16, T.UINT16, T.INT4, T.UINT4],
                         ids=["int8", "uint8", "int16", "uint16", "int4", "uint4"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_integer_types(form, qtype, per_channel):
    case = Case(form=form, qtype=qtype, per_channel=per_channel)
    assert (case.a < 0).any()
    out, r = fold_and_check(case)
    f = assert_folded_weight(case, out)
    assert r["exact"]
    # A per-tensor scale became per-channel on the output-channel axis; zero points keep their values.
    assert f["scale"].shape == (case.wdims[case.out_axis],)
    assert f["axis"] == case.out_axis
    np.testing.assert_array_equal(np.unique(f["zero"].astype(np.int64)), [mid_zero(qtype)])
    if form == "qat":
        assert "q_node" in f  # TensorRT's convention: Q -> DQ stays
        assert {a.name: h.get_attribute_value(a) for a in f["q_node"].attribute}.get("axis") == case.out_axis


@pytest.mark.parametrize("qtype", [T.INT8, T.UINT8, T.INT4], ids=["int8", "uint8", "int4"])
def test_qat_materialized(qtype):
    case = Case(form="qat", qtype=qtype)
    out, r = fold_and_check(case, materialize_quantized_weights=True)
    assert "QuantizeLinear" not in [n.op_type for n in onnx.load_from_string(out).graph.node if n.name == "w_Q"]
    f = folded_weight(out)
    assert f["float"] is None, "the weight is now an int initializer behind a lone DequantizeLinear"
    np.testing.assert_array_equal(f["q"], expected_integers(case))
    assert "w_float" not in f["consts"]


def test_qat_ties_do_not_flip():
    """round(W * a / (s * |a|)) would flip ties; the snapped weight re-quantizes to exactly -q / q."""
    case = Case(form="qat", qtype=T.INT8, seed=3)
    w = case.w_float
    sel = case.expand(case.scale0)
    ratio = w / sel
    assert np.any(np.abs(ratio - np.floor(ratio) - 0.5) < 1e-6), "the case holds exact ties"
    out, _ = fold_and_check(case)
    assert_folded_weight(case, out)


@pytest.mark.parametrize("qtype", FLOAT8, ids=["e4m3fn", "e5m2"])
def test_float8_weights(qtype):
    case = Case(form="int", qtype=qtype, act_in=False)
    out, r = fold_and_check(case)
    f = assert_folded_weight(case, out)
    neg = case.a[case.out_ch] < 0
    np.testing.assert_array_equal(f["q"][neg], case.q0[neg] ^ 0x80)  # sign bit flipped


def test_float8_quantizer_is_kept():
    case = Case(form="int", qtype=T.FLOAT8E4M3FN, act_in=False)
    # Rebuild as QAT: float weight -> Q(float8) -> DQ.
    m = case.model
    nodes = list(m.graph.node)
    dq = next(n for n in nodes if n.name == "w_DQ")
    w = case.q0.astype(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32) * case.expand(case.scale0)
    m.graph.initializer.append(nh.from_array(w.astype(np.float32), "w_float"))
    q = h.make_node("QuantizeLinear", ["w_float", "w_scale", "w_zero"], ["w_qq"], name="w_Q", axis=0)
    dq.input[0] = "w_qq"
    m.graph.node.insert(0, q)
    r = assert_kept(case, "float8-quantizer", "float8")
    assert r["node"] == "bn"


# ------------------------------------------------------------------------------------------------ layers


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("group", [1, 2, 6], ids=["g1", "g2", "depthwise"])
def test_conv_ranks_and_groups(rank, group):
    cin = 6 if group == 6 else 8
    case = Case(layer="Conv", rank=rank, group=group, cin=cin, cout=6)
    out, _ = fold_and_check(case)
    assert_folded_weight(case, out)


@pytest.mark.parametrize("form", ["int", "qat"])
def test_conv_transpose(form):
    case = Case(layer="ConvTranspose", form=form, cin=4, cout=6)
    out, _ = fold_and_check(case)
    f = assert_folded_weight(case, out)
    assert f["axis"] == 1


def test_grouped_conv_transpose_with_tied_factors_folds():
    # Groups 2, out channels 6: channel j and j + 3 share the scale slice j of axis 1, so their |a| must agree.
    gamma = np.array([1.2, -0.7, 0.9, -1.2, 0.7, 0.9])
    case = Case(layer="ConvTranspose", cin=4, cout=6, group=2, gamma=gamma)
    case.var[3:] = case.var[:3]
    case.a = case.gamma.astype(np.float64) / np.sqrt(case.var.astype(np.float64) + np.float64(np.float32(EPS)))
    case.t = case.beta.astype(np.float64) - case.mean.astype(np.float64) * case.a
    for init in case.model.graph.initializer:
        if init.name == "var":
            init.CopyFrom(nh.from_array(case.var, "var"))
    out, _ = fold_and_check(case)
    assert_folded_weight(case, out)


def test_grouped_conv_transpose_with_different_factors_is_kept():
    case = Case(layer="ConvTranspose", cin=4, cout=6, group=2)
    assert_kept(case, "scale-layout", "output channels")


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [None, "float", "int32"])
def test_gemm(trans_b, bias):
    case = Case(layer="Gemm", trans_b=trans_b, bias=bias, cin=10, cout=7, alpha=0.5, beta=2.0 if bias == "float" else 1.0)
    out, r = fold_and_check(case)
    assert_folded_weight(case, out)


@pytest.mark.parametrize("form", ["int", "qat"])
def test_matmul_becomes_gemm(form):
    case = Case(layer="MatMul", form=form, cin=10, cout=7)
    out, r = fold_and_check(case)
    assert_folded_weight(case, out)
    assert r["into_op"] == "MatMul"
    assert [n.op_type for n in onnx.load_from_string(out).graph.node if n.name == "layer"] == ["Gemm"]


def test_matmul_with_unknown_rank_is_kept():
    case = Case(layer="MatMul", cin=10, cout=7)
    case.model.graph.input[0].type.tensor_type.ClearField("shape")
    assert_kept(case, "not-2d")


# ------------------------------------------------------------------------------------------------ negative factors


def test_int8_minus_128_in_a_negative_channel_is_kept_by_default():
    case = Case(qtype=T.INT8, seed=1)
    neg = int(np.flatnonzero(case.a < 0)[0])
    q = case.q0.copy()
    q[neg, 0, 0, 0] = -128
    case = Case(qtype=T.INT8, seed=1, ints=q)
    r = assert_kept(case, "negation-overflow", f"channel {neg}", "-128", "allow_nonzero_zero_point")
    # The option folds it exactly with the complement form (q' = -1 - q, z' = -1) in that channel only;
    # the other negative channels keep zero point 0 with q' = -q.
    out, r = fold_and_check(case, allow_nonzero_zero_point=True)
    f = folded_weight(out)
    expected_zero = np.zeros(6, np.int64)
    expected_zero[neg] = -1
    np.testing.assert_array_equal(f["zero"], expected_zero)
    np.testing.assert_array_equal(f["q"][neg], -1 - case.q0[neg])
    others = (case.a[case.out_ch] < 0) & (case.out_ch != neg)
    assert others.any()
    np.testing.assert_array_equal(f["q"][others], -case.q0[others])
    assert "complement" in r["message"]


def test_minus_128_in_a_positive_channel_folds():
    case = Case(qtype=T.INT8, seed=1)
    pos = int(np.flatnonzero(case.a > 0)[0])
    q = case.q0.copy()
    q[pos, 0, 0, 0] = -128
    case = Case(qtype=T.INT8, seed=1, ints=q)
    out, _ = fold_and_check(case)
    assert_folded_weight(case, out)


def test_uint8_zero_point_0_needs_the_option():
    case = Case(qtype=T.UINT8, zero=0)
    assert_kept(case, "negation-overflow", "uint8", "allow_nonzero_zero_point")
    out, r = fold_and_check(case, allow_nonzero_zero_point=True)
    f = folded_weight(out)
    neg = case.a < 0
    np.testing.assert_array_equal(f["zero"][neg], 255)
    np.testing.assert_array_equal(f["q"][neg], 255 - case.q0[neg])


def test_no_negative_factor_keeps_integers():
    case = Case(gamma=np.linspace(0.5, 1.5, 6))
    out, r = fold_and_check(case)
    f = assert_folded_weight(case, out)
    np.testing.assert_array_equal(f["q"], case.q0)
    assert "w_q" in f["consts"], "integers untouched: the initializer keeps its name"


def test_zero_factor_int_form_folds_with_zero_scale():
    gamma = np.array([1.0, 0.0, -1.0, 0.5, 0.7, 1.1])
    case = Case(gamma=gamma)
    out, _ = fold_and_check(case)
    f = assert_folded_weight(case, out)
    assert f["scale"][1] == 0


def test_zero_factor_qat_form_is_kept_unless_materialized():
    gamma = np.array([1.0, 0.0, -1.0, 0.5, 0.7, 1.1])
    case = Case(form="qat", gamma=gamma)
    assert_kept(case, "zero-factor", "channel 1", "materialize_quantized_weights")
    fold_and_check(case, materialize_quantized_weights=True)


# ------------------------------------------------------------------------------------------------ blocked


def test_blocked_along_input_axis_folds():
    case = Case(qtype=T.INT4, block_size=4, cin=8, cout=6)
    out, _ = fold_and_check(case)
    f = folded_weight(out)
    assert f["scale"].shape == tuple(case.scale0.shape)
    assert {a.name: h.get_attribute_value(a) for a in f["node"].attribute}["block_size"] == 4
    a_el = case.a[case.out_ch]
    expected = (case.expand(case.scale0).astype(np.float64) * np.abs(a_el)).astype(np.float32)
    np.testing.assert_array_equal(case.expand(f["scale"]), expected)
    np.testing.assert_array_equal(f["q"], expected_integers(case))


def test_blocked_across_output_channels_is_kept():
    # Blocks of 2 along the output axis: one scale covers two output channels with different BN factors.
    case = Case(qtype=T.INT8, block_size=2, block_axis=0, cin=8, cout=6)
    assert_kept(case, "scale-layout", "output channels")


def test_blocked_across_output_channels_with_tied_factors_folds():
    gamma = np.array([1.1, 1.1, -0.8, -0.8, 0.6, 0.6])
    case = Case(qtype=T.INT8, block_size=2, block_axis=0, cin=8, cout=6, gamma=gamma)
    case.var[:] = 1.0
    for init in case.model.graph.initializer:
        if init.name == "var":
            init.CopyFrom(nh.from_array(case.var, "var"))
    case.a = case.gamma.astype(np.float64) / np.sqrt(1.0 + np.float64(np.float32(EPS)))
    case.t = case.beta.astype(np.float64) - case.mean.astype(np.float64) * case.a
    out, _ = fold_and_check(case)
    f = folded_weight(out)
    np.testing.assert_array_equal(f["q"], expected_integers(case))


# ------------------------------------------------------------------------------------------------ bias


@pytest.mark.parametrize("form", ["int", "qat"])
def test_float_bias(form):
    case = Case(form=form, bias="float")
    out, r = fold_and_check(case)
    f = folded_weight(out)
    b = f["consts"][f["layer"].input[2]]
    np.testing.assert_allclose(b, (case.a * case.b_float + case.t).astype(np.float32), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_int32_bias_requantized(per_channel):
    case = Case(form="int", bias="int32", per_channel=per_channel)
    out, r = fold_and_check(case)
    f = assert_folded_weight(case, out)
    bdq = f["by_output"][f["layer"].input[2]]
    b_int = f["consts"][bdq.input[0]]
    b_scale = f["consts"][bdq.input[1]]
    assert b_int.dtype == np.int32 and b_scale.shape == (6,)
    # onnxruntime's convention holds after the fold: bias scale = s_x * s'_w.
    np.testing.assert_array_equal(b_scale, (case.s_x * f["scale"].astype(np.float32)).astype(np.float32))
    sb_old = np.broadcast_to(case.sb.reshape(-1), [6]).astype(np.float64)
    target = case.a * case.b_int * sb_old + case.t
    np.testing.assert_array_equal(b_int, np.round(target / b_scale.astype(np.float64)).astype(np.int32))
    err = np.max(np.abs(b_int * b_scale.astype(np.float64) - target))
    assert dict(r["metrics"])["bias_requantization_error"] == pytest.approx(err, rel=1e-9)
    assert err <= 0.5 * b_scale.max()


def test_no_bias_int_form_gains_int32_bias():
    case = Case(form="int", bias=None)
    out, r = fold_and_check(case)
    f = folded_weight(out)
    bdq = f["by_output"][f["layer"].input[2]]
    assert bdq.op_type == "DequantizeLinear"
    assert f["consts"][bdq.input[0]].dtype == np.int32
    assert "bias_requantization_error" in dict(r["metrics"])


def test_no_bias_qat_form_gains_float_bias():
    case = Case(form="qat", bias=None)
    out, r = fold_and_check(case)
    f = folded_weight(out)
    b = f["consts"][f["layer"].input[2]]
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, case.t.astype(np.float32))


def test_int32_bias_overflow_is_kept():
    case = Case(form="int", bias="int32", seed=2)
    # Tiny bias scale: the BN shift t / (s_x * s'_w) does not fit int32.
    for init in case.model.graph.initializer:
        if init.name == "b_scale":
            init.CopyFrom(nh.from_array(np.full(6, 1e-12, np.float32), "b_scale"))
    assert_kept(case, "bias-overflow", "int32")


def test_shared_int32_bias_is_kept():
    case = Case(form="int", bias="int32")
    m = case.model
    m.graph.node.append(h.make_node("Identity", ["b"], ["b_copy"], name="other"))
    m.graph.output.append(h.make_tensor_value_info("b_copy", T.FLOAT, None))
    assert_kept(case, "shared-bias")


# ------------------------------------------------------------------------------------------------ quantizers


def test_output_quantizer_after_bn_stays_and_fold_is_exact():
    case = Case(form="int", out_quant=True, bias="float")
    out, r = fold_and_check(case)
    assert r["exact"]
    m = onnx.load_from_string(out)
    q = next(n for n in m.graph.node if n.name == "out_Q")
    assert q.input[0] == "z"  # the layer now produces the BN's output name
    assert next(n for n in m.graph.node if n.name == "layer").output[0] == "z"


@pytest.mark.parametrize("form", ["int", "qat"])
def test_activation_quantizer_between_is_kept(form):
    case = Case(form=form, act_between=True)
    assert_kept(case, "activation-quantizer", "act_Q", "drop_activation_quantizers")


def test_activation_quantizer_dropped_on_request_is_approximate():
    # An output quantizer after the BN: the folded layer keeps a quantizer after it (else it is kept, see
    # test_exporters_ortq.py). The deviation is measured at the BN's output "z", before that quantizer.
    case = Case(form="int", act_between=True, bias="int32", out_quant=True)
    result = fold(case.bytes, drop_activation_quantizers=True)
    r = result.records["bn"]
    assert r["folded"] and not r["exact"]
    names = [n.name for n in onnx.load_from_string(result.bytes).graph.node]
    assert "act_Q" not in names and "act_DQ" not in names
    metrics = dict(r["metrics"])
    assert metrics["dropped_quantizer_scale"] == pytest.approx(0.2)
    # The deviation is exactly what the dropped quantizer did: BN(y) instead of BN(DQ(Q(y))), i.e.
    # a * (y - DQ(Q(y))) per channel (rounding and clamping), up to float rounding and the int32 bias rounding.
    feeds = random_inputs(case.model)
    _, e, y, yd = (o.astype(np.float64) for o in run(with_outputs(case.model, "z", "y", "yd"), feeds))
    a = run(with_outputs(onnx.load_from_string(result.bytes), "z"), feeds)[1].astype(np.float64)
    predicted = e + case.a[None, :, None, None] * (y - yd)
    tol = 1e-5 * np.ptp(e) + metrics["bias_requantization_error"] * (1 + 1e-6)
    assert np.abs(a - predicted).max() <= tol
    assert np.abs(e - a).max() > 100 * tol  # not exact, and the report says so
    print(f"deviation from dropping the quantizer: max {np.abs(e - a).max():.4g} of output range {np.ptp(e):.4g}")


def test_qat_q_and_dq_share_one_scale_and_another_layer_shares_it_too():
    case = Case(form="qat")
    m = case.model
    # A second QAT conv reading the same scale and zero point tensors, no BN.
    m.graph.initializer.append(nh.from_array(case.w_float * 0.5, "w2_float"))
    m.graph.node.extend([
        h.make_node("QuantizeLinear", ["w2_float", "w_scale", "w_zero"], ["w2_qq"], name="w2_Q", axis=0),
        h.make_node("DequantizeLinear", ["w2_qq", "w_scale", "w_zero"], ["w2"], name="w2_DQ", axis=0),
        h.make_node("Conv", ["xd", "w2"], ["out2"], name="layer2", pads=[1, 1, 1, 1]),
    ])
    m.graph.output.append(h.make_tensor_value_info("out2", T.FLOAT, None))
    result = fold(case.bytes)
    assert result.records["bn"]["folded"]
    fm = onnx.load_from_string(result.bytes)
    consts = constants(fm)
    np.testing.assert_array_equal(consts["w_scale"], case.scale0)  # the shared tensor is untouched
    by_name = {n.name: n for n in fm.graph.node}
    assert by_name["w2_Q"].input[1] == "w_scale" and by_name["w2_DQ"].input[1] == "w_scale"
    # This layer's Q and DQ read one new scale together.
    assert by_name["w_Q"].input[1] == by_name["w_DQ"].input[1] != "w_scale"
    assert by_name["w_Q"].input[1] in result.records["bn"]["new_tensors"]
    feeds = random_inputs(case.model)
    for e, a in zip(run(case.model, feeds), run(result.bytes, feeds)):
        assert np.abs(e - a).max() <= 1e-5 * np.ptp(e)


def test_shared_integer_weight_gets_new_tensor():
    case = Case(form="int")
    m = case.model
    m.graph.node.extend([
        h.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w2"], name="w2_DQ", axis=0),
        h.make_node("Conv", ["xd", "w2"], ["out2"], name="layer2", pads=[1, 1, 1, 1]),
    ])
    m.graph.output.append(h.make_tensor_value_info("out2", T.FLOAT, None))
    result = fold(case.bytes)
    assert result.records["bn"]["folded"]
    consts = constants(onnx.load_from_string(result.bytes))
    np.testing.assert_array_equal(consts["w_q"].astype(np.int64), case.q0)
    np.testing.assert_array_equal(consts["w_scale"], case.scale0)
    feeds = random_inputs(case.model)
    for e, a in zip(run(case.model, feeds), run(result.bytes, feeds)):
        assert np.abs(e - a).max() <= 1e-5 * np.ptp(e)


def test_scale_from_constant_nodes():
    case = Case(form="qat")
    m = case.model
    for name in ("w_scale", "w_zero"):
        init = next(i for i in m.graph.initializer if i.name == name)
        m.graph.node.insert(0, h.make_node("Constant", [], [name], value=init))
        m.graph.initializer.remove(init)
    out, r = fold_and_check(case)
    assert_folded_weight(case, out)


# ------------------------------------------------------------------------------------------------ kept


def test_dequantized_weight_read_by_another_node_is_kept():
    case = Case()
    case.model.graph.node.append(h.make_node("Conv", ["xd", "w"], ["out2"], name="layer2", pads=[1, 1, 1, 1]))
    case.model.graph.output.append(h.make_tensor_value_info("out2", T.FLOAT, None))
    assert_kept(case, "shared-weight", "layer")


def test_second_consumer_of_layer_output_is_kept():
    case = Case()
    case.model.graph.node.append(h.make_node("Relu", ["y"], ["r"], name="relu"))
    case.model.graph.output.append(h.make_tensor_value_info("r", T.FLOAT, None))
    assert_kept(case, "layer-output-read-elsewhere", "relu")


def test_layer_output_as_graph_output_is_kept():
    case = Case()
    case.model.graph.output.append(h.make_tensor_value_info("y", T.FLOAT, None))
    assert_kept(case, "layer-output-is-graph-output")


def test_non_constant_integer_weight_is_kept():
    case = Case()
    m = case.model
    init = next(i for i in m.graph.initializer if i.name == "w_q")
    m.graph.initializer.remove(init)
    m.graph.input.append(h.make_tensor_value_info("w_q", T.INT8, case.wdims))
    assert_kept(case, "non-constant-weight")


def test_non_constant_float_weight_is_kept():
    case = Case(form="qat")
    m = case.model
    init = next(i for i in m.graph.initializer if i.name == "w_float")
    m.graph.initializer.remove(init)
    m.graph.input.append(h.make_tensor_value_info("w_float", T.FLOAT, case.wdims))
    assert_kept(case, "non-constant-weight", "w_float")


def test_non_constant_scale_is_kept():
    case = Case()
    m = case.model
    init = next(i for i in m.graph.initializer if i.name == "w_scale")
    m.graph.initializer.remove(init)
    m.graph.input.append(h.make_tensor_value_info("w_scale", T.FLOAT, [6]))
    assert_kept(case, "non-constant-quantization-parameters")


def test_mismatched_q_and_dq_are_kept():
    case = Case(form="qat")
    m = case.model
    m.graph.initializer.append(nh.from_array(case.scale0 * 2, "w_scale2"))
    next(n for n in m.graph.node if n.name == "w_DQ").input[1] = "w_scale2"
    assert_kept(case, "mismatched-qdq")


def test_old_opset_per_tensor_is_kept():
    case = Case(per_channel=False, opset=10)
    case.model.ir_version = 7
    r = assert_kept(case, "opset-too-old", "opset >= 13", "allow_opset_upgrade")


@pytest.mark.parametrize("form", ["int", "qat"])
def test_old_opset_raised_to_13_on_request(form):
    case = Case(per_channel=False, opset=10, form=form, bias="float", out_quant=True)
    case.model.ir_version = 7
    out, r = fold_and_check(case, allow_opset_upgrade=True)
    m = onnx.load_from_string(out)
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 13)]
    assert "opset was raised to 13" in r["message"]
    f = assert_folded_weight(case, out)
    assert f["axis"] == 0 and f["scale"].shape == (6,)


def test_old_opset_with_an_op_that_changed_is_not_raised():
    case = Case(per_channel=False, opset=10)
    case.model.ir_version = 7
    m = case.model
    out = next(o for o in m.graph.output if o.name == "out")
    m.graph.node.append(h.make_node("Softmax", ["out"], ["soft"], name="softmax", axis=1))
    out.name = "soft"
    assert_kept(case, "opset-too-old", "Softmax", allow_opset_upgrade=True)


def test_old_opset_per_tensor_with_equal_factors_folds():
    # Every |a| equal: the per-tensor scale absorbs it without an axis; negative channels still mirror.
    case = Case(per_channel=False, opset=10, gamma=np.array([1.3, -1.3, 1.3, 1.3, -1.3, 1.3]))
    case.model.ir_version = 7
    case.var[:] = 1.0
    for init in case.model.graph.initializer:
        if init.name == "var":
            init.CopyFrom(nh.from_array(case.var, "var"))
    case.a = case.gamma.astype(np.float64) / np.sqrt(1.0 + np.float64(np.float32(EPS)))
    case.t = case.beta.astype(np.float64) - case.mean.astype(np.float64) * case.a
    out, _ = fold_and_check(case)
    f = folded_weight(out)
    assert f["scale"].size == 1 and f["axis"] is None
    np.testing.assert_array_equal(f["q"], expected_integers(case))


def test_training_mode_bn_is_kept():
    case = Case(opset=15)
    bn = next(n for n in case.model.graph.node if n.name == "bn")
    bn.attribute.append(h.make_attribute("training_mode", 1))
    assert_kept(case, "training-mode")


# ------------------------------------------------------------------------------------------------ chains


def test_two_bns_fold_into_one_quantized_layer():
    case = Case(form="int", per_channel=False)
    m = case.model
    bn = next(n for n in m.graph.node if n.name == "bn")
    bn.output[0] = "mid"
    rng = np.random.default_rng(9)
    for name, v in (("g2", rng.uniform(-1.5, 1.5, 6)), ("b2", rng.standard_normal(6)), ("m2", rng.standard_normal(6)),
                    ("v2", rng.uniform(0.5, 2, 6))):
        m.graph.initializer.append(nh.from_array(v.astype(np.float32), name))
    m.graph.node.append(h.make_node("BatchNormalization", ["mid", "g2", "b2", "m2", "v2"], ["out"], name="bn2"))
    result = fold(case.bytes)
    assert result.records["bn"]["folded"] and result.records["bn2"]["folded"]
    assert "BatchNormalization" not in [n.op_type for n in onnx.load_from_string(result.bytes).graph.node]
    tol = sum(dict(result.records[b]["metrics"]).get("bias_requantization_error", 0) for b in ("bn", "bn2"))
    feeds = random_inputs(case.model)
    e, a = run(case.model, feeds)[0], run(result.bytes, feeds)[0]
    assert np.abs(e - a).max() <= 1e-5 * np.ptp(e) + 2 * tol


# ------------------------------------------------------------------------------------------------ deployability


@pytest.mark.parametrize("kwargs", [
    dict(layer="Conv", form="int", out_quant=True),
    dict(layer="Conv", form="int", out_quant=True, per_channel=False),
    dict(layer="Conv", form="int", out_quant=True, bias="int32"),
    dict(layer="Conv", form="qat", out_quant=True, bias="float"),
    dict(layer="Gemm", form="int", out_quant=True, bias="int32", cin=10, cout=7),
    dict(layer="MatMul", form="int", out_quant=True, cin=16, cout=8),
], ids=["conv", "conv_per_tensor", "conv_int32_bias", "conv_qat", "gemm", "matmul"])
def test_deployability(kwargs):
    case = Case(**kwargs)
    out, r = fold_and_check(case)
    before, after = quantized_units(case.bytes), quantized_units(out)
    assert after >= before
    if kwargs["layer"] == "Conv" and kwargs["form"] == "int":
        assert after >= 1, "with BN gone, DQ -> Conv -> Q becomes one QLinearConv"


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("form", ["int", "qat"])
@pytest.mark.parametrize("opset", [13, 21])
def test_odd_quantization_parameters_keep_or_fold_exactly(form, opset):
    """Axes out of range, block sizes where there are none, scales and zero points of every wrong shape: never a
    crash; the BN is kept with a reason, or folded only where onnxruntime runs the original and agrees."""
    seen = collections.Counter()
    for axis, block, scale_shape, zero in [(ax, b, s, z) for ax in (None, -5, -1, 0, 3, 7) for b in (None, -1, 0, 3)
                                           for s in ([], [1], [6], [5], [6, 3, 3, 3], [0])
                                           for z in ("same", "scalar", "none")]:
        case = Case(form=form, opset=opset)
        m = case.model
        qdq = [n for n in m.graph.node if n.name in ("w_DQ", "w_Q")]
        for n in qdq:
            del n.attribute[:]
            if axis is not None:
                n.attribute.append(h.make_attribute("axis", axis))
            if block is not None:
                n.attribute.append(h.make_attribute("block_size", block))
        for init in list(m.graph.initializer):
            if init.name == "w_scale":
                init.CopyFrom(nh.from_array(np.full(scale_shape, 0.02, np.float32), "w_scale"))
            elif init.name == "w_zero" and zero == "none":
                m.graph.initializer.remove(init)
                for n in qdq:
                    del n.input[2]
            elif init.name == "w_zero":
                init.CopyFrom(nh.from_array(np.zeros(scale_shape if zero == "same" else [], np.int8), "w_zero"))
        result = fold(case.bytes, allow_nonzero_zero_point=True)  # a clamped -128 needs the complement
        r = result.records["bn"]
        seen[r["code"]] += 1
        if not r["folded"]:
            assert r["code"] == "malformed-quantization", r
            assert result.bytes == case.bytes
            continue
        run(case.model, random_inputs(case.model))  # the original is valid
        assert_same(case, result.bytes, r)
    assert seen["qdq-layer-bn"] > 0 and seen["malformed-quantization"] > 0
