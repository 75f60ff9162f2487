"""Issue 24, item 4: one table of layer kinds (cpp/folds/layer_kinds.h), shown by qdqfold_native.layer_kinds(),
used by the folds, the report's into_op and verify; and into_op no longer depends on node order (it was built
by a substring test of op names: "Conv" is in "ConvTranspose")."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native
from helpers.onnxrt import assert_same_outputs

C = 4


def bn_read_by_convtranspose_and_conv(convtranspose_first: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(44)
    inits = [nh.from_array(v.astype(np.float32), n) for n, v in
             (("gamma", rng.uniform(0.5, 1.5, C) * np.array([1, -1, 1, 1])), ("beta", rng.standard_normal(C)),
              ("mean", rng.standard_normal(C)), ("var", rng.uniform(0.5, 2, C)),
              ("w_conv", rng.standard_normal((5, C, 3, 3)) * 0.3), ("w_convt", rng.standard_normal((C, 3, 1, 1)) * 0.3))]
    layers = [h.make_node("ConvTranspose", ["z", "w_convt"], ["out_t"], name="convt"),
              h.make_node("Conv", ["z", "w_conv"], ["out_c"], name="conv")]
    if not convtranspose_first:
        layers.reverse()
    nodes = [h.make_node("Relu", ["x"], ["r"], name="relu"),
             h.make_node("BatchNormalization", ["r", "gamma", "beta", "mean", "var"], ["z"], name="bn"), *layers]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, C, 6, 6])],
                         [h.make_tensor_value_info("out_t", T.FLOAT, [1, 3, 6, 6]),
                          h.make_tensor_value_info("out_c", T.FLOAT, [1, 5, 4, 4])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("convtranspose_first", [True, False], ids=["convtranspose-first", "conv-first"])
def test_into_op_names_each_layer_op_once_whatever_the_node_order(convtranspose_first):
    model = bn_read_by_convtranspose_and_conv(convtranspose_first)
    out, report = qdqfold_native.fold_with_report(model.SerializeToString())
    r = report["batchnorms"][0]
    assert r["folded"] and r["direction"] == "forward" and r["code"] == "bn-layers", r
    assert r["into_op"] == "Conv,ConvTranspose", r
    assert sorted(r["into"]) == ["conv", "convt"]
    assert_same_outputs(model, onnx.load_from_string(out))


def test_the_layer_table():
    kinds = {k["op"]: k for k in qdqfold_native.layer_kinds()}
    assert list(kinds) == ["Conv", "ConvTranspose", "Gemm", "MatMul"]
    assert all(k["weight_input"] == 1 and k["weight_scale_input"] == 1 and k["weight_zero_point_input"] == 2
               for k in kinds.values())
    assert kinds["MatMul"]["bias_input"] is None and kinds["Gemm"]["bias_input"] == 2
    assert kinds["Conv"]["output_axis"] == "0" and kinds["ConvTranspose"]["output_axis"].startswith("1")
    assert [op for op, k in kinds.items() if k["spatial"]] == ["Conv", "ConvTranspose"]


def test_verify_takes_its_layer_ops_from_the_core():
    import importlib

    verify = importlib.import_module("qdqfold.verify")  # the module (qdqfold.verify is also a function's name)
    assert verify._LAYERS == tuple(k["op"] for k in qdqfold_native.layer_kinds())
