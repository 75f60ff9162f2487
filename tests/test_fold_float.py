"""Layer -> BatchNormalization folds for float weights (issue 3): Conv, ConvTranspose, Gemm, MatMul (+ Add).

Every test builds a small graph with onnx.helper, folds it, and compares onnxruntime's outputs (graph
optimisations off) of the original and the folded model. Negative cases assert the reason code and that
the model comes back byte-identical.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers.build import F32, RNG, bn_count, bn_node, bn_params, gemm_model, make_model, op_types, vi, weight
from helpers import folding
from helpers.folding import assert_folded, fold
from helpers.onnxrt import assert_same_outputs, random_inputs

# ---------------------------------------------------------------- builders


def assert_kept(model, code, **options):
    """The single BN kept with `code` by the backward folds only (helpers.folding.assert_kept)."""
    options.setdefault("fold_forward", False)
    return folding.assert_kept(model, code, **options)


def conv_bn_model(rank=2, group=1, cin=4, cout=6, bias=True, transpose=False, dtype=np.float32, opset=17,
                  bn_attrs=None, spatial=5, elem=F32):
    k = [3] * rank
    x_shape = [2, cin] + [spatial] * rank
    if transpose:
        w_shape = [cin, cout // group] + k
        attrs = dict(group=group, strides=[2] * rank)
        op = "ConvTranspose"
    else:
        w_shape = [cout, cin // group] + k
        attrs = dict(group=group, pads=[1] * (2 * rank))
        op = "Conv"
    inits = [weight("W", w_shape, dtype=dtype)] + bn_params("bn", cout, dtype=dtype)
    conv_inputs = ["x", "W"]
    if bias:
        inits.append(weight("B", [cout], dtype=dtype))
        conv_inputs.append("B")
    nodes = [helper.make_node(op, conv_inputs, ["y"], name="layer", **attrs),
             bn_node("y", "z", "bn", **(bn_attrs or {}))]
    z_shape = [2, cout] + [2 * spatial + 1 if transpose else spatial] * rank
    return make_model(nodes, [vi("x", x_shape, elem)], [vi("z", z_shape, elem)], inits, opset=opset)


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


def matmul_model(add_bias=None, bias_first=False, a_shape=(3, 5), n=8, dtype=np.float32, elem=F32, opset=17,
                 a_shape_known=True):
    k = a_shape[-1]
    inits = [weight("Bw", [k, n], dtype=dtype)] + bn_params("bn", a_shape[1] if len(a_shape) == 3 else n, dtype=dtype)
    nodes = [helper.make_node("MatMul", ["a", "Bw"], ["mm"], name="linear")]
    bn_in = "mm"
    if add_bias is not None:
        inits.append(weight("bias", list(add_bias), dtype=dtype))
        nodes.append(helper.make_node("Add", ["bias", "mm"] if bias_first else ["mm", "bias"], ["y"], name="add"))
        bn_in = "y"
    nodes.append(bn_node(bn_in, "z", "bn"))
    a_vi = vi("a", list(a_shape) if a_shape_known else None, elem)
    return make_model(nodes, [a_vi], [vi("z", None, elem)], inits, opset=opset)


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


# ---------------------------------------------------------------- dtypes


def _half_ulp_ok(actual: np.ndarray, exact: np.ndarray, dtype) -> None:
    """`actual` is `exact` (float64) correctly rounded to `dtype`: within half a unit in the last place."""
    info = ml_dtypes.finfo(dtype) if dtype == ml_dtypes.bfloat16 else np.finfo(dtype)
    mant = int(info.nmant)
    exp = np.floor(np.log2(np.maximum(np.abs(exact), float(info.tiny))))
    ulp = np.exp2(exp - mant)
    assert np.all(np.abs(actual.astype(np.float64) - exact) <= ulp / 2 * (1 + 1e-12))


def _bn_affine(model, prefix="bn"):
    p = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    a = p[f"{prefix}_scale"] / np.sqrt(p[f"{prefix}_var"] + np.float64(np.float32(1e-5)))
    return a, p[f"{prefix}_bias"] - p[f"{prefix}_mean"] * a


def test_float16_conv_bn_folds_with_one_rounding():
    model = conv_bn_model(dtype=np.float16, elem=TensorProto.FLOAT16, bias=True)
    folded, _ = assert_folded(model, rtol=4e-3)
    a, t = _bn_affine(model)
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    w2 = numpy_helper.to_array(folded.graph.initializer[0])
    assert w2.dtype == np.float16
    # numpy rounds float64 -> float16 directly (correctly): the fold must agree bit for bit
    np.testing.assert_array_equal(w2, (w * a[:, None, None, None]).astype(np.float16))


def test_float16_gemm_and_matmul_bn():
    assert_folded(gemm_model(trans_b=1, beta=0.5, dtype=np.float16, elem=TensorProto.FLOAT16), rtol=4e-3)
    assert_folded(matmul_model(dtype=np.float16, elem=TensorProto.FLOAT16), rtol=4e-3)


def test_float64_gemm_and_matmul_bn():
    assert_folded(gemm_model(trans_b=0, alpha=0.5, beta=2.0, dtype=np.float64, elem=TensorProto.DOUBLE), rtol=1e-12)
    assert_folded(matmul_model(add_bias=(8,), dtype=np.float64, elem=TensorProto.DOUBLE), rtol=1e-12)


def _as_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every float16/bfloat16/float64 tensor and type changed to float32, so onnxruntime's CPU
    kernels (no bfloat16 Conv, no float64 Conv) can run what it describes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    wide = {TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    for init in m.graph.initializer:
        if init.data_type in wide:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    for v in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        if v.type.tensor_type.elem_type in wide:
            v.type.tensor_type.elem_type = F32
    return m


@pytest.mark.parametrize("dtype,elem", [(ml_dtypes.bfloat16, TensorProto.BFLOAT16), (np.float64, TensorProto.DOUBLE)])
@pytest.mark.parametrize("transpose", [False, True])
def test_bfloat16_and_float64_conv_bn(dtype, elem, transpose):
    model = conv_bn_model(dtype=dtype, elem=elem, bias=True, transpose=transpose, group=2, opset=22, cin=4, cout=6)
    folded = fold(model)
    assert folded.report["batchnorms"][0]["folded"]
    onnx.checker.check_model(folded.model, full_check=True)
    w2 = numpy_helper.to_array(folded.model.graph.initializer[0])
    assert w2.dtype == dtype
    a, t = _bn_affine(model)
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    if transpose:  # [C, M/g, k, k] with g = 2: output channel o = block * 3 + j
        scale = a.reshape(2, 1, 3, 1, 1)
        exact = (w.reshape(2, 2, 3, 3, 3) * scale).reshape(w.shape)
    else:
        exact = w * a[:, None, None, None]
    _half_ulp_ok(w2, exact, dtype)
    rtol = 1e-2 if dtype == ml_dtypes.bfloat16 else 1e-5
    assert_same_outputs(_as_float32(model), _as_float32(folded.model), rtol_of_range=rtol)


def test_bfloat16_gemm_bn():
    model = gemm_model(trans_b=1, beta=2.0, dtype=ml_dtypes.bfloat16, elem=TensorProto.BFLOAT16)
    folded = fold(model)
    assert folded.report["batchnorms"][0]["folded"]
    onnx.checker.check_model(folded.model, full_check=True)
    assert numpy_helper.to_array(folded.model.graph.initializer[0]).dtype == ml_dtypes.bfloat16
    assert_same_outputs(_as_float32(model), _as_float32(folded.model), rtol_of_range=1e-2)


def test_float16_overflow_keeps_bn():
    model = conv_bn_model(dtype=np.float16, elem=TensorProto.FLOAT16, bias=False)
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0, 0, 0, 0] = 60000.0
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    inits = {i.name: i for i in model.graph.initializer}
    inits["bn_scale"].CopyFrom(numpy_helper.from_array(np.full(6, 4.0, np.float16), "bn_scale"))
    inits["bn_var"].CopyFrom(numpy_helper.from_array(np.full(6, 1.0, np.float16), "bn_var"))
    entry = assert_kept(model, "overflow")
    assert "channel 0" in entry["message"]


# ---------------------------------------------------------------- BatchNormalization versions


def _with_bn_attrs(model, **attrs):
    bn = model.graph.node[-1]
    for k, v in attrs.items():
        bn.attribute.append(helper.make_attribute(k, v))
    return model


@pytest.mark.parametrize("opset", [7, 8, 9, 13, 14, 15, 17, 22])
def test_every_inference_bn_version_folds(opset):
    attrs = {"spatial": 1} if opset < 9 else {"training_mode": 0} if opset >= 14 else {}
    model = conv_bn_model(opset=opset, bn_attrs=attrs)
    assert_folded(model)


@pytest.mark.parametrize("opset,attrs", [(5, dict(is_test=1, consumed_inputs=[0, 0, 0, 1, 1])), (6, dict(is_test=1))])
def test_opset_1_to_6_bn_with_is_test_folds(opset, attrs):
    # onnxruntime does not run BatchNormalization before opset 7: the reference is the same graph at opset 7
    model = conv_bn_model(opset=opset, bn_attrs=attrs)
    reference = conv_bn_model(opset=7)
    for dst, src in zip(model.graph.initializer, reference.graph.initializer):
        dst.CopyFrom(src)
    folded = fold(model)
    assert folded.report["batchnorms"][0]["folded"], folded.report
    assert bn_count(folded.model) == 0
    onnx.checker.check_model(folded.model, full_check=True)
    assert_same_outputs(reference, folded.model)


@pytest.mark.parametrize("opset,attrs", [(6, {}), (6, dict(is_test=0)), (5, dict(consumed_inputs=[0, 0, 0, 1, 1]))])
def test_opset_1_to_6_bn_without_is_test_is_training_form(opset, attrs):
    entry = assert_kept(conv_bn_model(opset=opset, bn_attrs=attrs), "training-mode")
    assert "is_test" in entry["message"]


def test_spatial_0_keeps_bn():
    assert_kept(conv_bn_model(opset=8, bn_attrs=dict(spatial=0)), "not-per-channel")


def test_training_mode_1_keeps_bn():
    assert_kept(conv_bn_model(opset=15, bn_attrs=dict(training_mode=1)), "training-mode")


def test_bn_with_running_statistics_outputs_keeps_bn():
    model = conv_bn_model(opset=9)
    model.graph.node[-1].output.extend(["rm", "rv"])
    assert_kept(model, "training-form")


def test_opset15_mixed_dtypes_float16_data_float32_statistics():
    # T = float16 (X, Y), T1 = float32 (scale, B), T2 = float32 (mean, var)
    model = conv_bn_model(opset=15, dtype=np.float16, elem=TensorProto.FLOAT16)
    for init in model.graph.initializer:
        if init.name.startswith("bn_"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    folded, _ = assert_folded(model, rtol=4e-3)
    assert numpy_helper.to_array(folded.graph.initializer[0]).dtype == np.float16


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


# ---------------------------------------------------------------- subgraphs and functions


def _branch(tag: str, weight_name: str, bias_name: str | None):
    """A branch graph: Conv (weights possibly from the outer scope) -> BN (parameters local) -> output."""
    inits = bn_params(f"{tag}_bn", 6)
    inputs = ["x", weight_name] + ([bias_name] if bias_name else [])
    nodes = [helper.make_node("Conv", inputs, [f"{tag}_y"], name=f"{tag}_conv", pads=[1, 1, 1, 1]),
             bn_node(f"{tag}_y", f"{tag}_z", f"{tag}_bn")]
    return helper.make_graph(nodes, tag, [], [vi(f"{tag}_z", [1, 6, 5, 5])], initializer=inits)


def test_if_branches_fold_with_outer_weights_left_untouched():
    then_g = _branch("then", "W", "B")
    else_inits = [weight("We", [6, 4, 3, 3])]
    else_g = _branch("else", "We", None)
    else_g.initializer.extend(else_inits)
    outer = [weight("W", [6, 4, 3, 3]), weight("B", [6])]
    nodes = [helper.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g, name="if"),
             # the outer W is also read in the main graph
             helper.make_node("Conv", ["x", "W", "B"], ["main_y"], name="main_conv", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vi("x", [1, 4, 5, 5]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                       [vi("out", [1, 6, 5, 5]), vi("main_y", [1, 6, 5, 5])], outer)
    folded = fold(model)
    assert [e["graph"] for e in folded.report["batchnorms"]] == ["main/if:then_branch", "main/if:else_branch"] or all(
        e["graph"].startswith("main/") for e in folded.report["batchnorms"])
    assert all(e["folded"] for e in folded.report["batchnorms"])
    assert bn_count(folded.model) == 0
    onnx.checker.check_model(folded.model, full_check=True)
    outer_after = {i.name: numpy_helper.to_array(i) for i in folded.model.graph.initializer}
    for init in outer:
        np.testing.assert_array_equal(outer_after[init.name], numpy_helper.to_array(init))
    for cond in (True, False):
        feeds = random_inputs(model)
        feeds["cond"] = np.array(cond)
        assert_same_outputs(model, folded.model, feeds=feeds)


def test_outer_weight_read_only_by_the_branches_is_dropped_once_both_folded():
    # Both branches read the outer W and B; each fold writes new tensors in its branch, after which nothing
    # reads the outer ones, so they go (an unused initializer would only bloat the model).
    model = make_model(
        [helper.make_node("If", ["cond"], ["out"], then_branch=_branch("then", "W", "B"),
                          else_branch=_branch("else", "W", "B"), name="if")],
        [vi("x", [1, 4, 5, 5]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [vi("out", [1, 6, 5, 5])], [weight("W", [6, 4, 3, 3]), weight("B", [6])])
    folded = fold(model)
    assert [e["folded"] for e in folded.report["batchnorms"]] == [True, True]
    assert [i.name for i in folded.model.graph.initializer] == []
    onnx.checker.check_model(folded.model, full_check=True)
    for cond in (True, False):
        feeds = random_inputs(model)
        feeds["cond"] = np.array(cond)
        assert_same_outputs(model, folded.model, feeds=feeds)


def test_outer_weight_still_read_by_one_branch_stays():
    then_g = _branch("then", "W", None)
    else_g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["else_z"], pads=[1, 1, 1, 1])], "else", [],
                               [vi("else_z", [1, 6, 5, 5])])
    model = make_model(
        [helper.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g, name="if")],
        [vi("x", [1, 4, 5, 5]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [vi("out", [1, 6, 5, 5])], [weight("W", [6, 4, 3, 3])])
    folded = fold(model)
    assert [e["folded"] for e in folded.report["batchnorms"]] == [True]
    assert [i.name for i in folded.model.graph.initializer] == ["W"]
    for cond in (True, False):
        feeds = random_inputs(model)
        feeds["cond"] = np.array(cond)
        assert_same_outputs(model, folded.model, feeds=feeds)


def test_loop_and_scan_bodies_fold():
    # Loop body: (iter, cond, carried) -> Conv -> BN -> carried
    body_inits = [weight("Wl", [4, 4, 3, 3])] + bn_params("lbn", 4)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Conv", ["carried", "Wl"], ["ly"], pads=[1, 1, 1, 1], name="loop_conv"),
         bn_node("ly", "carried_out", "lbn")],
        "loop_body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                      helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), vi("carried", [1, 4, 5, 5])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), vi("carried_out", [1, 4, 5, 5])],
        initializer=body_inits)
    # Scan body: one [4] row at a time through MatMul -> BN? BN needs [N, C]: use a Gemm on [1, 4] rows
    scan_inits = [weight("Ws", [4, 4])] + bn_params("sbn", 4)
    scan_body = helper.make_graph(
        [helper.make_node("Gemm", ["row", "Ws"], ["sy"], name="scan_gemm"), bn_node("sy", "srow", "sbn")],
        "scan_body", [vi("row", [1, 4])], [vi("srow", [1, 4])], initializer=scan_inits)
    nodes = [helper.make_node("Loop", ["trip", "", "x"], ["looped"], body=body, name="loop"),
             helper.make_node("Scan", ["rows"], ["scanned"], body=scan_body, num_scan_inputs=1, name="scan")]
    model = make_model(nodes, [helper.make_tensor_value_info("trip", TensorProto.INT64, []), vi("x", [1, 4, 5, 5]),
                               vi("rows", [3, 1, 4])], [vi("looped", [1, 4, 5, 5]), vi("scanned", [3, 1, 4])], [], opset=17)
    folded = fold(model)
    assert len(folded.report["batchnorms"]) == 2 and all(e["folded"] for e in folded.report["batchnorms"]), folded.report
    assert bn_count(folded.model) == 0
    onnx.checker.check_model(folded.model, full_check=True)
    feeds = random_inputs(model)
    feeds["trip"] = np.array(3, dtype=np.int64)
    assert_same_outputs(model, folded.model, feeds=feeds)


def test_model_local_function_with_constant_nodes_folds_including_a_chain():
    w = numpy_helper.from_array((RNG.standard_normal([6, 4, 3, 3]) * 0.5).astype(np.float32), "w")
    params = bn_params("f1", 6) + bn_params("f2", 6)
    consts = [helper.make_node("Constant", [], ["fw"], value=w)]
    for p in params:
        consts.append(helper.make_node("Constant", [], [p.name], value=p))
    fn_nodes = consts + [helper.make_node("Conv", ["fx", "fw"], ["fy"], pads=[1, 1, 1, 1], name="fconv"),
                         bn_node("fy", "fz", "f1"), bn_node("fz", "fout", "f2")]
    fn = helper.make_function("local", "ConvBN", ["fx"], ["fout"], fn_nodes, [helper.make_opsetid("", 17)])
    model = make_model([helper.make_node("ConvBN", ["x"], ["out"], domain="local", name="call")],
                       [vi("x", [1, 4, 5, 5])], [vi("out", None)], [],
                       functions=[fn], extra_opsets=[helper.make_opsetid("local", 1)])
    folded = fold(model)
    assert [e["graph"].startswith("function:") for e in folded.report["batchnorms"]] == [True, True]
    assert all(e["folded"] for e in folded.report["batchnorms"]), folded.report
    assert bn_count(folded.model) == 0
    f = folded.model.functions[0]
    assert [n.op_type for n in f.node].count("Constant") == 2  # the folded W and B; the BN parameters are gone
    onnx.checker.check_model(folded.model, full_check=True)
    assert_same_outputs(model, folded.model)


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
