"""--target onnxruntime leaves alone what it cannot copy exactly (found by review of the residual rewrite):
a QuantizeLinear with a `precision` attribute (opset 23+: the type it divides in), a DequantizeLinear with
`output_dtype` (the float type it computes), and a bias Add whose constant sits behind a DequantizeLinear
(no residual: requantizing the layer's output before it would be a new rounding)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native


def run_off(data: bytes, feeds: dict) -> list:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def codes(report: dict) -> dict:
    return {t["node"]: t["code"] for t in report["target_layers"]}


def _opset_supported(opset: int) -> bool:
    return onnx.defs.onnx_opset_version() >= opset


@pytest.mark.skipif(not _opset_supported(25), reason="onnx without opset 25")
def test_a_quantizer_with_a_precision_attribute_gets_no_copy():
    rng = np.random.default_rng(0)
    inits = [nh.from_array(np.array(0.05, np.float32), "s"), nh.from_array(np.array(0, np.uint8), "z"),
             nh.from_array(rng.integers(-100, 100, [4, 4, 1, 1]).astype(np.int8), "wq"),
             nh.from_array(np.array(0.013, np.float32), "sw"), nh.from_array(np.array(0, np.int8), "zw"),
             nh.from_array(np.array(0.0371, np.float16), "sy"), nh.from_array(np.array(3, np.uint8), "zy")]
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]), h.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             h.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"]),
             h.make_node("Conv", ["xd", "wd"], ["c"], name="conv"), h.make_node("Relu", ["c"], ["r"]),
             h.make_node("QuantizeLinear", ["r", "sy", "zy"], ["rq"], precision=T.FLOAT),
             h.make_node("DequantizeLinear", ["rq", "sy", "zy"], ["y"], output_dtype=T.FLOAT)]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 4, 64, 64])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, 4, 64, 64])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 25)])
    model.ir_version = 11
    data = model.SerializeToString()
    feeds = {"x": (rng.standard_normal([1, 4, 64, 64]) * 3).astype(np.float32)}
    try:
        expected = run_off(data, feeds)[0]
    except Exception as error:  # an onnxruntime without opset 25
        pytest.skip(f"onnxruntime cannot run opset 25: {str(error)[:80]}")
    out, report = qdqfold_native.fold_with_report(data, target="onnxruntime")
    assert codes(report)["conv"] != "output-quantizer"
    assert np.array_equal(run_off(bytes(out), feeds)[0], expected)


@pytest.mark.skipif(not _opset_supported(23), reason="onnx without opset 23")
def test_a_dequantizer_with_output_dtype_is_no_grid_to_copy():
    inits = [nh.from_array(np.array(0.05, np.float32), "sa"), nh.from_array(np.array(0, np.int8), "z"),
             nh.from_array(np.array(0.03, np.float32), "sb"), nh.from_array(np.array(0.07, np.float32), "sy")]
    nodes = [h.make_node("QuantizeLinear", ["a", "sa", "z"], ["aq"], name="qa"),
             h.make_node("DequantizeLinear", ["aq", "sa", "z"], ["ad"], name="dqa", output_dtype=T.FLOAT16),
             h.make_node("Relu", ["ad"], ["v"], name="relu"),
             h.make_node("QuantizeLinear", ["b", "sb", "z"], ["bq"], name="qb"),
             h.make_node("DequantizeLinear", ["bq", "sb", "z"], ["bd"], name="dqb", output_dtype=T.FLOAT16),
             h.make_node("Add", ["v", "bd"], ["c"], name="add"), h.make_node("Cast", ["c"], ["c32"], to=T.FLOAT),
             h.make_node("QuantizeLinear", ["c32", "sy", "z"], ["cq"], name="qy"),
             h.make_node("DequantizeLinear", ["cq", "sy", "z"], ["y"], name="dqy")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("a", T.FLOAT, [1, 4]),
                                      h.make_tensor_value_info("b", T.FLOAT, [1, 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, 4])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 23)])
    model.ir_version = 10
    data = model.SerializeToString()
    rng = np.random.default_rng(1)
    feeds = {k: (rng.standard_normal([1, 4]) * 4).astype(np.float32) for k in ("a", "b")}
    try:
        expected = run_off(data, feeds)[0]
    except Exception as error:
        pytest.skip(f"onnxruntime cannot run opset 23: {str(error)[:80]}")
    out, report = qdqfold_native.fold_with_report(data, target="onnxruntime")
    assert codes(report).get("add") != "grid-input"
    onnx.checker.check_model(onnx.load_from_string(bytes(out)), full_check=True)
    assert np.array_equal(run_off(bytes(out), feeds)[0], expected)


@pytest.mark.parametrize("requantize", [False, True])
def test_a_bias_behind_a_dequantizer_makes_no_residual(requantize):
    rng = np.random.default_rng(0)
    inits = [nh.from_array(np.array(0.05, np.float32), "s"), nh.from_array(np.array(0, np.int8), "z"),
             nh.from_array(rng.integers(-100, 100, [8, 8]).astype(np.int8), "wq"),
             nh.from_array(np.array(0.01, np.float32), "sw"),
             nh.from_array(rng.integers(-100, 100, [8]).astype(np.int8), "bq"),
             nh.from_array(np.array(0.01, np.float32), "sbias")]
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]), h.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             h.make_node("DequantizeLinear", ["wq", "sw", "z"], ["wd"]),
             h.make_node("DequantizeLinear", ["bq", "sbias", "z"], ["bd"]),
             h.make_node("MatMul", ["xd", "wd"], ["mm"], name="mm"), h.make_node("Add", ["mm", "bd"], ["a"], name="biasadd"),
             h.make_node("QuantizeLinear", ["a", "s", "z"], ["aq"]), h.make_node("DequantizeLinear", ["aq", "s", "z"], ["y"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 8])],
                         [h.make_tensor_value_info("y", T.FLOAT, [2, 8])], inits)
    data = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]).SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, target="onnxruntime", requantize_residuals=requantize)
    assert "biasadd" not in codes(report)
    assert all(t.get("exact", True) for t in report["target_layers"])
    feeds = {"x": (rng.standard_normal([2, 8]) * 3).astype(np.float32)}
    assert np.array_equal(run_off(bytes(out), feeds)[0], run_off(data, feeds)[0])


@pytest.mark.parametrize("option", ["requantize_residuals", "store_float_weights"])
def test_a_target_switch_without_a_target_is_an_error(option, tmp_path):
    import subprocess
    import sys

    from helpers.samples import MODELS

    data = (MODELS / "qat_seed_prebn.onnx").read_bytes()
    with pytest.raises(TypeError, match=f"option '{option}' needs a target"):
        qdqfold_native.fold(data, **{option: True})
    assert qdqfold_native.fold(data, target="onnxruntime", **{option: True})  # with one, accepted
    flag = "--" + option.replace("_", "-")
    out = tmp_path / "o.onnx"
    done = subprocess.run([sys.executable, "-m", "qdqfold", str(MODELS / "qat_seed_prebn.onnx"), "-o", str(out),
                           flag], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert f"{flag} needs a deployment target: add --target onnxruntime" in done.stderr
    assert not out.exists()


def test_requantize_merged_without_merge_branches_is_an_error(tmp_path):
    """--requantize-merged only changes what --merge-branches merges: alone it used to do nothing, silently."""
    import subprocess
    import sys

    from helpers.samples import MODELS

    data = (MODELS / "qat_seed_prebn.onnx").read_bytes()
    with pytest.raises(TypeError, match="option 'requantize_merged' needs merge_branches=True"):
        qdqfold_native.fold(data, requantize_merged=True)
    assert qdqfold_native.fold(data, merge_branches=True, requantize_merged=True)  # with it, accepted
    out = tmp_path / "o.onnx"
    done = subprocess.run([sys.executable, "-m", "qdqfold", str(MODELS / "qat_seed_prebn.onnx"), "-o", str(out),
                           "--requantize-merged"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "--requantize-merged needs --merge-branches" in done.stderr
    assert not out.exists()
