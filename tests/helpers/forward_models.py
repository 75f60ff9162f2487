"""Builders of the forward fold tests (test_fold_forward*.py, test_proven_shapes.py, test_overflow_headroom.py):
BN -> Conv / ConvTranspose models, and the folded / kept checks."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from helpers import folding
from helpers.build import op_types
from helpers.folding import fold_api
from helpers.onnxrt import assert_same_outputs


F32 = TensorProto.FLOAT
RNG = np.random.default_rng(5)


def bn_params(prefix: str, c: int, *, zero_shift: bool = False, dtype=np.float32) -> list[onnx.TensorProto]:
    """Trained-looking statistics (some negative gammas); zero_shift gives t = beta - mean * a == 0 exactly."""
    gamma = RNG.uniform(0.5, 2.0, c) * np.where(RNG.random(c) < 0.3, -1.0, 1.0)
    beta = np.zeros(c) if zero_shift else RNG.standard_normal(c)
    mean = np.zeros(c) if zero_shift else RNG.standard_normal(c)
    var = RNG.uniform(0.05, 3.0, c)
    return [numpy_helper.from_array(v.astype(dtype), f"{prefix}_{n}")
            for n, v in zip(["scale", "bias", "mean", "var"], [gamma, beta, mean, var])]


def bn_node(x: str, y: str, prefix: str = "bn") -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}_{n}" for n in ["scale", "bias", "mean", "var"]],
                            [y], name=prefix)


def tensor(name: str, shape, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.5).astype(dtype), name)


def vi(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def make_model(nodes, inputs, outputs, initializers=(), opset=17, value_info=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    # Outputs declared without a shape get the inferred one (the full checker wants one).
    inferred = onnx.shape_inference.infer_shapes(model)
    for out, inf in zip(model.graph.output, inferred.graph.output):
        if not out.type.tensor_type.HasField("shape") and inf.type.tensor_type.HasField("shape"):
            out.type.CopyFrom(inf.type)
    return model


def assert_folded_forward(model, *, into: int = 1, rtol: float = 1e-5, **options):
    folded = fold_api(model, **options)
    entry = folded.report.batchnorms[0]
    assert entry.folded and entry.direction == "forward", entry.describe()
    assert len(entry.into) == into
    assert "BatchNormalization" not in op_types(folded.model)
    onnx.checker.check_model(folded.model, full_check=True)
    assert_same_outputs(folded.input, folded.bytes, rtol)
    return folded.model, entry


def assert_kept(model, code: str, **options):
    return folding.assert_kept(model, code, api=True, **options)


def bn_conv_model(shape, out_channels=6, kernel=3, group=1, pads=None, auto_pad=None, strides=None,
                  dilations=None, zero_shift=False, bias=True, op="Conv", input_shape=None):
    """x -> Relu -> BN -> Conv/ConvTranspose -> y (the Relu keeps BN from folding backwards)."""
    c, rank = shape[1], len(shape) - 2
    kernel = [kernel] * rank if isinstance(kernel, int) else kernel
    w_shape = [out_channels, c // group, *kernel] if op == "Conv" else [c, out_channels // group, *kernel]
    attrs = {"group": group}
    if pads is not None:
        attrs["pads"] = pads
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    if strides is not None:
        attrs["strides"] = strides
    if dilations is not None:
        attrs["dilations"] = dilations
    inits = [*bn_params("bn", c, zero_shift=zero_shift), tensor("w", w_shape)]
    if bias:
        inits.append(tensor("b", [out_channels]))
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", "n"),
             helper.make_node(op, ["n", "w"] + (["b"] if bias else []), ["y"], name="layer", **attrs)]
    return make_model(nodes, [vi("x", input_shape or shape)], [vi("y", None)], inits)
