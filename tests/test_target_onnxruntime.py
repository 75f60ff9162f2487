"""The onnxruntime deployment target (issue 22): target="onnxruntime" gives a layer whose output reaches activation
quantizers through ops that commute with rounding those quantizers' Q -> DQ right after it (exact: the same
integers reach the downstream quantizers, cpp/targets/onnxruntime_output_quantizers.cpp), leaves the others with
a reason, and predicts the integer kernels onnxruntime forms.

Each rule is checked on a model without BN, so the target is the only change: outputs with onnxruntime's
optimisations off are equal, bit for bit, to the original's. The prediction is checked against the kernels in the
model onnxruntime saves at its default level (a count: the same on CPUs with and without VNNI; outputs at that
level are not compared, since the integer kernels saturate on AVX2-only CPUs, issue 21).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native
from helpers.exporters.modelopt_qat import mobilenet_v2_qat
from helpers.onnxrt import run
from helpers.qdq import ort_op_counts

RNG = np.random.default_rng(22)
C = 4
KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "MatMulIntegerToFloat")


def ort_kernels(data: bytes) -> dict[str, int]:
    """The integer kernels in the model onnxruntime builds at its default level (saved optimized model)."""
    counts = ort_op_counts(data, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    return {k: counts[k] for k in KERNELS}


def layer_model(chain, out_scale=0.04, out_zero=0, out_type=T.INT8, y_shape=(1, C, 6, 6), extra_inits=(), extra_outputs=()):
    """x -> Q -> DQ -> Conv(int8 W -> DQ per channel, float bias) -> `chain` (nodes reading "c", writing "r") ->
    Q(out_scale, out_zero) -> DQ -> y."""
    w = RNG.integers(-127, 128, (C, C, 3, 3)).astype(np.int8)
    inits = [nh.from_array(np.array(0.05, np.float32), "sx"), nh.from_array(np.array(0, np.int8), "zx"),
             nh.from_array(w, "wq"), nh.from_array(RNG.uniform(0.002, 0.004, C).astype(np.float32), "sw"),
             nh.from_array(np.zeros(C, np.int8), "zw"),
             nh.from_array((RNG.standard_normal(C) * 0.3).astype(np.float32), "b"),
             nh.from_array(np.array(out_scale, np.float32), "sy"),
             nh.from_array(np.array(out_zero, {T.INT8: np.int8, T.UINT8: np.uint8}[out_type]), "zy"),
             *extra_inits]
    nodes = [h.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="iq"),
             h.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="idq"),
             h.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="wdq", axis=0),
             h.make_node("Conv", ["xd", "wd", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             *chain,
             h.make_node("QuantizeLinear", ["r", "sy", "zy"], ["yq"], name="oq"),
             h.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"], name="odq")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, C, 6, 6])],
                         [h.make_tensor_value_info("y", T.FLOAT, y_shape), *extra_outputs], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def feeds(seed):
    # Wide inputs: many conv outputs saturate, cross the Clip bounds and land on every step in between.
    return {"x": (np.random.default_rng(seed).standard_normal((1, C, 6, 6)) * 3).astype(np.float32)}


def relu(i="c", o="r", name="relu"):
    return h.make_node("Relu", [i], [o], name=name)


CLIP_BOUNDS = [nh.from_array(np.array(0, np.float32), "lo"), nh.from_array(np.array(6, np.float32), "hi"),
               nh.from_array(np.array(0.013, np.float32), "lo_off"), nh.from_array(np.array(2.97, np.float32), "hi_off")]
SHAPE = [nh.from_array(np.array([1, C, 36], np.int64), "shape")]

RULES = {
    "relu-zp0": dict(chain=[relu()]),
    "relu-uint8-zp128": dict(chain=[relu()], out_type=T.UINT8, out_zero=128),
    "relu-int8-zp-minus-20": dict(chain=[relu()], out_zero=-20),
    "relu6-clip-on-grid": dict(chain=[h.make_node("Clip", ["c", "lo", "hi"], ["r"], name="clip")],
                               out_scale=6 / 127, extra_inits=CLIP_BOUNDS),
    "clip-bounds-off-grid": dict(chain=[h.make_node("Clip", ["c", "lo_off", "hi_off"], ["r"], name="clip")],
                                 extra_inits=CLIP_BOUNDS),
    "maxpool-padded": dict(chain=[h.make_node("MaxPool", ["c"], ["r"], name="pool", kernel_shape=[3, 3],
                                              pads=[1, 1, 1, 1], strides=[2, 2])], y_shape=[1, C, 3, 3]),
    "relu-maxpool": dict(chain=[relu(o="p"), h.make_node("MaxPool", ["p"], ["r"], name="pool", kernel_shape=[2, 2],
                                                         strides=[2, 2])], y_shape=[1, C, 3, 3]),
    "reshape-transpose": dict(chain=[h.make_node("Reshape", ["c", "shape"], ["s"], name="reshape"),
                                     h.make_node("Transpose", ["s"], ["r"], name="transpose", perm=[0, 2, 1])],
                              y_shape=[1, 36, C], extra_inits=SHAPE),
    "flatten": dict(chain=[h.make_node("Flatten", ["c"], ["r"], name="flatten", axis=1)], y_shape=[1, C * 36]),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_each_commuting_rule_gives_the_same_integers(rule):
    model = layer_model(**RULES[rule])
    out, report = qdqfold_native.fold_with_report(model.SerializeToString(), target="onnxruntime")
    (layer,) = report["target_layers"]
    assert layer["folded"] and layer["code"] == "output-quantizer" and layer["into"] == ["oq"], layer
    targeted = onnx.load_from_string(out)
    onnx.checker.check_model(targeted)
    conv = next(n for n in targeted.graph.node if n.op_type == "Conv")
    q = next(n for n in targeted.graph.node if conv.output[0] in n.input)
    assert q.op_type == "QuantizeLinear" and q.input[1] == "sy"
    # int8 activation pairs are written as the equal uint8 ones (cpp/targets/onnxruntime_uint8.cpp): z + 128.
    zeros = {t.name: nh.to_array(t) for t in targeted.graph.initializer}
    original = {t.name: nh.to_array(t) for t in model.graph.initializer}["zy"]
    shift = 128 if original.dtype == np.int8 else 0
    assert int(zeros[q.input[2]]) == int(original) + shift and (shift == 0) == (q.input[2] == "zy")
    for seed in range(4):
        expected, actual = run(model, feeds(seed))[0], run(out, feeds(seed))[0]
        np.testing.assert_array_equal(actual, expected)  # the same integers, dequantized the same way
    # The prediction is onnxruntime's count, before and after. MaxPool and reshapes onnxruntime crosses itself
    # (QDQPropagationTransformer): one kernel before already. A uint8 output quantizer after an int8 input forms
    # one on x86-64, where onnxruntime turns int8 activation pairs into uint8 first (QDQS8ToU8Transformer).
    predicted = report["target_kernels"]
    assert ort_kernels(model.SerializeToString())["QLinearConv"] == predicted["before"]["QLinearConv"]
    assert ort_kernels(out)["QLinearConv"] == predicted["after"]["QLinearConv"]
    crossed_by_onnxruntime = rule in ("maxpool-padded", "reshape-transpose")
    assert predicted["before"]["QLinearConv"] == int(crossed_by_onnxruntime)
    assert predicted["after"]["QLinearConv"] == 1


def test_several_readers_with_one_quantizer_share_the_new_one():
    """c -> Relu -> Q and c -> MaxPool -> Q with the same parameters: one Q -> DQ after the conv feeds both."""
    chain = [relu(o="r1"), h.make_node("QuantizeLinear", ["r1", "sy", "zy"], ["q1"], name="oq1"),
             h.make_node("DequantizeLinear", ["q1", "sy", "zy"], ["y1"], name="odq1"), relu(o="r", name="relu2")]
    model = layer_model(chain, y_shape=[1, C, 6, 6],
                        extra_outputs=[h.make_tensor_value_info("y1", T.FLOAT, [1, C, 6, 6])])
    out, report = qdqfold_native.fold_with_report(model.SerializeToString(), target="onnxruntime")
    (layer,) = report["target_layers"]
    assert layer["folded"] and sorted(layer["into"]) == ["oq", "oq1"], layer
    for seed in range(3):
        for e, a in zip(run(model, feeds(seed)), run(out, feeds(seed))):
            np.testing.assert_array_equal(a, e)


def other_quantizer(scale):
    return [relu(o="r1"), h.make_node("QuantizeLinear", ["r1", "s2", "zy"], ["q1"], name="oq1"),
            h.make_node("DequantizeLinear", ["q1", "s2", "zy"], ["y1"], name="odq1"), relu(o="r", name="relu2")], \
        [nh.from_array(np.array(scale, np.float32), "s2")]


KEPT = {
    "sigmoid": (dict(chain=[h.make_node("Sigmoid", ["c"], ["r"], name="sig")]), "not-commuting", "Sigmoid 'sig'"),
    "add-without-quantizers": (dict(chain=[h.make_node("Add", ["c", "xd"], ["r"], name="residual")]),
                               "not-commuting", "no quantizers"),
    "different-quantizers": (dict(chain=other_quantizer(0.07)[0], extra_inits=other_quantizer(0.07)[1],
                                  extra_outputs=[h.make_tensor_value_info("y1", T.FLOAT, [1, C, 6, 6])]),
                             "different-quantizers", "different parameters"),
    "graph-output": (dict(chain=[relu()], extra_outputs=[h.make_tensor_value_info("c", T.FLOAT, [1, C, 6, 6])]),
                     "graph-output", "graph output"),
    "maxpool-indices-used": (dict(chain=[h.make_node("MaxPool", ["c"], ["r", "idx"], name="pool", kernel_shape=[2, 2],
                                                     strides=[2, 2])], y_shape=[1, C, 3, 3],
                                  extra_outputs=[h.make_tensor_value_info("idx", T.INT64, [1, C, 3, 3])]),
                             "not-commuting", "Indices"),
}


@pytest.mark.parametrize("case", list(KEPT))
def test_a_layer_that_does_not_commute_is_kept_with_its_reason(case):
    kwargs, code, words = KEPT[case]
    kwargs = dict(kwargs)
    kwargs.setdefault("y_shape", [1, C, 6, 6])
    model = layer_model(**kwargs)
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, target="onnxruntime")
    (layer,) = [t for t in report["target_layers"] if t["op_type"] == "Conv"]
    assert not layer["folded"] and layer["code"] == code and words in layer["message"], layer
    # A residual Add with a float input is left alone too, with its own reason (test_target_residuals.py).
    for t in report["target_layers"]:
        assert t["op_type"] == "Conv" or (not t["folded"] and t["code"] == "residual-float-input"), t
    assert out == data  # nothing to fold, nothing changed: byte for byte
    assert report["target_kernels"]["after"] == report["target_kernels"]["before"]


def test_a_float_layer_is_listed_and_left_alone():
    x = h.make_tensor_value_info("x", T.FLOAT, [1, C, 6, 6])
    w = nh.from_array(RNG.standard_normal((C, C, 1, 1)).astype(np.float32), "w")
    graph = h.make_graph([h.make_node("Conv", ["x", "w"], ["c"], name="conv"), relu(o="y")], "g", [x],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, C, 6, 6])], [w])
    data = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]).SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, target="onnxruntime")
    assert [e["code"] for e in report["target_layers"]] == ["inputs-not-quantized"] and out == data
    assert report["target"] == "onnxruntime"


def test_no_target_no_target_fields_and_unknown_targets_are_refused():
    data = layer_model([relu()]).SerializeToString()
    _, report = qdqfold_native.fold_with_report(data)
    assert not {"target", "target_layers", "target_kernels"} & set(report)
    assert qdqfold_native.fold(data, target=None) == qdqfold_native.fold(data)
    with pytest.raises(TypeError, match="unknown target 'tensorrt'.*onnxruntime"):
        qdqfold_native.fold(data, target="tensorrt")
    with pytest.raises(TypeError, match="target"):
        qdqfold_native.fold(data, target=1)


@pytest.fixture(scope="module")
def mobilenet():
    model = mobilenet_v2_qat()
    data = model.SerializeToString()
    folded = qdqfold_native.fold(data)
    targeted, report = qdqfold_native.fold_with_report(data, target="onnxruntime")
    return data, folded, targeted, report


def test_mobilenet_v2_qat_kernels_rise_as_predicted(mobilenet):
    data, folded, targeted, report = mobilenet
    assert all(b["folded"] for b in report["batchnorms"])
    layers = [e for e in report["target_layers"] if e["op_type"] in ("Conv", "Gemm")]
    assert len(layers) == 53  # 52 Conv + the classifier's Gemm
    # The 10 residual Adds are listed too, left in float (their float inputs: test_target_residuals.py).
    adds = [e for e in report["target_layers"] if e["op_type"] == "Add"]
    assert len(adds) == 10 and {e["code"] for e in adds} == {"residual-float-input"}
    by_code = collections.Counter(e["code"] for e in layers)
    # Every conv feeding a Clip (Relu6) gets its quantizer; the project convs before a residual Add without
    # quantizers stay float, the two whose output goes straight to a quantizer need nothing, the classifier is
    # the graph output.
    assert by_code == {"output-quantizer": 34, "not-commuting": 16, "already-quantized": 2, "graph-output": 1}
    predicted = report["target_kernels"]
    assert predicted["before"]["QLinearConv"] == 0 and predicted["after"]["QLinearConv"] == 36
    # onnxruntime's own count, in the model it saves at its default level.
    assert ort_kernels(data)["QLinearConv"] == predicted["before"]["QLinearConv"]
    real = ort_kernels(targeted)
    for op in KERNELS:
        assert real[op] == predicted["after"].get(op, 0), (op, real, predicted["after"])
    assert ort_kernels(folded)["QLinearConv"] == 2  # the fold alone: the two convs already quantized


def test_mobilenet_v2_qat_target_computes_what_the_fold_computes(mobilenet):
    """The target after the fold changes no integer: outputs with optimisations off equal the fold's."""
    _, folded, targeted, _ = mobilenet
    for seed in range(2):
        x = {"input": np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype(np.float32)}
        np.testing.assert_array_equal(run(targeted, x)[0], run(folded, x)[0])


def test_cli_target_flag_reports_the_target(tmp_path, mobilenet):
    import json
    import subprocess
    import sys

    src = tmp_path / "m.onnx"
    src.write_bytes(mobilenet[0])
    done = subprocess.run([sys.executable, "-m", "qdqfold", str(src), "-o", str(tmp_path / "out.onnx"),
                           "--target", "onnxruntime"], capture_output=True, text=True, check=True)
    assert "Target onnxruntime: 34 of 63 layers given output quantizers (exactly)" in done.stdout
    assert "QLinearConv 0 -> 36" in done.stdout
    doc = json.loads(subprocess.run([sys.executable, "-m", "qdqfold", str(src), "-n", "--target", "onnxruntime",
                                     "--json"], capture_output=True, text=True, check=True).stdout)
    assert doc["target"]["given_output_quantizers"] == 34
    assert doc["target"]["kernels"]["after"]["QLinearConv"] == 36
    story = subprocess.run([sys.executable, "-m", "qdqfold", str(src), "-n", "--target", "onnxruntime", "--explain",
                            "/features/features.3/conv/conv.2/Conv"], capture_output=True, text=True, check=True).stdout
    assert "not-commuting" in story and "Add '/features/features.3/Add'" in story


def test_a_float_weight_behind_quantize_linear_is_stored_as_its_integers():
    """Float W -> Q(axis 0) -> DQ -> Conv, no BN: the target stores the integers Q makes; outputs bit-identical."""
    model = layer_model([relu()])
    g = model.graph
    wq = next(i for i in g.initializer if i.name == "wq")
    scale = nh.to_array(next(i for i in g.initializer if i.name == "sw"))
    # Float values around the grid, ties included (x.5 steps), as a QAT export holds them.
    steps = nh.to_array(wq).astype(np.float32) + RNG.choice([-0.5, -0.3, 0.0, 0.25, 0.5], (C, C, 3, 3))
    g.initializer.remove(wq)
    g.initializer.append(nh.from_array((steps * scale.reshape(-1, 1, 1, 1)).astype(np.float32), "wf"))
    g.node.insert(2, h.make_node("QuantizeLinear", ["wf", "sw", "zw"], ["wq"], name="wquant", axis=0))
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, target="onnxruntime")
    (layer,) = report["target_layers"]
    assert layer["metrics"].get("weight_stored_as_integers") == 1.0 and "int8 integers" in layer["message"]
    folded = onnx.load_from_string(out)
    assert "wquant" not in [n.name for n in folded.graph.node] and "wf" not in [i.name for i in folded.graph.initializer]
    (stored,) = [i for i in folded.graph.initializer if i.name in layer["new_tensors"] and len(i.dims) == 4]
    assert stored.data_type == T.INT8
    for seed in range(3):
        np.testing.assert_array_equal(run(out, feeds(seed))[0], run(data, feeds(seed))[0])


def test_mobilenet_v2_qat_weights_are_stored_as_integers(mobilenet):
    data, folded, targeted, report = mobilenet
    model = onnx.load_from_string(targeted)
    assert "QuantizeLinear" not in {n.op_type for n in model.graph.node
                                    if n.input and n.input[0] in {i.name for i in model.graph.initializer}}
    assert len(targeted) * 3 < len(data)  # int8 weights: about a quarter of the float bytes
