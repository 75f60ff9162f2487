"""Layer -> BatchNormalization folds through quantized weights (qdq-layer-bn): BNs kept with a reason (the model
byte-identical), chains, deployability, odd quantization parameters. Checks: helpers/qdq_folds.py.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from helpers.folding import fold
from helpers.onnxrt import random_inputs, run
from helpers.qdq import Case, assert_folded_weight, assert_same, expected_integers, folded_weight, quantized_units
from helpers.qdq_folds import assert_kept, fold_and_check, with_unit_variance


# ------------------------------------------------------------------------------------------------ kept


def test_dequantized_weight_read_by_another_node_is_kept():
    case = Case()
    case.model.graph.node.append(h.make_node("Conv", ["xd", "w"], ["out2"], name="layer2", pads=[1, 1, 1, 1]))
    case.model.graph.output.append(h.make_tensor_value_info("out2", T.FLOAT, None))
    assert_kept(case, "shared-weight", "layer")


def test_second_consumer_of_layer_output_is_kept():
    case = Case()
    case.model.graph.node.append(h.make_node("Relu", ["y"], ["r"], name="relu"))
    case.model.graph.output.append(h.make_tensor_value_info("r", T.FLOAT, None))
    assert_kept(case, "layer-output-read-elsewhere", "relu")


def test_layer_output_as_graph_output_is_kept():
    case = Case()
    case.model.graph.output.append(h.make_tensor_value_info("y", T.FLOAT, None))
    assert_kept(case, "layer-output-is-graph-output")


def test_non_constant_integer_weight_is_kept():
    case = Case()
    m = case.model
    init = next(i for i in m.graph.initializer if i.name == "w_q")
    m.graph.initializer.remove(init)
    m.graph.input.append(h.make_tensor_value_info("w_q", T.INT8, case.wdims))
    assert_kept(case, "non-constant-weight")


def test_non_constant_float_weight_is_kept():
    case = Case(form="qat")
    m = case.model
    init = next(i for i in m.graph.initializer if i.name == "w_float")
    m.graph.initializer.remove(init)
    m.graph.input.append(h.make_tensor_value_info("w_float", T.FLOAT, case.wdims))
    assert_kept(case, "non-constant-weight", "w_float")


def test_non_constant_scale_is_kept():
    case = Case()
    m = case.model
    init = next(i for i in m.graph.initializer if i.name == "w_scale")
    m.graph.initializer.remove(init)
    m.graph.input.append(h.make_tensor_value_info("w_scale", T.FLOAT, [6]))
    assert_kept(case, "non-constant-quantization-parameters")


def test_mismatched_q_and_dq_are_kept():
    case = Case(form="qat")
    m = case.model
    m.graph.initializer.append(nh.from_array(case.scale0 * 2, "w_scale2"))
    next(n for n in m.graph.node if n.name == "w_DQ").input[1] = "w_scale2"
    assert_kept(case, "mismatched-qdq")


def test_old_opset_per_tensor_is_kept():
    case = Case(per_channel=False, opset=10)
    case.model.ir_version = 7
    r = assert_kept(case, "opset-too-old", "opset >= 13", "allow_opset_upgrade")


@pytest.mark.parametrize("form", ["int", "qat"])
def test_old_opset_raised_to_13_on_request(form):
    case = Case(per_channel=False, opset=10, form=form, bias="float", out_quant=True)
    case.model.ir_version = 7
    out, r = fold_and_check(case, allow_opset_upgrade=True)
    m = onnx.load_from_string(out)
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 13)]
    assert "opset was raised to 13" in r["message"]
    f = assert_folded_weight(case, out)
    assert f["axis"] == 0 and f["scale"].shape == (6,)


def test_old_opset_with_an_op_that_changed_is_not_raised():
    case = Case(per_channel=False, opset=10)
    case.model.ir_version = 7
    m = case.model
    out = next(o for o in m.graph.output if o.name == "out")
    m.graph.node.append(h.make_node("Softmax", ["out"], ["soft"], name="softmax", axis=1))
    out.name = "soft"
    assert_kept(case, "opset-too-old", "Softmax", allow_opset_upgrade=True)


def test_old_opset_per_tensor_with_equal_factors_folds():
    # Every |a| equal: the per-tensor scale absorbs it without an axis; negative channels still mirror.
    case = Case(per_channel=False, opset=10, gamma=np.array([1.3, -1.3, 1.3, 1.3, -1.3, 1.3]))
    case.model.ir_version = 7
    with_unit_variance(case)
    out, _ = fold_and_check(case)
    f = folded_weight(out)
    assert f["scale"].size == 1 and f["axis"] is None
    np.testing.assert_array_equal(f["q"], expected_integers(case))


def test_training_mode_bn_is_kept():
    case = Case(opset=15)
    bn = next(n for n in case.model.graph.node if n.name == "bn")
    bn.attribute.append(h.make_attribute("training_mode", 1))
    assert_kept(case, "training-mode")


# ------------------------------------------------------------------------------------------------ chains


def test_two_bns_fold_into_one_quantized_layer():
    case = Case(form="int", per_channel=False)
    m = case.model
    bn = next(n for n in m.graph.node if n.name == "bn")
    bn.output[0] = "mid"
    rng = np.random.default_rng(9)
    for name, v in (("g2", rng.uniform(-1.5, 1.5, 6)), ("b2", rng.standard_normal(6)), ("m2", rng.standard_normal(6)),
                    ("v2", rng.uniform(0.5, 2, 6))):
        m.graph.initializer.append(nh.from_array(v.astype(np.float32), name))
    m.graph.node.append(h.make_node("BatchNormalization", ["mid", "g2", "b2", "m2", "v2"], ["out"], name="bn2"))
    result = fold(case.bytes)
    assert result.records["bn"]["folded"] and result.records["bn2"]["folded"]
    assert "BatchNormalization" not in [n.op_type for n in onnx.load_from_string(result.bytes).graph.node]
    tol = sum(dict(result.records[b]["metrics"]).get("bias_requantization_error", 0) for b in ("bn", "bn2"))
    feeds = random_inputs(case.model)
    e, a = run(case.model, feeds)[0], run(result.bytes, feeds)[0]
    assert np.abs(e - a).max() <= 1e-5 * np.ptp(e) + 2 * tol


# ------------------------------------------------------------------------------------------------ deployability


@pytest.mark.parametrize("kwargs", [
    dict(layer="Conv", form="int", out_quant=True),
    dict(layer="Conv", form="int", out_quant=True, per_channel=False),
    dict(layer="Conv", form="int", out_quant=True, bias="int32"),
    dict(layer="Conv", form="qat", out_quant=True, bias="float"),
    dict(layer="Gemm", form="int", out_quant=True, bias="int32", cin=10, cout=7),
    dict(layer="MatMul", form="int", out_quant=True, cin=16, cout=8),
], ids=["conv", "conv_per_tensor", "conv_int32_bias", "conv_qat", "gemm", "matmul"])
def test_deployability(kwargs):
    case = Case(**kwargs)
    out, r = fold_and_check(case)
    before, after = quantized_units(case.bytes), quantized_units(out)
    assert after >= before
    if kwargs["layer"] == "Conv" and kwargs["form"] == "int":
        assert after >= 1, "with BN gone, DQ -> Conv -> Q becomes one QLinearConv"


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("form", ["int", "qat"])
@pytest.mark.parametrize("opset", [13, 21])
def test_odd_quantization_parameters_keep_or_fold_exactly(form, opset):
    """Axes out of range, block sizes where there are none, scales and zero points of every wrong shape: never a
    crash; the BN is kept with a reason, or folded only where onnxruntime runs the original and agrees."""
    seen = collections.Counter()
    for axis, block, scale_shape, zero in [(ax, b, s, z) for ax in (None, -5, -1, 0, 3, 7) for b in (None, -1, 0, 3)
                                           for s in ([], [1], [6], [5], [6, 3, 3, 3], [0])
                                           for z in ("same", "scalar", "none")]:
        case = Case(form=form, opset=opset)
        m = case.model
        qdq = [n for n in m.graph.node if n.name in ("w_DQ", "w_Q")]
        for n in qdq:
            del n.attribute[:]
            if axis is not None:
                n.attribute.append(h.make_attribute("axis", axis))
            if block is not None:
                n.attribute.append(h.make_attribute("block_size", block))
        for init in list(m.graph.initializer):
            if init.name == "w_scale":
                init.CopyFrom(nh.from_array(np.full(scale_shape, 0.02, np.float32), "w_scale"))
            elif init.name == "w_zero" and zero == "none":
                m.graph.initializer.remove(init)
                for n in qdq:
                    del n.input[2]
            elif init.name == "w_zero":
                init.CopyFrom(nh.from_array(np.zeros(scale_shape if zero == "same" else [], np.int8), "w_zero"))
        result = fold(case.bytes, allow_nonzero_zero_point=True)  # a clamped -128 needs the complement
        r = result.records["bn"]
        seen[r["code"]] += 1
        if not r["folded"]:
            assert r["code"] == "malformed-quantization", r
            assert result.bytes == case.bytes
            continue
        run(case.model, random_inputs(case.model))  # the original is valid
        assert_same(case, result.bytes, r)
    assert seen["qdq-layer-bn"] > 0 and seen["malformed-quantization"] > 0
