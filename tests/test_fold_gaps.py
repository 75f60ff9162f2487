"""Backward folds that used to keep their BN without need:

1. quantized MatMul -> Add(constant bias) -> BN (int form and QAT form, either Add operand order);
2. a MatMul in an If branch whose input is an outer-scope value with a declared 2-D shape (float and QDQ);
3. Gemm with transA=1 -> BN (float and QDQ), while BN -> Gemm(transA=1) forwards is still kept.

Each case compares onnxruntime's outputs (optimisations off) of the original and the folded model; the QDQ cases
use test_fold_qdq's bound (identical up to float rounding, rare one-step flips of a downstream quantizer).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native
from conftest import assert_same_outputs, op_types, random_inputs, run
from test_fold_qdq import Case, assert_folded_weight, assert_same, fold

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
    out, records = fold(case.bytes, **options)
    r = records["bn"]
    assert r["folded"], r
    assert r["code"] == "qdq-layer-bn" and r["direction"] == "backward" and r["exact"]
    assert r["into"] == ["layer", "add"] and r["into_op"] == "MatMul"
    m = onnx.load_from_string(out)
    onnx.checker.check_model(m, full_check=True)
    ops = op_types(m)
    assert "BatchNormalization" not in ops and "Gemm" not in ops and ops.count("MatMul") == 1 and ops.count("Add") == 1
    assert_same(case, out, r)
    return out, r, m


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
    out, records = fold(case.bytes)
    assert not records["bn"]["folded"] and records["bn"]["code"] == "no-foldable-layer", records["bn"]
    assert out == case.bytes


def test_quantized_matmul_output_read_elsewhere_is_kept():
    case = matmul_add_case("int")
    case.model.graph.output.append(h.make_tensor_value_info("mm", T.FLOAT, None))
    out, records = fold(case.bytes)
    r = records["bn"]
    assert not r["folded"] and r["code"] == "layer-output-is-graph-output", r
    assert out == case.bytes


def test_quantized_matmul_add_output_read_elsewhere_is_kept():
    case = matmul_add_case("qat")
    m = case.model
    m.graph.node.append(h.make_node("Relu", ["y"], ["side"], name="side"))
    m.graph.output.append(h.make_tensor_value_info("side", T.FLOAT, None))
    out, records = fold(case.bytes)
    r = records["bn"]
    assert not r["folded"] and r["code"] == "layer-output-read-elsewhere", r
    assert out == case.bytes


def test_quantized_matmul_add_of_unknown_rank_is_kept():
    case = matmul_add_case("int")
    case.model.graph.input[0].type.tensor_type.ClearField("shape")
    out, records = fold(case.bytes)
    assert not records["bn"]["folded"] and records["bn"]["code"] == "not-2d", records["bn"]
    assert out == case.bytes
