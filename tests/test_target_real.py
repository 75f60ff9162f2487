"""target="onnxruntime" (issue 22) on a cut of a real ModelOpt 0.47 INT8_DEFAULT_CFG export: MobileNetV2's
features.3, an inverted residual block (1x1 expand -> Clip(0, 6) -> depthwise 3x3 -> Clip(0, 6) -> 1x1 project,
each Conv -> BN with its input quantizer, then the residual Add of the block's input, which ModelOpt reads through
a float -> float Cast), up to the next block's input quantizer (tests/models/real/README.md).

- The kernels onnxruntime forms (saved model, default level) are the report's prediction: a QLinearConv for each
  conv the target gives an output quantizer, none for the QAT export, the projection conv left in float beside
  the residual Add with its reason.
- Exact: with onnxruntime's optimisations off the targeted model computes the fold alone's outputs bit for bit,
  and against the QAT export its outputs stay within the rounding twin (qdqfold.verify, outputs only: the
  certificates isolate a folded layer's BN output, which the target's new output quantizer now rounds).
- requantize_residuals makes every conv a QLinearConv and the Add a QLinearAdd, reported approximate.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qdqfold
import qdqfold_native
from helpers.qdq import ort_op_counts

CUT = Path(__file__).parent / "models" / "real" / "modelopt_int8_mobilenet_v2_block3_residual.onnx"
KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearConcat", "QLinearMul",
           "MatMulIntegerToFloat")


def kernels(data: bytes) -> dict[str, int]:
    counts = ort_op_counts(data, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    return {k: counts[k] for k in KERNELS if counts[k]}


def predicted(report: dict) -> dict[str, int]:
    return {k: v for k, v in report["target_kernels"]["after"].items() if v}


def off(data: bytes, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module")
def data() -> bytes:
    return CUT.read_bytes()


@pytest.fixture(scope="module")
def feeds(data) -> list[dict]:
    (x,) = [i for i in onnx.load_from_string(data).graph.input]
    shape = [d.dim_value for d in x.type.tensor_type.shape.dim]
    # Wide inputs too: values past the quantizers' ranges and on many rounding boundaries.
    return [{x.name: (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)}
            for seed, scale in ((0, 1.0), (1, 3.0))]


def test_the_qat_cut_forms_no_integer_kernel(data):
    assert kernels(data) == {}
    assert kernels(qdqfold_native.fold(data)) == {}


@pytest.mark.parametrize("store_float_weights", [False, True], ids=["target", "target-store-float-weights"])
def test_target_forms_the_kernels_it_predicts(data, store_float_weights):
    out, report = qdqfold_native.fold_with_report(data, target="onnxruntime", store_float_weights=store_float_weights)
    given = [e for e in report["target_layers"] if e["folded"] and e["op_type"] == "Conv"]
    formed = kernels(out)
    assert formed == predicted(report)
    assert formed.get("QLinearConv", 0) == len(given) > 0
    left = {e["node"]: e["code"] for e in report["target_layers"] if not e["folded"]}
    # The projection conv reaches the next quantizer only through the residual Add, whose other input is a float.
    assert left == {"/features/features.3/conv/conv.2/Conv": "not-commuting",
                    "/features/features.3/Add": "residual-float-input"}


@pytest.mark.parametrize("store_float_weights", [False, True], ids=["target", "target-store-float-weights"])
def test_target_is_the_fold_bit_for_bit_with_optimisations_off(data, feeds, store_float_weights):
    folded = qdqfold_native.fold(data)
    out = qdqfold_native.fold(data, target="onnxruntime", store_float_weights=store_float_weights)
    assert out != folded
    for f in feeds:
        for a, b in zip(off(folded, f), off(out, f)):
            assert np.array_equal(a, b)


def test_target_stays_within_the_rounding_twin_of_the_qat_export(data, feeds):
    out, report = qdqfold_native.fold_with_report(data, target="onnxruntime")
    result = qdqfold.verify(data, out, report=report, levels=("off",), certificates=False, inputs=feeds)
    assert all(o.verdict == "exact" for o in result.outputs), [(o.of_range, o.floor_of_range) for o in result.outputs]


def test_requantize_residuals_makes_every_conv_and_the_add_integer(data):
    out, report = qdqfold_native.fold_with_report(data, target="onnxruntime", requantize_residuals=True)
    convs = collections.Counter(n.op_type for n in onnx.load_from_string(data).graph.node)["Conv"]
    formed = kernels(out)
    assert formed == predicted(report)
    assert formed == {"QLinearConv": convs, "QLinearAdd": 1}
    (add,) = [e for e in report["target_layers"] if e["op_type"] == "Add"]
    assert (add["code"], add["exact"]) == ("requantized-residual", False)
    assert add["metrics"]["new_rounding_step"] > 0


def test_requantize_residuals_rounds_the_cast_block_input_with_the_next_convs_quantizer(data):
    """ModelOpt reads the block input through a float32 -> float32 Cast before the Add; that Cast is an identity,
    so the input is rounded with the quantizer that already reads the Cast's input (features.3's first conv's), not
    with the Add's output quantizer (features.4's), whose smaller range clipped it (found on real exports)."""
    model = onnx.load_from_string(data)
    (cast,) = [n for n in model.graph.node if n.op_type == "Cast"]
    (reader,) = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == cast.input[0]]
    _, report = qdqfold_native.fold_with_report(data, target="onnxruntime", requantize_residuals=True)
    (add,) = [e for e in report["target_layers"] if e["op_type"] == "Add"]
    assert reader.name in add["into"], (reader.name, add["into"])
    assert f"input '{cast.output[0]}' rounded with the parameters of QuantizeLinear '{reader.name}'" in add["message"]
