"""Backward folds that used to keep their BN without need:

1. quantized MatMul -> Add(constant bias) -> BN (int form and QAT form, either Add operand order);
2. a MatMul in an If branch whose input is an outer-scope value with a declared 2-D shape (float and QDQ);
3. Gemm with transA=1 -> BN (float and QDQ), while BN -> Gemm(transA=1) forwards is still kept.

Each case compares onnxruntime's outputs (optimisations off) of the original and the folded model; the QDQ cases
use the QDQ bound of helpers.qdq.assert_same (identical up to float rounding, rare one-step flips of a downstream
quantizer).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native
from helpers.build import bn_arrays, bn_node, bn_params, gemm_model, op_types, vi
from helpers.build import make_model as make_float_model
from helpers.folding import assert_folded, fold
from helpers.onnxrt import assert_same_outputs, run
from helpers.qdq import Case, assert_folded_weight, assert_same

# ------------------------------------------------------------------------------------------------ 1. MatMul + Add


def matmul_add_case(form="int", bias_shape=(7,), bias_first=False, seed=0, **kwargs):
    """Case's quantized MatMul (x [3, 10] . w [10, 7]) with an Add of a constant bias between it and the BN."""
    case = Case(layer="MatMul", form=form, cin=10, cout=7, seed=seed, **kwargs)
    m = case.model
    layer = next(n for n in m.graph.node if n.name == "layer")
    layer.output[0] = "mm"
    case.c = np.random.default_rng(seed + 5).standard_normal(bias_shape).astype(np.float32)
    m.graph.initializer.append(nh.from_array(case.c, "c"))
    position = list(m.graph.node).index(layer) + 1
    m.graph.node.insert(position, h.make_node("Add", ["c", "mm"] if bias_first else ["mm", "c"], ["y"], name="add"))
    onnx.checker.check_model(m, full_check=True)
    return case


def fold_matmul_add(case, **options):
    result = fold(case.bytes, **options)
    r = result.records["bn"]
    assert r["folded"], r
    assert r["code"] == "qdq-layer-bn" and r["direction"] == "backward" and r["exact"]
    assert r["into"] == ["layer", "add"] and r["into_op"] == "MatMul"
    m = onnx.load_from_string(result.bytes)
    onnx.checker.check_model(m, full_check=True)
    ops = op_types(m)
    assert "BatchNormalization" not in ops and "Gemm" not in ops and ops.count("MatMul") == 1 and ops.count("Add") == 1
    assert_same(case, result.bytes, r)
    return result.bytes, r, m


def folded_add_bias(m):
    add = next(n for n in m.graph.node if n.name == "add")
    consts = {i.name: nh.to_array(i) for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = nh.to_array(n.attribute[0].t)
    slot = 0 if add.input[0] in consts else 1
    assert add.output[0] == "out"  # the Add took over the BN's output name
    return consts[add.input[slot]]


@pytest.mark.parametrize("form", ["int", "qat"])
@pytest.mark.parametrize("bias_first", [False, True], ids=["mm_first", "bias_first"])
@pytest.mark.parametrize("bias_shape", [(7,), (1, 7), (3, 7), (1,), (3, 1)])
def test_quantized_matmul_add_bn_folds(form, bias_first, bias_shape):
    case = matmul_add_case(form, bias_shape, bias_first)
    assert (case.a < 0).any()
    out, r, m = fold_matmul_add(case)
    assert_folded_weight(case, out)  # s' = s * |a|, integers mirrored where a < 0 (QAT: snapped float weight)
    # c' = a * c + t, widened along the features where c broadcast.
    rows = bias_shape[0] if len(bias_shape) == 2 else 1
    c = np.broadcast_to(case.c.astype(np.float64), (rows, 7) if len(bias_shape) == 2 else (7,))
    expected = (case.a * c + case.t).astype(np.float32)
    got = folded_add_bias(m)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("form", ["int", "qat"])
def test_quantized_matmul_add_bn_per_tensor_and_output_quantizer(form):
    case = matmul_add_case(form, per_channel=False, out_quant=True, seed=2)
    out, r, _ = fold_matmul_add(case)
    f = assert_folded_weight(case, out)
    assert f["axis"] == 1  # per-tensor scale became per-channel on MatMul's output axis
    # A bigger input: the one-step flips of the output quantizer stay rare and explained by float rounding.
    feeds = {"x": np.random.default_rng(9).standard_normal((3, 10)).astype(np.float32)}
    assert_same(case, out, r, feeds=feeds)


def test_quantized_matmul_add_bn_materialized():
    case = matmul_add_case("qat")
    out, _, m = fold_matmul_add(case, materialize_quantized_weights=True)
    assert "QuantizeLinear" not in [n.op_type for n in m.graph.node if n.name == "w_Q"]


def test_quantized_matmul_add_with_non_constant_bias_is_kept():
    case = matmul_add_case("int")
    m = case.model
    m.graph.initializer.remove(next(i for i in m.graph.initializer if i.name == "c"))
    m.graph.input.append(h.make_tensor_value_info("c", T.FLOAT, [7]))
    result = fold(case.bytes)
    assert not result.records["bn"]["folded"] and result.records["bn"]["code"] == "no-foldable-layer", result.records["bn"]
    assert result.bytes == case.bytes


def test_quantized_matmul_output_read_elsewhere_is_kept():
    case = matmul_add_case("int")
    case.model.graph.output.append(h.make_tensor_value_info("mm", T.FLOAT, None))
    result = fold(case.bytes)
    r = result.records["bn"]
    assert not r["folded"] and r["code"] == "layer-output-is-graph-output", r
    assert result.bytes == case.bytes


def test_quantized_matmul_add_output_read_elsewhere_is_kept():
    case = matmul_add_case("qat")
    m = case.model
    m.graph.node.append(h.make_node("Relu", ["y"], ["side"], name="side"))
    m.graph.output.append(h.make_tensor_value_info("side", T.FLOAT, None))
    result = fold(case.bytes)
    r = result.records["bn"]
    assert not r["folded"] and r["code"] == "layer-output-read-elsewhere", r
    assert result.bytes == case.bytes


def test_quantized_matmul_add_of_unknown_rank_is_kept():
    case = matmul_add_case("int")
    case.model.graph.input[0].type.tensor_type.ClearField("shape")
    result = fold(case.bytes)
    assert not result.records["bn"]["folded"] and result.records["bn"]["code"] == "not-2d", result.records["bn"]
    assert result.bytes == case.bytes


# ------------------------------------------------------------------------------------------------ 2. outer-scope rank

CIN, COUT = 6, 5
EPS = 1e-5
Q8 = np.random.default_rng(0).integers(-127, 128, size=(CIN, COUT)).astype(np.int8)
SCALE = np.random.default_rng(2).uniform(0.01, 0.05, COUT).astype(np.float32)


def bn_tensors(prefix):
    return bn_arrays([1.2, -0.7, 0.9, -1.5, 0.6], prefix)


def if_model(form, x_shape=(3, CIN), outer="input", act_quant=False):
    """cond ? BN(MatMul(v, W)) : MatMul(v, W2) where v is an outer value: the graph input x (declared x_shape,
    None: no shape) or, with outer="flatten", Flatten(x) with no value_info. W is a float initializer in the
    branch (form "float"), or DQ(int8 outer initializer) ("int") or Q -> DQ of a float one ("qat") in the branch.
    act_quant: v goes through an activation Q -> DQ in the outer graph first."""
    inits, outer_nodes = [], []
    v = "x"
    if outer == "flatten":
        outer_nodes.append(h.make_node("Flatten", ["x"], ["xf"], name="flatten"))
        v = "xf"
    if act_quant:
        inits += [nh.from_array(np.array(0.02, np.float32), "x_scale"), nh.from_array(np.array(128, np.uint8), "x_zero")]
        outer_nodes += [h.make_node("QuantizeLinear", [v, "x_scale", "x_zero"], ["xq"], name="x_Q"),
                        h.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="x_DQ")]
        v = "xd"
    bn = bn_tensors("t_")
    then_inits = [nh.from_array(val, k) for k, val in bn.items()]
    if form == "float":
        then_inits.append(nh.from_array((Q8.astype(np.float32) * SCALE), "t_w"))
        then_nodes = []
    elif form == "int":
        inits += [nh.from_array(Q8, "w_q"), nh.from_array(SCALE, "w_scale")]
        then_nodes = [h.make_node("DequantizeLinear", ["w_q", "w_scale"], ["t_w"], axis=1, name="t_DQ")]
    else:
        w = (Q8.astype(np.float32) * SCALE).astype(np.float32)
        w.reshape(-1)[::3] *= np.float32(1.1)  # off the grid
        inits += [nh.from_array(SCALE, "w_scale"), nh.from_array(np.zeros(COUT, np.int8), "w_zero")]
        then_inits.append(nh.from_array(w, "t_wf"))
        then_nodes = [h.make_node("QuantizeLinear", ["t_wf", "w_scale", "w_zero"], ["t_wq"], axis=1, name="t_Q"),
                      h.make_node("DequantizeLinear", ["t_wq", "w_scale", "w_zero"], ["t_w"], axis=1, name="t_DQ")]
    then_nodes += [h.make_node("MatMul", [v, "t_w"], ["t_y"], name="t_mm"),
                   h.make_node("BatchNormalization", ["t_y", "t_gamma", "t_beta", "t_mean", "t_var"], ["t_out"],
                               epsilon=EPS, name="t_bn")]
    then_g = h.make_graph(then_nodes, "then", [], [h.make_tensor_value_info("t_out", T.FLOAT, None)], then_inits)
    else_g = h.make_graph([h.make_node("MatMul", [v, "e_w"], ["e_out"], name="e_mm")], "else", [],
                          [h.make_tensor_value_info("e_out", T.FLOAT, None)],
                          [nh.from_array(np.random.default_rng(4).standard_normal((CIN, COUT)).astype(np.float32), "e_w")])
    x_vi = h.make_tensor_value_info("x", T.FLOAT, None if x_shape is None else list(x_shape))
    graph = h.make_graph(outer_nodes + [h.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g,
                                                    name="if")], "g",
                         [h.make_tensor_value_info("cond", T.BOOL, []), x_vi],
                         [h.make_tensor_value_info("out", T.FLOAT, None)], inits)
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def then_branch(model_bytes):
    m = onnx.load_from_string(model_bytes)
    node = next(n for n in m.graph.node if n.op_type == "If")
    return next(a.g for a in node.attribute if a.name == "then_branch")


def assert_if_outputs_same(m, out, x_shape=(3, CIN), exact=True):
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal(x_shape).astype(np.float32)
        for cond in (True, False):
            feeds = {"cond": np.array(cond), "x": x}
            if exact:
                assert_same_outputs(m, out, feeds=feeds)
            else:
                # QDQ: identical up to float rounding (no quantizer after the BN here, so no flips).
                e, a = run(m, feeds)[0], run(out, feeds)[0]
                np.testing.assert_allclose(a, e, rtol=0, atol=1e-5 * np.ptp(e))


@pytest.mark.parametrize("outer", ["input", "flatten"])
def test_float_matmul_in_if_branch_reading_outer_2d_value_folds(outer):
    m = if_model("float", x_shape=(3, CIN) if outer == "input" else (3, CIN, 1, 1), outer=outer)
    result = fold(m)
    r = result.records["t_bn"]
    assert r["folded"] and r["code"] == "gemm-bn", r
    branch = then_branch(result.bytes)
    assert [n.op_type for n in branch.node] == ["Gemm"]
    assert_if_outputs_same(m, result.bytes, x_shape=(3, CIN) if outer == "input" else (3, CIN, 1, 1))


@pytest.mark.parametrize("form", ["int", "qat"])
@pytest.mark.parametrize("act_quant", [False, True], ids=["float_x", "quantized_x"])
def test_qdq_matmul_in_if_branch_reading_outer_2d_value_folds(form, act_quant):
    m = if_model(form, act_quant=act_quant)
    result = fold(m)
    r = result.records["t_bn"]
    assert r["folded"] and r["code"] == "qdq-layer-bn" and r["exact"], r
    branch = then_branch(result.bytes)
    assert "BatchNormalization" not in [n.op_type for n in branch.node]
    # Outer tensors are never edited (the branch reads new ones; outer ones nothing reads any more are dropped).
    om = onnx.load_from_string(result.bytes)
    before = {t.name: t.SerializeToString() for t in m.graph.initializer}
    assert all(before[t.name] == t.SerializeToString() for t in om.graph.initializer)
    assert "x_scale" in {t.name for t in om.graph.initializer} or not act_quant
    bn = bn_tensors("t_")
    a = bn["t_gamma"].astype(np.float64) / np.sqrt(bn["t_var"].astype(np.float64) + np.float64(np.float32(EPS)))
    inner = {t.name: nh.to_array(t) for t in branch.initializer}
    dq = next(n for n in branch.node if n.op_type == "DequantizeLinear")
    np.testing.assert_array_equal(inner[dq.input[1]], (SCALE * np.abs(a)).astype(np.float32))
    if form == "int":
        np.testing.assert_array_equal(inner[dq.input[0]].astype(np.int64), np.where(a < 0, -Q8.astype(np.int64), Q8))
    assert_if_outputs_same(m, result.bytes, exact=False)


@pytest.mark.parametrize("form, code", [("float", "unknown-rank"), ("int", "not-2d"), ("qat", "not-2d")])
def test_matmul_in_if_branch_reading_outer_value_of_unknown_rank_is_kept(form, code):
    result = fold(if_model(form, x_shape=None))
    r = result.records["t_bn"]
    assert not r["folded"] and r["code"] == code, r
    assert result.bytes == result.input


@pytest.mark.parametrize("form, code", [("float", "channel-axis-mismatch"), ("int", "not-2d")])
def test_matmul_in_if_branch_reading_outer_3d_value_is_kept(form, code):
    result = fold(if_model(form, x_shape=(2, 3, CIN)))
    r = result.records["t_bn"]
    assert not r["folded"] and r["code"] == code, r
    assert result.bytes == result.input


@pytest.mark.parametrize("form, code", [("float", "unknown-rank"), ("int", "not-2d")])
def test_matmul_on_function_input_is_kept(form, code):
    # A function's inputs have no shapes, whatever the calling graph declares: the rank stays unknown.
    bn = bn_tensors("")
    const = lambda name, v: h.make_node("Constant", [], [name], value=nh.from_array(v, name))  # noqa: E731
    body = [const(k, v) for k, v in bn.items()]
    if form == "float":
        body.append(const("w", (Q8.astype(np.float32) * SCALE).astype(np.float32)))
    else:
        body += [const("w_q", Q8), const("w_scale", SCALE),
                 h.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=1)]
    body += [h.make_node("MatMul", ["fx", "w"], ["y"]),
             h.make_node("BatchNormalization", ["y", "gamma", "beta", "mean", "var"], ["fy"], epsilon=EPS, name="fbn")]
    fn = h.make_function("local", "Linear", ["fx"], ["fy"], body, [h.make_opsetid("", 13)])
    graph = h.make_graph([h.make_node("Linear", ["x"], ["out"], domain="local")], "g",
                         [h.make_tensor_value_info("x", T.FLOAT, [3, CIN])],
                         [h.make_tensor_value_info("out", T.FLOAT, None)])
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 13), h.make_opsetid("local", 1)], functions=[fn])
    m.ir_version = 8
    result = fold(m)
    r = result.records["fbn"]
    assert not r["folded"] and r["code"] == code, r
    assert result.bytes == result.input


# ------------------------------------------------------------------------------------------------ 3. Gemm transA=1

def trans_a_gemm_model(trans_b, c_shape, alpha=1.0, beta=1.0, m=3, k=5, n=8):
    """gemm_model with A given transposed: input a [k, m], Gemm(transA=1)."""
    model = gemm_model(trans_b=trans_b, alpha=alpha, beta=beta, c_shape=c_shape, m=m, k=k, n=n)
    model.graph.node[0].attribute.append(h.make_attribute("transA", 1))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value, dims[1].dim_value = k, m
    return model


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (0.5, 2.0), (1.5, 0.0)])
@pytest.mark.parametrize("c_shape", [None, (8,), (3, 8), (3, 1), ()])
def test_float_gemm_trans_a_bn_folds(trans_b, alpha, beta, c_shape):
    model = trans_a_gemm_model(trans_b, c_shape, alpha, beta)
    folded, report = assert_folded(model, expect_codes=["gemm-bn"])
    assert op_types(folded) == ["Gemm"]
    attrs = {a.name: h.get_attribute_value(a) for a in folded.graph.node[0].attribute}
    assert attrs["transA"] == 1 and attrs.get("transB", 0) == trans_b and attrs.get("alpha", 1.0) == alpha


def test_float_gemm_trans_a_shape_mismatch_is_kept():
    # BN over M = 3 channels while the Gemm makes N = 8 features: not this Gemm's output channels.
    model = trans_a_gemm_model(1, (8,))
    bn = model.graph.node[1]
    model.graph.initializer.extend(bn_params("bn3", 3))
    bn.input[1:] = [f"bn3_{p}" for p in ("scale", "bias", "mean", "var")]
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, fold_forward=False)
    r = report["batchnorms"][0]
    assert not r["folded"] and r["code"] == "shape-mismatch", r
    assert out == data


def qdq_trans_a_case(form, bias, trans_b=1, **kwargs):
    """test_fold_qdq's quantized Gemm with A given transposed: x [cin, 3] -> Q -> DQ -> Gemm(transA=1)."""
    case = Case(layer="Gemm", form=form, bias=bias, trans_b=trans_b, cin=10, cout=7, **kwargs)
    m = case.model
    next(n for n in m.graph.node if n.name == "layer").attribute.append(h.make_attribute("transA", 1))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value, dims[1].dim_value = 10, 3
    return case


@pytest.mark.parametrize("form", ["int", "qat"])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [None, "float", "int32"])
def test_qdq_gemm_trans_a_bn_folds(form, trans_b, bias):
    case = qdq_trans_a_case(form, bias, trans_b=trans_b, alpha=0.5)
    result = fold(case.bytes)
    r = result.records["bn"]
    assert r["folded"] and r["code"] == "qdq-layer-bn" and r["into"] == ["layer"], r
    m = onnx.load_from_string(result.bytes)
    onnx.checker.check_model(m, full_check=True)
    assert "BatchNormalization" not in op_types(m)
    layer = next(n for n in m.graph.node if n.name == "layer")
    assert {a.name: h.get_attribute_value(a) for a in layer.attribute}["transA"] == 1
    assert_folded_weight(case, result.bytes)
    assert_same(case, result.bytes, r)


def test_qdq_gemm_trans_a_with_output_quantizer():
    case = qdq_trans_a_case("qat", "int32", out_quant=True, seed=4)
    result = fold(case.bytes)
    assert result.records["bn"]["folded"], result.records["bn"]
    assert_same(case, result.bytes, result.records["bn"])


def test_bn_into_gemm_trans_a_forwards_is_still_kept():
    # BN -> Gemm(transA=1): A's features are on its axis 0, BN's channels on axis 1; a forward fold would scale
    # the wrong axis of B, so it is kept (backward folds into transA=1 are the ones allowed).
    c = 4
    inits = [*bn_params("bn", c), nh.from_array(np.random.default_rng(0).standard_normal((c, 3)).astype(np.float32), "w")]
    nodes = [h.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", "n", "bn"),
             h.make_node("Gemm", ["n", "w"], ["y"], transA=1, name="fc")]
    model = make_float_model(nodes, [vi("x", [c, c])], [vi("y", None)], inits)
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data)
    r = report["batchnorms"][0]
    assert not r["folded"] and r["code"] == "unsupported-layer" and "transA" in r["message"], r
    assert out == data
