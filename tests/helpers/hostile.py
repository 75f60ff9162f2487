"""Builders and checks of the hostile-model tests (test_hostile_models*.py): small Conv -> BN models, and the
checks that a BN is kept with the model byte-identical, or folded to the same outputs."""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native
from qdqfold_native import FoldError

from helpers.onnxrt import random_inputs, run


SANITIZED = bool(os.environ.get("QDQFOLD_SANITIZED"))
RNG = np.random.default_rng(1)


# ------------------------------------------------------------------------------------------------ builders

def bn_tensors(channels: int, *, scale=None, bias=None, mean=None, var=None, dtype=np.float32, prefix="bn"):
    values = {
        "scale": RNG.uniform(0.5, 1.5, channels) * np.where(np.arange(channels) % 2, -1, 1) if scale is None else scale,
        "bias": RNG.uniform(-1, 1, channels) if bias is None else bias,
        "mean": RNG.uniform(-1, 1, channels) if mean is None else mean,
        "var": RNG.uniform(0.5, 2, channels) if var is None else var,
    }
    return [numpy_helper.from_array(np.asarray(v, dtype), f"{prefix}_{k}") for k, v in values.items()]


def bn_node(x="c", y="y", prefix="bn", **attrs):
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var")],
                            [y], name=prefix, **attrs)


def make(nodes, inputs, outputs, initializers=(), opset=17, value_info=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def conv_bn(channels=3, *, weight=None, conv_bias=True, eps=1e-5, dtype=np.float32, elem=TensorProto.FLOAT, **bn) -> onnx.ModelProto:
    """x[1,C,4,4] -> Conv(3x3, pad 1) -> BN -> y."""
    w = RNG.standard_normal((channels, channels, 3, 3)) if weight is None else weight
    inits = [numpy_helper.from_array(np.asarray(w, dtype), "w")] + bn_tensors(channels, dtype=dtype, **bn)
    conv_inputs = ["x", "w"]
    if conv_bias:
        inits.append(numpy_helper.from_array(RNG.standard_normal(channels).astype(dtype), "b"))
        conv_inputs.append("b")
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1]), bn_node(epsilon=eps)]
    return make(nodes, [helper.make_tensor_value_info("x", elem, [1, channels, 4, 4])],
                [helper.make_tensor_value_info("y", elem, [1, channels, 4, 4])], inits)


def initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def _folds_are_registered() -> bool:
    _, report = qdqfold_native.fold_with_report(serialize(conv_bn()))
    return report["batchnorms"][0]["code"] != "not-implemented"


# Until the first fold was registered every BN was kept as "not-implemented"; the reason-code checks below
# are strict once one is (the byte-identity checks are strict either way), and the test after this says
# that one is.
FOLDS = _folds_are_registered()


# ------------------------------------------------------------------------------------------------ checks

def assert_kept_unchanged(data: bytes, codes: set[str] | None = None, **options) -> dict:
    """Every BN is kept, with a reason from `codes` (when folds exist), and the model comes back byte-identical."""
    out, report = qdqfold_native.fold_with_report(data, **options)
    assert report["batchnorms"], "the model's BN is not in the report"
    for entry in report["batchnorms"]:
        assert entry["folded"] is False, f"{entry['node']} was folded: {entry}"
        assert entry["code"] and entry["message"]
        if FOLDS and codes is not None:
            assert entry["code"] in codes, f"{entry['node']}: {entry['code']} ({entry['message']}), expected {codes}"
    assert out == data
    return report


def assert_same_or_nan(original: bytes, folded: bytes, rtol_of_range: float = 1e-5) -> None:
    """Outputs agree within `rtol_of_range` of the finite range, and NaN/Inf sit in the same places."""
    feeds = random_inputs(original)
    for e, a in zip(run(original, feeds), run(folded, feeds)):
        e64, a64 = e.astype(np.float64), a.astype(np.float64)
        assert np.array_equal(np.isnan(e64), np.isnan(a64))
        assert np.array_equal(np.isinf(e64), np.isinf(a64)) and np.array_equal(e64[np.isinf(e64)], a64[np.isinf(a64)])
        finite = np.isfinite(e64)
        if finite.any():
            span = float(np.ptp(e64[finite]))
            err = float(np.max(np.abs(e64[finite] - a64[finite])))
            assert err <= rtol_of_range * max(span, 1e-12), f"error {err} exceeds {rtol_of_range} of range {span}"


def assert_safe(data: bytes, *, runs_in_ort: bool = True, rtol_of_range: float = 1e-5, **options) -> str:
    """FoldError, or an unchanged model with every BN kept, or (when onnxruntime runs the model) a folded
    model that computes the same. Returns "error", "kept" or "folded"."""
    try:
        out, report = qdqfold_native.fold_with_report(data, **options)
    except FoldError as e:
        assert str(e)
        return "error"
    if not any(entry["folded"] for entry in report["batchnorms"]):
        assert out == data
        return "kept"
    assert runs_in_ort, f"folded a model onnxruntime cannot run: {report}"
    assert_same_or_nan(data, out, rtol_of_range)
    return "folded"


def qdq_conv_bn(per_channel=True, q_dtype=np.int8, scale_len=None, axis=0) -> onnx.ModelProto:
    """int W -> DequantizeLinear -> Conv -> BN (onnxruntime quantize_static's weight form)."""
    c = 4
    info = np.iinfo(q_dtype)
    q = RNG.integers(info.min, info.max + 1, size=(c, c, 1, 1)).astype(q_dtype)
    n = scale_len if scale_len is not None else (c if per_channel else 1)
    shape = (n,) if per_channel or scale_len is not None else ()
    inits = [numpy_helper.from_array(q, "wq"),
             numpy_helper.from_array(RNG.uniform(0.01, 0.1, shape).astype(np.float32), "ws"),
             numpy_helper.from_array(np.zeros(shape, q_dtype), "wz")] + bn_tensors(c)
    attrs = {"axis": axis} if per_channel else {}
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="dq_w", **attrs),
             helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node()]
    return make(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 3, 3])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 3, 3])], inits)
