"""Checks deferred to the writing (graph::Model::DeferredChecks).

A fold run first skips the read-only passes whose checks almost never fail (a weight value overflowing once
scaled, a negated integer leaving its type) and lets the weight's generator check while it writes; if one
fails, the output is thrown away and the model folded again with every check first. These tests make checks
fail so that the second run happens, and assert its result is the checked-first one: the failing BN kept with
its reason, every other BN folded, fold() and fold_file() byte-identical, and no temporary file left behind.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native

from helpers.onnxrt import assert_same_outputs

F16 = TensorProto.FLOAT16


def _bn(prefix: str, gamma: np.ndarray, c: int) -> list[onnx.TensorProto]:
    values = [gamma, np.linspace(-1, 1, c), np.linspace(0.5, -0.5, c), np.ones(c)]
    return [numpy_helper.from_array(v.astype(np.float16), f"{prefix}_{n}")
            for n, v in zip(["scale", "bias", "mean", "var"], values)]


def _bn_node(x: str, y: str, prefix: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}_{n}" for n in ["scale", "bias", "mean", "var"]],
                            [y], name=prefix, epsilon=0.0)


def _weight(name: str, shape, big: bool) -> onnx.TensorProto:
    w = np.random.default_rng(7).standard_normal(shape).astype(np.float16)
    if big:
        w[0, 0, 0, 0] = 60000.0  # times a BN factor of 4: past float16's largest value, 65504
    return numpy_helper.from_array(w, name)


def _model(nodes, inits, c_out: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F16, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("z", F16, [1, c_out, 6, 6])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def two_layers_first_overflows() -> onnx.ModelProto:
    """conv1 -> bn1 (overflows float16) -> relu -> conv2 -> bn2 (folds)."""
    nodes = [helper.make_node("Conv", ["x", "W1"], ["y1"], name="conv1", pads=[1, 1, 1, 1]), _bn_node("y1", "b1", "bn1"),
             helper.make_node("Relu", ["b1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "W2"], ["y2"], name="conv2", pads=[1, 1, 1, 1]), _bn_node("y2", "z", "bn2")]
    inits = [_weight("W1", [4, 3, 3, 3], big=True), *_bn("bn1", np.full(4, 4.0), 4),
             _weight("W2", [5, 4, 3, 3], big=False), *_bn("bn2", np.array([1.5, -0.5, 2.0, -1.0, 0.75]), 5)]
    return _model(nodes, inits, 5)


def chain_second_overflows() -> onnx.ModelProto:
    """conv -> bn1 (factor 1, folds) -> bn2 (factor 4 on the weight bn1 wrote: overflows)."""
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]), _bn_node("y", "b1", "bn1"),
             _bn_node("b1", "z", "bn2")]
    inits = [_weight("W", [4, 3, 3, 3], big=True), *_bn("bn1", np.ones(4), 4), *_bn("bn2", np.full(4, 4.0), 4)]
    return _model(nodes, inits, 4)


def _as_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for init in m.graph.initializer:
        if init.data_type == F16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    for v in list(m.graph.input) + list(m.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT
    return m


def _outcomes(report) -> dict[str, tuple[bool, str]]:
    return {e["node"]: (e["folded"], e["code"]) for e in report["batchnorms"]}


def _fold_both_ways(model: onnx.ModelProto, tmp_path) -> tuple[bytes, dict]:
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, fold_forward=False)
    src, dst = tmp_path / "in.onnx", tmp_path / "out" / "folded.onnx"
    src.write_bytes(data)
    dst.parent.mkdir()
    file_report = qdqfold_native.fold_file(str(src), str(dst), fold_forward=False)
    assert dst.read_bytes() == out
    assert _outcomes(file_report) == _outcomes(report)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["folded.onnx"], "the failed first run left a file"
    # A dry run writes nothing, so it cannot leave a check to the writing: its report is the real run's.
    dry_report = qdqfold_native.fold_file(str(src), None, fold_forward=False)
    assert _outcomes(dry_report) == _outcomes(report)
    return out, report


def test_overflow_found_while_writing_keeps_that_bn_and_folds_the_rest(tmp_path):
    model = two_layers_first_overflows()
    out, report = _fold_both_ways(model, tmp_path)
    assert _outcomes(report) == {"bn1": (False, "overflow"), "bn2": (True, "conv-bn")}
    kept = next(e for e in report["batchnorms"] if e["node"] == "bn1")
    assert "channel 0" in kept["message"]
    folded = onnx.load_from_string(out)
    inits = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits["W1"].tobytes() == original["W1"].tobytes(), "the kept BN's layer must be untouched"
    a2 = original["bn2_scale"].astype(np.float64)  # var 1, epsilon 0: the factor is gamma
    expected = (original["W2"].astype(np.float64) * a2[:, None, None, None]).astype(np.float16)
    np.testing.assert_array_equal(inits["W2"], expected)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "BatchNormalization", "Relu", "Conv"]
    assert_same_outputs(_as_float32(model), _as_float32(folded), rtol_of_range=1e-2)


def test_overflow_of_a_weight_an_earlier_fold_wrote_keeps_the_second_bn(tmp_path):
    model = chain_second_overflows()
    out, report = _fold_both_ways(model, tmp_path)
    assert _outcomes(report) == {"bn1": (True, "conv-bn"), "bn2": (False, "overflow")}
    folded = onnx.load_from_string(out)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "BatchNormalization"]
    assert_same_outputs(_as_float32(model), _as_float32(folded), rtol_of_range=1e-2)


def test_no_failure_means_one_run_and_the_same_bytes_from_both_entry_points(tmp_path):
    model = two_layers_first_overflows()
    w1 = next(i for i in model.graph.initializer if i.name == "W1")
    w = numpy_helper.to_array(w1).copy()
    w[0, 0, 0, 0] = 1.0
    w1.CopyFrom(numpy_helper.from_array(w, "W1"))
    _, report = _fold_both_ways(model, tmp_path)
    assert _outcomes(report) == {"bn1": (True, "conv-bn"), "bn2": (True, "conv-bn")}


def qat_conv_bn(lowest_in_negated_channel: bool) -> onnx.ModelProto:
    """float W -> QuantizeLinear -> DequantizeLinear (int8, per channel, zero point 0) -> Conv -> BN, with a
    negative BN factor on channel 0. 288 weights per channel: more than the 256 int8 values, so the fold's
    snap check tries the values rather than the weights and does not read them."""
    rng = np.random.default_rng(3)
    w = rng.uniform(-1, 1, (4, 32, 3, 3)).astype(np.float32)
    scale = (np.abs(w).reshape(4, -1).max(axis=1) / 127).astype(np.float32)
    if lowest_in_negated_channel:
        w[0, 5, 1, 1] = -128 * scale[0]  # quantizes to -128, whose negation does not fit int8
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(scale, "w_scale"),
             numpy_helper.from_array(np.zeros(4, np.int8), "w_zero")]
    gamma = np.array([-1.5, 0.5, 2.0, 1.0], np.float32)
    for n, v in zip(["scale", "bias", "mean", "var"], [gamma, np.linspace(-1, 1, 4), np.linspace(0.5, -0.5, 4),
                                                       np.full(4, 0.8)]):
        inits.append(numpy_helper.from_array(np.asarray(v, np.float32), f"bn_{n}"))
    nodes = [helper.make_node("QuantizeLinear", ["W", "w_scale", "w_zero"], ["Wq"], name="w_Q", axis=0),
             helper.make_node("DequantizeLinear", ["Wq", "w_scale", "w_zero"], ["Wdq"], name="w_DQ", axis=0),
             helper.make_node("Conv", ["x", "Wdq"], ["y"], name="conv"),
             helper.make_node("BatchNormalization", ["y", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["z"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 5, 5])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 3, 3])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_lowest_integer_found_while_writing_gives_the_checked_first_outcome(tmp_path):
    model = qat_conv_bn(lowest_in_negated_channel=True)
    out, report = _fold_both_ways(model, tmp_path)
    [entry] = report["batchnorms"]
    assert (entry["folded"], entry["code"]) == (False, "negation-overflow")
    assert "channel 0" in entry["message"] and "-128" in entry["message"]
    assert out == model.SerializeToString(), "a kept BN leaves the model byte-identical"


def test_lowest_integer_with_the_complement_form_allowed_folds_exactly():
    model = qat_conv_bn(lowest_in_negated_channel=True)
    out, report = qdqfold_native.fold_with_report(model.SerializeToString(), allow_nonzero_zero_point=True)
    [entry] = report["batchnorms"]
    assert entry["folded"], entry
    folded = onnx.load_from_string(out)
    zero = next(numpy_helper.to_array(i) for i in folded.graph.initializer if "zero" in i.name)
    assert zero[0] == -1, "channel 0 takes the complement form q' = -1 - q, z' = -1"
    assert_same_outputs(model, folded, rtol_of_range=1e-5)


def test_negation_without_the_lowest_integer_folds_in_one_run(tmp_path):
    model = qat_conv_bn(lowest_in_negated_channel=False)
    out, report = _fold_both_ways(model, tmp_path)
    [entry] = report["batchnorms"]
    assert entry["folded"], entry
    folded = onnx.load_from_string(out)
    zero = next(numpy_helper.to_array(i) for i in folded.graph.initializer if "zero" in i.name)
    assert not zero.any(), "q' = -q keeps the zero points at 0"
    assert_same_outputs(model, folded, rtol_of_range=1e-5)


def qat_matmul_bn() -> onnx.ModelProto:
    """The same through a MatMul [1, 260] x [260, 4] (per-column scale, the generator's row-at-a-time walk),
    with the lowest int8 value in the negated column 0."""
    rng = np.random.default_rng(4)
    w = rng.uniform(-1, 1, (260, 4)).astype(np.float32)
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    w[17, 0] = -128 * scale[0]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(scale, "w_scale"),
             numpy_helper.from_array(np.zeros(4, np.int8), "w_zero")]
    for n, v in zip(["scale", "bias", "mean", "var"], [[-1.5, 0.5, 2.0, 1.0], [0.1, 0.2, 0.3, 0.4], [0.0] * 4, [1.0] * 4]):
        inits.append(numpy_helper.from_array(np.asarray(v, np.float32), f"bn_{n}"))
    nodes = [helper.make_node("QuantizeLinear", ["W", "w_scale", "w_zero"], ["Wq"], name="w_Q", axis=1),
             helper.make_node("DequantizeLinear", ["Wq", "w_scale", "w_zero"], ["Wdq"], name="w_DQ", axis=1),
             helper.make_node("MatMul", ["x", "Wdq"], ["y"], name="matmul"),
             helper.make_node("BatchNormalization", ["y", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["z"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 260])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_lowest_integer_found_while_writing_a_matmul_weight_row_by_row(tmp_path):
    model = qat_matmul_bn()
    out, report = _fold_both_ways(model, tmp_path)
    [entry] = report["batchnorms"]
    assert (entry["folded"], entry["code"]) == (False, "negation-overflow"), entry
    assert out == model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(model.SerializeToString(), allow_nonzero_zero_point=True)
    assert report["batchnorms"][0]["folded"]
    assert_same_outputs(model, onnx.load_from_string(out), rtol_of_range=1e-5)
