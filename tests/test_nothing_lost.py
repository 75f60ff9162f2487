"""Nothing lost: folding touches the folded BatchNormalization nodes, the layers that absorbed them, and those
layers' weights; everything else (metadata_props, doc strings, producer fields, functions, training_info,
value_info of surviving values, unknown fields, untouched nodes and initializers) comes back byte for byte.

Hypothesis builds models with random extras around random foldable and unfoldable blocks. The check splits
input and output on the wire, message by message, and compares the raw bytes of every sub-message that
no fold touched; for the messages a fold edits, every field other than those the fold rewrites.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native
from qdqfold.verify import verify

from helpers.wire import length_delimited

# CI runs a fixed budget; QDQFOLD_PROPERTY_EXAMPLES=2000 for a longer hunt (see the README, Development).
EXAMPLES = int(os.environ.get("QDQFOLD_PROPERTY_EXAMPLES", "60"))

F32 = TensorProto.FLOAT

# ------------------------------------------------------------------------------------------------ the wire

MODEL_GRAPH, MODEL_FUNCTIONS = 7, 25
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_VALUE_INFO = 1, 5, 13
NODE_INPUT, NODE_OUTPUT, NODE_ATTRIBUTE = 1, 2, 5
ATTRIBUTE_G, ATTRIBUTE_GRAPHS = 6, 11
TENSOR_DATA_FIELDS = {1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14}  # dims, type, data, name, data_location


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def fields(buf: bytes) -> list[tuple[int, bytes, bytes]]:
    """Top-level fields of a message: (number, payload of a length-delimited field or b"", whole field bytes)."""
    out, pos = [], 0
    while pos < len(buf):
        start = pos
        tag, pos = read_varint(buf, pos)
        number, wire_type = tag >> 3, tag & 7
        payload = b""
        if wire_type == 0:
            _, pos = read_varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = read_varint(buf, pos)
            payload = buf[pos:pos + length]
            pos += length
        else:
            raise AssertionError(f"wire type {wire_type}")
        out.append((number, payload, buf[start:pos]))
    return out


def field_strings(buf: bytes, number: int) -> list[str]:
    return [p.decode() for n, p, _ in fields(buf) if n == number]


def the_string(buf: bytes, number: int) -> str:
    values = field_strings(buf, number)
    return values[0] if values else ""


unknown_field = length_delimited  # a field number no ONNX message uses carries an unknown field


def with_unknown_fields(message, extra: bytes):
    """The same protobuf message with `extra` (encoded fields of numbers it does not know) appended."""
    return type(message).FromString(message.SerializeToString() + extra)


# ------------------------------------------------------------------------------------------------ models

@st.composite
def extras(draw) -> bytes:
    """Zero to two unknown fields (numbers no ONNX message uses), with arbitrary payloads."""
    return b"".join(unknown_field(draw(st.integers(1000, 5000)), draw(st.binary(max_size=12)))
                    for _ in range(draw(st.integers(0, 2))))


text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=16)


@st.composite
def block(draw, index: int, x: str, channels: int):
    """One block after value `x`: nodes, initializers, its output, its intermediate values (and any extra
    output). Conv -> BN (foldable; with its weight shared, so that the fold writes a new tensor; or with a
    the layer's output also a graph output, so that the BN stays), Relu (nothing to fold), or BN -> Conv pad 0 (forward)."""
    p = f"b{index}"
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["conv_bn", "conv_bn_shared", "conv_bn_kept", "relu", "bn_conv"]))
    doc = draw(text)
    params = [numpy_helper.from_array(v.astype(np.float32), f"{p}_{k}") for k, v in
              {"scale": rng.uniform(0.5, 1.5, channels) * rng.choice([-1, 1], channels),
               "bias": rng.uniform(-1, 1, channels), "mean": rng.uniform(-1, 1, channels),
               "var": rng.uniform(0.5, 2, channels)}.items()]
    bn_inputs = [f"{p}_{k}" for k in ("scale", "bias", "mean", "var")]
    w = numpy_helper.from_array(rng.standard_normal((channels, channels, 1, 1)).astype(np.float32), f"{p}_w")
    w.doc_string = draw(text)
    w = with_unknown_fields(w, draw(extras()))
    y = f"{p}_out"
    if kind == "relu":
        return [helper.make_node("Relu", [x], [y], name=f"{p}_relu", doc_string=doc)], [], y, []
    if kind == "bn_conv":
        nodes = [helper.make_node("BatchNormalization", [x] + bn_inputs, [f"{p}_n"], name=f"{p}_bn"),
                 helper.make_node("Conv", [f"{p}_n", w.name], [y], name=f"{p}_conv", doc_string=doc)]
        return nodes, [w] + params, y, [f"{p}_n"]
    conv = helper.make_node("Conv", [x, w.name], [f"{p}_c"], name=f"{p}_conv", doc_string=doc,
                            kernel_shape=[1, 1], pads=[0, 0, 0, 0])
    conv = with_unknown_fields(conv, draw(extras()))
    nodes = [conv, helper.make_node("BatchNormalization", [f"{p}_c"] + bn_inputs, [y], name=f"{p}_bn",
                                    epsilon=draw(st.sampled_from([1e-5, 1e-3])))]
    if kind == "conv_bn_shared":  # the weight is read again elsewhere: a new tensor, the old one stays
        nodes.append(helper.make_node("Conv", [x, w.name], [f"{p}_side"], name=f"{p}_side"))
        return nodes, [w] + params, y, [f"{p}_c"], f"{p}_side"
    if kind == "conv_bn_kept":
        return nodes, [w] + params, y, [f"{p}_c"], f"{p}_c"
    return nodes, [w] + params, y, [f"{p}_c"]


@st.composite
def models(draw) -> onnx.ModelProto:
    channels = draw(st.integers(1, 3))
    nodes, inits, value_info, outputs = [], [], [], []
    x = "input"
    for index in range(draw(st.integers(1, 4))):
        result = draw(block(index, x, channels))
        b_nodes, b_inits, y, intermediates = result[:4]
        nodes += b_nodes
        inits += b_inits
        outputs += [helper.make_tensor_value_info(v, F32, [1, channels, 2, 2]) for v in result[4:]]
        for v in intermediates + [y]:
            if draw(st.booleans()):
                info = helper.make_tensor_value_info(v, F32, [1, channels, 2, 2], doc_string=draw(text))
                value_info.append(with_unknown_fields(info, draw(extras())))
        x = y
    outputs.insert(0, helper.make_tensor_value_info(x, F32, [1, channels, 2, 2]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", F32, [1, channels, 2, 2])],
                              outputs, initializer=inits, value_info=value_info, doc_string=draw(text))
    graph = with_unknown_fields(graph, draw(extras()))
    functions = []
    if draw(st.booleans()):  # a model-local function, not called: it must pass through as it is
        body = [helper.make_node("Relu", ["a"], ["b"], doc_string=draw(text))]
        fn = helper.make_function("local", draw(st.sampled_from(["F", "G"])), ["a"], ["b"], body,
                                  [helper.make_opsetid("", 17)], doc_string=draw(text))
        functions.append(with_unknown_fields(fn, draw(extras())))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)] +
                              ([helper.make_opsetid("local", 1)] if functions else []), functions=functions)
    model.ir_version = 8
    model.producer_name, model.producer_version = draw(text), draw(text)
    model.domain, model.model_version, model.doc_string = draw(text), draw(st.integers(0, 2**40)), draw(text)
    helper.set_model_props(model, draw(st.dictionaries(text, text, max_size=3)))
    if draw(st.booleans()):
        training = onnx.TrainingInfoProto()
        training.algorithm.CopyFrom(helper.make_graph([helper.make_node("Identity", ["input"], ["t"])], "train", [],
                                                      [helper.make_tensor_value_info("t", F32, None)]))
        model.training_info.append(training)
    return with_unknown_fields(model, draw(extras()))


# ------------------------------------------------------------------------------------------------ the check

def assert_untouched_except(original: bytes, folded: bytes, changed: set[int], skip: set[int] = frozenset()) -> None:
    """The fields of two messages agree in order and bytes, except fields numbered in `changed` (compared
    by the caller) and `skip` (the fold rewrites them)."""
    a = [(n, w) for n, _, w in fields(original) if n not in changed | skip]
    b = [(n, w) for n, _, w in fields(folded) if n not in changed | skip]
    assert a == b


def check_nothing_lost(data: bytes, out: bytes, report: dict) -> None:
    folded_bns = {b["node"] for b in report["batchnorms"] if b["folded"]}
    layers = {name for b in report["batchnorms"] if b["folded"] for name in b["into"]}
    # Model: every field but the graph byte-identical, in order (functions hold no BN here).
    assert_untouched_except(data, out, changed={MODEL_GRAPH})
    g_in = next(p for n, p, _ in fields(data) if n == MODEL_GRAPH)
    g_out = next(p for n, p, _ in fields(out) if n == MODEL_GRAPH)
    # Graph: everything but nodes, initializers and value_info byte-identical, in order.
    assert_untouched_except(g_in, g_out, changed={GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_VALUE_INFO})
    nodes_in = [(p, w) for n, p, w in fields(g_in) if n == GRAPH_NODE]
    nodes_out = {the_string(p, 3): (p, w) for n, p, w in fields(g_out) if n == GRAPH_NODE}
    touched_values: set[str] = set()
    for payload, whole in nodes_in:
        name = the_string(payload, 3)
        if name in folded_bns:
            assert name not in nodes_out
            touched_values.update(field_strings(payload, NODE_INPUT)[1:])
            continue
        assert name in nodes_out, f"node {name} disappeared"
        if name in layers:  # inputs and outputs rewired; every other field (attributes, doc, unknown) kept
            assert_untouched_except(payload, nodes_out[name][0], changed={NODE_INPUT, NODE_OUTPUT})
            touched_values.update(field_strings(payload, NODE_INPUT) + field_strings(payload, NODE_OUTPUT))
        else:
            assert nodes_out[name][1] == whole, f"node {name} changed"
    # Initializers: untouched ones byte-identical; a rewritten one keeps every field but its data and dims.
    inits_out = {the_string(p, 8): p for n, p, _ in fields(g_out) if n == GRAPH_INITIALIZER}
    for n, payload, _ in fields(g_in):
        if n != GRAPH_INITIALIZER:
            continue
        name = the_string(payload, 8)
        if name not in touched_values:
            assert inits_out.get(name) == payload, f"initializer {name} changed or disappeared"
        elif name in inits_out:
            assert_untouched_except(payload, inits_out[name], changed=TENSOR_DATA_FIELDS)
    # value_info: kept byte-identical for every value that still exists.
    surviving = {v for p, _ in nodes_out.values() for v in field_strings(p, NODE_OUTPUT)}
    infos_out = [w for n, _, w in fields(g_out) if n == GRAPH_VALUE_INFO]
    for n, payload, whole in fields(g_in):
        if n == GRAPH_VALUE_INFO and the_string(payload, 1) in surviving:
            assert whole in infos_out, f"value_info of {the_string(payload, 1)} lost"
    # protobuf agrees the result is a model, with the same metadata (a second opinion on the above).
    m_in, m_out = onnx.load_from_string(data), onnx.load_from_string(out)
    assert m_out.metadata_props == m_in.metadata_props and m_out.functions == m_in.functions
    assert m_out.training_info == m_in.training_info


# Derandomized as test_property_folds is (the same examples every run), unless QDQFOLD_PROPERTY_EXAMPLES asks
# for a longer hunt.
@settings(max_examples=EXAMPLES, deadline=None, derandomize="QDQFOLD_PROPERTY_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(models())
def test_everything_but_the_folded_parts_comes_back_byte_identical(model):
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data)
    check_nothing_lost(data, out, report)
    if any(b["folded"] for b in report["batchnorms"]):
        # Against the rounding twin, never a bare tolerance: a Relu can leave one tiny output beside large
        # cancelling intermediates, where float rounding alone is far above any fixed share of the range.
        result = verify(data, out, report=report, levels=("off",), input_sets=1)
        assert result.verdict == "exact", result.failure_message()
    else:
        assert out == data


def test_the_check_notices_a_lost_doc_string():
    """The checker itself fails when something is lost (here: a node's doc_string)."""
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="r", doc_string="keep me")], "g",
        [helper.make_tensor_value_info("x", F32, [1])], [helper.make_tensor_value_info("y", F32, [1])]))
    data = model.SerializeToString()
    model.graph.node[0].doc_string = ""
    try:
        check_nothing_lost(data, model.SerializeToString(), {"batchnorms": []})
    except AssertionError:
        return
    raise AssertionError("the check missed a lost doc_string")
