"""Quantized (QDQ) layers followed by a BN, and the checks on their folds.

`Case` builds a layer whose weight is quantized (int W -> DequantizeLinear, or float W -> QuantizeLinear ->
DequantizeLinear: the QAT form), followed by a BatchNormalization, and keeps every number it used, so a test can
predict the folded integers, scales and zero points with numpy (`assert_folded_weight`) and compare onnxruntime's
outputs with the bound a QDQ fold guarantees (`assert_same`).
"""

from __future__ import annotations

import collections
import os
import tempfile

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from helpers.onnxrt import random_inputs, run


RANGES = {T.INT8: (-128, 127), T.UINT8: (0, 255), T.INT16: (-32768, 32767), T.UINT16: (0, 65535),
          T.INT4: (-8, 7), T.UINT4: (0, 15)}


NUMPY = {T.INT8: np.int8, T.UINT8: np.uint8, T.INT16: np.int16, T.UINT16: np.uint16, T.INT4: ml_dtypes.int4,
         T.UINT4: ml_dtypes.uint4, T.INT32: np.int32, T.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn,
         T.FLOAT8E5M2: ml_dtypes.float8_e5m2}


FLOAT8 = (T.FLOAT8E4M3FN, T.FLOAT8E5M2)


EPS = 1e-5


def mid_zero(qtype):
    lo, hi = RANGES[qtype]
    return 0 if lo < 0 else (hi + 1) // 2


class Case:
    """A layer with a quantized weight followed by BN, built from options; keeps the numbers it used."""

    def __init__(self, layer="Conv", form="int", qtype=T.INT8, per_channel=True, block_size=0, zero=None,
                 bias=None, act_in=True, act_between=False, out_quant=False, gamma=None, opset=None, rank=2,
                 group=1, cin=8, cout=6, trans_b=1, alpha=1.0, beta=1.0, ints=None, seed=0, ties=True,
                 block_axis=None):
        rng = np.random.default_rng(seed)
        self.layer, self.form, self.qtype, self.group = layer, form, qtype, group
        self.opset = opset or (21 if qtype in (T.INT16, T.UINT16, T.INT4, T.UINT4) or block_size else
                               19 if qtype in FLOAT8 else 13)
        self.trans_b = trans_b
        nodes, inits = [], []
        if layer in ("Conv", "ConvTranspose"):
            spatial = [5, 6, 4][:rank]
            x_shape = [2, cin] + spatial
            if layer == "Conv":
                wdims = [cout, cin // group] + [3] * rank
                out_axis = 0
            else:
                wdims = [cin, cout // group] + [3] * rank
                out_axis = 1
        else:
            x_shape = [3, cin]
            wdims = [cout, cin] if (layer == "Gemm" and trans_b) else [cin, cout]
            out_axis = 0 if (layer == "Gemm" and trans_b) else 1
        self.wdims, self.out_axis = wdims, out_axis
        in_axis = 1 - out_axis
        # Which output channel every weight element belongs to.
        idx = np.indices(wdims)
        if layer == "ConvTranspose":
            self.out_ch = (idx[0] // (cin // group)) * (cout // group) + idx[1]
        else:
            self.out_ch = idx[out_axis]

        # Quantization layout.
        if block_size:
            self.axis = in_axis if block_axis is None else block_axis
            sdims = list(wdims)
            sdims[self.axis] = -(-wdims[self.axis] // block_size)
        elif per_channel:
            self.axis = out_axis
            sdims = [wdims[out_axis]]
        else:
            self.axis = None
            sdims = []
        self.block_size = block_size
        nscale = int(np.prod(sdims)) if sdims else 1
        if qtype in FLOAT8:
            zero_values = np.zeros(nscale)
        else:
            lo, hi = RANGES[qtype]
            zero_values = np.full(nscale, mid_zero(qtype) if zero is None else zero)
        scale_values = rng.uniform(0.01, 0.05, nscale).astype(np.float32)
        self.scale0 = scale_values.reshape(sdims) if sdims else scale_values.reshape([])
        self.zero0 = zero_values.reshape(sdims) if sdims else zero_values.reshape([])
        zel = self.expand(self.zero0)
        sel = self.expand(self.scale0)

        if qtype in FLOAT8:
            floats = rng.standard_normal(wdims) * 4
            q = floats.astype(NUMPY[qtype])
            self.q0 = q.view(np.uint8).astype(np.int64)
            self.w_float = None
        elif form == "int":
            lo, hi = RANGES[qtype]
            q = rng.integers(lo + 1, hi + 1, size=wdims) if ints is None else np.asarray(ints).reshape(wdims)
            self.q0 = q.astype(np.int64)
            self.w_float = None
        else:
            lo, hi = RANGES[qtype]
            span = np.minimum(hi - zel, zel - lo - 1).astype(np.float32)
            w = (rng.uniform(-1, 1, wdims).astype(np.float32) * span * sel).astype(np.float32)
            if ties:  # exact ties of round(W / s): the classic place where re-rounding flips
                flat = w.reshape(-1)
                sflat = np.broadcast_to(sel, wdims).reshape(-1)
                for k in range(0, flat.size, 7):
                    flat[k] = np.float32((np.floor(flat[k] / sflat[k]) + 0.5) * sflat[k])
            self.w_float = w
            self.q0 = np.clip(np.round(w / sel) + zel, lo, hi).astype(np.int64)

        # BN: a few negative gammas.
        gamma = rng.uniform(0.5, 1.5, cout) * np.where(np.arange(cout) % 3 == 1, -1, 1) if gamma is None else np.asarray(gamma, float)
        self.gamma = gamma.astype(np.float32)
        self.beta = rng.standard_normal(cout).astype(np.float32)
        self.mean = rng.standard_normal(cout).astype(np.float32) * 0.3
        self.var = rng.uniform(0.5, 2.0, cout).astype(np.float32)
        self.a = self.gamma.astype(np.float64) / np.sqrt(self.var.astype(np.float64) + np.float64(np.float32(EPS)))
        self.t = self.beta.astype(np.float64) - self.mean.astype(np.float64) * self.a

        # Graph.
        x = "x"
        if act_in:
            self.s_x = np.float32(0.02)
            inits += [nh.from_array(np.array(self.s_x, np.float32), "x_scale"),
                      nh.from_array(np.array(128, np.uint8), "x_zero")]
            nodes += [h.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="x_Q"),
                      h.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="x_DQ")]
            x = "xd"
        qattrs = {}
        if self.axis is not None:
            qattrs["axis"] = self.axis
        if block_size:
            qattrs["block_size"] = block_size
        inits.append(nh.from_array(self.scale0.astype(np.float32), "w_scale"))
        zero_inputs = []
        if qtype in FLOAT8 or not (qtype == T.UINT8 and zero == "absent"):
            inits.append(self.make_zero("w_zero"))
            zero_inputs = ["w_zero"]
        if form == "int":
            inits.append(self.make_ints(self.q0, "w_q"))
            nodes.append(h.make_node("DequantizeLinear", ["w_q", "w_scale"] + zero_inputs, ["w"], name="w_DQ", **qattrs))
        else:
            inits.append(nh.from_array(self.w_float, "w_float"))
            nodes += [h.make_node("QuantizeLinear", ["w_float", "w_scale"] + zero_inputs, ["w_qq"], name="w_Q", **qattrs),
                      h.make_node("DequantizeLinear", ["w_qq", "w_scale"] + zero_inputs, ["w"], name="w_DQ", **qattrs)]
        layer_inputs = [x, "w"]
        self.b_float = None
        self.b_int = None
        if bias == "float":
            self.b_float = rng.standard_normal(cout).astype(np.float32)
            inits.append(nh.from_array(self.b_float, "b"))
            layer_inputs.append("b")
        elif bias == "int32":
            sw = np.broadcast_to(self.scale0, [cout]) if self.axis is None else self.scale0
            self.sb = (self.s_x * sw.astype(np.float32)).astype(np.float32)
            self.b_int = rng.integers(-2000, 2000, cout).astype(np.int32)
            inits += [nh.from_array(self.b_int, "b_q"), nh.from_array(self.sb.reshape(-1) if self.axis is not None else self.sb[:1].reshape([]), "b_scale"),
                      nh.from_array(np.zeros(cout if self.axis is not None else [], np.int32), "b_zero")]
            battrs = {"axis": 0} if self.axis is not None else {}
            nodes.append(h.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zero"], ["b"], name="b_DQ", **battrs))
            layer_inputs.append("b")
        attrs = {}
        if layer in ("Conv", "ConvTranspose"):
            attrs = {"group": group, "pads": [1] * (2 * rank)}
        if layer == "Gemm":
            attrs = {"transB": trans_b, "alpha": alpha, "beta": beta}
        nodes.append(h.make_node(layer, layer_inputs, ["y"], name="layer", **attrs))
        bn_in = "y"
        if act_between:
            inits += [nh.from_array(np.array(0.2, np.float32), "y_scale"), nh.from_array(np.array(128, np.uint8), "y_zero")]
            nodes += [h.make_node("QuantizeLinear", ["y", "y_scale", "y_zero"], ["yq"], name="act_Q"),
                      h.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["yd"], name="act_DQ")]
            bn_in = "yd"
        for name, v in (("gamma", self.gamma), ("beta", self.beta), ("mean", self.mean), ("var", self.var)):
            inits.append(nh.from_array(v, name))
        bn_out = "z" if out_quant else "out"
        nodes.append(h.make_node("BatchNormalization", [bn_in, "gamma", "beta", "mean", "var"], [bn_out], name="bn",
                                 epsilon=EPS))
        self.out_step = None
        if out_quant:
            self.out_step = np.float32(0.05)
            inits += [nh.from_array(np.array(self.out_step, np.float32), "z_scale"),
                      nh.from_array(np.array(128, np.uint8), "z_zero")]
            nodes += [h.make_node("QuantizeLinear", ["z", "z_scale", "z_zero"], ["zq"], name="out_Q"),
                      h.make_node("DequantizeLinear", ["zq", "z_scale", "z_zero"], ["out"], name="out_DQ")]
        graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, x_shape)],
                             [h.make_tensor_value_info("out", T.FLOAT, [None] * len(x_shape))], inits)
        self.model = h.make_model(graph, opset_imports=[h.make_opsetid("", self.opset)])
        self.model.ir_version = 10 if self.opset >= 21 else 9 if self.opset >= 19 else 8

    def expand(self, per_scale):
        """A scale or zero point broadcast to every weight element."""
        per_scale = np.asarray(per_scale)
        if per_scale.ndim == 0 or per_scale.size == 1 and self.axis is None:
            return np.broadcast_to(per_scale.reshape([]), self.wdims)
        if self.block_size:
            return np.repeat(per_scale, self.block_size, axis=self.axis).take(range(self.wdims[self.axis]), axis=self.axis)
        shape = [1] * len(self.wdims)
        shape[self.axis] = -1
        return np.broadcast_to(per_scale.reshape(shape), self.wdims)

    def make_ints(self, values, name):
        if self.qtype in FLOAT8:
            return nh.from_array(np.asarray(values).astype(np.uint8).view(NUMPY[self.qtype]), name)
        return nh.from_array(np.asarray(values).astype(NUMPY[self.qtype]), name)

    def make_zero(self, name):
        return self.make_ints(np.asarray(self.zero0), name)

    @property
    def bytes(self):
        return self.model.SerializeToString()


def constants(model):
    """Every initializer and Constant node value of the main graph, by name, as numpy arrays."""
    values = {i.name: nh.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            values[n.output[0]] = nh.to_array(n.attribute[0].t)
    return values


def folded_weight(model_bytes):
    """Integers, scale, zero point, axis (and QAT float weight) behind the layer's weight input."""
    m = onnx.load_from_string(model_bytes)
    by_output = {o: n for n in m.graph.node for o in n.output}
    consts = constants(m)
    layer = next(n for n in m.graph.node if n.name == "layer")
    dq = by_output[layer.input[1]]
    assert dq.op_type == "DequantizeLinear"
    attrs = {a.name: h.get_attribute_value(a) for a in dq.attribute}
    result = {"scale": consts[dq.input[1]], "axis": attrs.get("axis"), "node": dq, "layer": layer, "model": m,
              "consts": consts, "by_output": by_output}
    result["zero"] = consts[dq.input[2]] if len(dq.input) > 2 and dq.input[2] else None
    if dq.input[0] in consts:
        raw = consts[dq.input[0]]
        is_float8 = raw.dtype in [np.dtype(NUMPY[t]) for t in FLOAT8]
        result["q"] = raw.view(np.uint8).astype(np.int64) if is_float8 else raw.astype(np.int64)
        result["float"] = None
    else:
        q = by_output[dq.input[0]]
        assert q.op_type == "QuantizeLinear"
        result["float"] = consts[q.input[0]]
        result["q_node"] = q
    return result


def dequantize_layout(case, values, axis):
    """Broadcast a folded per-channel scale/zero (on `axis`) or the original layout to the weight's shape."""
    values = np.asarray(values)
    if values.size == 1:
        return np.broadcast_to(values.reshape([]), case.wdims)
    if case.block_size:
        return case.expand(values)
    shape = [1] * len(case.wdims)
    shape[axis] = -1
    return np.broadcast_to(values.reshape(shape), case.wdims)


def expected_integers(case):
    """q' where a < 0: the mirror about the zero point, c - q with c = 2z (= -q for z = 0)."""
    a_el = case.a[case.out_ch]
    z_el = case.expand(case.zero0).astype(np.int64)
    if case.qtype in FLOAT8:
        return np.where(a_el < 0, case.q0 ^ 0x80, case.q0)
    return np.where(a_el < 0, 2 * z_el - case.q0, case.q0)


def assert_folded_weight(case, folded_bytes):
    """The folded weight equals a * (original dequantized weight) per output channel, integers exactly."""
    f = folded_weight(folded_bytes)
    a_el = case.a[case.out_ch]
    if case.form == "int" or case.qtype in FLOAT8:
        q_new = f["q"]
    else:
        q_new = None
    expected_q = expected_integers(case)
    axis = f["axis"] if f["axis"] is not None else 1
    s_new = dequantize_layout(case, f["scale"], axis).astype(np.float64)
    z_new = dequantize_layout(case, f["zero"], axis).astype(np.int64) if f["zero"] is not None else 0
    # The scale: s' = float32(s * |a|) exactly.
    s_old = case.expand(case.scale0).astype(np.float64)
    np.testing.assert_array_equal(s_new, (s_old * np.abs(a_el)).astype(np.float32).astype(np.float64))
    if f["float"] is not None:
        # QAT form: re-quantizing the new float weight with (s', z') gives exactly the mirrored integers.
        lo, hi = RANGES[case.qtype]
        w_new = f["float"]
        q_new = np.clip(np.round(w_new / s_new.astype(np.float32)) + z_new, lo, hi).astype(np.int64)
    np.testing.assert_array_equal(q_new, expected_q)
    if case.qtype in FLOAT8:
        deq_new = q_new.astype(np.uint8).view(NUMPY[case.qtype]).astype(np.float64) * s_new
        deq_old = case.q0.astype(np.uint8).view(NUMPY[case.qtype]).astype(np.float64) * s_old
    else:
        deq_new = (q_new - z_new) * s_new
        deq_old = (case.q0 - case.expand(case.zero0).astype(np.int64)) * s_old
    np.testing.assert_allclose(deq_new, a_el * deq_old, rtol=1e-6, atol=1e-12)
    return f


def with_outputs(model, *names):
    """A copy of `model` that also outputs the given intermediate values."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.append(h.make_tensor_value_info(n, T.FLOAT, None))
    return m


def assert_same(case, folded_bytes, record, feeds=None, rtol_of_range=1e-5):
    """onnxruntime outputs of original and folded: identical up to float rounding plus the reported int32
    bias rounding. With an output quantizer after the BN, an output may move by one quantization step only
    where the original BN output lay within that error of the quantizer's rounding boundary, and such flips
    that float rounding alone explains stay under 0.1% of the elements."""
    feeds = feeds if feeds is not None else random_inputs(case.model)
    bias_error = dict(record["metrics"]).get("bias_requantization_error", 0.0)
    if case.out_step is None:
        expected = run(case.model, feeds)[0].astype(np.float64)
        actual = run(folded_bytes, feeds)[0].astype(np.float64)
        assert expected.shape == actual.shape
        tol = rtol_of_range * np.ptp(expected) + bias_error * (1 + 1e-6)
        diff = np.abs(expected - actual)
        assert diff.max() <= tol, f"max error {diff.max()} > {tol}"
        return diff.max()
    expected, z = (o.astype(np.float64) for o in run(with_outputs(case.model, "z"), feeds))
    actual = run(folded_bytes, feeds)[0].astype(np.float64)
    step = float(case.out_step)
    diff = np.abs(expected - actual)
    flips = diff > 1e-3 * step
    assert diff.max() <= step + rtol_of_range * np.ptp(expected), "a flip is at most one quantization step"
    ratio = z / step
    to_boundary = np.abs(ratio - np.floor(ratio) - 0.5) * step
    float_band = rtol_of_range * np.ptp(z)
    assert np.all(to_boundary[flips] <= bias_error * (1 + 1e-6) + float_band), "a flip not explained by the fold"
    if bias_error == 0:
        assert flips.mean() <= 1e-3, f"{flips.sum()} of {diff.size} outputs differ"
    return diff.max()


QUANT_UNITS = ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger")


def ort_op_counts(model_bytes, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED) -> collections.Counter:
    """Nodes by op type in the model onnxruntime builds (CPU, at `level`, its saved optimized model)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "opt.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.optimized_model_filepath = path
        so.log_severity_level = 3
        ort.InferenceSession(bytes(model_bytes), so, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def quantized_units(model_bytes) -> int:
    """Quantized node units onnxruntime forms (CPU, extended optimisations, saved optimized model)."""
    counts = ort_op_counts(model_bytes)
    return sum(counts[k] for k in QUANT_UNITS)


MODELOPT_OUTPUT_STEP = 0.03125


def modelopt_f16_layer(bias: bool, seed: int = 0, c_in: int = 8, c_out: int = 16, dtype=np.float16,
                       w_scale: float = 4e-4, mean: float = 3.0) -> onnx.ModelProto:
    """ModelOpt ONNX PTQ's default layout: x -> Q -> DQ -> Conv(float16 W -> Q -> DQ per channel) -> BN (float16
    parameters) -> Relu -> Q -> DQ -> y, with the small weight scales and BN means of a trained network, so the folded bias in
    steps of s_x * s_w * |a| is far beyond what float16 holds as an integer."""
    rng = np.random.default_rng(seed)
    onnx_type = h.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = (rng.standard_normal((c_out, c_in, 3, 3)) * w_scale * 40).astype(dtype)
    sw = (np.abs(w.astype(np.float64)).reshape(c_out, -1).max(1) / 127).astype(dtype)
    gamma = rng.uniform(0.5, 2, c_out) * rng.choice([-1, 1], c_out)
    inits = [nh.from_array(np.array(0.02, dtype), "sx"), nh.from_array(np.array(0, np.int8), "zx"),
             nh.from_array(w, "w"), nh.from_array(sw, "sw"),
             nh.from_array(np.zeros(c_out, np.int8), "zw"),
             nh.from_array(gamma.astype(dtype), "g"),
             nh.from_array((rng.standard_normal(c_out) * 0.5).astype(dtype), "be"),
             nh.from_array((rng.standard_normal(c_out) * mean).astype(dtype), "m"),
             nh.from_array(rng.uniform(0.5, 2, c_out).astype(dtype), "v")]
    conv_inputs = ["xd", "wd"]
    if bias:
        inits.append(nh.from_array((rng.standard_normal(c_out) * 0.1).astype(dtype), "b"))
        conv_inputs.append("b")
    nodes = [h.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="iq"),
             h.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="idq"),
             h.make_node("QuantizeLinear", ["w", "sw", "zw"], ["wq"], name="wq", axis=0),
             h.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="wdq", axis=0),
             h.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["n"], name="bn"),
             # The next layer's activation quantizer: onnxruntime quantizes a float bias only in a full QDQ unit.
             h.make_node("Relu", ["n"], ["r"], name="relu"),
             h.make_node("QuantizeLinear", ["r", "sy", "zy"], ["yq"], name="oq"),
             h.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"], name="odq")]
    inits += [nh.from_array(np.array(MODELOPT_OUTPUT_STEP, dtype), "sy"),
              nh.from_array(np.array(0, np.uint8), "zy")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx_type, [1, c_in, 12, 12])],
                              [h.make_tensor_value_info("y", onnx_type, [1, c_out, 12, 12])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 19)])
