"""Issue 14, pattern 7: MatMul(const W) -> Flatten/Reshape -> BatchNormalization (timm LeViT's LinearNorm).

`self.bn(self.linear(x).flatten(0, 1)).reshape_as(x)` exports as MatMul -> Flatten(axis=2) (torch writes
flatten(0, -2) of a rank-3 tensor that way) or Reshape([-1, F]) -> BN -> Reshape. The reshape keeps the features on
axis 1, so the BN folds into W's columns plus an Add of its shift after the MatMul (`matmul-reshape-bn`).
"""

from __future__ import annotations

import onnx
import pytest

import qdqfold_native
from helpers.exporters.levit import B, F, N, levit_linear_norm
from helpers.onnxrt import assert_same_outputs


@pytest.mark.parametrize("form", [dict(flatten="Flatten", axis=2), dict(flatten="Flatten", axis=-1),
                                  dict(flatten="Reshape", shape=(-1, F)), dict(flatten="Reshape", shape=(B * N, F)),
                                  dict(flatten="Flatten", axis=2, zero_shift=True), dict(flatten="Flatten", bias=True),
                                  dict(flatten="Reshape", bias=True)],
                         ids=["flatten2", "flatten-1", "reshape-1F", "reshape-BNF", "zero-shift", "bias-flatten",
                              "bias-reshape"])
def test_linear_norm_folds_into_the_matmul(form):
    model = levit_linear_norm(**form)
    out, report = qdqfold_native.fold_with_report(model.SerializeToString())
    r = report["batchnorms"][0]
    assert r["folded"] and r["code"] == "matmul-reshape-bn" and r["direction"] == "backward", r
    folded = onnx.load_from_string(out)
    ops = [n.op_type for n in folded.graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Add") == (0 if form.get("zero_shift") else 1)  # the bias Add, or the shift's
    onnx.checker.check_model(folded, full_check=True)
    assert_same_outputs(model, folded)


@pytest.mark.parametrize("form", [dict(flatten="Flatten", axis=1), dict(flatten="Reshape", shape=(-1, F // 2))],
                         ids=["flatten1", "reshape-split"])
def test_a_reshape_that_moves_the_features_keeps_the_bn(form):
    # Flatten(axis=1) of [B, N, F] is [B, N*F]; Reshape([-1, F/2]) splits each row of features in two.
    data = levit_linear_norm(**form).SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, fold_forward=False)
    r = report["batchnorms"][0]
    assert not r["folded"] and r["code"] == "reshape-moves-features", r
    assert out == data


# Issue 24, item 2: timm's LeViT (levit_128s) kept 46 of 52 BNs as `layer-output-read-elsewhere`: `.reshape_as(x)`
# exports as Shape(MatMul output) -> Reshape, and that Shape node read the MatMul's output. A reader of the shape
# only never blocks a fold, which changes no shape. (At the end of the file: the helper's RNG is shared.)
@pytest.mark.parametrize("form", [dict(flatten="Flatten", axis=2), dict(flatten="Reshape", shape=(-1, F)),
                                  dict(flatten="Flatten", bias=True), dict(flatten="Flatten", size=True)],
                         ids=["flatten2", "reshape-1F", "bias", "size-too"])
def test_linear_norm_whose_matmul_output_is_read_by_shape_folds(form):
    form = dict(form)
    reader = "Size" if form.pop("size", False) else "Shape"
    model = levit_linear_norm(**form, shape_reader=reader)
    assert [n.op_type for n in model.graph.node].count("Shape") == 1
    out, report = qdqfold_native.fold_with_report(model.SerializeToString())
    r = report["batchnorms"][0]
    assert r["folded"] and r["code"] == "matmul-reshape-bn", r
    folded = onnx.load_from_string(out)
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    shape = next(n for n in folded.graph.node if n.op_type == "Shape")
    assert shape.input[0] == "/m/c/linear/MatMul_output_0"  # the MatMul's (or bias Add's) output, still there
    onnx.checker.check_model(folded, full_check=True)
    assert_same_outputs(model, folded)
