"""Hostile and odd models. Each one gets a FoldError naming the problem, or comes back with its
BatchNormalization kept (reported, with a reason) and the model byte-identical; where a fold is legitimate
(e.g. weights given in float_data), the folded model must compute what the original computes in onnxruntime.
Never a crash, a hang, an allocation larger than the input warrants, or a silently changed output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native
from qdqfold_native import FoldError

from helpers.hostile import (FOLDS, RNG, SANITIZED, assert_safe, bn_node, bn_tensors, conv_bn, initializer, make,
                             qdq_conv_bn, serialize)
from helpers.wire import length_delimited as field, varint


def test_the_reason_code_checks_are_live():
    assert FOLDS, "a plain Conv -> BN is no longer folded: the hostile tests' reason checks would go quiet"


# ------------------------------------------------------------------------------------------------ the wire

def test_length_past_the_end_of_the_enclosing_message_but_inside_the_file():
    node = field(1, b"x") + field(2, b"y") + field(4, b"Identity")
    lying_node = varint(1 << 3 | 2) + varint(len(node) + 40) + node  # runs 40 bytes into what follows the graph
    opset = field(8, bytes([0x10, 17]))
    data = bytes([0x08, 0x08]) + field(7, lying_node) + opset + field(14, field(1, b"k") + field(2, b"v" * 64))  # bytes do follow
    with pytest.raises(FoldError, match="declares"):
        qdqfold_native.fold(data)


@pytest.mark.parametrize("length", [2**31, 2**32 + 5, 2**62, 2**64 - 1])
def test_raw_data_declaring_far_more_bytes_than_the_file_holds(length):
    tensor = varint(1 << 3) + varint(3) + varint(2 << 3) + varint(1) + varint(9 << 3 | 2) + varint(length) + b"\0" * 12
    data = bytes([0x08, 0x08]) + field(7, field(5, tensor) + field(1, field(4, b"Relu"))) + field(8, bytes([0x10, 17]))
    with pytest.raises(FoldError, match="declares|varint"):
        qdqfold_native.fold(data)


# ------------------------------------------------------------------------------------------------ dims

@pytest.mark.parametrize("dims", [[2**32, 2**32], [2**40, 2**40, 2**40], [3, 2**62, 3]])
def test_dims_whose_product_overflows(dims):
    model = conv_bn()
    initializer(model, "bn_var").dims[:] = dims
    with pytest.raises(FoldError, match="bn_var.*overflows"):
        qdqfold_native.fold(serialize(model))


@pytest.mark.parametrize("dims, dtype", [
    ([2**62], TensorProto.FLOAT),       # 2**62 * 4 bytes wraps to 0 in 64 bits
    ([2**61], TensorProto.DOUBLE),      # 2**61 * 8 wraps to 0
    ([2**60, 4], TensorProto.FLOAT),    # 2**62 elements
    ([2**60], TensorProto.COMPLEX128),  # 2**60 * 16 wraps to 0
])
def test_byte_size_that_wraps_to_the_actual_raw_data_size(dims, dtype):
    """dims * element size overflowing 64 bits must not pass for an empty raw_data."""
    model = conv_bn()
    t = initializer(model, "bn_mean")
    t.dims[:] = dims
    t.data_type = dtype
    t.raw_data = b""
    with pytest.raises(FoldError, match="bn_mean"):
        qdqfold_native.fold(serialize(model))


def test_negative_dims_in_a_batchnorm_parameter_and_in_a_weight():
    for name in ("bn_scale", "w"):
        model = conv_bn()
        initializer(model, name).dims[0] = -3
        with pytest.raises(FoldError, match=f"{name}.*negative dimension"):
            qdqfold_native.fold(serialize(model))


def _fold_under_memory_limit(data: bytes, tmp_path, limit_mb: int = 400) -> str:
    """Folds `data` in a child process whose address space is capped: prints 'error', 'kept' or 'folded'."""
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    code = textwrap.dedent(f"""
        import resource, sys
        import qdqfold_native
        data = open({str(path)!r}, "rb").read()
        resource.setrlimit(resource.RLIMIT_AS, ({limit_mb} << 20, {limit_mb} << 20))
        try:
            out, report = qdqfold_native.fold_with_report(data)
        except qdqfold_native.FoldError:
            print("error")
        else:
            print("folded" if any(b["folded"] for b in report["batchnorms"]) else
                  ("kept" if out == data else "changed"))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


@pytest.mark.skipif(SANITIZED, reason="ASan reserves terabytes of address space: RLIMIT_AS cannot apply")
@pytest.mark.parametrize("name", ["bn_var", "w", "b"])
@pytest.mark.parametrize("count", [2**40, 2**33, 10**8])
def test_typed_data_claiming_huge_dims_allocates_nothing_large(name, count, tmp_path):
    """A tensor with dims of 2**40 elements and one value in float_data: the bytes are 20, so is the memory."""
    model = conv_bn()
    t = initializer(model, name)
    t.ClearField("raw_data")
    t.dims[:] = [count]
    t.float_data.append(1.0)
    assert _fold_under_memory_limit(serialize(model), tmp_path) in ("error", "kept")


# ------------------------------------------------------------------------------------------------ data fields

@pytest.mark.parametrize("cut, extra", [(4, b""), (0, b"\0\0\0\0"), (1, b""), (0, b"\0")])
@pytest.mark.parametrize("name", ["bn_scale", "bn_var", "w", "b"])
def test_raw_data_shorter_or_longer_than_its_dims(name, cut, extra):
    model = conv_bn()
    t = initializer(model, name)
    t.raw_data = t.raw_data[:len(t.raw_data) - cut] + extra
    with pytest.raises(FoldError, match=f"'{name}': raw_data holds"):
        qdqfold_native.fold(serialize(model))


def test_raw_data_of_the_wrong_size_in_a_constant_node():
    model = conv_bn()
    t = initializer(model, "bn_scale")
    t.raw_data = t.raw_data[:-4]
    model.graph.initializer.remove(t)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["bn_scale"], name="scale_const", value=t))
    data = serialize(model)
    # The Constant's tensor is read when a fold asks for it: a FoldError then, or the BN kept.
    assert assert_safe(data, runs_in_ort=False) in ("error", "kept")


def _to_typed(t: onnx.TensorProto) -> None:
    """Moves a tensor's values from raw_data into its typed *_data field, as old exporters write them."""
    values = numpy_helper.to_array(t)
    t.ClearField("raw_data")
    if values.dtype == np.float32:
        t.float_data.extend(values.ravel().tolist())
    elif values.dtype == np.float64:
        t.double_data.extend(values.ravel().tolist())
    elif values.dtype == np.float16:
        t.int32_data.extend(values.ravel().view(np.uint16).tolist())
    elif values.dtype == np.int64:
        t.int64_data.extend(values.ravel().tolist())
    else:  # int8 / uint8 / int16 / int32 / bool
        t.int32_data.extend(values.ravel().astype(np.int32).tolist())


@pytest.mark.parametrize("dtype, elem", [(np.float32, TensorProto.FLOAT), (np.float16, TensorProto.FLOAT16)])
def test_typed_data_fields_instead_of_raw_data(dtype, elem):
    model = conv_bn(dtype=dtype, elem=elem)
    for t in model.graph.initializer:
        _to_typed(t)
    data = serialize(model)
    # float16 weights are rounded once more when folded: half an ulp of float16 is 2**-11 of the value.
    result = assert_safe(data, rtol_of_range=1e-5 if dtype == np.float32 else 4e-3)
    if FOLDS:
        assert result == "folded"


def test_double_data_in_a_float64_gemm():
    k, n = 5, 3
    inits = [numpy_helper.from_array(RNG.standard_normal((n, k)), "w"), numpy_helper.from_array(RNG.standard_normal(n), "c0")]
    inits += bn_tensors(n, dtype=np.float64)
    for t in inits:
        _to_typed(t)
    model = make([helper.make_node("Gemm", ["x", "w", "c0"], ["c"], transB=1), bn_node()],
                 [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, k])],
                 [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, n])], inits)
    result = assert_safe(serialize(model))
    if FOLDS:
        assert result == "folded"


@pytest.mark.parametrize("q_dtype", [np.int8, np.uint8])
def test_quantized_weight_in_int32_data(q_dtype):
    model = qdq_conv_bn(q_dtype=q_dtype)
    for name in ("wq", "wz"):
        _to_typed(initializer(model, name))
    assert_safe(serialize(model))


def test_typed_data_with_fewer_values_than_dims_say():
    for name in ("bn_mean", "w"):
        model = conv_bn()
        t = initializer(model, name)
        _to_typed(t)
        del t.float_data[-1]
        assert assert_safe(serialize(model), runs_in_ort=False) in ("error", "kept")


def test_values_in_a_data_field_of_the_wrong_type():
    model = conv_bn()
    t = initializer(model, "bn_var")
    values = numpy_helper.to_array(t)
    t.ClearField("raw_data")
    t.int64_data.extend([1] * values.size)  # int64_data on a float tensor
    assert assert_safe(serialize(model), runs_in_ort=False) in ("error", "kept")
