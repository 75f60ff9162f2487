"""BatchNormalization -> layer folds (issue 5): BN before Conv (any rank and group), ConvTranspose,
Flatten/Reshape -> Gemm/MatMul, through Identity/Dropout, into several readers, and the padded case with the
exact border correction (option pad_correction).

Every fold is judged by onnxruntime (graph optimisations off) running the original and the folded model:
outputs within 1e-5 of the output range. Every kept case asserts its reason code and a byte-identical model.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqfold
import qdqfold_native

from helpers.build import op_types
from helpers import folding
from helpers.folding import fold_api
from helpers.onnxrt import assert_same_outputs, random_inputs, run

F32 = TensorProto.FLOAT
RNG = np.random.default_rng(5)


# ---------------------------------------------------------------- builders


def bn_params(prefix: str, c: int, *, zero_shift: bool = False, dtype=np.float32) -> list[onnx.TensorProto]:
    """Trained-looking statistics (some negative gammas); zero_shift gives t = beta - mean * a == 0 exactly."""
    gamma = RNG.uniform(0.5, 2.0, c) * np.where(RNG.random(c) < 0.3, -1.0, 1.0)
    beta = np.zeros(c) if zero_shift else RNG.standard_normal(c)
    mean = np.zeros(c) if zero_shift else RNG.standard_normal(c)
    var = RNG.uniform(0.05, 3.0, c)
    return [numpy_helper.from_array(v.astype(dtype), f"{prefix}_{n}")
            for n, v in zip(["scale", "bias", "mean", "var"], [gamma, beta, mean, var])]


def bn_node(x: str, y: str, prefix: str = "bn") -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}_{n}" for n in ["scale", "bias", "mean", "var"]],
                            [y], name=prefix)


def tensor(name: str, shape, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.5).astype(dtype), name)


def vi(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def make_model(nodes, inputs, outputs, initializers=(), opset=17, value_info=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    # Outputs declared without a shape get the inferred one (the full checker wants one).
    inferred = onnx.shape_inference.infer_shapes(model)
    for out, inf in zip(model.graph.output, inferred.graph.output):
        if not out.type.tensor_type.HasField("shape") and inf.type.tensor_type.HasField("shape"):
            out.type.CopyFrom(inf.type)
    return model


def assert_folded_forward(model, *, into: int = 1, rtol: float = 1e-5, **options):
    folded = fold_api(model, **options)
    entry = folded.report.batchnorms[0]
    assert entry.folded and entry.direction == "forward", entry.describe()
    assert len(entry.into) == into
    assert "BatchNormalization" not in op_types(folded.model)
    onnx.checker.check_model(folded.model, full_check=True)
    assert_same_outputs(folded.input, folded.bytes, rtol)
    return folded.model, entry


def assert_kept(model, code: str, **options):
    return folding.assert_kept(model, code, api=True, **options)


def bn_conv_model(shape, out_channels=6, kernel=3, group=1, pads=None, auto_pad=None, strides=None,
                  dilations=None, zero_shift=False, bias=True, op="Conv", input_shape=None):
    """x -> Relu -> BN -> Conv/ConvTranspose -> y (the Relu keeps BN from folding backwards)."""
    c, rank = shape[1], len(shape) - 2
    kernel = [kernel] * rank if isinstance(kernel, int) else kernel
    w_shape = [out_channels, c // group, *kernel] if op == "Conv" else [c, out_channels // group, *kernel]
    attrs = {"group": group}
    if pads is not None:
        attrs["pads"] = pads
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    if strides is not None:
        attrs["strides"] = strides
    if dilations is not None:
        attrs["dilations"] = dilations
    inits = [*bn_params("bn", c, zero_shift=zero_shift), tensor("w", w_shape)]
    if bias:
        inits.append(tensor("b", [out_channels]))
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", "n"),
             helper.make_node(op, ["n", "w"] + (["b"] if bias else []), ["y"], name="layer", **attrs)]
    return make_model(nodes, [vi("x", input_shape or shape)], [vi("y", None)], inits)


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
