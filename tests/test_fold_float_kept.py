"""Float folds: BatchNormalizations kept with a reason (the model byte-identical), and rounding at the edges (issue 3).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers.build import F32, RNG, gemm_model, op_types, vi, weight
from helpers.float_layers import assert_kept, conv_bn_model, matmul_model
from helpers.folding import assert_folded, fold


# ---------------------------------------------------------------- preconditions: kept with a reason


def test_second_reader_of_the_layer_output_keeps_bn():
    model = conv_bn_model()
    model.graph.node.append(helper.make_node("Relu", ["y"], ["r"], name="relu"))
    model.graph.output.append(vi("r", [2, 6, 5, 5]))
    entry = assert_kept(model, "layer-output-read-elsewhere")
    assert "relu" in entry["message"]


def test_layer_output_that_is_a_graph_output_keeps_bn():
    model = conv_bn_model()
    model.graph.output.append(vi("y", [2, 6, 5, 5]))
    assert_kept(model, "layer-output-is-graph-output")


def test_non_constant_weight_keeps_bn():
    model = conv_bn_model()
    w = model.graph.initializer[0]
    model.graph.input.append(vi("W", list(w.dims)))
    model.graph.initializer.remove(w)
    assert_kept(model, "non-constant-weight")


def test_initializer_that_is_also_a_graph_input_is_not_constant():
    model = conv_bn_model()
    model.graph.input.append(vi("W", list(model.graph.initializer[0].dims)))
    assert_kept(model, "non-constant-weight")


def test_non_constant_bias_keeps_bn():
    model = conv_bn_model(bias=True)
    b = [i for i in model.graph.initializer if i.name == "B"][0]
    model.graph.initializer.remove(b)
    model.graph.input.append(vi("B", [6]))
    assert_kept(model, "non-constant-bias")


def test_non_constant_bn_parameters_keep_bn():
    model = conv_bn_model()
    mean = [i for i in model.graph.initializer if i.name == "bn_mean"][0]
    model.graph.initializer.remove(mean)
    model.graph.input.append(vi("bn_mean", [6]))
    assert_kept(model, "non-constant-parameters")


def test_non_positive_variance_keeps_bn():
    model = conv_bn_model()
    var = [i for i in model.graph.initializer if i.name == "bn_var"][0]
    values = numpy_helper.to_array(var).copy()
    values[2] = -1.0
    var.CopyFrom(numpy_helper.from_array(values, "bn_var"))
    entry = assert_kept(model, "non-positive-variance")
    assert "channel 2" in entry["message"]


def test_bn_length_not_matching_the_output_channels_keeps_bn():
    model = conv_bn_model(cout=6)
    for init in model.graph.initializer:
        if init.name.startswith("bn_"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[:4], init.name))
    assert_kept(model, "shape-mismatch")


def test_quantized_weight_is_left_to_the_qdq_fold():
    # int8 W -> DequantizeLinear -> Conv: not this fold's pattern (NotApplicable), whatever the QDQ fold does
    model = conv_bn_model(bias=False)
    w = model.graph.initializer[0]
    model.graph.initializer.remove(w)
    model.graph.initializer.extend([
        numpy_helper.from_array(RNG.integers(-100, 100, list(w.dims)).astype(np.int8), "Wq"),
        numpy_helper.from_array(np.float32(0.01), "Ws")])
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["Wq", "Ws"], ["W"], name="dq_w"))
    result = fold(model)
    assert result.report["batchnorms"][0]["code"] != "conv-bn"


def test_activation_quantizer_between_conv_and_bn_is_not_this_fold():
    model = conv_bn_model()
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(0.05), "as"),
                                    numpy_helper.from_array(np.uint8(128), "az")])
    bn = model.graph.node[1]
    bn.input[0] = "yd"
    model.graph.node.insert(1, helper.make_node("QuantizeLinear", ["y", "as", "az"], ["yq"]))
    model.graph.node.insert(2, helper.make_node("DequantizeLinear", ["yq", "as", "az"], ["yd"]))
    result = fold(model, fold_forward=False)
    assert result.report["batchnorms"][0]["code"] != "conv-bn" and not result.report["batchnorms"][0]["folded"]
    assert result.bytes == result.input


# ---------------------------------------------------------------- more preconditions and rounding


def test_gemm_with_non_constant_c_keeps_bn():
    model = gemm_model(c_shape=(8,))
    c = [i for i in model.graph.initializer if i.name == "C"][0]
    model.graph.initializer.remove(c)
    model.graph.input.append(vi("C", [8]))
    assert_kept(model, "non-constant-bias")


def test_gemm_with_c_that_does_not_broadcast_over_the_features_keeps_bn():
    model = gemm_model(c_shape=(8,))
    c = [i for i in model.graph.initializer if i.name == "C"][0]
    c.CopyFrom(weight("C", [2, 8, 1]))
    assert_kept(model, "shape-mismatch")


def test_matmul_output_read_by_another_node_keeps_bn():
    model = matmul_model(add_bias=(8,))
    model.graph.node.append(helper.make_node("Relu", ["mm"], ["r"], name="relu"))
    model.graph.output.append(vi("r", [3, 8]))
    assert_kept(model, "layer-output-read-elsewhere")


def test_shared_bias_alone_gets_a_new_tensor():
    model = conv_bn_model(bias=True)
    model.graph.node.append(helper.make_node("Add", ["z", "B4"], ["z2"], name="uses_b"))
    model.graph.node.insert(0, helper.make_node("Reshape", ["B", "shape"], ["B4"], name="reshape_b"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 6, 1, 1], np.int64), "shape"))
    model.graph.output[0].name = "z2"
    folded, report = assert_folded(model)
    new = report["batchnorms"][0]["new_tensors"]
    assert len(new) == 1 and new[0].startswith("B")  # only the bias; W was replaced in place
    assert "W" in {i.name for i in folded.graph.initializer}


def test_weight_from_a_constant_node_becomes_an_initializer():
    model = conv_bn_model(bias=False)
    w = model.graph.initializer[0]
    model.graph.initializer.remove(w)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["W"], value=w, name="w_const"))
    folded, report = assert_folded(model)
    assert op_types(folded) == ["Conv"]
    assert set(report["batchnorms"][0]["new_tensors"]) <= {i.name for i in folded.graph.initializer}


@pytest.mark.parametrize("dtype,elem,offset", [(np.float16, TensorProto.FLOAT16, 2.0 ** -11),
                                               (ml_dtypes.bfloat16, TensorProto.BFLOAT16, 2.0 ** -8)])
def test_scaled_weight_is_rounded_once_not_through_float32(dtype, elem, offset):
    # a = 1 + half an ulp of the weight type + 2^-30: float32 would round it to the tie and then to 1.0;
    # the correctly rounded result is 1 + one ulp. BN scale in float64 (opset 15 allows T1 != T), eps = 0.
    a = 1.0 + offset + 2.0 ** -30
    model = conv_bn_model(opset=15, dtype=dtype, elem=elem, bias=False, cin=1, cout=1, rank=1,
                          bn_attrs=dict(epsilon=0.0))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones([1, 1, 3], dtype), "W"))
    params = {"bn_scale": a, "bn_bias": 0.0, "bn_mean": 0.0, "bn_var": 1.0}
    for init in model.graph.initializer[1:]:
        init.CopyFrom(numpy_helper.from_array(np.array([params[init.name]], np.float64), init.name))
    folded = fold(model)
    assert folded.report["batchnorms"][0]["folded"]
    w2 = numpy_helper.to_array(folded.model.graph.initializer[0]).astype(np.float64)
    np.testing.assert_array_equal(w2, np.full([1, 1, 3], 1.0 + 2 * offset))


@pytest.mark.parametrize("attrs", [dict(strides=[0, 1]), dict(pads=[1, 1]), dict(dilations=[-1, 1]),
                                   dict(kernel_shape=[2, 2])])
def test_conv_with_attributes_no_runtime_accepts_keeps_bn(attrs):
    model = conv_bn_model(bias=True)
    conv = model.graph.node[0]
    kept = [a for a in conv.attribute if a.name not in attrs]
    del conv.attribute[:]
    conv.attribute.extend(kept + [helper.make_attribute(k, v) for k, v in attrs.items()])
    assert_kept(model, "malformed-layer")


@pytest.mark.parametrize("elements", [3, 40])
def test_weight_stored_in_typed_float_data_fields(elements):
    # float_data instead of raw_data, small enough (12 bytes) to live inside a std::string object
    model = conv_bn_model(bias=True, rank=1, cin=1, cout=elements)
    w = model.graph.initializer[0]
    values = numpy_helper.to_array(w)[:, :, :1].copy()  # kernel 1: 3 weights = 12 bytes
    model.graph.node[0].ClearField("attribute")
    typed = helper.make_tensor("W", F32, list(values.shape), values.flatten().tolist(), raw=False)
    assert not typed.raw_data
    w.CopyFrom(typed)
    assert_folded(model)
