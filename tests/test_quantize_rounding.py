"""The QAT fold predicts QuantizeLinear's integers exactly, on the values where rounding is delicate.

The fold quantizes each float weight once (in float32 lanes for 8- and 16-bit types, see
kernels/quantized.cpp) to write W' = (q' - z') * s'. Weights here sit on and next to rounding ties, on the
range's ends, far outside it, at +-Inf and NaN; the folded weight must re-quantize to the integers of a numpy
reference of QuantizeLinear (round half to even of x / s in float32, plus z, clamped), negated where the BN
factor is negative.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native

TYPES = {  # onnx type: (numpy type, lo, hi, opset)
    TensorProto.INT8: (np.int8, -128, 127, 17),
    TensorProto.UINT8: (np.uint8, 0, 255, 17),
    TensorProto.INT16: (np.int16, -32768, 32767, 21),
    TensorProto.UINT16: (np.uint16, 0, 65535, 21),
}


def reference_quantize(x: np.ndarray, s: np.float32, z: int, lo: int, hi: int) -> np.ndarray:
    ratio = (x.astype(np.float32) / s).astype(np.float64)
    q = np.rint(ratio) + z  # rint: ties to even
    q = np.where(np.isnan(ratio), z, q)
    return np.clip(q, lo, hi).astype(np.int64)


def delicate_weights(s: float, z: int, lo: int, hi: int, count: int) -> np.ndarray:
    s32 = np.float32(s)
    ks = np.arange(lo - z - 3, hi - z + 3, dtype=np.float64)
    ks = ks[np.linspace(0, len(ks) - 1, min(len(ks), 300)).astype(int)]
    ties = (ks + 0.5) * s32
    near = np.concatenate([np.nextafter(ties.astype(np.float32), np.float32(np.inf)),
                           np.nextafter(ties.astype(np.float32), np.float32(-np.inf))])
    exact = ks * s32
    special = np.array([0.0, -0.0, 1e30, -1e30, np.inf, -np.inf, np.nan, (hi - z + 0.5) * s, (lo - z - 0.5) * s])
    values = np.concatenate([ties, near, exact, special]).astype(np.float32)
    return np.resize(values, count)


@pytest.mark.parametrize("onnx_type", list(TYPES), ids=lambda t: TensorProto.DataType.Name(t))
@pytest.mark.parametrize("zero", ["zero", "offset"])
def test_folded_qat_weight_requantizes_to_the_reference_integers(onnx_type, zero):
    np_type, lo, hi, opset = TYPES[onnx_type]
    z = 0 if lo < 0 and zero == "zero" else (lo + hi + 1) // 2 + (3 if zero == "offset" else 0)
    c_out, c_in = 4, 64
    s = np.float32(0.0123)
    w = delicate_weights(float(s), z, lo, hi, c_out * c_in).reshape(c_out, c_in, 1, 1)
    gamma = np.array([2.0, -1.0, 0.5, 3.0], np.float32)  # channel 1 negated: q' = 2z - q keeps z
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(s, np.float32), "w_scale"),
             numpy_helper.from_array(np.array(z, np_type), "w_zero"),
             numpy_helper.from_array(gamma, "bn_scale"), numpy_helper.from_array(np.zeros(4, np.float32), "bn_bias"),
             numpy_helper.from_array(np.zeros(4, np.float32), "bn_mean"),
             numpy_helper.from_array(np.ones(4, np.float32), "bn_var")]
    nodes = [helper.make_node("QuantizeLinear", ["W", "w_scale", "w_zero"], ["Wq"], name="w_Q"),
             helper.make_node("DequantizeLinear", ["Wq", "w_scale", "w_zero"], ["Wdq"], name="w_DQ"),
             helper.make_node("Conv", ["x", "Wdq"], ["y"], name="conv"),
             helper.make_node("BatchNormalization", ["y", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["out"],
                              name="bn", epsilon=0.0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 2, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, c_out, 2, 2])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    out, report = qdqfold_native.fold_with_report(model.SerializeToString(), allow_nonzero_zero_point=True)
    [entry] = report["batchnorms"]
    assert entry["folded"], entry
    folded = onnx.load_from_string(out)
    t = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    q_node = next(n for n in folded.graph.node if n.op_type == "QuantizeLinear")
    w2, s2, z2 = (t[name] for name in q_node.input)
    s2 = np.broadcast_to(s2.astype(np.float32), (c_out,))
    z2 = np.broadcast_to(z2.astype(np.int64), (c_out,))

    expected = reference_quantize(w, s, z, lo, hi).reshape(c_out, -1)
    for o in range(c_out):
        got = reference_quantize(w2[o].ravel(), s2[o], int(z2[o]), lo, hi)
        if gamma[o] > 0:
            np.testing.assert_array_equal(got, expected[o], err_msg=f"channel {o}")
        else:
            # the negation, in whichever form the fold chose: q' - z' = -(q - z)
            np.testing.assert_array_equal(got - z2[o], -(expected[o] - z), err_msg=f"channel {o}")
        # and W' lies on its grid: W' = (q' - z') * s' exactly in float32
        np.testing.assert_array_equal(w2[o].ravel(), ((got - z2[o]) * s2[o].astype(np.float64)).astype(np.float32))


def test_every_integer_snaps_back_through_a_float32_weight_for_normal_scales():
    """The claim check_snap relies on to skip trying each integer: for a float32 weight and a new scale s' that is
    a normal float32 with (hi - lo) * s' far from overflow, W' = fl32(m * s') quantizes back to m for every
    |m| <= 2^16 (W' / s' is within |m| 2^-23 of m). Tried for every such m, on scales spread over the whole
    exponent range, the smallest normal and random mantissas included."""
    rng = np.random.default_rng(11)
    m = np.arange(-(1 << 16), (1 << 16) + 1, dtype=np.float64)
    tiny = np.finfo(np.float32).tiny
    exponents = rng.uniform(np.log2(tiny), np.log2(np.finfo(np.float32).max / 2 ** 18), 60)
    scales = np.concatenate([[tiny, np.nextafter(tiny, np.float32(1)), 1.0, 0.0123, 3.0e33],
                             2.0 ** exponents * rng.uniform(1, 2, 60)]).astype(np.float32)
    for s in scales:
        w = (m * np.float64(s)).astype(np.float32)  # one rounding of the exact product
        back = np.rint((w / s).astype(np.float64))  # QuantizeLinear's ratio in float32, ties to even
        np.testing.assert_array_equal(back, m, err_msg=f"scale {s!r}")
