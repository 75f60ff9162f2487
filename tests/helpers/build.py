"""Small float graphs built with onnx.helper: BN parameters, layers, models (the builders test_fold_float.py
and test_fold_layer_variants.py share), and what a test asks of a graph (op types, BN count).

RNG is shared on purpose: the models those tests build depend on the order they draw from it, as they always did.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT
RNG = np.random.default_rng(1234)


def bn_params(prefix: str, c: int, rng=RNG, dtype=np.float32) -> list[onnx.TensorProto]:
    """Trained-looking BN statistics: some negative gammas, variances far from 1."""
    gamma = rng.uniform(0.5, 2.0, c) * np.where(rng.random(c) < 0.3, -1.0, 1.0)
    beta = rng.standard_normal(c)
    mean = rng.standard_normal(c)
    var = rng.uniform(0.05, 3.0, c)
    names = ["scale", "bias", "mean", "var"]
    return [numpy_helper.from_array(v.astype(dtype), f"{prefix}_{n}") for n, v in zip(names, [gamma, beta, mean, var])]


def bn_arrays(gamma, prefix: str = "") -> dict[str, np.ndarray]:
    """BN parameters as arrays keyed ``<prefix>gamma`` ... ``<prefix>var``: the given gamma, beta and mean standard
    normal and var in [0.5, 2) from a generator seeded 1 (the same values on every call)."""
    rng = np.random.default_rng(1)
    c = len(gamma)
    return {prefix + "gamma": np.asarray(gamma, np.float32), prefix + "beta": rng.standard_normal(c).astype(np.float32),
            prefix + "mean": rng.standard_normal(c).astype(np.float32),
            prefix + "var": rng.uniform(0.5, 2.0, c).astype(np.float32)}


def bn_node(x: str, y: str, prefix: str, name: str | None = None, **attrs) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}_{n}" for n in ["scale", "bias", "mean", "var"]],
                            [y], name=name or prefix, **attrs)


def weight(name: str, shape, rng=RNG, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.5).astype(dtype), name)


def make_model(nodes, inputs, outputs, initializers=(), opset=17, value_info=(), functions=(), extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets],
                              functions=list(functions))
    model.ir_version = 8 if opset <= 17 else 10
    # Graph outputs declared without a shape get the inferred one (the full checker wants a shape).
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # older opsets the inference does not know: leave the outputs as declared
        return model
    for out, inf in zip(model.graph.output, inferred.graph.output):
        if not out.type.tensor_type.HasField("shape") and inf.type.tensor_type.HasField("shape"):
            out.type.CopyFrom(inf.type)
    return model


def vi(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def bn_count(model: onnx.ModelProto) -> int:
    count = [0]

    def visit(g):
        for n in g.node:
            if n.op_type == "BatchNormalization":
                count[0] += 1
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g)
                for sub in a.graphs:
                    visit(sub)

    visit(model.graph)
    for f in model.functions:
        for n in f.node:
            count[0] += n.op_type == "BatchNormalization"
    return count[0]


def gemm_model(trans_b=0, alpha=1.0, beta=1.0, c_shape=(8,), m=3, k=5, n=8, dtype=np.float32, elem=F32, opset=17):
    b_shape = [n, k] if trans_b else [k, n]
    inits = [weight("Bw", b_shape, dtype=dtype)] + bn_params("bn", n, dtype=dtype)
    inputs = ["a", "Bw"]
    if c_shape is not None:
        inits.append(weight("C", list(c_shape), dtype=dtype))
        inputs.append("C")
    nodes = [helper.make_node("Gemm", inputs, ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta),
             bn_node("y", "z", "bn")]
    return make_model(nodes, [vi("a", [m, k], elem)], [vi("z", None, elem)], inits, opset=opset)


def op_types(model: onnx.ModelProto | bytes) -> list[str]:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load_from_string(bytes(model))
    return [n.op_type for n in model.graph.node]


def float_conv_bn(symbolic_batch: bool = False) -> onnx.ModelProto:
    """x -> Conv(3x3, pad 0) -> BN -> y, float: the fold every folder can do."""
    rng = np.random.default_rng(1)
    c_in, c_out = 3, 4
    inits = [
        numpy_helper.from_array(rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "b"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c_out).astype(np.float32) * np.array([1, -1, 1, 1], np.float32),
                                "gamma"),
        numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c_out).astype(np.float32), "var"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn")]
    batch = "N" if symbolic_batch else 1
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c_in, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, c_out, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
