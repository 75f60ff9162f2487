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
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native
from qdqfold_native import FoldError

from helpers.onnxrt import random_inputs, run
from helpers.wire import length_delimited as field, varint

SANITIZED = bool(os.environ.get("QDQFOLD_SANITIZED"))
RNG = np.random.default_rng(1)


# ------------------------------------------------------------------------------------------------ builders

def bn_tensors(channels: int, *, scale=None, bias=None, mean=None, var=None, dtype=np.float32, prefix="bn"):
    values = {
        "scale": RNG.uniform(0.5, 1.5, channels) * np.where(np.arange(channels) % 2, -1, 1) if scale is None else scale,
        "bias": RNG.uniform(-1, 1, channels) if bias is None else bias,
        "mean": RNG.uniform(-1, 1, channels) if mean is None else mean,
        "var": RNG.uniform(0.5, 2, channels) if var is None else var,
    }
    return [numpy_helper.from_array(np.asarray(v, dtype), f"{prefix}_{k}") for k, v in values.items()]


def bn_node(x="c", y="y", prefix="bn", **attrs):
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var")],
                            [y], name=prefix, **attrs)


def make(nodes, inputs, outputs, initializers=(), opset=17, value_info=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def conv_bn(channels=3, *, weight=None, conv_bias=True, eps=1e-5, dtype=np.float32, elem=TensorProto.FLOAT, **bn) -> onnx.ModelProto:
    """x[1,C,4,4] -> Conv(3x3, pad 1) -> BN -> y."""
    w = RNG.standard_normal((channels, channels, 3, 3)) if weight is None else weight
    inits = [numpy_helper.from_array(np.asarray(w, dtype), "w")] + bn_tensors(channels, dtype=dtype, **bn)
    conv_inputs = ["x", "w"]
    if conv_bias:
        inits.append(numpy_helper.from_array(RNG.standard_normal(channels).astype(dtype), "b"))
        conv_inputs.append("b")
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1]), bn_node(epsilon=eps)]
    return make(nodes, [helper.make_tensor_value_info("x", elem, [1, channels, 4, 4])],
                [helper.make_tensor_value_info("y", elem, [1, channels, 4, 4])], inits)


def initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def _folds_are_registered() -> bool:
    _, report = qdqfold_native.fold_with_report(serialize(conv_bn()))
    return report["batchnorms"][0]["code"] != "not-implemented"


# Until the first fold was registered every BN was kept as "not-implemented"; the reason-code checks below
# are strict once one is (the byte-identity checks are strict either way), and the test after this says
# that one is.
FOLDS = _folds_are_registered()


def test_the_reason_code_checks_are_live():
    assert FOLDS, "a plain Conv -> BN is no longer folded: the hostile tests' reason checks would go quiet"


# ------------------------------------------------------------------------------------------------ checks

def assert_kept_unchanged(data: bytes, codes: set[str] | None = None, **options) -> dict:
    """Every BN is kept, with a reason from `codes` (when folds exist), and the model comes back byte-identical."""
    out, report = qdqfold_native.fold_with_report(data, **options)
    assert report["batchnorms"], "the model's BN is not in the report"
    for entry in report["batchnorms"]:
        assert entry["folded"] is False, f"{entry['node']} was folded: {entry}"
        assert entry["code"] and entry["message"]
        if FOLDS and codes is not None:
            assert entry["code"] in codes, f"{entry['node']}: {entry['code']} ({entry['message']}), expected {codes}"
    assert out == data
    return report


def assert_same_or_nan(original: bytes, folded: bytes, rtol_of_range: float = 1e-5) -> None:
    """Outputs agree within `rtol_of_range` of the finite range, and NaN/Inf sit in the same places."""
    feeds = random_inputs(original)
    for e, a in zip(run(original, feeds), run(folded, feeds)):
        e64, a64 = e.astype(np.float64), a.astype(np.float64)
        assert np.array_equal(np.isnan(e64), np.isnan(a64))
        assert np.array_equal(np.isinf(e64), np.isinf(a64)) and np.array_equal(e64[np.isinf(e64)], a64[np.isinf(a64)])
        finite = np.isfinite(e64)
        if finite.any():
            span = float(np.ptp(e64[finite]))
            err = float(np.max(np.abs(e64[finite] - a64[finite])))
            assert err <= rtol_of_range * max(span, 1e-12), f"error {err} exceeds {rtol_of_range} of range {span}"


def assert_safe(data: bytes, *, runs_in_ort: bool = True, rtol_of_range: float = 1e-5, **options) -> str:
    """FoldError, or an unchanged model with every BN kept, or (when onnxruntime runs the model) a folded
    model that computes the same. Returns "error", "kept" or "folded"."""
    try:
        out, report = qdqfold_native.fold_with_report(data, **options)
    except FoldError as e:
        assert str(e)
        return "error"
    if not any(entry["folded"] for entry in report["batchnorms"]):
        assert out == data
        return "kept"
    assert runs_in_ort, f"folded a model onnxruntime cannot run: {report}"
    assert_same_or_nan(data, out, rtol_of_range)
    return "folded"


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


def _qdq_conv_bn(per_channel=True, q_dtype=np.int8, scale_len=None, axis=0) -> onnx.ModelProto:
    """int W -> DequantizeLinear -> Conv -> BN (onnxruntime quantize_static's weight form)."""
    c = 4
    info = np.iinfo(q_dtype)
    q = RNG.integers(info.min, info.max + 1, size=(c, c, 1, 1)).astype(q_dtype)
    n = scale_len if scale_len is not None else (c if per_channel else 1)
    shape = (n,) if per_channel or scale_len is not None else ()
    inits = [numpy_helper.from_array(q, "wq"),
             numpy_helper.from_array(RNG.uniform(0.01, 0.1, shape).astype(np.float32), "ws"),
             numpy_helper.from_array(np.zeros(shape, q_dtype), "wz")] + bn_tensors(c)
    attrs = {"axis": axis} if per_channel else {}
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="dq_w", **attrs),
             helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node()]
    return make(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 3, 3])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 3, 3])], inits)


@pytest.mark.parametrize("q_dtype", [np.int8, np.uint8])
def test_quantized_weight_in_int32_data(q_dtype):
    model = _qdq_conv_bn(q_dtype=q_dtype)
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


# ------------------------------------------------------------------------------------------------ values

def test_scale_of_the_wrong_length():
    model = conv_bn()
    t = initializer(model, "bn_scale")
    t.CopyFrom(numpy_helper.from_array(np.ones(4, np.float32), "bn_scale"))  # 3 channels
    assert_kept_unchanged(serialize(model), {"shape-mismatch"})


@pytest.mark.parametrize("scale_len", [3, 5, 1])
def test_quantization_scale_of_the_wrong_length(scale_len):
    model = _qdq_conv_bn(scale_len=scale_len)
    assert assert_safe(serialize(model), runs_in_ort=scale_len == 1) in (("error", "kept") if scale_len != 1 else
                                                                          ("error", "kept", "folded"))


@pytest.mark.parametrize("var, eps", [(0.0, 0.0), (-1.0, 1e-5), (-1e-5, 1e-5), (-3.0, 0.0)])
def test_zero_or_negative_variance_keeps_the_batchnorm(var, eps):
    model = conv_bn(var=np.array([1.0, var, 1.0]), eps=eps)
    assert_kept_unchanged(serialize(model), {"non-positive-variance"})


def test_zero_variance_with_a_positive_epsilon_folds_exactly():
    model = conv_bn(var=np.zeros(3), eps=1e-3)
    result = assert_safe(serialize(model))
    if FOLDS:
        assert result == "folded"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("parameter", ["scale", "bias", "mean", "var"])
def test_non_finite_batchnorm_parameter_keeps_the_batchnorm(parameter, value):
    values = RNG.uniform(0.5, 1.5, 3)
    values[1] = value
    model = conv_bn(**{parameter: values})
    assert_kept_unchanged(serialize(model), {"non-finite-parameters", "non-positive-variance"})


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["w", "b"])
def test_non_finite_layer_weight_folds_to_the_same_outputs_or_stays(where, value):
    model = conv_bn()
    t = initializer(model, where)
    a = numpy_helper.to_array(t).copy()
    a.flat[1] = value
    t.CopyFrom(numpy_helper.from_array(a, where))
    assert assert_safe(serialize(model)) in ("kept", "folded")


def test_huge_finite_parameters_that_overflow_float32_when_folded():
    """a = gamma / sqrt(var + eps) is finite in double but the folded weight overflows float32: keep."""
    model = conv_bn(scale=np.array([3e38, 1.0, 1.0]), var=np.array([1e-30, 1.0, 1.0]), eps=0.0)
    assert assert_safe(serialize(model), runs_in_ort=True) in ("kept", "folded")


# ------------------------------------------------------------------------------------------------ attributes

@pytest.mark.parametrize("axis", [4, 7, -5, 2**40, -(2**62)])
def test_dequantize_axis_out_of_range(axis):
    data = serialize(_qdq_conv_bn(axis=axis))
    assert assert_safe(data, runs_in_ort=False) in ("error", "kept")


@pytest.mark.parametrize("attrs", [{"group": 0}, {"group": 2}, {"group": -3}, {"group": 2**40}])
def test_conv_groups_that_do_not_fit_the_weight(attrs):
    model = conv_bn()
    model.graph.node[0].attribute.append(helper.make_attribute("group", attrs["group"]))
    assert assert_safe(serialize(model), runs_in_ort=False) in ("error", "kept")


@pytest.mark.parametrize("attrs", [{"pads": [1, 1]}, {"strides": [0, 0]}, {"dilations": [-1, 1]}, {"kernel_shape": [9]}])
def test_conv_geometry_that_makes_no_sense(attrs):
    """A backward fold only scales weight slices: the geometry does not enter it, and must come out as it was."""
    model = conv_bn()
    conv = model.graph.node[0]
    kept = [a for a in conv.attribute if a.name not in attrs]
    del conv.attribute[:]
    conv.attribute.extend(kept + [helper.make_attribute(k, v) for k, v in attrs.items()])
    data = serialize(model)
    try:
        out, report = qdqfold_native.fold_with_report(data)
    except FoldError:
        return
    if report["batchnorms"][0]["folded"]:
        folded_conv = next(n for n in onnx.load_from_string(out).graph.node if n.op_type == "Conv")
        assert list(folded_conv.attribute) == list(conv.attribute)
        # Fold the same model with sane geometry: the weights must come out the same.
        sane = onnx.load_from_string(data)
        sane_conv = sane.graph.node[0]
        del sane_conv.attribute[:]
        sane_conv.attribute.extend(kept)
        reference = onnx.load_from_string(qdqfold_native.fold(serialize(sane)))
        assert {t.name: t.raw_data for t in onnx.load_from_string(out).graph.initializer} == \
            {t.name: t.raw_data for t in reference.graph.initializer}
    else:
        assert out == data


@pytest.mark.parametrize("axis", [9, -9, 2**62])
def test_flatten_axis_out_of_range_between_batchnorm_and_gemm(axis):
    c = 3
    inits = [numpy_helper.from_array(RNG.standard_normal((2, c * 4)).astype(np.float32), "w")] + bn_tensors(c)
    nodes = [bn_node("x", "n"), helper.make_node("Flatten", ["n"], ["f"], axis=axis),
             helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    model = make(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 2, 2])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    assert assert_safe(serialize(model), runs_in_ort=False) in ("error", "kept")


def test_gemm_with_a_transb_that_is_neither_0_nor_1_and_matmul_of_rank_3():
    k, n = 4, 3
    inits = [numpy_helper.from_array(RNG.standard_normal((n, k)).astype(np.float32), "w")] + bn_tensors(n)
    model = make([helper.make_node("Gemm", ["x", "w"], ["c"], transB=7), bn_node()],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    assert assert_safe(serialize(model), runs_in_ort=True) in ("error", "kept", "folded")
    inits = [numpy_helper.from_array(RNG.standard_normal((2, k, n)).astype(np.float32), "w")] + bn_tensors(n)
    model = make([helper.make_node("MatMul", ["x", "w"], ["c"]), bn_node()],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, k])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    assert_safe(serialize(model), runs_in_ort=False)


def test_batchnorm_without_inputs_or_outputs():
    model = conv_bn()
    bn = model.graph.node[1]
    del bn.input[3:]
    assert_kept_unchanged(serialize(model), {"malformed"})
    model = conv_bn()
    del model.graph.node[1].output[:]
    assert assert_safe(serialize(model), runs_in_ort=False) in ("error", "kept")


# ------------------------------------------------------------------------------------------------ names

def test_duplicate_initializer_names_fold_as_onnxruntime_reads_them():
    """onnxruntime takes the last initializer of a name: a fold must read (and replace) that one, or keep."""
    model = conv_bn()
    first = bn_tensors(3, prefix="bn")
    model.graph.initializer.insert(0, first[0])  # an earlier bn_scale with other values
    model.graph.initializer.insert(0, numpy_helper.from_array(np.zeros((3, 3, 3, 3), np.float32), "w"))
    assert assert_safe(serialize(model)) in ("error", "kept", "folded")


def test_two_nodes_writing_the_same_value():
    model = conv_bn()
    model.graph.node.insert(0, helper.make_node("Relu", ["x"], ["c"], name="also_c"))
    assert assert_safe(serialize(model), runs_in_ort=False) in ("error", "kept")


def test_node_output_named_like_an_initializer():
    model = conv_bn()
    model.graph.node.insert(0, helper.make_node("Relu", ["x"], ["bn_scale"], name="shadow"))
    assert assert_safe(serialize(model), runs_in_ort=False) in ("error", "kept")


def test_reading_a_value_nothing_produces():
    for missing in ("bn_mean", "w"):
        model = conv_bn()
        model.graph.initializer.remove(initializer(model, missing))
        assert assert_safe(serialize(model), runs_in_ort=False) in ("error", "kept")


def test_layer_input_that_nothing_produces():
    model = conv_bn()
    model.graph.node[0].input[0] = "ghost"
    assert assert_safe(serialize(model), runs_in_ort=False) in ("error", "kept")


@pytest.mark.parametrize("loop", ["conv-reads-bn", "bn-reads-itself", "three-node"])
def test_graph_cycle(loop):
    model = conv_bn()
    conv, bn = model.graph.node[0], model.graph.node[1]
    if loop == "conv-reads-bn":
        conv.input[0] = "y"
    elif loop == "bn-reads-itself":
        bn.input[0] = "y"
    else:
        conv.input[0] = "r"
        model.graph.node.append(helper.make_node("Relu", ["y"], ["r"], name="relu"))
    assert assert_safe(serialize(model), runs_in_ort=False) in ("error", "kept")


# ------------------------------------------------------------------------------------------------ size

def _many_nodes(blocks: int, channels: int = 2) -> bytes:
    """`blocks` x (Conv 1x1 -> BN -> Relu -> Identity): 4 * blocks nodes, every value in value_info."""
    nodes, inits, infos = [], [], []
    x = "x"
    for k in range(blocks):
        p = f"b{k}"
        inits.append(numpy_helper.from_array(RNG.standard_normal((channels, channels, 1, 1)).astype(np.float32), p + "_w"))
        inits += bn_tensors(channels, prefix=p)
        nodes += [helper.make_node("Conv", [x, p + "_w"], [p + "_c"], name=p + "_conv"),
                  bn_node(p + "_c", p + "_n", prefix=p),
                  helper.make_node("Relu", [p + "_n"], [p + "_r"], name=p + "_relu"),
                  helper.make_node("Identity", [p + "_r"], [p + "_i"], name=p + "_id")]
        infos += [helper.make_tensor_value_info(p + s, TensorProto.FLOAT, [1, channels, 2, 2]) for s in ("_c", "_n", "_r")]
        x = p + "_i"
    model = make(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 2, 2])],
                 [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, 2, 2])], inits, value_info=infos)
    return serialize(model)


def test_hundred_thousand_nodes():
    data = _many_nodes(25_000)
    out, report = qdqfold_native.fold_with_report(data)
    assert len(report["batchnorms"]) == 25_000
    folded = sum(b["folded"] for b in report["batchnorms"])
    if folded == 0:
        assert out == data
    else:  # the same model, BN by BN: check the node counts here and the arithmetic on a smaller copy
        model = onnx.load_from_string(out)
        assert len(model.graph.node) == 100_000 - folded
        small = _many_nodes(50)
        assert_same_or_nan(small, qdqfold_native.fold(small))


def test_fold_time_grows_linearly_with_model_size():
    """Not a timing assertion on the machine's speed: the ratio between two sizes rules out quadratic work."""
    if SANITIZED:
        pytest.skip("timing under ASan says nothing")
    def best_time(data: bytes) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            qdqfold_native.fold(data)
            times.append(time.perf_counter() - start)
        return min(times)
    small, large = _many_nodes(2_500), _many_nodes(20_000)
    ratio = best_time(large) / best_time(small)
    assert ratio < 8 * 4, f"8x the model took {ratio:.1f}x the time"  # quadratic would be ~64x


def _nested(depth: int, innermost: bytes) -> bytes:
    """`innermost` (a GraphProto payload) inside `depth` If then-branches; built on the wire, as protobuf
    refuses such depth."""
    graph = innermost
    for k in range(depth):
        attribute = field(1, b"then_branch") + bytes([0xA0, 0x01, 5]) + field(6, graph)
        else_attr = field(1, b"else_branch") + bytes([0xA0, 0x01, 5]) + field(6, innermost)
        out = f"y{k}".encode()
        node = field(1, b"cond") + field(2, out) + field(3, f"if{k}".encode()) + field(4, b"If")
        graph = field(1, node + field(5, attribute) + field(5, else_attr))
        graph += field(12, serialize(helper.make_tensor_value_info(out.decode(), TensorProto.FLOAT, None)))
    return graph


def test_nesting_of_subgraphs_a_hundred_deep_with_a_fold_at_the_bottom():
    inner_model = conv_bn()
    inner = inner_model.graph
    inner.ClearField("input")
    body = helper.make_graph(list(inner.node), "body", [], list(inner.output), initializer=list(inner.initializer))
    graph = _nested(99, serialize(body))
    inputs = field(11, serialize(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))) + \
        field(11, serialize(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])))
    data = bytes([0x08, 0x08]) + field(7, graph + inputs) + field(8, bytes([0x10, 17]))
    out, report = qdqfold_native.fold_with_report(data)
    bns = report["batchnorms"]
    assert len(bns) == 100  # one in each else-branch and one at the bottom
    assert max(b["graph"].count("/") for b in bns) == 99
    if not any(b["folded"] for b in bns):
        assert out == data
    else:  # the output must itself be a model qdqfold reads back unchanged, with fewer BNs
        assert qdqfold_native.fold(out, fold_backward=False, fold_forward=False) == out
        _, again = qdqfold_native.fold_with_report(out)
        assert len(again["batchnorms"]) < len(bns)
