"""BatchNormalization -> layer folds (issue 5): BN before Conv (any rank and group), ConvTranspose,
Flatten/Reshape -> Gemm/MatMul, through Identity/Dropout, into several readers, and the padded case with the
exact border correction (option pad_correction).

Every fold is judged by onnxruntime (graph optimisations off) running the original and the folded model:
outputs within 1e-5 of the output range. Every kept case asserts its reason code and a byte-identical model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import qdqfold_native

from helpers.build import op_types
from helpers.forward_models import (RNG, assert_folded_forward, assert_kept, bn_conv_model, bn_node, bn_params,
                                    make_model, tensor, vi)
from helpers.onnxrt import assert_same_outputs, random_inputs, run


# ---------------------------------------------------------------- BN -> Conv, exact without padding


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("layout", ["single", "grouped", "depthwise"])
def test_bn_conv_without_padding_folds_in_every_rank_and_group_layout(rank, layout):
    c = 8
    group, out_channels = {"single": (1, 5), "grouped": (4, 12), "depthwise": (8, 8)}[layout]
    model = bn_conv_model([2, c] + [7] * rank, out_channels=out_channels, group=group, pads=[0] * (2 * rank))
    folded, entry = assert_folded_forward(model)
    assert entry.code == "bn-conv" and entry.into_op == "Conv" and entry.into == ["layer"]
    assert op_types(folded) == ["Relu", "Conv"]
    # BN's parameters and output are gone; the Conv reads the Relu's output.
    names = {i.name for i in folded.graph.initializer}
    assert not any(n.startswith("bn_") for n in names)
    assert folded.graph.node[1].input[0] == "r"


def test_bn_conv_without_bias_gets_one_and_strides_dilations_are_fine_without_padding():
    model = bn_conv_model([1, 4, 13, 11], kernel=3, strides=[2, 3], dilations=[2, 1], bias=False)
    folded, _ = assert_folded_forward(model)
    assert len(folded.graph.node[1].input) == 3


def test_weight_that_would_overflow_once_scaled_keeps_the_bn():
    model = bn_conv_model([1, 4, 5, 5], pads=[0, 0, 0, 0], zero_shift=True)  # t = 0: the bias stays finite
    gamma = next(t for t in model.graph.initializer if t.name == "bn_scale")
    gamma.CopyFrom(numpy_helper.from_array(np.full(4, 4e9, dtype=np.float32), "bn_scale"))
    var = next(t for t in model.graph.initializer if t.name == "bn_var")  # 1: a = 4e9 is within the 2^32 headroom
    var.CopyFrom(numpy_helper.from_array(np.full(4, 1.0, dtype=np.float32), "bn_var"))
    w = next(t for t in model.graph.initializer if t.name == "w")
    values = numpy_helper.to_array(w).copy()
    values.flat[7] = 1e30  # 1e30 * 4e9 does not fit float32
    w.CopyFrom(numpy_helper.from_array(values, "w"))
    entry = assert_kept(model, "overflow")
    assert "weight 'w' would overflow float32" in entry.message


def test_a_bn_factor_that_overflows_keeps_the_bn_the_original_is_inf_there():
    model = bn_conv_model([1, 4, 5, 5], pads=[0, 0, 0, 0], zero_shift=True)
    gamma = next(t for t in model.graph.initializer if t.name == "bn_scale")
    gamma.CopyFrom(numpy_helper.from_array(np.full(4, 3e38, dtype=np.float32), "bn_scale"))
    var = next(t for t in model.graph.initializer if t.name == "bn_var")
    var.CopyFrom(numpy_helper.from_array(np.full(4, 0.01, dtype=np.float32), "bn_var"))
    entry = assert_kept(model, "overflow")
    assert "gamma / sqrt(var + epsilon)" in entry.message


def test_auto_pad_valid_is_no_padding():
    assert_folded_forward(bn_conv_model([1, 4, 9, 9], auto_pad="VALID"))


def test_auto_pad_same_with_a_1x1_kernel_pads_nothing():
    assert_folded_forward(bn_conv_model([1, 4, 9, 9], kernel=1, strides=[2, 2], auto_pad="SAME_UPPER"))


def test_end_pads_no_window_reaches_fold_without_the_option():
    # in 6, kernel 2, stride 2, pads end 1: the last window covers 4..5 and never reads the pad. Seeing that
    # needs the input's size, which the core infers from the static graph input (no value_info needed).
    model = bn_conv_model([1, 3, 6, 6], kernel=2, strides=[2, 2], pads=[0, 0, 1, 1])
    folded, entry = assert_folded_forward(model)
    assert "Add" not in op_types(folded)
    # A symbolic input with a value_info claiming 6 x 6 proves nothing (fed 7 x 7, the last window reads the pad).
    dynamic = bn_conv_model([1, 3, 6, 6], kernel=2, strides=[2, 2], pads=[0, 0, 1, 1], input_shape=[1, 3, "h", "w"])
    dynamic.graph.value_info.append(vi("r", [1, 3, 6, 6]))
    assert_kept(dynamic, "padding")


# ---------------------------------------------------------------- padding


PADDED = {
    "symmetric": dict(pads=[1, 1, 1, 1]),
    "asymmetric": dict(pads=[0, 2, 1, 0], kernel=[3, 2]),
    "strided-dilated": dict(pads=[2, 1, 2, 0], strides=[2, 1], dilations=[2, 2]),
    "same-upper": dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    "same-lower": dict(auto_pad="SAME_LOWER", kernel=[4, 3]),
    "grouped": dict(pads=[1, 1, 1, 1], group=2, out_channels=6),
    "depthwise": dict(pads=[1, 0, 1, 2], group=4, out_channels=8),
}


@pytest.mark.parametrize("case", sorted(PADDED))
def test_padded_conv_is_kept_by_default_with_the_option_named(case):
    entry = assert_kept(bn_conv_model([1, 4, 10, 9], **PADDED[case]), "padding")
    assert "pad_correction" in entry.message and "'layer'" in entry.message


@pytest.mark.parametrize("case", sorted(PADDED))
def test_padded_conv_folds_exactly_with_the_border_correction(case):
    folded, entry = assert_folded_forward(bn_conv_model([2, 4, 10, 9], **PADDED[case]), pad_correction=True)
    assert op_types(folded) == ["Relu", "Conv", "Add"]
    # One constant [1, M, H_out, W_out] and its size in the report.
    out_shape = run(folded, random_inputs(folded))[0].shape
    add = folded.graph.node[2]
    constant = next(i for i in folded.graph.initializer if i.name == add.input[1])
    assert list(constant.dims) == [1, *out_shape[1:]]
    assert entry.metrics["max_abs_correction"] > 0
    assert entry.metrics["correction_elements"] == np.prod(out_shape[1:])
    assert constant.name in entry.new_tensors
    assert folded.graph.output[0].name == "y" and add.output[0] == "y"


@pytest.mark.parametrize("rank", [1, 3])
def test_border_correction_in_1d_and_3d(rank):
    shape = [1, 3] + [6] * rank
    model = bn_conv_model(shape, pads=[1] * (2 * rank))
    assert_kept(model, "padding")
    assert_folded_forward(model, pad_correction=True)


def test_zero_shift_folds_a_padded_conv_without_the_option():
    folded, entry = assert_folded_forward(bn_conv_model([1, 4, 8, 8], pads=[1, 1, 1, 1], zero_shift=True))
    assert op_types(folded) == ["Relu", "Conv"] and not entry.metrics


def test_dynamic_spatial_size_keeps_the_bn_and_says_so():
    model = bn_conv_model([1, 4, 8, 8], pads=[1, 1, 1, 1], input_shape=["n", 4, "h", "w"])
    entry = assert_kept(model, "dynamic-shape", pad_correction=True)
    assert "static spatial size" in entry.message
    # Without the option it is the padding that keeps it.
    assert_kept(model, "padding")


def test_dynamic_batch_is_fine_for_the_correction():
    model = bn_conv_model([3, 4, 8, 8], pads=[1, 1, 1, 1], input_shape=["n", 4, 8, 8])
    assert_folded_forward(model, pad_correction=True)


def test_shapes_come_from_the_shapes_option_when_the_model_has_none():
    # x's own shape is symbolic; the caller knows it.
    model = bn_conv_model([2, 4, 8, 8], pads=[1, 1, 1, 1], input_shape=["n", 4, "h", "w"])
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, pad_correction=True, shapes={"x": [None, 4, 8, 8]})
    assert report["batchnorms"][0]["folded"]
    # A shape given for an intermediate value is a claim like value_info: the core infers those itself.
    _, claimed = qdqfold_native.fold_with_report(data, pad_correction=True, shapes={"r": [None, 4, 8, 8]})
    assert claimed["batchnorms"][0]["code"] == "dynamic-shape"
    assert_same_outputs(data, out, feeds={"x": RNG.standard_normal((2, 4, 8, 8)).astype(np.float32)})
    # The model's own value_info is not altered by the shape inference the Python layer runs.
    folded = onnx.load_from_string(out)
    assert len(folded.graph.value_info) == 0


def test_the_python_layer_infers_shapes_only_on_a_copy():
    model = bn_conv_model([1, 4, 8, 8], pads=[1, 1, 1, 1])
    folded, _ = assert_folded_forward(model, pad_correction=True)
    assert len(folded.graph.value_info) == 0


def test_the_shapes_option_is_checked():
    data = bn_conv_model([1, 4, 8, 8]).SerializeToString()
    with pytest.raises(TypeError, match="shapes"):
        qdqfold_native.fold(data, shapes=[1, 2])
    with pytest.raises(TypeError, match="shapes"):
        qdqfold_native.fold(data, shapes={"r": ["h"]})


# ---------------------------------------------------------------- ConvTranspose


def test_convtranspose_1x1_folds():
    folded, entry = assert_folded_forward(bn_conv_model([1, 4, 5, 5], op="ConvTranspose", kernel=1))
    assert entry.code == "bn-convtranspose"


def test_convtranspose_stride_1_cropping_the_kernel_reach_folds_exactly():
    model = bn_conv_model([1, 4, 9, 9], op="ConvTranspose", kernel=3, pads=[2, 2, 2, 2], group=2, out_channels=6)
    folded, _ = assert_folded_forward(model)
    assert "Add" not in op_types(folded)


@pytest.mark.parametrize("attrs", [dict(kernel=2, strides=[2, 2]), dict(kernel=3, pads=[1, 1, 1, 1]),
                                   dict(kernel=3, strides=[2, 2], group=2, out_channels=6)])
def test_convtranspose_whose_positions_get_different_taps_is_kept_then_corrected(attrs):
    model = bn_conv_model([1, 4, 5, 5], op="ConvTranspose", **attrs)
    entry = assert_kept(model, "uneven-taps")
    assert "pad_correction" in entry.message
    folded, _ = assert_folded_forward(model, pad_correction=True)
    assert op_types(folded) == ["Relu", "ConvTranspose", "Add"]


def test_convtranspose_zero_shift_folds_whatever_the_strides():
    assert_folded_forward(bn_conv_model([1, 4, 5, 5], op="ConvTranspose", kernel=2, strides=[2, 2], zero_shift=True))


# ---------------------------------------------------------------- Flatten / Reshape -> Gemm / MatMul


def bn_flatten_model(layer="Gemm", reshape="Flatten", trans_b=1, alpha=1.0, beta=1.0, c_shape=(5,), hw=(3, 4),
                     batch=2, flatten_axis=None, reshape_to=(0, -1), value_info=()):
    c, n_out = 4, 5
    k = c * int(np.prod(hw))
    inits = [*bn_params("bn", c)]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", "n")]
    if reshape == "Flatten":
        attrs = {} if flatten_axis is None else {"axis": flatten_axis}
        nodes.append(helper.make_node("Flatten", ["n"], ["f"], name="flatten", **attrs))
    elif reshape == "Reshape":
        inits.append(numpy_helper.from_array(np.array(reshape_to, np.int64), "target"))
        nodes.append(helper.make_node("Reshape", ["n", "target"], ["f"], name="reshape"))
    if layer == "Gemm":
        inits.append(tensor("w", [n_out, k] if trans_b else [k, n_out]))
        inputs = ["f" if reshape else "n", "w"]
        if c_shape is not None:
            inits.append(tensor("c", list(c_shape)))
            inputs.append("c")
        nodes.append(helper.make_node("Gemm", inputs, ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta))
    else:
        inits.append(tensor("w", [k, n_out]))
        nodes.append(helper.make_node("MatMul", ["f", "w"], ["y"], name="fc"))
    return make_model(nodes, [vi("x", [batch, c, *hw])], [vi("y", None)], inits, value_info=value_info)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [(5,), (1, 5), (2, 5), (1,), None])
def test_bn_flatten_gemm_folds(trans_b, c_shape):
    folded, entry = assert_folded_forward(bn_flatten_model(trans_b=trans_b, c_shape=c_shape))
    assert entry.code == "bn-gemm" and op_types(folded) == ["Relu", "Flatten", "Gemm"]


def test_gemm_alpha_and_beta_are_honoured():
    folded, _ = assert_folded_forward(bn_flatten_model(alpha=0.7, beta=-1.3, c_shape=(2, 5)))
    gemm = folded.graph.node[-1]
    assert helper.get_attribute_value(next(a for a in gemm.attribute if a.name == "beta")) == 1.0


def test_gemm_beta_zero_ignores_the_old_bias():
    assert_folded_forward(bn_flatten_model(beta=0.0))


def test_bn_flatten_matmul_gets_one_add_for_the_shift():
    folded, entry = assert_folded_forward(bn_flatten_model(layer="MatMul"))
    assert entry.code == "bn-matmul" and op_types(folded) == ["Relu", "Flatten", "MatMul", "Add"]


def test_bn_reshape_keeping_the_batch_folds():
    assert_folded_forward(bn_flatten_model(reshape="Reshape", reshape_to=(0, -1)))


@pytest.mark.parametrize("target", [(2, -1), (-1, 48), (2, 48)])
def test_bn_reshape_to_2d_gemm_folds_when_the_shape_shows_one_sample_per_row(target):
    # The core infers the shape from the static graph input itself.
    assert_folded_forward(bn_flatten_model(reshape="Reshape", reshape_to=target))
    assert_folded_forward(bn_flatten_model(reshape="Reshape", reshape_to=target), pad_correction=True)
    # A symbolic batch with a value_info claiming 2 proves nothing: fed 4 samples, a row would hold two.
    model = bn_flatten_model(reshape="Reshape", reshape_to=target, value_info=[vi("n", [2, 4, 3, 4])])
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    assert_kept(model, "unsupported-reshape")


def test_reshape_that_does_not_keep_samples_in_rows_is_kept():
    # [4, 24]: every sample spread over two rows.
    entry = assert_kept(bn_flatten_model(reshape="Reshape", reshape_to=(4, -1)), "unsupported-reshape")
    assert "'reshape'" in entry.message


def test_flatten_from_another_axis_is_kept():
    assert_kept(bn_flatten_model(flatten_axis=2, hw=(3, 4)), "unsupported-reshape")


def test_bn1d_before_gemm_folds():
    c, n_out = 6, 3
    inits = [*bn_params("bn", c), tensor("w", [n_out, c]), tensor("c", [n_out])]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"),
             helper.make_node("Gemm", ["n", "w", "c"], ["y"], name="fc", transB=1)]
    assert_folded_forward(make_model(nodes, [vi("x", [4, c])], [vi("y", None)], inits))


def test_bn1d_before_matmul_needs_a_known_rank():
    c, n_out = 6, 3
    inits = [*bn_params("bn", c), tensor("w", [c, n_out])]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"), helper.make_node("MatMul", ["n", "w"], ["y"])]
    assert_folded_forward(make_model(nodes, [vi("x", [4, c])], [vi("y", None)], inits))
    # An input without a shape: a value_info claiming rank 2 is not a proof.
    assert_kept(make_model(nodes, [vi("x", None)], [vi("y", None)], inits, value_info=[vi("r", [4, c])]), "unknown-rank")


def test_gemm_with_transposed_input_is_kept():
    c = 4
    inits = [*bn_params("bn", c), tensor("w", [c, 3])]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"),
             helper.make_node("Gemm", ["n", "w"], ["y"], transA=1)]
    assert_kept(make_model(nodes, [vi("x", [c, c])], [vi("y", None)], inits), "unsupported-layer")
