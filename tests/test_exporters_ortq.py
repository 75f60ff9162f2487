"""Issue 14, pattern 11: drop_activation_quantizers must not cost quantized kernels.

onnx-neural-compressor (without its pre-pass) and onnxruntime's quantize_static write `Conv -> Q -> DQ -> BN`.
drop_activation_quantizers drops that Q/DQ pair to fold (approximately) only where another quantizer still follows
the folded layer (every reader of the BN's output is a QuantizeLinear); where the BN feeds Relu (or a graph
output), dropping would leave the conv with no quantizer after it and onnxruntime could no longer run it as a
quantized kernel: kept as `quantizer-would-be-lost`.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper as nh
import numpy as np

import qdqfold_native
from helpers.exporters.ortq import with_relu_after_bn
from helpers.onnxrt import random_inputs, run
from helpers.qdq import Case


def test_drop_is_refused_where_no_quantizer_would_follow_the_layer():
    case = with_relu_after_bn(Case(form="int", act_between=True))
    out, report = qdqfold_native.fold_with_report(case.bytes, drop_activation_quantizers=True)
    r = report["batchnorms"][0]
    assert not r["folded"] and r["code"] == "quantizer-would-be-lost", r
    assert "act_Q" in r["message"] and "relu" in r["message"]
    assert out == case.bytes


def test_drop_is_refused_before_a_graph_output():
    case = Case(form="int", act_between=True)
    out, report = qdqfold_native.fold_with_report(case.bytes, drop_activation_quantizers=True)
    r = report["batchnorms"][0]
    assert r["code"] == "quantizer-would-be-lost" and "graph output" in r["message"], r
    assert out == case.bytes


def test_drop_goes_ahead_where_a_quantizer_follows_the_bn():
    case = Case(form="int", act_between=True, out_quant=True)  # Conv -> Q -> DQ -> BN -> Q -> DQ (onnxruntime)
    out, report = qdqfold_native.fold_with_report(case.bytes, drop_activation_quantizers=True)
    r = report["batchnorms"][0]
    assert r["folded"] and not r["exact"], r
    m = onnx.load_from_string(out)
    layer = next(n for n in m.graph.node if n.name == "layer")
    readers = [n for n in m.graph.node if layer.output[0] in n.input]
    assert [n.op_type for n in readers] == ["QuantizeLinear"]  # the layer still has its quantizer after it


def test_an_int32_bias_with_a_nonzero_zero_point_is_requantized_with_zero_point_0():
    """Found by fuzzing the exporter fixtures: the re-quantized int32 bias kept its old nonzero zero point."""

    case = Case(layer="Conv", form="int", bias="int32")
    for i in case.model.graph.initializer:
        if i.name == "b_zero":
            z = nh.to_array(i).copy()
            z[2] = -1
            i.CopyFrom(nh.from_array(z, "b_zero"))
    out, report = qdqfold_native.fold_with_report(case.bytes)
    r = report["batchnorms"][0]
    assert r["folded"], r
    feeds = random_inputs(case.model)
    e, a = run(case.model, feeds)[0].astype(np.float64), run(out, feeds)[0].astype(np.float64)
    bias_error = dict(r["metrics"])["bias_requantization_error"]
    assert np.abs(e - a).max() <= 1e-5 * np.ptp(e) + bias_error * (1 + 1e-6)
