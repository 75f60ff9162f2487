"""Layer -> BatchNormalization folds through quantized weights (qdq-layer-bn): the bias (float, int32
re-quantized, gained, shared) and the quantizers around the layer. Checks: helpers/qdq_folds.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from helpers.folding import fold
from helpers.onnxrt import random_inputs, run
from helpers.qdq import Case, assert_folded_weight, constants, folded_weight, with_outputs
from helpers.qdq_folds import assert_kept, fold_and_check


# ------------------------------------------------------------------------------------------------ bias


@pytest.mark.parametrize("form", ["int", "qat"])
def test_float_bias(form):
    case = Case(form=form, bias="float")
    out, r = fold_and_check(case)
    f = folded_weight(out)
    b = f["consts"][f["layer"].input[2]]
    np.testing.assert_allclose(b, (case.a * case.b_float + case.t).astype(np.float32), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_int32_bias_requantized(per_channel):
    case = Case(form="int", bias="int32", per_channel=per_channel)
    out, r = fold_and_check(case)
    f = assert_folded_weight(case, out)
    bdq = f["by_output"][f["layer"].input[2]]
    b_int = f["consts"][bdq.input[0]]
    b_scale = f["consts"][bdq.input[1]]
    assert b_int.dtype == np.int32 and b_scale.shape == (6,)
    # onnxruntime's convention holds after the fold: bias scale = s_x * s'_w.
    np.testing.assert_array_equal(b_scale, (case.s_x * f["scale"].astype(np.float32)).astype(np.float32))
    sb_old = np.broadcast_to(case.sb.reshape(-1), [6]).astype(np.float64)
    target = case.a * case.b_int * sb_old + case.t
    np.testing.assert_array_equal(b_int, np.round(target / b_scale.astype(np.float64)).astype(np.int32))
    err = np.max(np.abs(b_int * b_scale.astype(np.float64) - target))
    assert dict(r["metrics"])["bias_requantization_error"] == pytest.approx(err, rel=1e-9)
    assert err <= 0.5 * b_scale.max()


def test_no_bias_int_form_gains_int32_bias():
    case = Case(form="int", bias=None)
    out, r = fold_and_check(case)
    f = folded_weight(out)
    bdq = f["by_output"][f["layer"].input[2]]
    assert bdq.op_type == "DequantizeLinear"
    assert f["consts"][bdq.input[0]].dtype == np.int32
    assert "bias_requantization_error" in dict(r["metrics"])


def test_no_bias_qat_form_gains_float_bias():
    case = Case(form="qat", bias=None)
    out, r = fold_and_check(case)
    f = folded_weight(out)
    b = f["consts"][f["layer"].input[2]]
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, case.t.astype(np.float32))


def test_int32_bias_overflow_is_kept():
    case = Case(form="int", bias="int32", seed=2)
    # Tiny bias scale: the BN shift t / (s_x * s'_w) does not fit int32.
    for init in case.model.graph.initializer:
        if init.name == "b_scale":
            init.CopyFrom(nh.from_array(np.full(6, 1e-12, np.float32), "b_scale"))
    assert_kept(case, "bias-overflow", "int32")


def test_shared_int32_bias_is_kept():
    case = Case(form="int", bias="int32")
    m = case.model
    m.graph.node.append(h.make_node("Identity", ["b"], ["b_copy"], name="other"))
    m.graph.output.append(h.make_tensor_value_info("b_copy", T.FLOAT, None))
    assert_kept(case, "shared-bias")


# ------------------------------------------------------------------------------------------------ quantizers


def test_output_quantizer_after_bn_stays_and_fold_is_exact():
    case = Case(form="int", out_quant=True, bias="float")
    out, r = fold_and_check(case)
    assert r["exact"]
    m = onnx.load_from_string(out)
    q = next(n for n in m.graph.node if n.name == "out_Q")
    assert q.input[0] == "z"  # the layer now produces the BN's output name
    assert next(n for n in m.graph.node if n.name == "layer").output[0] == "z"


@pytest.mark.parametrize("form", ["int", "qat"])
def test_activation_quantizer_between_is_kept(form):
    case = Case(form=form, act_between=True)
    assert_kept(case, "activation-quantizer", "act_Q", "drop_activation_quantizers")


def test_activation_quantizer_dropped_on_request_is_approximate():
    # An output quantizer after the BN: the folded layer keeps a quantizer after it (else it is kept, see
    # test_exporters_ortq.py). The deviation is measured at the BN's output "z", before that quantizer.
    case = Case(form="int", act_between=True, bias="int32", out_quant=True)
    result = fold(case.bytes, drop_activation_quantizers=True)
    r = result.records["bn"]
    assert r["folded"] and not r["exact"]
    names = [n.name for n in onnx.load_from_string(result.bytes).graph.node]
    assert "act_Q" not in names and "act_DQ" not in names
    metrics = dict(r["metrics"])
    assert metrics["dropped_quantizer_scale"] == pytest.approx(0.2)
    # The deviation is exactly what the dropped quantizer did: BN(y) instead of BN(DQ(Q(y))), i.e.
    # a * (y - DQ(Q(y))) per channel (rounding and clamping), up to float rounding and the int32 bias rounding.
    feeds = random_inputs(case.model)
    _, e, y, yd = (o.astype(np.float64) for o in run(with_outputs(case.model, "z", "y", "yd"), feeds))
    a = run(with_outputs(onnx.load_from_string(result.bytes), "z"), feeds)[1].astype(np.float64)
    predicted = e + case.a[None, :, None, None] * (y - yd)
    tol = 1e-5 * np.ptp(e) + metrics["bias_requantization_error"] * (1 + 1e-6)
    assert np.abs(a - predicted).max() <= tol
    assert np.abs(e - a).max() > 100 * tol  # not exact, and the report says so
    print(f"deviation from dropping the quantizer: max {np.abs(e - a).max():.4g} of output range {np.ptp(e):.4g}")


def test_qat_q_and_dq_share_one_scale_and_another_layer_shares_it_too():
    case = Case(form="qat")
    m = case.model
    # A second QAT conv reading the same scale and zero point tensors, no BN.
    m.graph.initializer.append(nh.from_array(case.w_float * 0.5, "w2_float"))
    m.graph.node.extend([
        h.make_node("QuantizeLinear", ["w2_float", "w_scale", "w_zero"], ["w2_qq"], name="w2_Q", axis=0),
        h.make_node("DequantizeLinear", ["w2_qq", "w_scale", "w_zero"], ["w2"], name="w2_DQ", axis=0),
        h.make_node("Conv", ["xd", "w2"], ["out2"], name="layer2", pads=[1, 1, 1, 1]),
    ])
    m.graph.output.append(h.make_tensor_value_info("out2", T.FLOAT, None))
    result = fold(case.bytes)
    assert result.records["bn"]["folded"]
    fm = onnx.load_from_string(result.bytes)
    consts = constants(fm)
    np.testing.assert_array_equal(consts["w_scale"], case.scale0)  # the shared tensor is untouched
    by_name = {n.name: n for n in fm.graph.node}
    assert by_name["w2_Q"].input[1] == "w_scale" and by_name["w2_DQ"].input[1] == "w_scale"
    # This layer's Q and DQ read one new scale together.
    assert by_name["w_Q"].input[1] == by_name["w_DQ"].input[1] != "w_scale"
    assert by_name["w_Q"].input[1] in result.records["bn"]["new_tensors"]
    feeds = random_inputs(case.model)
    for e, a in zip(run(case.model, feeds), run(result.bytes, feeds)):
        assert np.abs(e - a).max() <= 1e-5 * np.ptp(e)


def test_shared_integer_weight_gets_new_tensor():
    case = Case(form="int")
    m = case.model
    m.graph.node.extend([
        h.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w2"], name="w2_DQ", axis=0),
        h.make_node("Conv", ["xd", "w2"], ["out2"], name="layer2", pads=[1, 1, 1, 1]),
    ])
    m.graph.output.append(h.make_tensor_value_info("out2", T.FLOAT, None))
    result = fold(case.bytes)
    assert result.records["bn"]["folded"]
    consts = constants(onnx.load_from_string(result.bytes))
    np.testing.assert_array_equal(consts["w_q"].astype(np.int64), case.q0)
    np.testing.assert_array_equal(consts["w_scale"], case.scale0)
    feeds = random_inputs(case.model)
    for e, a in zip(run(case.model, feeds), run(result.bytes, feeds)):
        assert np.abs(e - a).max() <= 1e-5 * np.ptp(e)


def test_scale_from_constant_nodes():
    case = Case(form="qat")
    m = case.model
    for name in ("w_scale", "w_zero"):
        init = next(i for i in m.graph.initializer if i.name == name)
        m.graph.node.insert(0, h.make_node("Constant", [], [name], value=init))
        m.graph.initializer.remove(init)
    out, r = fold_and_check(case)
    assert_folded_weight(case, out)
