"""Issue 24, item 1: per-channel and per-block scales and zero points stored in a shape that broadcasts to them.

ModelOpt's INT4 export for TensorRT writes `W[float] -> trt::DequantizeLinear(Constant scale [C_out, 1, 1, 1],
axis=0) -> Conv`: one value per output channel, in the weight's rank. Such a scale (any shape that broadcasts,
axis by axis, to one value per slice of the axis, or per block with block_size) is read as the per-channel (per
block) scale it is, on every weight form, and written back in the exporter's own shape (a Constant node stays a
Constant node).

onnxruntime's standard DequantizeLinear only runs 1-D per-axis scales, so the standard forms are compared in
onnxruntime after `canonical()` reshapes every Q/DQ parameter to the form the spec names, for the comparison only;
the folded integers and scales are checked exactly (helpers.qdq.assert_folded_weight).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native
from helpers.onnxrt import assert_same_outputs
from helpers.qdq import Case, assert_folded_weight, assert_same, constants
from qdqfold.trt_compat import standard_qdq


def _attrs(n):
    return {a.name: h.get_attribute_value(a) for a in n.attribute}


def _replace_initializer(model, name, array):
    inits = [nh.from_array(array, name) if i.name == name else i for i in model.graph.initializer]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)


def broadcast_copy(model, shape_of):
    """A copy of `model` whose weight Q/DQ parameters (w_scale, w_zero) are stored with the shape
    shape_of(canonical array) gives (same values, broadcast)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i in list(m.graph.initializer):
        if i.name in ("w_scale", "w_zero"):
            a = nh.to_array(i)
            _replace_initializer(m, i.name, a.reshape(shape_of(a)))
    return m


def canonical(data: bytes) -> onnx.ModelProto:
    """For onnxruntime only: every standard Q/DQ parameter in the spec's shape (per axis 1-D, blocked the
    full blocked shape)."""
    m = onnx.load_from_string(data)
    consts = constants(m)
    dims = {i.name: list(i.dims) for i in m.graph.initializer}
    by_output = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or n.domain not in ("", "ai.onnx"):
            continue
        a = _attrs(n)
        src = n.input[0] if n.op_type == "DequantizeLinear" else n.input[0]
        if src in by_output and by_output[src].op_type == "QuantizeLinear":
            src = by_output[src].input[0]
        wdims = dims.get(src)
        for name in n.input[1:3]:
            if not name or name not in consts or consts[name].size == 1 or wdims is None:
                continue
            v = consts[name]
            if a.get("block_size"):
                axis = a.get("axis", 1) % len(wdims)
                full = list(wdims)
                full[axis] = -(-wdims[axis] // a["block_size"])
                v = np.broadcast_to(v.reshape([1] * (len(full) - v.ndim) + list(v.shape)), full).copy()
            else:
                v = v.reshape(-1)
            _replace_initializer(m, name, v)
    return m


FORMS = [("int", T.INT8), ("qat", T.INT8), ("int", T.INT4), ("int", T.UINT4), ("qat", T.UINT8),
         ("int", T.FLOAT8E4M3FN)]


@pytest.mark.parametrize("form,qtype", FORMS, ids=[f"{f}-{onnx.TensorProto.DataType.Name(t).lower()}" for f, t in FORMS])
@pytest.mark.parametrize("layer", ["Conv", "ConvTranspose"])
def test_per_channel_scale_in_the_weights_rank_folds_and_keeps_its_shape(form, qtype, layer):
    case = Case(layer=layer, form=form, qtype=qtype, per_channel=True)
    rank = len(case.wdims)
    shape = lambda a: [a.size if k == case.out_axis else 1 for k in range(rank)]  # noqa: E731
    model = broadcast_copy(case.model, shape)
    out, report = qdqfold_native.fold_with_report(model.SerializeToString())
    r = report["batchnorms"][0]
    assert r["folded"] and r["code"] == "qdq-layer-bn", r
    folded = onnx.load_from_string(out)
    dq = next(n for n in folded.graph.node if n.name == "w_DQ")
    dims = {i.name: list(i.dims) for i in folded.graph.initializer}
    assert dims[dq.input[1]] == shape(case.scale0)
    if len(dq.input) > 2 and dq.input[2]:
        assert dims[dq.input[2]] == shape(case.zero0)
    std = canonical(out).SerializeToString()
    assert_folded_weight(case, std)
    assert_same(case, std, r)


def _blocked_case(stored_scale, seed, gamma=None):
    """A blocked int8 Case whose scale has the values `stored_scale` broadcast to the full blocked shape, and
    the model with the scale and zero point stored in stored_scale's shape."""
    case = Case(form="int", qtype=T.INT8, block_size=4, cin=8, cout=6, seed=seed, gamma=gamma)
    case.scale0 = np.broadcast_to(stored_scale, case.scale0.shape).astype(np.float32).copy()
    _replace_initializer(case.model, "w_scale", case.scale0)
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    _replace_initializer(model, "w_scale", stored_scale.astype(np.float32))
    _replace_initializer(model, "w_zero", np.zeros(stored_scale.shape, np.int8))
    return case, model


def _fold_blocked(case, model):
    out, report = qdqfold_native.fold_with_report(model.SerializeToString())
    r = report["batchnorms"][0]
    assert r["folded"], r
    folded = onnx.load_from_string(out)
    dq = next(n for n in folded.graph.node if n.name == "w_DQ")
    dims = {i.name: list(i.dims) for i in folded.graph.initializer}
    std = canonical(out).SerializeToString()
    assert_folded_weight(case, std)
    assert_same(case, std, r)
    return dims[dq.input[1]], dims[dq.input[2]]


def test_blocked_scale_broadcast_over_the_kernel_folds_and_keeps_its_shape():
    """A blocked scale [C_out, blocks, 1, 1]: one value per output channel and input block, the same over the
    kernel taps; it stays in that shape (each value still covers one output channel)."""
    stored = np.random.default_rng(5).uniform(0.01, 0.05, (6, 2, 1, 1))
    case, model = _blocked_case(stored, seed=3)
    assert case.zero0.shape == (6, 2, 3, 3) and not case.zero0.any()
    assert _fold_blocked(case, model) == ([6, 2, 1, 1], [6, 2, 1, 1])


def test_blocked_scale_shared_by_the_output_channels_is_expanded():
    """A blocked scale [1, blocks, 3, 3] shared by every output channel must take one value per output channel
    after the fold: it is written in the full blocked shape."""
    stored = np.random.default_rng(6).uniform(0.01, 0.05, (1, 2, 3, 3))
    case, model = _blocked_case(stored, seed=4, gamma=[0.7, -1.2, 0.9, 1.3, -0.6, 1.1])
    assert _fold_blocked(case, model) == ([6, 2, 3, 3], [6, 2, 3, 3])


def test_a_scale_that_does_not_broadcast_to_the_axis_is_still_malformed():
    case = Case(form="int", qtype=T.INT8, per_channel=True)
    model = broadcast_copy(case.model, lambda a: [1, a.size, 1, 1])  # on axis 1, but the DQ says axis 0
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data)
    r = report["batchnorms"][0]
    assert not r["folded"] and r["code"] == "malformed-quantization", r
    assert "does not broadcast to one value per slice of axis 0" in r["message"]
    assert r["attempts"][0]["at"] == "w_DQ"  # the node at fault


# ModelOpt INT4 for TensorRT, as its exporter writes it: the scale a Constant node of shape [C_out, 1, 1, 1].
C = 6


def modelopt_int4(seed=24, shape=(C, 1, 1, 1)):
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.05, 0.1, C).astype(np.float32)
    steps = rng.integers(-7, 8, (C, 3, 3, 3)) + rng.uniform(-0.45, 0.45, (C, 3, 3, 3))
    w = nh.from_array((steps * s.reshape(-1, 1, 1, 1)).astype(np.float32), "conv.weight")
    gamma = rng.uniform(0.5, 1.5, C) * np.where(np.arange(C) % 2 == 1, -1.0, 1.0)
    bn = [nh.from_array(v.astype(np.float32), f"bn.{n}") for n, v in
          (("weight", gamma), ("bias", rng.standard_normal(C)), ("running_mean", rng.standard_normal(C)),
           ("running_var", rng.uniform(0.5, 2, C)))]
    nodes = [h.make_node("Constant", [], ["/conv/weight_quantizer/Constant_output_0"],
                         value=nh.from_array(s.reshape(shape), "s")),
             h.make_node("DequantizeLinear", ["conv.weight", "/conv/weight_quantizer/Constant_output_0"], ["w"],
                         domain="trt", name="/conv/weight_quantizer/DequantizeLinear", axis=0),
             h.make_node("Conv", ["x", "w"], ["y"], name="/conv/Conv", pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["y"] + [t.name for t in bn], ["out"], name="/bn/BatchNormalization")]
    graph = h.make_graph(nodes, "main_graph", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 6, 6])],
                         [h.make_tensor_value_info("out", T.FLOAT, [1, C, 6, 6])], [w, *bn])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("trt", 1)])
    model.ir_version = 8
    a = nh.to_array(bn[0]).astype(np.float64) / np.sqrt(nh.to_array(bn[3]).astype(np.float64) + np.float64(np.float32(1e-5)))
    return model, s, a


def test_modelopt_int4_constant_scale_of_the_weights_rank_folds_in_place():
    model, s0, a = modelopt_int4()
    out, report = qdqfold_native.fold_with_report(model.SerializeToString())
    r = report["batchnorms"][0]
    assert r["folded"] and r["code"] == "qdq-layer-bn", r
    folded = onnx.load_from_string(out)
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    dq = next(n for n in folded.graph.node if n.op_type == "DequantizeLinear")
    assert dq.domain == "trt" and _attrs(dq)["axis"] == 0
    # The scale stays the exporter's Constant node, same output name and shape, with s' = s * |a|.
    const = next(n for n in folded.graph.node if n.op_type == "Constant" and n.output[0] == dq.input[1])
    assert dq.input[1] == "/conv/weight_quantizer/Constant_output_0"
    s1 = nh.to_array(const.attribute[0].t)
    assert list(s1.shape) == [C, 1, 1, 1]
    np.testing.assert_array_equal(s1.reshape(-1), (s0.astype(np.float64) * np.abs(a)).astype(np.float32))
    assert not any(i.name.startswith("/conv/weight_quantizer") for i in folded.graph.initializer)
    # The snapped weight re-quantizes (as TensorRT does: round half to even, int4) to the mirrored integers.
    w0 = nh.to_array(next(i for i in model.graph.initializer if i.name == "conv.weight")).astype(np.float32)
    w1 = constants(folded)[dq.input[0]].astype(np.float32)
    q0 = np.clip(np.round(w0 / s0.reshape(-1, 1, 1, 1)), -8, 7)
    q1 = np.clip(np.round(w1 / s1), -8, 7)
    np.testing.assert_array_equal(q1, np.where((a < 0)[:, None, None, None], -q0, q0))
    assert_same_outputs(onnx.load_from_string(standard_qdq(model.SerializeToString())),
                        onnx.load_from_string(standard_qdq(out)))


def test_modelopt_int4_per_tensor_constant_of_the_weights_rank_becomes_per_channel_in_that_rank():
    model, s0, a = modelopt_int4(seed=7)
    const = model.graph.node[0]
    const.attribute[0].t.CopyFrom(nh.from_array(s0.max().reshape(1, 1, 1, 1), "s"))  # the weight within 7 steps
    out, report = qdqfold_native.fold_with_report(model.SerializeToString())
    r = report["batchnorms"][0]
    assert r["folded"], r
    folded = onnx.load_from_string(out)
    dq = next(n for n in folded.graph.node if n.op_type == "DequantizeLinear")
    s1 = constants(folded)[dq.input[1]]
    assert list(s1.shape) == [C, 1, 1, 1] and _attrs(dq)["axis"] == 0
    assert_same_outputs(onnx.load_from_string(standard_qdq(model.SerializeToString())),
                        onnx.load_from_string(standard_qdq(out)))
