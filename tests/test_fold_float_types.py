"""Float folds by element type (float16, bfloat16, float64) and by BatchNormalization version (issue 3).

The same method as test_fold_float.py: onnxruntime's outputs (optimisations off) of the original and the folded model.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers.build import F32, bn_count, gemm_model
from helpers.float_layers import assert_kept, conv_bn_model, matmul_model
from helpers.folding import assert_folded, fold
from helpers.onnxrt import assert_same_outputs


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
