"""Structure-aware property test of every fold together. Hypothesis builds random valid graphs: chains of
Conv / ConvTranspose / Gemm / MatMul and BatchNormalization in both orders, with random shapes, groups,
pads, strides, dilations, biases, dtypes (float32, float16), opsets, quantized weights (int8/uint8 behind
DequantizeLinear, per channel or per tensor; float weights behind QuantizeLinear -> DequantizeLinear),
activation quantizers, and shared weights and parameters. The property: the folded model passes the ONNX
checker, runs in onnxruntime, and computes what the original computes, judged as ``qdqfold.verify`` judges
(issue 13): every fold's certificate within its float-rounding bound (plus the reported int32 bias
rounding), and every output within the rounding twin's floor or 1e-5 of its range. ``assert_matches`` (the
former fixed-tolerance judge) stays for reference.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native
from qdqfold.verify import verify

from helpers.onnxrt import random_inputs, run

# CI runs a fixed budget; QDQFOLD_PROPERTY_EXAMPLES=2000 for a longer hunt (see docs/development.md).
EXAMPLES = int(os.environ.get("QDQFOLD_PROPERTY_EXAMPLES", "60"))

NP_TYPE = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


class Builder:
    """Accumulates nodes and initializers; numbers come from one seeded generator."""

    def __init__(self, draw, elem, opset):
        self.draw, self.elem, self.opset = draw, elem, opset
        self.dtype = NP_TYPE[elem]
        self.rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        self.nodes, self.inits, self.extra_outputs = [], [], []
        self.counter = 0
        self.out_step = None  # quantization step of an output quantizer, if the chain ends in one
        self.chain_ends = False  # set by a block after which nothing may follow

    def name(self, base: str) -> str:
        self.counter += 1
        return f"{base}{self.counter}"

    def tensor(self, base: str, values, dtype=None) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(values).astype(dtype or self.dtype), name))
        return name

    def node(self, op: str, inputs, n_out: int = 1, **attrs) -> str:
        outputs = [self.name(op.lower() + "_out") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self.name(op), **attrs))
        return outputs[0]

    # -------------------------------------------------------------------------------------------- pieces

    def bn(self, x: str, channels: int, shared_params: list[str] | None = None) -> str:
        params = shared_params or [
            self.tensor("gamma", self.rng.uniform(0.5, 1.5, channels) * self.rng.choice([-1, 1], channels)),
            self.tensor("beta", self.rng.uniform(-1, 1, channels)),
            self.tensor("mean", self.rng.uniform(-1, 1, channels)),
            self.tensor("var", self.rng.uniform(0.25, 2, channels))]
        self.last_bn_params = params
        return self.node("BatchNormalization", [x] + params, epsilon=float(self.draw(st.sampled_from([1e-5, 1e-3]))))

    def weight(self, shape, out_axis: int, quantized: str) -> str:
        """A float weight, or one behind DequantizeLinear ("int": integer initializer; "qat": float weight
        through QuantizeLinear -> DequantizeLinear), per channel along `out_axis` or per tensor."""
        w = self.rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        if quantized == "none":
            return self.tensor("w", w)
        qtype = self.draw(st.sampled_from([np.int8, np.uint8]))
        per_channel = self.draw(st.booleans())
        channels = shape[out_axis]
        scale = self.rng.uniform(0.005, 0.02, channels if per_channel else ()).astype(np.float32)
        zero_value = 0 if qtype == np.int8 else 128
        zero = np.full(channels if per_channel else (), zero_value, qtype)
        attrs = {"axis": out_axis} if per_channel else {}
        s, z = self.tensor("ws", scale, np.float32), self.tensor("wz", zero, qtype)
        if quantized == "int":
            info = np.iinfo(qtype)
            q = self.rng.integers(info.min + 1, info.max + 1, size=shape).astype(qtype)
            return self.node("DequantizeLinear", [self.tensor("wq", q, qtype), s, z], **attrs)
        wq = self.node("QuantizeLinear", [self.tensor("wf", w, np.float32), s, z], **attrs)
        return self.node("DequantizeLinear", [wq, s, z], **attrs)

    def activation_qdq(self, x: str, step: float = 0.02) -> str:
        s = self.tensor("as", np.float32(step), np.float32)
        z = self.tensor("az", np.uint8(128), np.uint8)
        return self.node("DequantizeLinear", [self.node("QuantizeLinear", [x, s, z]), s, z])

    def quantized(self) -> str:
        if self.elem != TensorProto.FLOAT or self.opset < 13:
            return "none"
        return self.draw(st.sampled_from(["none", "none", "int", "qat"]))

    # -------------------------------------------------------------------------------------------- blocks

    def spatial_block(self, x: str, shape: list[int]) -> tuple[str, list[int]]:
        """One block on an NCHW value: returns the new value and its shape."""
        n, c, h, w = shape
        kind = self.draw(st.sampled_from(["conv_bn", "conv_bn", "convt_bn", "bn_conv", "relu", "conv_qdq_bn"]))
        if kind == "relu":
            return self.node("Relu", [x]), shape
        if kind == "bn_conv":
            pad = self.draw(st.sampled_from([0, 0, 1]))
            k = self.draw(st.integers(1, 3)) if pad == 0 else 3
            k = min(k, h + 2 * pad, w + 2 * pad)
            groups = self.draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0]))
            cout = groups * self.draw(st.integers(1, 2))
            y = self.bn(x, c)
            wname = self.weight([cout, c // groups, k, k], 0, "none")
            y = self.node("Conv", [y, wname], group=groups, pads=[pad] * 4, kernel_shape=[k, k])
            return y, [n, cout, h + 2 * pad - k + 1, w + 2 * pad - k + 1]
        groups = self.draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0]))
        cout = groups * self.draw(st.integers(1, 2))
        k = self.draw(st.integers(1, 3))
        stride = self.draw(st.integers(1, 2))
        bias = [self.tensor("b", self.rng.standard_normal(cout))] if self.draw(st.booleans()) else []
        if kind == "convt_bn":
            pad = self.draw(st.integers(0, k - 1))
            if (min(h, w) - 1) * stride + k - 2 * pad < 1:
                pad = 0
            wname = self.weight([c, cout // groups, k, k], 1, self.quantized())
            y = self.node("ConvTranspose", [x, wname] + bias, group=groups, strides=[stride] * 2, pads=[pad] * 4,
                          kernel_shape=[k, k])
            size = lambda d: (d - 1) * stride + k - 2 * pad  # noqa: E731
            return self.maybe_shared(x, wname, self.bn(y, cout)), [n, cout, size(h), size(w)]
        dilation = self.draw(st.integers(1, 2)) if k > 1 else 1
        span = dilation * (k - 1) + 1
        pad = self.draw(st.integers(0, 1))
        if min(h, w) + 2 * pad < span:
            k, dilation, span = 1, 1, 1
        wname = self.weight([cout, c // groups, k, k], 0, self.quantized())
        if kind == "conv_qdq_bn" and x == "input" and self.opset >= 13 and self.elem == TensorProto.FLOAT:
            # An input quantizer, as quantize_static writes them; only where no fold precedes it, since a fold
            # upstream may legitimately flip it by one step, and later layers carry that anywhere (the QDQ
            # fold tests bound those flips directly). The fold may then re-quantize an int32 bias with a
            # reported rounding error; the chain ends with this block, so that error reaches the output as is.
            x = self.activation_qdq(x)
            self.chain_ends = True
        y = self.node("Conv", [x, wname] + bias, group=groups, pads=[pad] * 4, strides=[stride] * 2,
                      dilations=[dilation] * 2, kernel_shape=[k, k])
        size = lambda d: (d + 2 * pad - span) // stride + 1  # noqa: E731
        return self.maybe_shared(x, wname, self.bn(y, cout)), [n, cout, size(h), size(w)]

    def maybe_shared(self, x: str, wname: str, y: str) -> str:
        """Sometimes another node reads the same weight, or a second BN shares this BN's parameters."""
        choice = self.draw(st.sampled_from(["no", "no", "no", "weight", "params"]))
        if choice == "weight":
            self.extra_outputs.append(self.node("Identity", [wname]))
        elif choice == "params":
            self.extra_outputs.append(self.node("BatchNormalization", [y] + self.last_bn_params))
        return y

    def flat_block(self, x: str, features: int) -> tuple[str, int]:
        kind = self.draw(st.sampled_from(["gemm_bn", "matmul_bn", "bn_gemm", "relu"]))
        n_out = self.draw(st.integers(1, 5))
        if kind == "relu":
            return self.node("Relu", [x]), features
        if kind == "bn_gemm":
            y = self.bn(x, features)
            trans_b = self.draw(st.integers(0, 1))
            wname = self.weight([n_out, features] if trans_b else [features, n_out], 0 if trans_b else 1, "none")
            return self.node("Gemm", [y, wname], transB=trans_b), n_out
        if kind == "matmul_bn":
            wname = self.weight([features, n_out], 1, self.quantized())
            return self.maybe_shared(x, wname, self.bn(self.node("MatMul", [x, wname]), n_out)), n_out
        trans_b = self.draw(st.integers(0, 1))
        wname = self.weight([n_out, features] if trans_b else [features, n_out], 0 if trans_b else 1, self.quantized())
        c_shape = self.draw(st.sampled_from([None, (n_out,), (1, n_out), ()]))
        inputs = [x, wname] + ([] if c_shape is None else [self.tensor("c", self.rng.standard_normal(c_shape))])
        alpha, beta = self.draw(st.sampled_from([(1.0, 1.0), (0.5, 2.0), (-1.5, 0.25)]))
        y = self.node("Gemm", inputs, transB=trans_b, alpha=alpha, beta=beta)
        return self.maybe_shared(x, wname, self.bn(y, n_out)), n_out


@st.composite
def models(draw) -> tuple[onnx.ModelProto, float | None, dict]:
    elem = draw(st.sampled_from([TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT16]))
    opset = draw(st.sampled_from([11, 13, 15, 17, 19, 21]))
    b = Builder(draw, elem, opset)
    if draw(st.booleans()):  # NCHW, then perhaps Flatten and 2-D layers
        # Batches of a few samples, so that every output has a range to measure errors against.
        shape = [draw(st.integers(2, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 6)), draw(st.integers(2, 6))]
        x = "input"
        inputs = [helper.make_tensor_value_info("input", elem, shape)]
        for _ in range(draw(st.integers(1, 3))):
            x, shape = b.spatial_block(x, shape)
            if b.chain_ends:
                break
        if not b.chain_ends and draw(st.booleans()):
            x = b.node("Flatten", [x])
            features = shape[1] * shape[2] * shape[3]
            for _ in range(draw(st.integers(0, 2))):
                x, features = b.flat_block(x, features)
    else:
        features = draw(st.integers(1, 6))
        inputs = [helper.make_tensor_value_info("input", elem, [draw(st.integers(3, 6)), features])]
        x = "input"
        for _ in range(draw(st.integers(1, 3))):
            x, features = b.flat_block(x, features)
    if b.nodes[-1].op_type == "Relu" and b.nodes[-1].output[0] == x and b.nodes[-1].input[0] != "input":
        # No Relu at the very end: it can flatten the output's range far below the magnitudes whose float
        # rounding the output carries, and the range is what errors are measured against.
        x = b.nodes.pop().input[0]
    if elem == TensorProto.FLOAT and opset >= 13 and draw(st.booleans()):
        b.out_step = 0.05
        x = b.activation_qdq(x, b.out_step)  # an output quantizer after the last BN: the fold stays exact
    outputs = [helper.make_tensor_value_info(v, elem if v != b.extra_outputs else elem, None)
               for v in [x] + b.extra_outputs]
    graph = helper.make_graph(b.nodes, "random", inputs, outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 8 if opset >= 15 else 7
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    # Outputs with their inferred types (the checker wants them; Identity of a weight is a weight's type).
    known = {v.name: v.type for v in model.graph.value_info}
    for out in model.graph.output:
        if out.name in known:
            out.type.CopyFrom(known[out.name])
    del model.graph.value_info[:]
    options = draw(st.sampled_from([{}, {}, {"pad_correction": True}, {"allow_nonzero_zero_point": True},
                                    {"materialize_quantized_weights": True}]))
    return model, b.out_step, options


def assert_matches(original: bytes, folded: bytes, elem: int, out_step: float | None, bias_error: float) -> None:
    """Outputs agree within float rounding plus the reported int32 bias rounding; an output quantizer may flip
    by one step on at most 0.1% of its elements (and at least one may flip)."""
    feeds = random_inputs(original, seed=7)
    rtol = 1e-5 if elem == TensorProto.FLOAT else 1e-2
    for k, (e, a) in enumerate(zip(run(original, feeds), run(folded, feeds))):
        assert e.shape == a.shape and e.dtype == a.dtype
        e64, a64 = e.astype(np.float64), a.astype(np.float64)
        # 1e-5 of the range, or of the magnitude where that is larger (a few outputs close together):
        # float32 rounding of the output itself is 6e-8 of its magnitude.
        tol = rtol * max(float(np.ptp(e64)), float(np.max(np.abs(e64))), 1e-6) + bias_error * (1 + 1e-6)
        diff = np.abs(e64 - a64)
        if out_step is None or k > 0:
            assert diff.max() <= tol, f"output {k}: max error {diff.max()} > {tol}"
            continue
        flips = diff > tol
        assert diff.max() <= out_step + tol, "a flip is at most one quantization step"
        assert flips.sum() <= max(1, 0.001 * diff.size), f"{flips.sum()} of {diff.size} quantized outputs flipped"


# The CI's run is derandomized (the same examples every run, so a pass means the same thing each time); a
# longer hunt (QDQFOLD_PROPERTY_EXAMPLES set) draws new examples.
@settings(max_examples=EXAMPLES, deadline=None, derandomize="QDQFOLD_PROPERTY_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(models())
def test_folded_models_are_valid_run_and_compute_the_same(case):
    model, out_step, options = case
    onnx.checker.check_model(model, full_check=True)  # the generator builds valid models only
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, **options)
    if not any(b["folded"] for b in report["batchnorms"]):
        assert out == data
        return
    folded = onnx.load_from_string(out)
    onnx.checker.check_model(folded, full_check=True)
    remaining = sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert remaining == sum(not b["folded"] for b in report["batchnorms"])
    approximate = [b for b in report["batchnorms"] if b["folded"] and not b["exact"]]
    assert not approximate, "no approximate option is on"
    # Judged as --verify judges: a certificate per fold (its layer on the original's activations, within a
    # float-rounding bound plus the reported int32 bias rounding), and every output within the rounding twin's
    # floor (or 1e-5 of its range), optimisations off.
    result = verify(data, out, report=report, count_units=False, levels=("off",), input_sets=2, seed=7)
    if result.verdict != "exact" and os.environ.get("QDQFOLD_PROPERTY_DUMP"):
        onnx.save(model, os.environ["QDQFOLD_PROPERTY_DUMP"])
    assert result.verdict == "exact", result.failure_message()
    assert all(c.passed for c in result.certificates)
