"""Residual Adds under target="onnxruntime" (issue 22, item 3; cpp/targets/onnxruntime_residuals.cpp).

- grid-input (exact, always): an Add input that is a DequantizeLinear's output carried through Relu / MaxPool
  (no padding) / Reshape gets Q -> DQ with that DQ's parameters; the Add then becomes QLinearAdd, and the outputs
  with onnxruntime's optimisations off are the original's, bit for bit.
- a float input on no grid (a conv's output) is a new rounding: kept with its reason, unless requantize_residuals,
  which rounds it (approximate: each rounded element moves by at most half the reported step, measured here).
- on a generated ModelOpt-style ResNet (BasicBlocks, the Adds without quantizers) the option makes every conv a
  QLinearConv and every Add whose output is quantized a QLinearAdd, as the report predicts.
Kernel counts are those of the model onnxruntime saves at its default level (the same on CPUs with and without
VNNI); outputs at that level are not compared (issue 21).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native
from helpers.exporters.modelopt_qat import resnet_qat
from helpers.onnxrt import run
from helpers.qdq import ort_op_counts

SHAPE = [1, 4, 6, 6]


def ort_counts(data: bytes) -> dict[str, int]:
    return ort_op_counts(data, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)


def residual_model(grid_chain, zero=0, ztype=T.INT8):
    """a -> Q -> DQ -> `grid_chain` (nodes reading "ad", writing "v"); b -> Q -> DQ -> "bd";
    Add(v, bd) -> Q -> DQ -> y."""
    npt = {T.INT8: np.int8, T.UINT8: np.uint8}[ztype]
    inits = [nh.from_array(np.array(0.05, np.float32), "sa"), nh.from_array(np.array(zero, npt), "z"),
             nh.from_array(np.array(0.03, np.float32), "sb"), nh.from_array(np.array(0.07, np.float32), "sy"),
             nh.from_array(np.array([1, 4, 36], np.int64), "shape")]
    nodes = [h.make_node("QuantizeLinear", ["a", "sa", "z"], ["aq"], name="qa"),
             h.make_node("DequantizeLinear", ["aq", "sa", "z"], ["ad"], name="dqa"),
             *grid_chain,
             h.make_node("QuantizeLinear", ["b", "sb", "z"], ["bq"], name="qb"),
             h.make_node("DequantizeLinear", ["bq", "sb", "z"], ["bd"], name="dqb"),
             h.make_node("Add", ["v", "bd"], ["c"], name="add"),
             h.make_node("QuantizeLinear", ["c", "sy", "z"], ["cq"], name="qy"),
             h.make_node("DequantizeLinear", ["cq", "sy", "z"], ["y"], name="dqy")]
    out_shape = {"pool": [1, 4, 3, 3], "reshape": [1, 4, 36]}.get(grid_chain[-1].name if grid_chain else "", SHAPE)
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("a", T.FLOAT, SHAPE),
                                      h.make_tensor_value_info("b", T.FLOAT, out_shape)],
                         [h.make_tensor_value_info("y", T.FLOAT, out_shape)], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), out_shape


GRID = {
    "relu": [h.make_node("Relu", ["ad"], ["v"], name="relu")],
    "relu-uint8-zp128": [h.make_node("Relu", ["ad"], ["v"], name="relu")],
    "maxpool": [h.make_node("Relu", ["ad"], ["r"], name="relu"),
                h.make_node("MaxPool", ["r"], ["v"], name="pool", kernel_shape=[2, 2], strides=[2, 2])],
    "reshape": [h.make_node("Reshape", ["ad", "shape"], ["v"], name="reshape")],
}


@pytest.mark.parametrize("case", list(GRID))
def test_an_input_on_a_grid_gets_its_quantizer_exactly_and_the_add_becomes_qlinearadd(case):
    kw = dict(zero=128, ztype=T.UINT8) if "uint8" in case else {}
    model, out_shape = residual_model(GRID[case], **kw)
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, target="onnxruntime")
    records = {t["node"]: t for t in report["target_layers"]}
    assert len(records) == len(report["target_layers"])  # one record per node
    assert records["add"]["folded"] and records["add"]["exact"] and records["add"]["code"] == "grid-input"
    rng = np.random.default_rng(22)
    for _ in range(3):  # wide inputs: every step, both saturation ends
        feeds = {"a": (rng.standard_normal(SHAPE) * 4).astype(np.float32),
                 "b": (rng.standard_normal(out_shape) * 4).astype(np.float32)}
        for e, a in zip(run(data, feeds), run(bytes(out), feeds)):
            np.testing.assert_array_equal(a, e)
    before, after = ort_counts(data), ort_counts(bytes(out))
    # (onnxruntime moves a DQ forward over a Reshape itself: there the Add was a QLinearAdd already.)
    assert before["QLinearAdd"] == (1 if case == "reshape" else 0) and after["QLinearAdd"] == 1
    assert report["target_kernels"]["before"]["QLinearAdd"] == before["QLinearAdd"]
    assert report["target_kernels"]["after"]["QLinearAdd"] == after["QLinearAdd"]


def test_an_input_off_the_grid_is_kept_with_its_reason_and_nothing_changes():
    # Clip(0.013, 2.97) puts values off the grid: no exact quantizer for the Add's input.
    clip = [h.make_node("Clip", ["ad", "lo", "hi"], ["v"], name="clip")]
    model, _ = residual_model(clip)
    model.graph.initializer.extend([nh.from_array(np.array(0.013, np.float32), "lo"),
                                    nh.from_array(np.array(2.97, np.float32), "hi")])
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, target="onnxruntime")
    (add,) = [t for t in report["target_layers"] if t["node"] == "add"]
    assert not add["folded"] and add["code"] == "residual-float-input" and "requantize_residuals" in add["message"]
    assert bytes(out) == data


def conv_residual():
    """x -> Q -> DQ -> Conv -> c; Add(c, x) -> Q -> DQ -> y: the conv's output and the block input are float."""
    rng = np.random.default_rng(5)
    inits = [nh.from_array(np.array(0.05, np.float32), "sx"), nh.from_array(np.array(0, np.int8), "z"),
             nh.from_array(rng.integers(-127, 128, (4, 4, 3, 3)).astype(np.int8), "wq"),
             nh.from_array(np.full(4, 0.004, np.float32), "sw"), nh.from_array(np.zeros(4, np.int8), "zw"),
             nh.from_array(np.array(0.08, np.float32), "sy")]
    nodes = [h.make_node("QuantizeLinear", ["x", "sx", "z"], ["xq"], name="qx"),
             h.make_node("DequantizeLinear", ["xq", "sx", "z"], ["xd"], name="dqx"),
             h.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="dqw", axis=0),
             h.make_node("Conv", ["xd", "wd"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             h.make_node("Add", ["c", "x"], ["s"], name="add"),
             h.make_node("QuantizeLinear", ["s", "sy", "z"], ["sq"], name="qy"),
             h.make_node("DequantizeLinear", ["sq", "sy", "z"], ["y"], name="dqy")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, SHAPE)],
                         [h.make_tensor_value_info("y", T.FLOAT, SHAPE)], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_requantize_residuals_rounds_within_the_reported_step_and_is_reported_approximate():
    model = conv_residual()
    data = model.SerializeToString()
    exact, exact_report = qdqfold_native.fold_with_report(data, target="onnxruntime")
    assert {t["node"]: t["code"] for t in exact_report["target_layers"]}["add"] == "residual-float-input"
    out, report = qdqfold_native.fold_with_report(data, target="onnxruntime", requantize_residuals=True)
    (add,) = [t for t in report["target_layers"] if t["node"] == "add"]
    assert add["folded"] and not add["exact"] and add["code"] == "requantized-residual"
    step = dict(add["metrics"])["new_rounding_step"]
    # Measured: the Add's new inputs against the float values they replace, on the same feeds.
    target = onnx.load_from_string(bytes(out))
    (node,) = [n for n in target.graph.node if n.name == "add"]
    pairs = [(old, new) for old, new in zip(["c", "x"], node.input) if old != new]
    assert len(pairs) == 2
    for name in [v for p in pairs for v in p]:
        target.graph.output.append(h.make_empty_tensor_value_info(name))
    producer = {o: n for n in target.graph.node for o in n.output}
    inits = {t.name: nh.to_array(t) for t in target.graph.initializer}
    rng = np.random.default_rng(1)
    moved = 0.0
    for _ in range(3):
        x = (rng.standard_normal(SHAPE) * 2).astype(np.float32)
        values = dict(zip([o.name for o in target.graph.output], run(target.SerializeToString(), {"x": x})))
        for old, new in pairs:
            scale = float(inits[producer[new].input[1]])  # the new pair's own step (at most the reported one)
            assert scale <= step
            inside = np.abs(values[old]) <= 127 * scale  # inside its range: elsewhere the rounding clips
            d = np.abs(values[old].astype(np.float64) - values[new])[inside]
            assert d.max() <= step / 2 * (1 + 1e-6)
            moved = max(moved, float(d.max()))
    assert moved > 0  # approximate indeed: some input moved
    counts = ort_counts(bytes(out))
    assert counts["QLinearAdd"] == 1 and counts["QLinearConv"] == 1 and ort_counts(bytes(exact))["QLinearAdd"] == 0


def test_resnet_requantize_residuals_makes_every_conv_an_integer_kernel_as_predicted():
    data = resnet_qat(width=0.125, size=32, blocks=(2, 2, 2, 2)).SerializeToString()
    convs = sum(n.op_type == "Conv" for n in onnx.load_from_string(data).graph.node)
    adds = sum(n.op_type == "Add" for n in onnx.load_from_string(data).graph.node)
    exact, _ = qdqfold_native.fold_with_report(data, target="onnxruntime")
    out, report = qdqfold_native.fold_with_report(data, target="onnxruntime", requantize_residuals=True)
    plain, target, requantized = ort_counts(data), ort_counts(bytes(exact)), ort_counts(bytes(out))
    assert plain["QLinearConv"] == 0 and plain["QLinearAdd"] == 0
    assert 0 < target["QLinearConv"] < convs and target["QLinearAdd"] == 0
    assert requantized["QLinearConv"] == convs  # every conv, as the goal says
    # Every Add but the last (its output goes to GlobalAveragePool, which no quantizer follows).
    assert requantized["QLinearAdd"] == adds - 1
    predicted = report["target_kernels"]["after"]
    assert predicted["QLinearConv"] == requantized["QLinearConv"] and predicted["QLinearAdd"] == adds - 1
    codes = [t["code"] for t in report["target_layers"] if t["op_type"] == "Add"]
    assert codes.count("requantized-residual") == adds


@pytest.mark.parametrize("net", ["resnet", "mobilenet_v2"])
def test_the_saturation_check_covers_every_layer_the_target_makes_an_integer_kernel(net):
    """Issue 22 item 5: the static saturation check (cpp/analysis/integer_kernels.h) lists every layer onnxruntime
    runs as an integer kernel after the target, as many as the target predicts and onnxruntime forms."""
    from helpers.exporters.modelopt_qat import mobilenet_v2_qat

    from qdqfold import kernels

    model = resnet_qat(width=0.125) if net == "resnet" else mobilenet_v2_qat(width=0.25, size=32)
    out, report = qdqfold_native.fold_with_report(model.SerializeToString(), target="onnxruntime",
                                                  requantize_residuals=True)
    checked = kernels.check_bytes(bytes(out))
    formed = ort_counts(bytes(out))
    for op in ("QLinearConv", "QLinearMatMul", "QGemm"):
        assert sum(lay.kernel == op for lay in checked) == formed[op] == report["target_kernels"]["after"][op], op
    assert formed["QLinearAdd"] == report["target_kernels"]["after"]["QLinearAdd"] > 0


def test_a_concat_of_grid_inputs_becomes_qlinearconcat_exactly():
    inits = [nh.from_array(np.array(0.05, np.float32), "s"), nh.from_array(np.array(0, np.int8), "z"),
             nh.from_array(np.array(0.03, np.float32), "s2")]
    nodes = [h.make_node("QuantizeLinear", ["a", "s", "z"], ["aq"]), h.make_node("DequantizeLinear", ["aq", "s", "z"], ["ad"]),
             h.make_node("Relu", ["ad"], ["ar"], name="relu"),
             h.make_node("QuantizeLinear", ["b", "s2", "z"], ["bq"]),
             h.make_node("DequantizeLinear", ["bq", "s2", "z"], ["bd"]),
             h.make_node("Concat", ["ar", "bd"], ["c"], name="concat", axis=1),
             h.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"]), h.make_node("DequantizeLinear", ["cq", "s", "z"], ["y"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, T.FLOAT, SHAPE) for n in "ab"],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, 8, 6, 6])], inits)
    data = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]).SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, target="onnxruntime")
    records = {t["node"]: t for t in report["target_layers"]}
    rec = records["concat"]
    assert rec["code"] == "grid-input" and rec["exact"]
    # The Relu, now between its input's quantizer and the Concat's equal new one, runs on the integers.
    assert set(records) == {"concat", "relu"} and records["relu"]["code"] == "integer-activation"
    rng = np.random.default_rng(3)
    feeds = {n: (rng.standard_normal(SHAPE) * 4).astype(np.float32) for n in "ab"}
    np.testing.assert_array_equal(run(bytes(out), feeds)[0], run(data, feeds)[0])
    assert ort_counts(data)["QLinearConcat"] == report["target_kernels"]["before"]["QLinearConcat"] == 0
    assert ort_counts(bytes(out))["QLinearConcat"] == report["target_kernels"]["after"]["QLinearConcat"] == 1


def test_store_float_weights_gives_float_layers_the_dq_constant_bit_for_bit():
    """Issue 22 item 4: a conv left in float (its output feeds a residual Add without quantizers) reads its weight
    as the float32 constant its DequantizeLinear computes: the same outputs bit for bit, one DQ fewer."""
    model = conv_residual()
    data = model.SerializeToString()
    plain, _ = qdqfold_native.fold_with_report(data, target="onnxruntime")
    out, report = qdqfold_native.fold_with_report(data, target="onnxruntime", store_float_weights=True)
    (conv,) = [t for t in report["target_layers"] if t["node"] == "conv"]
    assert not conv["folded"] and dict(conv["metrics"]).get("weight_stored_as_float") == 1.0
    dqs = [sum(n.op_type == "DequantizeLinear" for n in onnx.load_from_string(bytes(m)).graph.node) for m in (plain, out)]
    assert dqs[1] == dqs[0] - 1
    rng = np.random.default_rng(4)
    for _ in range(3):
        x = {"x": (rng.standard_normal(SHAPE) * 3).astype(np.float32)}
        np.testing.assert_array_equal(run(bytes(out), x)[0], run(data, x)[0])
    # A layer that becomes an integer kernel keeps its integer weight.
    out2, report2 = qdqfold_native.fold_with_report(data, target="onnxruntime", requantize_residuals=True,
                                                    store_float_weights=True)
    assert all("weight_stored_as_float" not in dict(t["metrics"]) for t in report2["target_layers"])
    assert ort_counts(bytes(out2))["QLinearConv"] == 1


def test_an_add_of_a_constant_is_no_residual_and_is_left_alone():
    model = conv_residual()
    add = next(n for n in model.graph.node if n.name == "add")
    add.input[1] = "shift"
    model.graph.initializer.append(nh.from_array(np.full(SHAPE, 0.3, np.float32), "shift"))
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, target="onnxruntime", requantize_residuals=True)
    assert all(t["node"] != "add" for t in report["target_layers"])
    assert {t["code"] for t in report["target_layers"]} == {"not-commuting"}  # the conv, before the float Add
    assert bytes(out) == data
