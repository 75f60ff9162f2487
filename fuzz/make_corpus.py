"""Writes the fuzzer's seed corpus: small valid models covering every fold pattern and every reason to keep a
BatchNormalization, so that libFuzzer starts from inputs that reach deep into the folds rather than from
bytes the parser rejects at once.

    python3 fuzz/make_corpus.py [OUT_DIR]        # default: fuzz/corpus (not committed)

Also copies the small sample models (under 64 KB) from tests/models.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)
HERE = Path(__file__).resolve().parent
FLOAT = TensorProto.FLOAT


def array(shape, dtype=np.float32, low=-1.0, high=1.0):
    return RNG.uniform(low, high, size=shape).astype(dtype)


def bn_params(prefix: str, channels: int, var=None, dtype=np.float32) -> list[onnx.TensorProto]:
    var = array(channels, dtype, 0.5, 2.0) if var is None else np.asarray(var, dtype)
    return [numpy_helper.from_array(array(channels, dtype), prefix + "_scale"),
            numpy_helper.from_array(array(channels, dtype), prefix + "_bias"),
            numpy_helper.from_array(array(channels, dtype), prefix + "_mean"),
            numpy_helper.from_array(var, prefix + "_var")]


def bn(prefix: str, x: str, y: str, **attrs) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x] + [prefix + s for s in ("_scale", "_bias", "_mean", "_var")],
                            [y], name=prefix, **attrs)


def model(nodes, inputs, outputs, initializers=(), opset=17, value_info=(), functions=(), extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers), value_info=list(value_info))
    opsets = [helper.make_opsetid("", opset)] + list(extra_opsets)
    m = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    m.ir_version = 8 if opset <= 17 else 10
    return with_output_shapes(m)


def with_output_shapes(m: onnx.ModelProto) -> onnx.ModelProto:
    """Fills in the shapes of graph outputs declared without one (the checker wants them), by inference."""
    inferred = onnx.shape_inference.infer_shapes(m)
    known = {v.name: v.type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for out in m.graph.output:
        if not out.type.tensor_type.HasField("shape") and out.name in known:
            out.type.CopyFrom(known[out.name])
    return m


def vi(name, shape, elem=FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


# ---------------------------------------------------------------------------------------------- backward folds

def conv_bn(group=1, pads=(0, 0, 0, 0), bias=True, **bn_kwargs):
    cin, cout = 4, 4
    w = numpy_helper.from_array(array((cout, cin // group, 3, 3)), "w")
    inits = [w] + bn_params("bn", cout, **bn_kwargs)
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(array(cout), "b"))
        inputs.append("b")
    nodes = [helper.make_node("Conv", inputs, ["c"], name="conv", group=group, pads=list(pads)), bn("bn", "c", "y")]
    return model(nodes, [vi("x", [1, cin, 5, 5])], [vi("y", None)], inits)


def conv_transpose_bn(group=2):
    cin, cout = 4, 6
    w = numpy_helper.from_array(array((cin, cout // group, 2, 2)), "w")
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"], name="convt", group=group, strides=[2, 2]),
             bn("bn", "c", "y")]
    return model(nodes, [vi("x", [1, cin, 3, 3])], [vi("y", None)], [w] + bn_params("bn", cout))


def gemm_bn(trans_b=1, alpha=1.0, beta=1.0):
    k, n = 5, 3
    w = numpy_helper.from_array(array((n, k) if trans_b else (k, n)), "w")
    c = numpy_helper.from_array(array(n), "c_bias")
    nodes = [helper.make_node("Gemm", ["x", "w", "c_bias"], ["g"], name="gemm", transB=trans_b, alpha=alpha, beta=beta),
             bn("bn", "g", "y")]
    return model(nodes, [vi("x", [2, k])], [vi("y", None)], [w, c] + bn_params("bn", n))


def matmul_bn():
    w = numpy_helper.from_array(array((5, 3)), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"), bn("bn", "m", "y")]
    return model(nodes, [vi("x", [2, 5])], [vi("y", None)], [w] + bn_params("bn", 3))


def qdq_int_weight_conv_bn(per_channel=True, dtype=np.int8, negative_gamma=True):
    """int W -> DequantizeLinear -> Conv -> BN (onnxruntime quantize_static's form)."""
    cout, cin = 4, 3
    info = np.iinfo(dtype)
    q = numpy_helper.from_array(RNG.integers(info.min, info.max + 1, size=(cout, cin, 1, 1)).astype(dtype), "wq")
    scale = numpy_helper.from_array(array(cout if per_channel else (), np.float32, 0.01, 0.1), "ws")
    zero = numpy_helper.from_array(np.zeros(cout if per_channel else (), dtype), "wz")
    params = bn_params("bn", cout)
    if negative_gamma:
        params[0] = numpy_helper.from_array(-np.abs(numpy_helper.to_array(params[0])), "bn_scale")
    attrs = {"axis": 0} if per_channel else {}
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="dq_w", **attrs),
             helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn("bn", "c", "y")]
    return model(nodes, [vi("x", [1, cin, 4, 4])], [vi("y", None)], [q, scale, zero] + params)


def fake_quant_conv_bn(with_activation_qdq=False):
    """float W -> QuantizeLinear -> DequantizeLinear -> Conv -> BN (pytorch_quantization QAT export)."""
    cout, cin = 4, 3
    w = numpy_helper.from_array(array((cout, cin, 3, 3)), "w_float")
    scale = numpy_helper.from_array(array(cout, np.float32, 0.005, 0.02), "ws")
    zero = numpy_helper.from_array(np.zeros(cout, np.int8), "wz")
    nodes = [helper.make_node("QuantizeLinear", ["w_float", "ws", "wz"], ["wq"], name="q_w", axis=0),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="dq_w", axis=0),
             helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    inits = [w, scale, zero] + bn_params("bn", cout)
    if with_activation_qdq:  # an activation quantizer between Conv and BN: no exact fold crosses it
        inits += [numpy_helper.from_array(np.float32(0.05), "as"), numpy_helper.from_array(np.uint8(128), "az")]
        nodes += [helper.make_node("QuantizeLinear", ["c", "as", "az"], ["cq"], name="q_a"),
                  helper.make_node("DequantizeLinear", ["cq", "as", "az"], ["cd"], name="dq_a"), bn("bn", "cd", "y")]
    else:
        nodes.append(bn("bn", "c", "y"))
    return model(nodes, [vi("x", [1, cin, 4, 4])], [vi("y", None)], inits, opset=13)


# ---------------------------------------------------------------------------------------------- forward folds

def bn_conv(pads=(0, 0, 0, 0), group=1):
    c = 4
    w = numpy_helper.from_array(array((4, c // group, 3, 3)), "w")
    nodes = [bn("bn", "x", "n"), helper.make_node("Conv", ["n", "w"], ["y"], name="conv", pads=list(pads), group=group)]
    return model(nodes, [vi("x", [1, c, 6, 6])], [vi("y", None)], [w] + bn_params("bn", c), value_info=[vi("n", [1, c, 6, 6])])


def bn_flatten_gemm():
    c, hw = 3, 4
    w = numpy_helper.from_array(array((2, c * hw)), "w")
    nodes = [bn("bn", "x", "n"), helper.make_node("Flatten", ["n"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w"], ["y"], name="gemm", transB=1)]
    return model(nodes, [vi("x", [1, c, 2, 2])], [vi("y", None)], [w] + bn_params("bn", c))


def bn_two_convs():
    c = 3
    inits = [numpy_helper.from_array(array((2, c, 1, 1)), "w1"), numpy_helper.from_array(array((2, c, 1, 1)), "w2")]
    nodes = [bn("bn", "x", "n"), helper.make_node("Conv", ["n", "w1"], ["y1"], name="conv1"),
             helper.make_node("Conv", ["n", "w2"], ["y2"], name="conv2")]
    return model(nodes, [vi("x", [1, c, 3, 3])], [vi("y1", None), vi("y2", None)], inits + bn_params("bn", c))


# ---------------------------------------------------------------------------------------------- reasons to keep

def shared_weight():
    w = numpy_helper.from_array(array((3, 3, 1, 1)), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn("bn", "c", "y"),
             helper.make_node("Conv", ["x", "w"], ["y2"], name="other")]
    return model(nodes, [vi("x", [1, 3, 2, 2])], [vi("y", None), vi("y2", None)], [w] + bn_params("bn", 3))


def second_consumer():
    w = numpy_helper.from_array(array((3, 3, 1, 1)), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn("bn", "c", "y"),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    return model(nodes, [vi("x", [1, 3, 2, 2])], [vi("y", None), vi("r", None)], [w] + bn_params("bn", 3))


def layer_output_is_graph_output():
    w = numpy_helper.from_array(array((3, 3, 1, 1)), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn("bn", "c", "y")]
    return model(nodes, [vi("x", [1, 3, 2, 2])], [vi("y", None), vi("c", None)], [w] + bn_params("bn", 3))


def non_constant_weight():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn("bn", "c", "y")]
    return model(nodes, [vi("x", [1, 3, 2, 2]), vi("w", [3, 3, 1, 1])], [vi("y", None)], bn_params("bn", 3))


def training_mode():
    m = conv_bn()
    bn_node = m.graph.node[1]
    bn_node.attribute.append(helper.make_attribute("training_mode", 1))
    bn_node.output.extend(["running_mean", "running_var"])
    return m


def old_opset_spatial0():
    m = conv_bn()
    m.opset_import[0].version = 7
    m.graph.node[1].attribute.append(helper.make_attribute("spatial", 0))
    return m


def bn_parameters_as_constants_and_dq():
    """BN scale from a Constant node, bias through DequantizeLinear of int32 (onnxruntime's quantizer)."""
    m = conv_bn()
    inits = {t.name: t for t in m.graph.initializer}
    scale = inits.pop("bn_scale")
    bias = numpy_helper.to_array(inits.pop("bn_bias"))
    bias_scale = np.float32(0.001)
    m.graph.ClearField("initializer")
    m.graph.initializer.extend(inits.values())
    m.graph.initializer.extend([numpy_helper.from_array(np.round(bias / bias_scale).astype(np.int32), "bq"),
                                numpy_helper.from_array(bias_scale, "bqs")])
    m.graph.node.insert(0, helper.make_node("Constant", [], ["bn_scale"], name="const_scale", value=scale))
    m.graph.node.insert(1, helper.make_node("DequantizeLinear", ["bq", "bqs"], ["bn_bias"], name="dq_bias"))
    return m


def typed_data_fields():
    """Weights in float_data / int32_data (float16) instead of raw_data."""
    m = conv_bn()
    for t in m.graph.initializer:
        values = numpy_helper.to_array(t).ravel()
        t.ClearField("raw_data")
        t.float_data.extend(values.tolist())
    return m


def float16_model():
    cout, cin = 2, 2
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn("bn", "c", "y")]
    inits = [numpy_helper.from_array(array((cout, cin, 1, 1), np.float16), "w")] + bn_params("bn", cout, dtype=np.float16)
    w16 = inits[0]
    w16.ClearField("raw_data")
    w16.int32_data.extend(np.frombuffer(array((cout, cin, 1, 1), np.float16).tobytes(), np.uint16).tolist())
    return model(nodes, [vi("x", [1, cin, 2, 2], TensorProto.FLOAT16)], [vi("y", None, TensorProto.FLOAT16)], inits)


def subgraph_if():
    inner = conv_bn()
    then_graph = helper.make_graph(list(inner.graph.node), "then", [], [vi("y", None)],
                                   initializer=list(inner.graph.initializer))
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y_else"])], "else", [], [vi("y_else", None)])
    nodes = [helper.make_node("If", ["cond"], ["out"], name="if", then_branch=then_graph, else_branch=else_graph)]
    return model(nodes, [vi("cond", [], TensorProto.BOOL), vi("x", [1, 4, 5, 5])], [vi("out", None)])


def model_function():
    """A model-local function whose body holds Conv -> BN with Constant-node weights."""
    w = numpy_helper.from_array(array((2, 2, 1, 1)), "w")
    params = bn_params("bn", 2)
    body = [helper.make_node("Constant", [], ["w"], value=w)]
    body += [helper.make_node("Constant", [], [p.name], value=p) for p in params]
    body += [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn("bn", "c", "y")]
    fn = helper.make_function("local", "ConvBn", ["x"], ["y"], body, [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("ConvBn", ["input"], ["output"], domain="local", name="call")]
    return model(nodes, [vi("input", [1, 2, 3, 3])], [vi("output", None)], functions=[fn],
                 extra_opsets=[helper.make_opsetid("local", 1)])


def metadata_rich():
    m = conv_bn()
    m.doc_string = "a model with every optional field"
    m.producer_name, m.producer_version, m.domain, m.model_version = "make_corpus", "1.0", "test", 7
    helper.set_model_props(m, {"author": "fuzz", "license": "none"})
    m.graph.doc_string = "graph doc"
    m.graph.node[0].doc_string = "the conv"
    return m


SEEDS = {
    "conv_bn": conv_bn, "conv_bn_grouped_padded": lambda: conv_bn(group=2, pads=(1, 1, 1, 1), bias=False),
    "conv_transpose_bn_grouped": conv_transpose_bn, "conv_transpose_bn": lambda: conv_transpose_bn(group=1),
    "gemm_bn_transb": gemm_bn, "gemm_bn_alpha_beta": lambda: gemm_bn(trans_b=0, alpha=0.5, beta=2.0),
    "matmul_bn": matmul_bn,
    "qdq_int8_per_channel": qdq_int_weight_conv_bn,
    "qdq_int8_per_tensor": lambda: qdq_int_weight_conv_bn(per_channel=False),
    "qdq_uint8_per_channel": lambda: qdq_int_weight_conv_bn(dtype=np.uint8),
    "fake_quant_conv_bn": fake_quant_conv_bn,
    "activation_qdq_between": lambda: fake_quant_conv_bn(with_activation_qdq=True),
    "bn_conv_pad0": bn_conv, "bn_conv_pad1": lambda: bn_conv(pads=(1, 1, 1, 1)),
    "bn_conv_depthwise": lambda: bn_conv(group=4), "bn_flatten_gemm": bn_flatten_gemm, "bn_two_convs": bn_two_convs,
    "shared_weight": shared_weight, "second_consumer": second_consumer,
    "layer_output_is_graph_output": layer_output_is_graph_output, "non_constant_weight": non_constant_weight,
    "training_mode": training_mode, "old_opset_spatial0": old_opset_spatial0,
    "nan_variance": lambda: conv_bn(var=[1.0, np.nan, 1.0, 1.0]),
    "negative_variance": lambda: conv_bn(var=[1.0, -2.0, 1.0, 1.0]),
    "bn_params_constant_and_dq": bn_parameters_as_constants_and_dq, "typed_data_fields": typed_data_fields,
    "float16": float16_model, "subgraph_if": subgraph_if, "model_function": model_function,
    "metadata_rich": metadata_rich,
}


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, build in SEEDS.items():
        m = build()
        onnx.checker.check_model(m)  # seeds are valid models: the fuzzer's mutations start from the real thing
        (out_dir / f"{name}.onnx").write_bytes(m.SerializeToString())
    for sample in sorted((HERE.parent / "tests" / "models").glob("*.onnx")):
        if sample.stat().st_size < 64 * 1024:
            shutil.copyfile(sample, out_dir / sample.name)
    print(f"{len(list(out_dir.glob('*.onnx')))} seeds in {out_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "corpus")
