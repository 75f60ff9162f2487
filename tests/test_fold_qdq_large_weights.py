"""The QDQ fold on weights larger than the file writer's 8 MB chunk: the new integers (mirrored where a < 0,
4-bit packed) and the QAT form's snapped float weight are generated a chunk at a time, so fold() on bytes and
fold_file() must agree byte for byte, and both must hold exactly the integers numpy predicts."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native

EPS = 1e-5


def model(layer, wdims, out_axis, qtype, form, seed=0, zero=0, minus_extremes=True):
    """x -> layer(DQ(q) or DQ(Q(W))) -> BN, with every third BN factor negative and per-channel scales."""
    rng = np.random.default_rng(seed)
    cout = wdims[out_axis]
    np_type = {T.INT8: np.int8, T.UINT8: np.uint8, T.INT4: ml_dtypes.int4, T.UINT4: ml_dtypes.uint4}[qtype]
    lo, hi = {T.INT8: (-128, 127), T.UINT8: (0, 255), T.INT4: (-8, 7), T.UINT4: (0, 15)}[qtype]
    scale = rng.uniform(0.01, 0.05, cout).astype(np.float32)
    shape = [1] * len(wdims)
    shape[out_axis] = cout
    q = rng.integers(lo + 1, hi + 1, size=wdims, dtype=np.int64)
    gamma = (rng.uniform(0.5, 1.5, cout) * np.where(np.arange(cout) % 3 == 1, -1, 1)).astype(np.float32)
    if minus_extremes:  # lo only where it may stay: in channels with a >= 0
        positive = np.moveaxis(q, out_axis, 0)[gamma > 0]
        positive.reshape(-1)[::97] = lo
        np.moveaxis(q, out_axis, 0)[gamma > 0] = positive
    inits = [nh.from_array(scale, "w_scale"), nh.from_array(np.full(cout, zero).astype(np_type), "w_zero")]
    nodes = []
    if form == "int":
        inits.append(nh.from_array(q.astype(np_type), "w_q"))
        nodes.append(h.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=out_axis))
        w_float = None
    else:
        # A float weight QuantizeLinear maps onto q exactly (and onto ties, where re-rounding would flip).
        w_float = ((q - zero) * scale.reshape(shape)).astype(np.float32)
        w_float.reshape(-1)[::11] += (0.5 * np.broadcast_to(scale.reshape(shape), wdims)).reshape(-1)[::11]
        inits.append(nh.from_array(w_float, "w_float"))
        q = np.clip(np.rint(w_float / scale.reshape(shape)) + zero, lo, hi).astype(np.int64)  # what Q makes of W
        nodes += [h.make_node("QuantizeLinear", ["w_float", "w_scale", "w_zero"], ["w_qq"], axis=out_axis),
                  h.make_node("DequantizeLinear", ["w_qq", "w_scale", "w_zero"], ["w"], axis=out_axis)]
    beta = rng.standard_normal(cout).astype(np.float32)
    mean = rng.standard_normal(cout).astype(np.float32)
    var = rng.uniform(0.5, 2.0, cout).astype(np.float32)
    for name, v in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var)):
        inits.append(nh.from_array(v, name))
    if layer == "Conv":
        x_shape = [1, wdims[1], 4, 4]
        nodes.append(h.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]))
    else:
        x_shape = [2, wdims[0]]
        nodes.append(h.make_node("MatMul", ["x", "w"], ["y"]))
    nodes.append(h.make_node("BatchNormalization", ["y", "gamma", "beta", "mean", "var"], ["out"], epsilon=EPS))
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, x_shape)],
                         [h.make_tensor_value_info("out", T.FLOAT, None)], inits)
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    m.ir_version = 10
    a = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + np.float64(np.float32(EPS)))
    return m, q, a, np.float32(scale), w_float


def fold_both(tmp_path, m, **options):
    data = m.SerializeToString()
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    src.write_bytes(data)
    on_bytes = qdqfold_native.fold(data, **options)
    report = qdqfold_native.fold_file(str(src), str(dst), **options)
    assert [b["folded"] for b in report["batchnorms"]] == [True]
    assert dst.read_bytes() == on_bytes
    return onnx.load_from_string(on_bytes)


def tensors(m):
    return {t.name: nh.to_array(t) for t in m.graph.initializer}


def expected(q, a, out_axis, zero=0):
    shape = [1] * q.ndim
    shape[out_axis] = -1
    return np.where(a.reshape(shape) < 0, 2 * zero - q, q)


@pytest.mark.parametrize("qtype", [T.INT8, T.INT4, T.UINT4])
def test_big_integer_weight_with_negated_channels(tmp_path, qtype):
    # Over 8 MB of integers (int4: packed, an odd element count, so the last byte carries a padding nibble).
    wdims = [512, 2049, 3, 3] if qtype == T.INT8 else [1023, 2049, 3, 3]
    zero = 8 if qtype == T.UINT4 else 0
    m, q, a, scale, _ = model("Conv", wdims, 0, qtype, "int", zero=zero)
    folded = tensors(fold_both(tmp_path, m))
    (name,) = [n for n in folded if n.startswith("w_q")]
    np.testing.assert_array_equal(folded[name].astype(np.int64), expected(q, a, 0, zero))
    np.testing.assert_array_equal(folded[[n for n in folded if n.startswith("w_scale")][0]],
                                  (scale * np.abs(a)).astype(np.float32))


def test_big_integer_weight_with_positive_factors_is_not_rewritten(tmp_path):
    m, q, a, _, _ = model("Conv", [512, 2049, 3, 3], 0, T.INT8, "int")
    for t in m.graph.initializer:
        if t.name == "gamma":
            t.CopyFrom(nh.from_array(np.abs(nh.to_array(t)), "gamma"))
    out = fold_both(tmp_path, m)
    original = {t.name: t for t in m.graph.initializer}
    folded = {t.name: t for t in out.graph.initializer}
    assert folded["w_q"].SerializeToString() == original["w_q"].SerializeToString()


@pytest.mark.parametrize("materialize", [False, True])
def test_big_qat_weight_snapped_in_chunks(tmp_path, materialize):
    m, q, a, scale, _ = model("Conv", [256, 2049, 3, 3], 0, T.INT8, "qat")
    out = fold_both(tmp_path, m, materialize_quantized_weights=materialize)
    folded = tensors(out)
    q_new = expected(q, a, 0)
    if materialize:
        (name,) = [n for n in folded if n.endswith("_quantized")]
        np.testing.assert_array_equal(folded[name].astype(np.int64), q_new)
        return
    s_new = (scale * np.abs(a)).astype(np.float32).reshape(-1, 1, 1, 1)
    w_new = folded["w_float"]
    np.testing.assert_array_equal(w_new, (q_new * s_new.astype(np.float64)).astype(np.float32))
    # QuantizeLinear (round half to even) gives back exactly the mirrored integers.
    np.testing.assert_array_equal(np.clip(np.rint(w_new / s_new), -128, 127), q_new)


@pytest.mark.parametrize("form, qtype, wdims", [("int", T.INT8, [4099, 2053]), ("qat", T.INT8, [4099, 2053]),
                                                ("int", T.INT4, [4097, 4100]), ("int", T.UINT4, [2049, 8194]),
                                                ("qat", T.UINT8, [1031, 2054])])
def test_big_matmul_weight(tmp_path, form, qtype, wdims):
    # Output channels along the last axis: generated a row at a time; the file writer's 8 MB chunks cut rows
    # (4-bit rows of even length are processed two columns per byte).
    zero = 8 if qtype == T.UINT4 else 128 if qtype == T.UINT8 else 0
    m, q, a, scale, _ = model("MatMul", wdims, 1, qtype, form, zero=zero)
    folded = tensors(fold_both(tmp_path, m))
    q_new = expected(q, a, 1, zero)
    if form == "int":
        np.testing.assert_array_equal(folded[[n for n in folded if n.startswith("w_q")][0]].astype(np.int64), q_new)
    else:
        s_new = (scale * np.abs(a)).astype(np.float32)
        lo, hi = (-128, 127) if qtype == T.INT8 else (0, 255)
        np.testing.assert_array_equal(np.clip(np.rint(folded["w_float"] / s_new) + zero, lo, hi), q_new)
