"""qdqfold.verify: differences per output, quantization steps moved, quantized node units, input shapes."""

from __future__ import annotations

import os
import tempfile
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqfold
from qdqfold.verify import is_quantized_unit, random_inputs, verify

from helpers.build import float_conv_bn, op_types
from helpers.onnxrt import session
from helpers.samples import MODELS

QAT_SEED = MODELS / "qat_seed_prebn.onnx"
ORTQ = MODELS / "ortq_seed_prebn_pc.onnx"


def _perturbed(model: onnx.ModelProto, name: str, delta: float) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, t in enumerate(out.graph.initializer):
        if t.name == name:
            values = numpy_helper.to_array(t).copy()
            values.flat[0] += delta
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(values, name))
    return out


def _ort_outputs(model, feeds):
    """Outputs in float64, run on one thread as verify runs (thread count can change the order of sums)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else bytes(model)
    outputs = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feeds)
    return [np.asarray(o, np.float64) for o in outputs]


def test_identical_models_show_no_difference():
    model = float_conv_bn()
    result = verify(model, model)
    assert result.passed and len(result.outputs) == 1
    out = result.outputs[0]
    assert (out.max_abs, out.max_rel, out.of_range) == (0.0, 0.0, 0.0)
    assert out.step is None and out.moved is None  # float graph: no quantizer
    assert out.range > 0 and out.elements == 4 * 6 * 6


def test_a_changed_weight_is_measured_exactly_and_fails_the_tolerance():
    model = float_conv_bn()
    changed = _perturbed(model, "w", 1e-2)
    result = verify(model, changed, seed=3, input_sets=1, twin=False, certificates=False)
    feeds = random_inputs(session(model), seed=3)
    expected, actual = _ort_outputs(model, feeds)[0], _ort_outputs(changed, feeds)[0]
    diff = np.abs(actual - expected)
    out = result.outputs[0]
    assert out.max_abs == pytest.approx(diff.max(), rel=1e-12)
    assert out.range == pytest.approx(expected.max() - expected.min(), rel=1e-12)
    assert out.of_range == pytest.approx(diff.max() / (expected.max() - expected.min()), rel=1e-12)
    nz = expected != 0
    assert out.max_rel == pytest.approx((diff[nz] / np.abs(expected[nz])).max(), rel=1e-12)
    assert not result.passed  # 1e-2 on a weight is far above 1e-5 of the range
    assert verify(model, changed, seed=3, tolerance=1.0, twin=False, certificates=False).passed
    # With its certificate, the changed weight is caught whatever the tolerance: the fold's layer, run on the
    # original's activations, is off by far more than float rounding.
    caught = verify(model, changed, seed=3, tolerance=1.0)
    assert caught.verdict == "differs" and not caught.worst_fold.passed and caught.worst_fold.node == "bn"


def test_conv_bn_fold_verifies_within_the_default_tolerance():
    model = float_conv_bn()
    folded, report = qdqfold.fold_model(model, report=True)
    if not report.folded:
        pytest.skip("the conv-bn fold is not built into this qdqfold_native yet")
    assert "BatchNormalization" not in op_types(folded)
    result = verify(model, folded)
    assert result.passed, result.to_dict()
    assert result.outputs[0].max_abs > 0 or result.outputs[0].of_range == 0  # figures are real numbers


def _activation_quantizer_scales(model: onnx.ModelProto) -> list[float]:
    """Scales of QuantizeLinear nodes fed by a graph input or another node's activation (not a weight)."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    weight_quantizer_inputs = {t for t in consts}
    scales = []
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in weight_quantizer_inputs:
            scales.append(float(np.min(np.abs(consts[n.input[1]]))))
    return scales


@pytest.mark.parametrize("path", [QAT_SEED, ORTQ], ids=lambda p: p.name)
def test_quantized_graph_step_is_the_smallest_activation_quantizer_scale(path):
    model = onnx.load(path)
    result = verify(model, model)
    out = result.outputs[0]
    assert out.step == pytest.approx(min(_activation_quantizer_scales(model)), rel=1e-7)
    assert out.moved == 0 and out.moved_share == 0.0


def test_moved_counts_elements_that_moved_half_a_step_or_more():
    model = onnx.load(QAT_SEED)
    # Shift the first bias: outputs downstream move; count those that moved by >= step / 2 ourselves.
    bias = next(t.name for t in model.graph.initializer if t.name.endswith("bias"))
    changed = _perturbed(model, bias, 0.05)
    result = verify(model, changed, tolerance=1.0, input_sets=1)
    out = result.outputs[0]
    feeds = random_inputs(session(model), seed=0)
    diff = np.abs(_ort_outputs(changed, feeds)[0] - _ort_outputs(model, feeds)[0])
    assert out.moved == int(np.count_nonzero(diff >= out.step / 2)) > 0
    assert out.moved_share == pytest.approx(out.moved / diff.size)


def test_quantized_units_are_counted_in_onnxruntimes_optimized_model():
    data = ORTQ.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = os.path.join(tmp, "o.onnx")
        ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        expected = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node
                           if is_quantized_unit(n.op_type))
    result = verify(data, data)
    assert result.quantized_units_before == dict(expected) == result.quantized_units_after
    assert sum(expected.values()) > 0  # onnxruntime does form integer kernels from this QDQ model
    assert result.to_dict()["quantized_units"] == {"before": sum(expected.values()), "after": sum(expected.values())}


def test_symbolic_dimensions_take_the_given_sizes():
    model = float_conv_bn(symbolic_batch=True)
    assert verify(model, model, count_units=False).input_shapes == {"x": [1, 3, 8, 8]}
    assert verify(model, model, symbolic_size=2, count_units=False).input_shapes == {"x": [2, 3, 8, 8]}
    result = verify(model, model, symbolic_size=2, dims={"N": 5}, count_units=False)
    assert result.input_shapes == {"x": [5, 3, 8, 8]}
    assert result.outputs[0].shape == [5, 4, 6, 6]


def test_integer_outputs_count_integer_steps():
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [64])],
        [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    changed = _perturbed(model, "s", 0.01)
    result = verify(model, changed, tolerance=1.0, count_units=False, input_sets=1)
    feeds = random_inputs(session(model))
    diff = np.abs(_ort_outputs(changed, feeds)[0] - _ort_outputs(model, feeds)[0])
    assert result.outputs[0].step == 1.0
    assert result.outputs[0].moved == int(np.count_nonzero(diff >= 0.5)) > 0


def test_a_model_onnxruntime_rejects_raises_verify_error():
    model = float_conv_bn()
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].input[1] = "no_such_tensor"
    with pytest.raises(qdqfold.VerifyError, match="onnxruntime cannot load"):
        verify(model, broken)
