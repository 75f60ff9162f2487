"""The quantized sample models (tests/models, see models/README.md): which BNs fold through quantized weights,
which are kept and why, outputs against onnxruntime running the original, and deployability."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native
from helpers.folding import fold
from helpers.onnxrt import assert_same_outputs, random_inputs, run
from helpers.qdq import quantized_units, with_outputs
from helpers.samples import MODELS

QAT = ["qat_seed_prebn", "qat_input_bn_net", "qat_arcface_head"]
ORTQ = ["ortq_seed_prebn_pc", "ortq_seed_prebn_pt"]


def load(name: str) -> bytes:
    return (MODELS / f"{name}.onnx").read_bytes()


def fold_sample(name: str, **options):
    """The sample model `name` folded by helpers.folding.fold."""
    return fold(load(name), **options)


def kept(records):
    return sorted(n for n, r in records.items() if not r["folded"])


@pytest.mark.parametrize("options", [{}, {"materialize_quantized_weights": True}], ids=["snapped", "materialized"])
def test_qat_seed_prebn_keeps_only_bn2(options):
    result = fold_sample("qat_seed_prebn", **options)
    assert kept(result.records) == ["/bn2/BatchNormalization"]
    bn1 = result.records["/bn1/BatchNormalization"]
    assert bn1["code"] == "qdq-layer-bn" and bn1["exact"] and bn1["into"] == ["/conv1/Conv"]
    # bn2 feeds conv2's activation quantizer: no exact fold crosses it (the forward fold reports it).
    bn2 = result.records["/bn2/BatchNormalization"]
    assert bn2["code"] == "activation-quantizer"
    assert "/conv2/iq/QuantizeLinear" in bn2["message"]
    assert_same_outputs(load("qat_seed_prebn"), result.bytes)


@pytest.mark.parametrize("options", [{}, {"materialize_quantized_weights": True}], ids=["snapped", "materialized"])
def test_qat_input_bn_net_keeps_only_data_bn(options):
    result = fold_sample("qat_input_bn_net", **options)
    assert kept(result.records) == ["/data_bn/BatchNormalization"]
    for name in ("/b1/BatchNormalization", "/b2/BatchNormalization", "/b3/BatchNormalization"):
        assert result.records[name]["code"] == "qdq-layer-bn" and result.records[name]["exact"]
    assert_same_outputs(load("qat_input_bn_net"), result.bytes)


@pytest.mark.parametrize("options", [{}, {"materialize_quantized_weights": True}], ids=["snapped", "materialized"])
def test_qat_arcface_head_keeps_none(options):
    result = fold_sample("qat_arcface_head", **options)
    assert kept(result.records) == []
    assert result.records["/features/BatchNormalization"]["into_op"] == "Gemm"
    # Conv -> BN -> BN: both fold into the same quantized conv, one after the other.
    assert result.records["/stem/stem.4/BatchNormalization"]["into"] == result.records["/bn2/BatchNormalization"]["into"]
    assert "BatchNormalization" not in [n.op_type for n in onnx.load_from_string(result.bytes).graph.node]
    assert_same_outputs(load("qat_arcface_head"), result.bytes)


@pytest.mark.parametrize("name", QAT)
def test_qat_weights_stay_on_their_grid(name):
    """The weight of every layer a BN folded into lies on its new quantization grid, W' = (q - z) * s' exactly,
    with q its numpy re-quantization (half to even); that layer's Q and DQ still share one scale."""
    result = fold_sample(name)
    m = onnx.load_from_string(result.bytes)
    consts = {i.name: nh.to_array(i) for i in m.graph.initializer}
    consts.update({n.output[0]: nh.to_array(n.attribute[0].t) for n in m.graph.node if n.op_type == "Constant"})
    by_output = {o: n for n in m.graph.node for o in n.output}
    by_name = {n.name: n for n in m.graph.node}
    layers = {layer for r in result.records.values() if r["folded"] for layer in r["into"]}
    assert layers
    for layer in layers:
        dq = by_output[by_name[layer].input[1]]
        q = by_output[dq.input[0]]
        assert (dq.op_type, q.op_type) == ("DequantizeLinear", "QuantizeLinear")
        assert dq.input[1] == q.input[1] and dq.input[2] == q.input[2]
        w, s, z = consts[q.input[0]], consts[q.input[1]], consts[q.input[2]].astype(np.int64)
        axis = {a.name: h.get_attribute_value(a) for a in q.attribute}.get("axis", 1)
        shape = [1] * w.ndim
        shape[axis] = -1
        s_b, z_b = s.reshape(shape), z.reshape(shape)
        ints = np.clip(np.round(w / s_b) + z_b, -128, 127)
        np.testing.assert_array_equal(w, ((ints - z_b) * s_b).astype(np.float32))
    onnx.checker.check_model(m, full_check=True)


@pytest.mark.parametrize("name", ORTQ)
def test_ortq_keeps_every_bn_by_default(name):
    result = fold_sample(name)
    assert kept(result.records) == sorted(result.records)
    for r in result.records.values():
        assert r["code"] == "activation-quantizer"
    assert "/conv1/Conv_output_0_QuantizeLinear" in result.records["/bn1/BatchNormalization"]["message"]
    assert result.bytes == load(name)


@pytest.mark.parametrize("name", ORTQ)
def test_ortq_drop_activation_quantizers(name):
    original = load(name)
    result = fold_sample(name, drop_activation_quantizers=True)
    bn1 = result.records["/bn1/BatchNormalization"]
    assert bn1["folded"] and not bn1["exact"] and bn1["into"] == ["/conv1/Conv"]
    metrics = dict(bn1["metrics"])
    assert metrics["dropped_quantizer_scale"] == pytest.approx(0.01996201, rel=1e-6)
    # bn2 sits after the Add's activation quantizer: no layer produces its input, and the layer after it
    # reads it through another quantizer (a forward case): kept.
    assert not result.records["/bn2/BatchNormalization"]["folded"]
    onnx.checker.check_model(onnx.load_from_string(result.bytes), full_check=True)

    # The deviation at bn1's output is exactly what the dropped quantizer did: a * (y - DQ(Q(y))).
    m = onnx.load_from_string(original)
    consts = {i.name: nh.to_array(i).astype(np.float64) for i in m.graph.initializer}
    gamma = (consts["bn1.weight_quantized"] - consts["bn1.weight_zero_point"]) * consts["bn1.weight_scale"]
    bn = next(n for n in m.graph.node if n.name == "/bn1/BatchNormalization")
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    a = gamma / np.sqrt(consts["bn1.running_var"] + np.float64(np.float32(eps)))
    feeds = random_inputs(original)
    bn_out = "/bn1/BatchNormalization_output_0"
    y, yd = "/conv1/Conv_output_0", "/conv1/Conv_output_0_DequantizeLinear_Output"
    e_final, e_bn, e_y, e_yd = run(with_outputs(m, bn_out, y, yd), feeds)
    f_final, f_bn = run(with_outputs(onnx.load_from_string(result.bytes), bn_out), feeds)
    predicted = e_bn.astype(np.float64) + a[None, :, None, None] * (e_y.astype(np.float64) - e_yd)
    tol = 1e-5 * np.ptp(e_bn) + metrics["bias_requantization_error"] * (1 + 1e-6)
    assert np.abs(f_bn - predicted).max() <= tol
    deviation = float(np.abs(f_final - e_final).max())
    output_step = float(consts["output_scale"])
    print(f"{name}: dropping the activation quantizer moves the model output by up to {deviation:.4g} "
          f"({deviation / output_step:.1f} output steps, range {np.ptp(e_final):.4g}); "
          f"{np.mean(np.abs(f_final - e_final) > 1e-6):.1%} of outputs change")
    assert 0 < deviation < 0.05 * np.ptp(e_final)


@pytest.mark.parametrize("name", QAT + ORTQ)
@pytest.mark.parametrize("options", [{}, {"drop_activation_quantizers": True}, {"materialize_quantized_weights": True}],
                         ids=["default", "drop", "materialize"])
def test_deployability_on_samples(name, options):
    """onnxruntime (CPU, extended optimisations) forms at least as many quantized units after the fold."""
    original = load(name)
    out = qdqfold_native.fold(original, **options)
    assert quantized_units(out) >= quantized_units(original)


def test_deployability_gain_on_qat_input_bn_net():
    # With the BN gone, Q -> DQ -> Conv -> Q (the next layer's input quantizer) becomes a QLinearConv.
    original = load("qat_input_bn_net")
    assert quantized_units(original) == 0
    assert quantized_units(qdqfold_native.fold(original)) == 3
