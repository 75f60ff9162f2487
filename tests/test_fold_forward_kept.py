"""Forward folds (BatchNormalization -> layer, issue 5): several readers and see-through nodes, why a BN is kept,
the direction chosen, element types, odd input (kept, never a crash). Builders: helpers/forward_models.py.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqfold
import qdqfold_native

from helpers.build import op_types
from helpers.folding import fold_api
from helpers.forward_models import (RNG, assert_folded_forward, assert_kept, bn_conv_model, bn_node, bn_params,
                                    make_model, tensor, vi)
from helpers.onnxrt import assert_same_outputs


# ---------------------------------------------------------------- several readers, see-through nodes


def two_reader_model(pads_b=0, shared_weight=False):
    c = 4
    inits = [*bn_params("bn", c), tensor("wa", [5, c, 3, 3]), tensor("ba", [5]), tensor("wb", [3, c, 1, 1])]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"),
             helper.make_node("Conv", ["n", "wa", "ba"], ["ya"], name="conv_a"),
             helper.make_node("Conv", ["n", "wa" if shared_weight else "wb"], ["yb"], name="conv_b",
                              pads=[pads_b] * 4)]
    return make_model(nodes, [vi("x", [1, c, 8, 8])], [vi("ya", None), vi("yb", None)], inits)


def test_bn_read_by_two_convs_folds_into_both():
    folded, entry = assert_folded_forward(two_reader_model(), into=2)
    assert sorted(entry.into) == ["conv_a", "conv_b"]


def test_bn_read_by_two_convs_stays_whole_when_one_cannot_take_it():
    entry = assert_kept(two_reader_model(pads_b=1), "padding")
    assert "conv_b" in entry.message and "all of them" in entry.message
    assert_folded_forward(two_reader_model(pads_b=1), into=2, pad_correction=True)


def test_bn_readers_sharing_one_weight_are_kept():
    assert_kept(two_reader_model(shared_weight=True), "shared-weight")


def see_through_model(opset=17, training_mode=None):
    c = 4
    inits = [*bn_params("bn", c), tensor("w", [5, c, 2, 2])]
    dropout_inputs = ["i"]
    graph_inputs = [vi("x", [1, c, 6, 6])]
    if training_mode == "constant":
        inits += [numpy_helper.from_array(np.array(0.3, np.float32), "ratio"),
                  numpy_helper.from_array(np.array(False), "train")]
        dropout_inputs = ["i", "ratio", "train"]
    elif training_mode == "input":
        graph_inputs.append(helper.make_tensor_value_info("train", TensorProto.BOOL, []))
        dropout_inputs = ["i", "", "train"]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"),
             helper.make_node("Identity", ["n"], ["i"], name="identity"),
             helper.make_node("Dropout", dropout_inputs, ["d"], name="dropout"),
             helper.make_node("Conv", ["d", "w"], ["y"], name="conv")]
    return make_model(nodes, graph_inputs, [vi("y", None)], inits, opset=opset)


@pytest.mark.parametrize("opset,training_mode", [(11, None), (17, None), (17, "constant")])
def test_bn_folds_through_identity_and_inference_dropout(opset, training_mode):
    folded, _ = assert_folded_forward(see_through_model(opset, training_mode))
    assert op_types(folded) == ["Relu", "Identity", "Dropout", "Conv"]
    assert folded.graph.node[1].input[0] == "r"


def test_dropout_whose_training_mode_is_an_input_is_not_see_through():
    model = see_through_model(17, "input")
    data = model.SerializeToString()
    out, report = qdqfold.fold_bytes(data)
    assert report.batchnorms[0].code == "no-foldable-layer" and out == data


def test_bn_read_by_a_flatten_gemm_and_a_conv_folds_into_both():
    c = 4
    inits = [*bn_params("bn", c), tensor("w", [5, c, 1, 1]), tensor("fw", [3, c * 9])]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"),
             helper.make_node("Conv", ["n", "w"], ["ya"], name="conv"),
             helper.make_node("Identity", ["n"], ["i"]),
             helper.make_node("Flatten", ["i"], ["f"]),
             helper.make_node("Gemm", ["f", "fw"], ["yb"], name="fc", transB=1)]
    model = make_model(nodes, [vi("x", [2, c, 3, 3])], [vi("ya", None), vi("yb", None)], inits)
    _, entry = assert_folded_forward(model, into=2)
    assert entry.code == "bn-layers"


# ---------------------------------------------------------------- why a BN is kept


def test_activation_quantizer_keeps_bn_and_names_the_quantizer():
    c = 4
    inits = [*bn_params("bn", c), tensor("w", [5, c, 1, 1]),
             numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"),
             helper.make_node("QuantizeLinear", ["n", "s", "z"], ["q"], name="act_q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="act_dq"),
             helper.make_node("Conv", ["dq", "w"], ["y"], name="conv")]
    entry = assert_kept(make_model(nodes, [vi("x", [1, c, 4, 4])], [vi("y", None)], inits), "activation-quantizer")
    assert "'act_q'" in entry.message and "quantized activations" in entry.message


def test_quantized_weight_keeps_bn():
    c = 4
    inits = [*bn_params("bn", c), numpy_helper.from_array(RNG.integers(-100, 100, (5, c, 1, 1)).astype(np.int8), "wq"),
             numpy_helper.from_array(np.full(5, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(5, np.int8), "wz")]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="w_dq", axis=0),
             helper.make_node("Conv", ["n", "w"], ["y"], name="conv")]
    entry = assert_kept(make_model(nodes, [vi("x", [1, c, 4, 4])], [vi("y", None)], inits), "quantized-weight")
    assert "'w_dq'" in entry.message


def test_shared_weight_read_by_another_node_keeps_bn():
    c = 4
    inits = [*bn_params("bn", c), tensor("w", [c, c, 1, 1])]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"),
             helper.make_node("Conv", ["n", "w"], ["y1"], name="conv1"),
             helper.make_node("Conv", ["x", "w"], ["y2"], name="conv2")]
    entry = assert_kept(make_model(nodes, [vi("x", [1, c, 4, 4])], [vi("y1", None), vi("y2", None)], inits),
                        "shared-weight")
    assert "'conv2'" in entry.message


def test_non_constant_weight_keeps_bn():
    c = 4
    inits = [*bn_params("bn", c)]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"), helper.make_node("Conv", ["n", "w"], ["y"])]
    model = make_model(nodes, [vi("x", [1, c, 4, 4]), vi("w", [3, c, 1, 1])], [vi("y", None)], inits)
    assert_kept(model, "non-constant-weight")


def test_non_constant_bias_keeps_bn():
    c = 4
    inits = [*bn_params("bn", c), tensor("w", [3, c, 1, 1])]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"),
             helper.make_node("Conv", ["n", "w", "b"], ["y"])]
    model = make_model(nodes, [vi("x", [1, c, 4, 4]), vi("b", [3])], [vi("y", None)], inits)
    assert_kept(model, "non-constant-bias")


def test_bn_output_that_is_a_graph_output_keeps_bn():
    model = bn_conv_model([1, 4, 5, 5], kernel=1)
    model.graph.output.append(vi("n", [1, 4, 5, 5]))
    assert_kept(model, "graph-output")


def test_bn_output_also_read_by_a_non_layer_keeps_bn():
    model = bn_conv_model([1, 4, 5, 5], kernel=1)
    model.graph.node.append(helper.make_node("Sigmoid", ["n"], ["s"], name="sig"))
    model.graph.output.append(vi("s", None))
    entry = assert_kept(model, "other-reader")
    assert "'sig'" in entry.message


def test_bn_read_only_by_non_layers_is_not_a_forward_pattern():
    c = 4
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"), helper.make_node("Sigmoid", ["n"], ["y"])]
    entry = assert_kept(make_model(nodes, [vi("x", [1, c, 3, 3])], [vi("y", None)], bn_params("bn", c)),
                        "no-foldable-layer")
    assert entry.direction is None


def test_channel_count_mismatch_keeps_bn():
    c = 4
    inits = [*bn_params("bn", c), tensor("w", [3, 2, 1, 1])]  # the Conv expects 2 input channels
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"), helper.make_node("Conv", ["n", "w"], ["y"])]
    model = make_model(nodes, [vi("x", None)], [vi("y", None)], inits)
    assert_kept(model, "shape-mismatch")


def test_layer_output_readers_do_not_matter_forwards():
    # The Conv's output is a graph output and read twice: folding forwards leaves its values unchanged.
    model = bn_conv_model([1, 4, 6, 6], kernel=1)
    model.graph.node.append(helper.make_node("Relu", ["y"], ["y2"]))
    model.graph.output.append(vi("y2", [1, 6, 6, 6]))
    assert_folded_forward(model)


def test_bn_value_info_and_parameters_are_dropped():
    model = bn_conv_model([1, 4, 6, 6], kernel=1)
    model.graph.value_info.extend([vi("n", [1, 4, 6, 6]), vi("r", [1, 4, 6, 6])])
    folded, _ = assert_folded_forward(model)
    assert [v.name for v in folded.graph.value_info] == ["r"]
    assert {i.name for i in folded.graph.initializer} == {"w", "b"}


def test_constant_node_weight_is_replaced_by_a_new_tensor():
    c = 4
    w = tensor("wv", [3, c, 1, 1])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"),
             helper.make_node("Constant", [], ["w"], value=w),
             helper.make_node("Conv", ["n", "w"], ["y"], name="conv")]
    folded, entry = assert_folded_forward(make_model(nodes, [vi("x", [1, c, 3, 3])], [vi("y", None)], bn_params("bn", c)))
    assert "Constant" not in op_types(folded) and entry.new_tensors


# ---------------------------------------------------------------- direction: backward first


def conv_bn_conv_model():
    c = 4
    inits = [tensor("w1", [c, 3, 3, 3]), *bn_params("bn", c), tensor("w2", [5, c, 1, 1])]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]), bn_node("h", "n"),
             helper.make_node("Conv", ["n", "w2"], ["y"], name="conv2")]
    return make_model(nodes, [vi("x", [1, 3, 6, 6])], [vi("y", None)], inits)


def test_bn_between_two_convs_folds_backwards():
    folded = fold_api(conv_bn_conv_model())
    entry = folded.report.batchnorms[0]
    assert entry.folded and entry.direction == "backward" and entry.into == ["conv1"]
    assert_same_outputs(folded.input, folded.bytes)


def test_bn_between_two_convs_folds_forwards_when_backward_is_off():
    model = conv_bn_conv_model()
    folded, entry = assert_folded_forward(model, fold_backward=False)
    assert entry.into == ["conv2"]
    result = fold_api(model, fold_forward=False, fold_backward=False)
    assert result.bytes == result.input and not result.report.batchnorms[0].folded


def test_graph_input_bn_into_padded_conv_needs_the_correction():
    c = 3
    inits = [*bn_params("bn", c), tensor("w", [4, c, 3, 3]), tensor("b", [4])]
    nodes = [bn_node("x", "n"), helper.make_node("Conv", ["n", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vi("x", [1, c, 12, 12])], [vi("y", None)], inits)
    assert_kept(model, "padding")
    assert_folded_forward(model, pad_correction=True)


# ---------------------------------------------------------------- element types


def typed_model(dtype, elem):
    c = 4
    inits = [*bn_params("bn", c, dtype=dtype), tensor("w", [5, c, 1, 1], dtype), tensor("b", [5], dtype)]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"), helper.make_node("Conv", ["n", "w", "b"], ["y"])]
    return make_model(nodes, [vi("x", [1, c, 4, 4], elem)], [vi("y", None, elem)], inits)


def test_float16_conv():
    assert_folded_forward(typed_model(np.float16, TensorProto.FLOAT16), rtol=4e-3)


def test_float64_gemm():
    c = 4
    inits = [*bn_params("bn", c, dtype=np.float64), tensor("w", [3, c * 4], np.float64), tensor("cb", [3], np.float64)]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"), helper.make_node("Flatten", ["n"], ["f"]),
             helper.make_node("Gemm", ["f", "w", "cb"], ["y"], transB=1)]
    model = make_model(nodes, [vi("x", [2, c, 2, 2], TensorProto.DOUBLE)], [vi("y", None, TensorProto.DOUBLE)], inits)
    assert_folded_forward(model, rtol=1e-12)


def test_bfloat16_weights_are_rounded_once():
    # onnxruntime has no bfloat16 Conv on CPU: check the numbers against numpy instead.
    model = typed_model(ml_dtypes.bfloat16, TensorProto.BFLOAT16)
    folded = fold_api(model)
    assert folded.report.batchnorms[0].folded
    init = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    new = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in folded.model.graph.initializer}
    a = init["bn_scale"] / np.sqrt(init["bn_var"] + np.float32(1e-5))
    t = init["bn_bias"] - init["bn_mean"] * a
    w = init["w"]
    expected_w = (w * a[None, :, None, None]).astype(ml_dtypes.bfloat16).astype(np.float64)
    expected_b = (init["b"] + (w[:, :, 0, 0] * t[None, :]).sum(1)).astype(ml_dtypes.bfloat16).astype(np.float64)
    np.testing.assert_allclose(new["w"], expected_w, rtol=2 ** -8)
    np.testing.assert_allclose(new["b"], expected_b, rtol=2 ** -7, atol=1e-2)


# ---------------------------------------------------------------- odd input: kept, never a crash


@pytest.mark.parametrize("size", [2 ** 30, 2 ** 40, 2 ** 62])
def test_absurd_spatial_size_of_the_input_is_kept_not_allocated(size):
    model = bn_conv_model([1, 4, 8, 8], pads=[1, 1, 1, 1], input_shape=[1, 4, "h", "w"])
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, pad_correction=True, shapes={"x": [1, 4, size, size]})
    assert report["batchnorms"][0]["code"] in ("correction-too-large", "dynamic-shape") and out == data
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = size
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = size
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, pad_correction=True, shapes={})
    assert report["batchnorms"][0]["code"] in ("correction-too-large", "dynamic-shape") and out == data


@pytest.mark.parametrize("attrs", [dict(dilations=[2 ** 62, 1]), dict(strides=[0, 1]), dict(pads=[1, 1, -1, 1]),
                                   dict(pads=[1, 1]), dict(auto_pad="SIDEWAYS")])
def test_malformed_conv_attributes_keep_the_bn(attrs):
    model = bn_conv_model([1, 4, 8, 8], **attrs)
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, pad_correction=True, shapes={"r": [1, 4, 8, 8]})
    # weight_layout (layer.cpp) or the forward fold's own geometry check names the attribute.
    assert report["batchnorms"][0]["code"] in ("malformed-layer", "unsupported-layer") and out == data


def test_bn_in_an_if_branch_folds_without_editing_the_outer_weight():
    c = 4
    outer = [*bn_params("bn", c), tensor("w", [3, c, 3, 3]), numpy_helper.from_array(np.array(True), "cond")]
    branch_nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"),
                    helper.make_node("Conv", ["n", "w"], ["yb"], name="conv")]
    then_branch = helper.make_graph(branch_nodes, "then", [], [vi("yb", [1, 3, 4, 4])])
    else_branch = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["ye"])], "else", [], [vi("ye", [1, 3, 4, 4])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    model = make_model(nodes, [vi("x", [1, c, 6, 6])], [vi("y", [1, 3, 4, 4])], outer)
    folded = fold_api(model)
    entry = folded.report.batchnorms[0]
    assert entry.folded and entry.graph != "main" and entry.new_tensors
    assert numpy_helper.to_array(next(i for i in folded.model.graph.initializer if i.name == "w")).tobytes() == \
        numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w")).tobytes()
    assert_same_outputs(folded.input, folded.bytes)
