"""Hostile and odd models, the graph's side: values (scales, variances, non-finite parameters), attributes,
names (duplicates, cycles, values nothing produces) and size (node counts, nesting). Each gets a FoldError naming
the problem or comes back with its BatchNormalization kept and the model byte-identical; never a crash, a hang or
a silently changed output. Builders and checks: helpers/hostile.py.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native
from qdqfold_native import FoldError

from helpers.hostile import (FOLDS, RNG, SANITIZED, assert_kept_unchanged, assert_safe, assert_same_or_nan, bn_node,
                             bn_tensors, conv_bn, initializer, make, qdq_conv_bn, serialize)
from helpers.wire import length_delimited as field


# ------------------------------------------------------------------------------------------------ values

def test_scale_of_the_wrong_length():
    model = conv_bn()
    t = initializer(model, "bn_scale")
    t.CopyFrom(numpy_helper.from_array(np.ones(4, np.float32), "bn_scale"))  # 3 channels
    assert_kept_unchanged(serialize(model), {"shape-mismatch"})


@pytest.mark.parametrize("scale_len", [3, 5, 1])
def test_quantization_scale_of_the_wrong_length(scale_len):
    model = qdq_conv_bn(scale_len=scale_len)
    assert assert_safe(serialize(model), runs_in_ort=scale_len == 1) in (("error", "kept") if scale_len != 1 else
                                                                          ("error", "kept", "folded"))


@pytest.mark.parametrize("var, eps", [(0.0, 0.0), (-1.0, 1e-5), (-1e-5, 1e-5), (-3.0, 0.0)])
def test_zero_or_negative_variance_keeps_the_batchnorm(var, eps):
    model = conv_bn(var=np.array([1.0, var, 1.0]), eps=eps)
    assert_kept_unchanged(serialize(model), {"non-positive-variance"})


def test_zero_variance_with_a_positive_epsilon_folds_exactly():
    model = conv_bn(var=np.zeros(3), eps=1e-3)
    result = assert_safe(serialize(model))
    if FOLDS:
        assert result == "folded"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("parameter", ["scale", "bias", "mean", "var"])
def test_non_finite_batchnorm_parameter_keeps_the_batchnorm(parameter, value):
    values = RNG.uniform(0.5, 1.5, 3)
    values[1] = value
    model = conv_bn(**{parameter: values})
    assert_kept_unchanged(serialize(model), {"non-finite-parameters", "non-positive-variance"})


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["w", "b"])
def test_non_finite_layer_weight_folds_to_the_same_outputs_or_stays(where, value):
    model = conv_bn()
    t = initializer(model, where)
    a = numpy_helper.to_array(t).copy()
    a.flat[1] = value
    t.CopyFrom(numpy_helper.from_array(a, where))
    assert assert_safe(serialize(model)) in ("kept", "folded")


def test_huge_finite_parameters_that_overflow_float32_when_folded():
    """a = gamma / sqrt(var + eps) is finite in double but the folded weight overflows float32: keep."""
    model = conv_bn(scale=np.array([3e38, 1.0, 1.0]), var=np.array([1e-30, 1.0, 1.0]), eps=0.0)
    assert assert_safe(serialize(model), runs_in_ort=True) in ("kept", "folded")


# ------------------------------------------------------------------------------------------------ attributes

@pytest.mark.parametrize("axis", [4, 7, -5, 2**40, -(2**62)])
def test_dequantize_axis_out_of_range(axis):
    data = serialize(qdq_conv_bn(axis=axis))
    assert assert_safe(data, runs_in_ort=False) in ("error", "kept")


@pytest.mark.parametrize("attrs", [{"group": 0}, {"group": 2}, {"group": -3}, {"group": 2**40}])
def test_conv_groups_that_do_not_fit_the_weight(attrs):
    model = conv_bn()
    model.graph.node[0].attribute.append(helper.make_attribute("group", attrs["group"]))
    assert assert_safe(serialize(model), runs_in_ort=False) in ("error", "kept")


@pytest.mark.parametrize("attrs", [{"pads": [1, 1]}, {"strides": [0, 0]}, {"dilations": [-1, 1]}, {"kernel_shape": [9]}])
def test_conv_geometry_that_makes_no_sense(attrs):
    """A backward fold only scales weight slices: the geometry does not enter it, and must come out as it was."""
    model = conv_bn()
    conv = model.graph.node[0]
    kept = [a for a in conv.attribute if a.name not in attrs]
    del conv.attribute[:]
    conv.attribute.extend(kept + [helper.make_attribute(k, v) for k, v in attrs.items()])
    data = serialize(model)
    try:
        out, report = qdqfold_native.fold_with_report(data)
    except FoldError:
        return
    if report["batchnorms"][0]["folded"]:
        folded_conv = next(n for n in onnx.load_from_string(out).graph.node if n.op_type == "Conv")
        assert list(folded_conv.attribute) == list(conv.attribute)
        # Fold the same model with sane geometry: the weights must come out the same.
        sane = onnx.load_from_string(data)
        sane_conv = sane.graph.node[0]
        del sane_conv.attribute[:]
        sane_conv.attribute.extend(kept)
        reference = onnx.load_from_string(qdqfold_native.fold(serialize(sane)))
        assert {t.name: t.raw_data for t in onnx.load_from_string(out).graph.initializer} == \
            {t.name: t.raw_data for t in reference.graph.initializer}
    else:
        assert out == data


@pytest.mark.parametrize("axis", [9, -9, 2**62])
def test_flatten_axis_out_of_range_between_batchnorm_and_gemm(axis):
    c = 3
    inits = [numpy_helper.from_array(RNG.standard_normal((2, c * 4)).astype(np.float32), "w")] + bn_tensors(c)
    nodes = [bn_node("x", "n"), helper.make_node("Flatten", ["n"], ["f"], axis=axis),
             helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    model = make(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 2, 2])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    assert assert_safe(serialize(model), runs_in_ort=False) in ("error", "kept")


def test_gemm_with_a_transb_that_is_neither_0_nor_1_and_matmul_of_rank_3():
    k, n = 4, 3
    inits = [numpy_helper.from_array(RNG.standard_normal((n, k)).astype(np.float32), "w")] + bn_tensors(n)
    model = make([helper.make_node("Gemm", ["x", "w"], ["c"], transB=7), bn_node()],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    assert assert_safe(serialize(model), runs_in_ort=True) in ("error", "kept", "folded")
    inits = [numpy_helper.from_array(RNG.standard_normal((2, k, n)).astype(np.float32), "w")] + bn_tensors(n)
    model = make([helper.make_node("MatMul", ["x", "w"], ["c"]), bn_node()],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, k])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    assert_safe(serialize(model), runs_in_ort=False)


def test_batchnorm_without_inputs_or_outputs():
    model = conv_bn()
    bn = model.graph.node[1]
    del bn.input[3:]
    assert_kept_unchanged(serialize(model), {"malformed"})
    model = conv_bn()
    del model.graph.node[1].output[:]
    assert assert_safe(serialize(model), runs_in_ort=False) in ("error", "kept")


# ------------------------------------------------------------------------------------------------ names

def test_duplicate_initializer_names_fold_as_onnxruntime_reads_them():
    """onnxruntime takes the last initializer of a name: a fold must read (and replace) that one, or keep."""
    model = conv_bn()
    first = bn_tensors(3, prefix="bn")
    model.graph.initializer.insert(0, first[0])  # an earlier bn_scale with other values
    model.graph.initializer.insert(0, numpy_helper.from_array(np.zeros((3, 3, 3, 3), np.float32), "w"))
    assert assert_safe(serialize(model)) in ("error", "kept", "folded")


def test_two_nodes_writing_the_same_value():
    model = conv_bn()
    model.graph.node.insert(0, helper.make_node("Relu", ["x"], ["c"], name="also_c"))
    assert assert_safe(serialize(model), runs_in_ort=False) in ("error", "kept")


def test_node_output_named_like_an_initializer():
    model = conv_bn()
    model.graph.node.insert(0, helper.make_node("Relu", ["x"], ["bn_scale"], name="shadow"))
    assert assert_safe(serialize(model), runs_in_ort=False) in ("error", "kept")


def test_reading_a_value_nothing_produces():
    for missing in ("bn_mean", "w"):
        model = conv_bn()
        model.graph.initializer.remove(initializer(model, missing))
        assert assert_safe(serialize(model), runs_in_ort=False) in ("error", "kept")


def test_layer_input_that_nothing_produces():
    model = conv_bn()
    model.graph.node[0].input[0] = "ghost"
    assert assert_safe(serialize(model), runs_in_ort=False) in ("error", "kept")


@pytest.mark.parametrize("loop", ["conv-reads-bn", "bn-reads-itself", "three-node"])
def test_graph_cycle(loop):
    model = conv_bn()
    conv, bn = model.graph.node[0], model.graph.node[1]
    if loop == "conv-reads-bn":
        conv.input[0] = "y"
    elif loop == "bn-reads-itself":
        bn.input[0] = "y"
    else:
        conv.input[0] = "r"
        model.graph.node.append(helper.make_node("Relu", ["y"], ["r"], name="relu"))
    assert assert_safe(serialize(model), runs_in_ort=False) in ("error", "kept")


# ------------------------------------------------------------------------------------------------ size

def _many_nodes(blocks: int, channels: int = 2) -> bytes:
    """`blocks` x (Conv 1x1 -> BN -> Relu -> Identity): 4 * blocks nodes, every value in value_info."""
    nodes, inits, infos = [], [], []
    x = "x"
    for k in range(blocks):
        p = f"b{k}"
        inits.append(numpy_helper.from_array(RNG.standard_normal((channels, channels, 1, 1)).astype(np.float32), p + "_w"))
        inits += bn_tensors(channels, prefix=p)
        nodes += [helper.make_node("Conv", [x, p + "_w"], [p + "_c"], name=p + "_conv"),
                  bn_node(p + "_c", p + "_n", prefix=p),
                  helper.make_node("Relu", [p + "_n"], [p + "_r"], name=p + "_relu"),
                  helper.make_node("Identity", [p + "_r"], [p + "_i"], name=p + "_id")]
        infos += [helper.make_tensor_value_info(p + s, TensorProto.FLOAT, [1, channels, 2, 2]) for s in ("_c", "_n", "_r")]
        x = p + "_i"
    model = make(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 2, 2])],
                 [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, 2, 2])], inits, value_info=infos)
    return serialize(model)


def test_hundred_thousand_nodes():
    data = _many_nodes(25_000)
    out, report = qdqfold_native.fold_with_report(data)
    assert len(report["batchnorms"]) == 25_000
    folded = sum(b["folded"] for b in report["batchnorms"])
    if folded == 0:
        assert out == data
    else:  # the same model, BN by BN: check the node counts here and the arithmetic on a smaller copy
        model = onnx.load_from_string(out)
        assert len(model.graph.node) == 100_000 - folded
        small = _many_nodes(50)
        assert_same_or_nan(small, qdqfold_native.fold(small))


def test_fold_time_grows_linearly_with_model_size():
    """Not a timing assertion on the machine's speed: the ratio between two sizes rules out quadratic work."""
    if SANITIZED:
        pytest.skip("timing under ASan says nothing")
    def best_time(data: bytes) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            qdqfold_native.fold(data)
            times.append(time.perf_counter() - start)
        return min(times)
    small, large = _many_nodes(2_500), _many_nodes(20_000)
    ratio = best_time(large) / best_time(small)
    assert ratio < 8 * 4, f"8x the model took {ratio:.1f}x the time"  # quadratic would be ~64x


def _nested(depth: int, innermost: bytes) -> bytes:
    """`innermost` (a GraphProto payload) inside `depth` If then-branches; built on the wire, as protobuf
    refuses such depth."""
    graph = innermost
    for k in range(depth):
        attribute = field(1, b"then_branch") + bytes([0xA0, 0x01, 5]) + field(6, graph)
        else_attr = field(1, b"else_branch") + bytes([0xA0, 0x01, 5]) + field(6, innermost)
        out = f"y{k}".encode()
        node = field(1, b"cond") + field(2, out) + field(3, f"if{k}".encode()) + field(4, b"If")
        graph = field(1, node + field(5, attribute) + field(5, else_attr))
        graph += field(12, serialize(helper.make_tensor_value_info(out.decode(), TensorProto.FLOAT, None)))
    return graph


def test_nesting_of_subgraphs_a_hundred_deep_with_a_fold_at_the_bottom():
    inner_model = conv_bn()
    inner = inner_model.graph
    inner.ClearField("input")
    body = helper.make_graph(list(inner.node), "body", [], list(inner.output), initializer=list(inner.initializer))
    graph = _nested(99, serialize(body))
    inputs = field(11, serialize(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))) + \
        field(11, serialize(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])))
    data = bytes([0x08, 0x08]) + field(7, graph + inputs) + field(8, bytes([0x10, 17]))
    out, report = qdqfold_native.fold_with_report(data)
    bns = report["batchnorms"]
    assert len(bns) == 100  # one in each else-branch and one at the bottom
    assert max(b["graph"].count("/") for b in bns) == 99
    if not any(b["folded"] for b in bns):
        assert out == data
    else:  # the output must itself be a model qdqfold reads back unchanged, with fewer BNs
        assert qdqfold_native.fold(out, fold_backward=False, fold_forward=False) == out
        _, again = qdqfold_native.fold_with_report(out)
        assert len(again["batchnorms"]) < len(bns)
