"""Layer -> BatchNormalization folds through quantized weights (qdq-layer-bn).

Every case builds a small graph with onnx.helper, folds it, asserts the folded integers, scales and zero points
directly against numpy, and compares onnxruntime's outputs (optimisations off) of the original and the folded
model.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from helpers.qdq import EPS, FLOAT8, Case, assert_folded_weight, expected_integers, folded_weight, mid_zero
from helpers.qdq_folds import assert_kept, fold_and_check, with_unit_variance


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
    with_unit_variance(case)
    out, _ = fold_and_check(case)
    f = folded_weight(out)
    np.testing.assert_array_equal(f["q"], expected_integers(case))
