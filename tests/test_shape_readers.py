"""Issue 24, item 2: a node that reads only the shape of a value (Shape, Size) never blocks a fold, since a fold
changes no shape. Where the value it reads goes away (a backward fold hands the BN's output name to the layer; a
forward fold removes the BN), it reads the value that replaces it, of the same shape. LeViT's layout is in
tests/test_exporters_levit.py; here the other directions and forms, each run in onnxruntime on the folded model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native
from helpers.onnxrt import assert_same_outputs, random_inputs, run
from helpers.qdq import Case, assert_same

RNG = np.random.default_rng(2424)
C = 4


def bn_inits(prefix="bn"):
    return [nh.from_array(v.astype(np.float32), f"{prefix}.{n}") for n, v in
            (("weight", RNG.uniform(0.5, 1.5, C) * np.array([1, -1, 1, 1])), ("bias", RNG.standard_normal(C)),
             ("mean", RNG.standard_normal(C)), ("var", RNG.uniform(0.5, 2, C)))]


def model_of(nodes, inits, outputs):
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 6, 6])],
                         [h.make_tensor_value_info(o, T.INT64 if o.startswith("shape") or o == "count" else T.FLOAT,
                                                   None) for o in outputs], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def readers_of(model, value):
    return [n.op_type for n in model.graph.node if value in n.input]


@pytest.mark.parametrize("reader", ["Shape", "Size"])
def test_conv_bn_whose_conv_output_is_read_by_a_shape_reader_folds(reader):
    """Conv -> BN, and Shape(conv output) -> Reshape of the BN's output back to it (reshape_as): the Conv takes
    the BN's output name, and the Shape reads that now."""
    w = nh.from_array((RNG.standard_normal((C, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    nodes = [h.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             h.make_node(reader, ["y"], ["shape_y"], name="reader"),
             h.make_node("BatchNormalization", ["y", "bn.weight", "bn.bias", "bn.mean", "bn.var"], ["z"], name="bn"),
             h.make_node("Relu", ["z"], ["out"], name="relu")]
    model = model_of(nodes, [w, *bn_inits()], ["out", "shape_y"])
    out, report = qdqfold_native.fold_with_report(model.SerializeToString())
    r = report["batchnorms"][0]
    assert r["folded"] and r["code"] == "conv-bn", r
    folded = onnx.load_from_string(out)
    assert sorted(readers_of(folded, "z")) == sorted(["Relu", reader]) and not readers_of(folded, "y")
    assert_same_outputs(model, folded)


def test_qdq_conv_bn_whose_conv_output_is_read_by_shape_folds():
    case = Case(form="int")
    m = case.model
    m.graph.node.append(h.make_node("Shape", ["y"], ["shape_y"], name="reader"))
    m.graph.output.append(h.make_tensor_value_info("shape_y", T.INT64, None))
    out, report = qdqfold_native.fold_with_report(m.SerializeToString())
    r = report["batchnorms"][0]
    assert r["folded"] and r["code"] == "qdq-layer-bn", r
    folded = onnx.load_from_string(out)
    assert readers_of(folded, "out") == ["Shape"]
    feeds = random_inputs(m)
    np.testing.assert_array_equal(run(m, feeds)[1], run(folded, feeds)[1])
    case.model = onnx.load_from_string(case.bytes)  # the original, its first output compared
    assert_same(case, out, r, feeds=feeds)


def test_bn_conv_whose_bn_output_is_read_by_shape_folds_forward():
    """BN -> unpadded Conv, and Shape(BN output): the forward fold removes the BN; the Shape reads BN's input."""
    w = nh.from_array((RNG.standard_normal((5, C, 3, 3)) * 0.3).astype(np.float32), "w2")
    nodes = [h.make_node("Relu", ["x"], ["r"], name="relu"),
             h.make_node("Conv", ["r", "w1"], ["y"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["y"], ["ry"], name="relu1"),
             h.make_node("BatchNormalization", ["ry", "bn.weight", "bn.bias", "bn.mean", "bn.var"], ["z"], name="bn"),
             h.make_node("Shape", ["z"], ["shape_z"], name="reader"),
             h.make_node("Conv", ["z", "w2"], ["out"], name="conv2")]
    w1 = nh.from_array((RNG.standard_normal((C, 3, 3, 3)) * 0.3).astype(np.float32), "w1")
    model = model_of(nodes, [w1, w, *bn_inits()], ["out", "shape_z"])
    out, report = qdqfold_native.fold_with_report(model.SerializeToString())
    r = report["batchnorms"][0]
    assert r["folded"] and r["direction"] == "forward" and r["code"] == "bn-conv", r
    folded = onnx.load_from_string(out)
    assert readers_of(folded, "ry") == ["Shape", "Conv"]
    assert_same_outputs(model, folded)


def test_a_reader_of_the_values_still_blocks():
    """Only Shape and Size are shape readers: a Relu that also reads the Conv's output keeps the BN."""
    w = nh.from_array((RNG.standard_normal((C, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    nodes = [h.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             h.make_node("Shape", ["y"], ["shape_y"], name="reader"),
             h.make_node("Relu", ["y"], ["side"], name="side"),
             h.make_node("BatchNormalization", ["y", "bn.weight", "bn.bias", "bn.mean", "bn.var"], ["out"], name="bn")]
    data = model_of(nodes, [w, *bn_inits()], ["out", "shape_y", "side"]).SerializeToString()
    out, report = qdqfold_native.fold_with_report(data)
    r = report["batchnorms"][0]
    assert not r["folded"] and r["code"] == "layer-output-read-elsewhere" and "Relu 'side'" in r["message"], r
    assert out == data
