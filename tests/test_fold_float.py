"""Layer -> BatchNormalization folds for float weights (issue 3): Conv, ConvTranspose, Gemm, MatMul (+ Add).

Every test builds a small graph with onnx.helper, folds it, and compares onnxruntime's outputs (graph
optimisations off) of the original and the folded model. Negative cases assert the reason code and that
the model comes back byte-identical.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from helpers.build import RNG, bn_node, bn_params, gemm_model, op_types, vi
from helpers.float_layers import assert_kept, conv_bn_model, matmul_model
from helpers.folding import assert_folded


# ---------------------------------------------------------------- Conv / ConvTranspose


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_folds_for_every_rank_group_and_bias(rank, group, bias):
    model = conv_bn_model(rank=rank, group=group, cin=4, cout=8, bias=bias)
    folded, report = assert_folded(model, expect_codes=["conv-bn"])
    assert op_types(folded) == ["Conv"]
    conv = folded.graph.node[0]
    assert conv.output[0] == "z" and conv.name == "layer"
    assert len(conv.input) == 3  # gained a bias where it had none
    assert report["batchnorms"][0]["into"] == ["layer"]


def test_depthwise_conv_bn():
    model = conv_bn_model(rank=2, group=8, cin=8, cout=8, bias=True)
    assert_folded(model)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_bn_folds_on_axis_1_of_each_group_block(rank, group, bias):
    # cin 8, cout 12: with groups the output channel is axis 1 of each group's [8/g, 12/g, k...] block
    model = conv_bn_model(rank=rank, group=group, cin=8, cout=12, bias=bias, transpose=True, spatial=3)
    folded, _ = assert_folded(model)
    assert op_types(folded) == ["ConvTranspose"]


def test_weight_and_bias_are_replaced_in_place_and_bn_parameters_dropped():
    model = conv_bn_model(bias=True)
    model.graph.value_info.extend([vi("y", [2, 6, 5, 5]), vi("z", [2, 6, 5, 5])])
    before = [i.name for i in model.graph.initializer]
    folded, report = assert_folded(model)
    # W and B keep their names and positions; the BN parameters are gone.
    assert [i.name for i in folded.graph.initializer] == [n for n in before if not n.startswith("bn_")]
    assert report["batchnorms"][0]["new_tensors"] == []
    # value_info of the removed tensor y is dropped, the BN output's (now the Conv's) is kept
    assert [v.name for v in folded.graph.value_info] == ["z"]
    # the stored values are a * W and a * b + t, rounded once
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    b = numpy_helper.to_array(model.graph.initializer[5]).astype(np.float64)
    g, beta, mean, var = (numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer[1:5])
    a = g / np.sqrt(var + np.float64(np.float32(1e-5)))
    t = beta - mean * a
    w2 = numpy_helper.to_array(folded.graph.initializer[0])
    b2 = numpy_helper.to_array(folded.graph.initializer[1])
    np.testing.assert_array_equal(w2, (w * a[:, None, None, None]).astype(np.float32))
    np.testing.assert_array_equal(b2, (a * b + t).astype(np.float32))


def test_shared_weight_gets_a_new_tensor_and_the_other_reader_keeps_the_old_one():
    model = conv_bn_model(bias=True)
    # a second Conv reads the same W and B, and its output is a graph output too
    model.graph.node.append(helper.make_node("Conv", ["x", "W", "B"], ["y2"], name="other", pads=[1, 1, 1, 1]))
    model.graph.output.append(vi("y2", [2, 6, 5, 5]))
    folded, report = assert_folded(model)
    new = report["batchnorms"][0]["new_tensors"]
    assert len(new) == 2 and all(n not in ("W", "B") for n in new)
    other = [n for n in folded.graph.node if n.name == "other"][0]
    assert list(other.input) == ["x", "W", "B"]
    inits = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    np.testing.assert_array_equal(inits["W"], numpy_helper.to_array(model.graph.initializer[0]))


def test_chain_conv_bn_bn_folds_both():
    model = conv_bn_model(bias=False)
    model.graph.node.append(bn_node("z", "z2", "bn2"))
    model.graph.initializer.extend(bn_params("bn2", 6))
    model.graph.output[0].name = "z2"
    folded, report = assert_folded(model, expect_codes=["conv-bn", "conv-bn"])
    assert op_types(folded) == ["Conv"] and folded.graph.node[0].output[0] == "z2"
    assert [e["into"] for e in report["batchnorms"]] == [["layer"], ["layer"]]


def test_bn_parameters_and_bias_from_constant_nodes():
    model = conv_bn_model(bias=True)
    inits = {i.name: i for i in model.graph.initializer}
    constants = []
    for name in ["bn_scale", "bn_bias", "bn_mean", "bn_var", "B"]:
        constants.append(helper.make_node("Constant", [], [name], value=inits[name]))
        model.graph.initializer.remove(inits[name])
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(constants + nodes)
    folded, _ = assert_folded(model)
    assert op_types(folded) == ["Conv"]  # the Constant nodes nobody reads any more are gone


def test_bn_parameters_and_bias_from_dequantize_linear_of_constant_integers():
    # onnxruntime's quantizer hands BN scale and bias over as DequantizeLinear(int8 / int32)
    model = conv_bn_model(bias=False)
    inits = {i.name: i for i in model.graph.initializer}
    scale_q = RNG.integers(-127, 127, 6).astype(np.int8)
    bias_q = RNG.integers(-5000, 5000, 6).astype(np.int32)
    conv_bias_q = RNG.integers(-5000, 5000, 6).astype(np.int32)
    model.graph.initializer.remove(inits["bn_scale"])
    model.graph.initializer.remove(inits["bn_bias"])
    model.graph.initializer.extend([
        numpy_helper.from_array(scale_q, "sq"), numpy_helper.from_array(np.float32(0.02), "ss"),
        numpy_helper.from_array(np.int8(3), "sz"),
        numpy_helper.from_array(bias_q, "bq"), numpy_helper.from_array(np.float32(1e-3), "bs"),
        numpy_helper.from_array(conv_bias_q, "cbq"),
    ])
    dqs = [helper.make_node("DequantizeLinear", ["sq", "ss", "sz"], ["bn_scale"], name="dq_scale"),
           helper.make_node("DequantizeLinear", ["bq", "bs"], ["bn_bias"], name="dq_bias"),
           helper.make_node("DequantizeLinear", ["cbq", "bs"], ["conv_bias"], name="dq_conv_bias")]
    conv = model.graph.node[0]
    conv.input.append("conv_bias")
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(dqs + nodes)
    folded, report = assert_folded(model)
    # the DequantizeLinear nodes fed only the folded nodes: gone with their integer inputs
    assert op_types(folded) == ["Conv"]
    assert {i.name for i in folded.graph.initializer} == {"W", *report["batchnorms"][0]["new_tensors"]}


# ---------------------------------------------------------------- Gemm / MatMul


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (1.5, 0.0), (1.0, -0.75)])
@pytest.mark.parametrize("c_shape", [None, (8,), (1, 8), (3, 8), (1,), (), (3, 1), (1, 1)])
def test_gemm_bn_honours_alpha_beta_and_every_c_shape(trans_b, alpha, beta, c_shape):
    model = gemm_model(trans_b=trans_b, alpha=alpha, beta=beta, c_shape=c_shape)
    folded, report = assert_folded(model, expect_codes=["gemm-bn"])
    assert op_types(folded) == ["Gemm"]
    gemm = folded.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs.get("beta", 1.0) == 1.0 and attrs.get("alpha", 1.0) == alpha
    c = [i for i in folded.graph.initializer if i.name == gemm.input[2]][0]
    assert list(c.dims)[-1] == 8  # widened along the features where it broadcast


@pytest.mark.parametrize("beta", [0.5, 0.0])
def test_gemm_bn_bn_chain_sees_the_beta_the_first_fold_wrote(beta):
    # The first fold rewrites C and sets beta = 1; the second must fold against that beta, not the old one.
    model = gemm_model(beta=beta, c_shape=(8,))
    model.graph.node[1].output[0] = "z1"
    model.graph.node.append(bn_node("z1", "z", "bn2"))
    model.graph.initializer.extend(bn_params("bn2", 8))
    folded, _ = assert_folded(model, expect_codes=["gemm-bn", "gemm-bn"])
    assert op_types(folded) == ["Gemm"]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_trans_a_folds_backwards(trans_b):
    # A backward fold scales B's output features, whichever way A is read (more in test_fold_layer_variants.py).
    model = gemm_model(trans_b=trans_b)
    model.graph.node[0].attribute.append(helper.make_attribute("transA", 1))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 5
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3
    folded, _ = assert_folded(model, expect_codes=["gemm-bn"])
    assert op_types(folded) == ["Gemm"]
    attrs = {a.name: helper.get_attribute_value(a) for a in folded.graph.node[0].attribute}
    assert attrs["transA"] == 1


def test_matmul_bn_becomes_gemm():
    model = matmul_model()
    folded, report = assert_folded(model, expect_codes=["gemm-bn"])
    assert op_types(folded) == ["Gemm"]
    assert folded.graph.node[0].output[0] == "z"
    assert report["batchnorms"][0]["into_op"] == "Gemm"


@pytest.mark.parametrize("bias_shape", [(8,), (1, 8), (1,), (3, 8), (3, 1)])
@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_add_bn_folds_into_both(bias_shape, bias_first):
    model = matmul_model(add_bias=bias_shape, bias_first=bias_first)
    folded, report = assert_folded(model, expect_codes=["gemm-bn"])
    assert op_types(folded) == ["MatMul", "Add"]
    assert report["batchnorms"][0]["into"] == ["linear", "add"]
    assert folded.graph.node[1].output[0] == "z"


def test_matmul_rank3_output_keeps_bn_because_axis_1_is_not_the_feature_axis():
    # [N, L, C] x [C, F]: BN's channel axis 1 is L
    model = matmul_model(a_shape=(2, 4, 5), n=8)
    entry = assert_kept(model, "channel-axis-mismatch")
    assert "axis 1" in entry["message"]


def test_matmul_of_unknown_rank_keeps_bn():
    model = matmul_model(a_shape_known=False)
    model.graph.output[0].type.tensor_type.ClearField("shape")
    assert_kept(model, "unknown-rank")


def test_matmul_after_flatten_has_known_rank():
    model = matmul_model()
    model.graph.input[0].CopyFrom(vi("x", [3, 5, 1, 1]))
    model.graph.node.insert(0, helper.make_node("Flatten", ["x"], ["a"], name="flatten"))
    assert_folded(model)


def test_matmul_add_with_non_constant_other_input_is_not_this_fold():
    model = matmul_model(add_bias=(8,))
    model.graph.initializer.remove([i for i in model.graph.initializer if i.name == "bias"][0])
    model.graph.input.append(vi("bias", [8]))
    entry = assert_kept(model, "no-foldable-layer")
