"""Verification that tells a correct fold from a wrong one (issue 13): every correct fold of the sample QAT /
int8 models and of a generated MobileNetV2-sized QDQ network (an activation quantizer at every layer input)
verifies **exact**; a deliberately wrong fold (one channel's scale or bias off by 1% in one layer, a bias
with the wrong sign, a mirrored channel left unmirrored) verifies **differs**, caught by the certificate of
that fold even where the end-to-end outputs hide it under the rounding floor."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import qdqfold_native
from qdqfold.verify import verify

from helpers.samples import MODELS

SHARED = Path("/work/shared/models")
QDQ_SAMPLES = ["qat_seed_prebn.onnx", "qat_arcface_head.onnx", "qat_input_bn_net.onnx"]


# ------------------------------------------------------------------------ a MobileNetV2-sized QDQ network

# (expansion, output channels, repeats, first stride): torchvision's MobileNetV2 table.
MBV2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class _Net:
    """Builds the graph; ``quantize`` puts Q -> DQ (int8, per tensor) at every layer input and W -> Q -> DQ
    (per output channel) on every weight, torchvision QAT style."""

    def __init__(self, rng, quantize: bool, act_scales: dict[str, float] | None):
        self.rng, self.quantize, self.act_scales = rng, quantize, act_scales or {}
        self.nodes, self.inits, self.layer_inputs = [], [], []
        self.counts: dict[str, int] = {}

    def name(self, base):  # per kind, so a conv has one name with and without quantizers
        self.counts[base] = self.counts.get(base, 0) + 1
        return f"{base}{self.counts[base]}"

    def act_quant(self, x):
        self.layer_inputs.append(x)
        if not self.quantize:
            return x
        p = self.name("aq")
        scale = np.float32(self.act_scales.get(x, 0.05))
        self.inits += [numpy_helper.from_array(np.array(scale), p + "_s"),
                       numpy_helper.from_array(np.array(0, np.int8), p + "_z")]
        self.nodes += [helper.make_node("QuantizeLinear", [x, p + "_s", p + "_z"], [p + "_q"], name=p + "/Q"),
                       helper.make_node("DequantizeLinear", [p + "_q", p + "_s", p + "_z"], [p + "_d"], name=p + "/DQ")]
        return p + "_d"

    def weight(self, w, axis=0):
        p = self.name("w")
        self.inits.append(numpy_helper.from_array(w, p))
        if not self.quantize:
            return p
        s = (np.abs(w).reshape(w.shape[0], -1).max(1) / 127).astype(np.float32)
        s[s == 0] = 1e-3
        self.inits += [numpy_helper.from_array(s, p + "_s"), numpy_helper.from_array(np.zeros(len(s), np.int8), p + "_z")]
        self.nodes += [helper.make_node("QuantizeLinear", [p, p + "_s", p + "_z"], [p + "_q"], name=p + "/Q", axis=axis),
                       helper.make_node("DequantizeLinear", [p + "_q", p + "_s", p + "_z"], [p + "_d"], name=p + "/DQ",
                                        axis=axis)]
        return p + "_d"

    def conv_bn(self, x, c_in, c_out, k, stride, groups, act, stats):
        p = self.name("conv")
        fan_in = c_in // groups * k * k
        w = (self.rng.standard_normal((c_out, c_in // groups, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        xq = self.act_quant(x)
        self.nodes.append(helper.make_node("Conv", [xq, self.weight(w)], [p + "_c"], name=p + "/Conv", group=groups,
                                           kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4))
        mean, var = stats.get(p + "_c", (np.zeros(c_out), np.ones(c_out)))
        gamma = self.rng.uniform(0.6, 1.4, c_out) * np.where(self.rng.random(c_out) < 0.15, -1, 1)
        beta = self.rng.standard_normal(c_out) * 0.2
        self.inits += [numpy_helper.from_array(np.asarray(v, np.float32), f"{p}_{n}")
                       for n, v in (("g", gamma), ("b", beta), ("m", mean), ("v", var))]
        self.nodes.append(helper.make_node("BatchNormalization", [p + "_c", p + "_g", p + "_b", p + "_m", p + "_v"],
                                           [p + "_bn"], name=p + "/BatchNormalization"))
        if not act:
            return p + "_bn"
        self.inits += [numpy_helper.from_array(np.array(0, np.float32), p + "_lo"),
                       numpy_helper.from_array(np.array(6, np.float32), p + "_hi")]
        self.nodes.append(helper.make_node("Clip", [p + "_bn", p + "_lo", p + "_hi"], [p + "_r"], name=p + "/Clip"))
        return p + "_r"


def _mbv2_graph(rng, quantize, act_scales, stats, width=1.0, classes=100):
    net = _Net(rng, quantize, act_scales)
    c = int(32 * width)
    x = net.conv_bn("input", 3, c, 3, 2, 1, True, stats)
    for t, c_out, n, s in MBV2:
        c_out = int(c_out * width)
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = c * t
            y = x
            if t != 1:
                y = net.conv_bn(y, c, hidden, 1, 1, 1, True, stats)
            y = net.conv_bn(y, hidden, hidden, 3, stride, hidden, True, stats)
            y = net.conv_bn(y, hidden, c_out, 1, 1, 1, False, stats)
            if stride == 1 and c == c_out:
                p = net.name("add")
                net.nodes.append(helper.make_node("Add", [x, y], [p], name=p))
                y = p
            x, c = y, c_out
    x = net.conv_bn(x, c, int(1280 * width), 1, 1, 1, True, stats)
    net.nodes += [helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"),
                  helper.make_node("Flatten", ["pool"], ["flat"], name="flatten")]
    w = (rng.standard_normal((classes, int(1280 * width))) * 0.03).astype(np.float32)
    xq = net.act_quant("flat")
    net.inits.append(numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b"))
    net.nodes.append(helper.make_node("Gemm", [xq, net.weight(w), "fc_b"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(net.nodes, "mbv2", [helper.make_tensor_value_info("input", TP.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TP.FLOAT, [1, classes])], net.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), net


def _run_exposing(model, names, feeds):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.append(helper.make_empty_tensor_value_info(n))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    out = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)
    return dict(zip([o.name for o in m.graph.output], out))


@lru_cache(maxsize=1)
def mobilenet_v2_qdq() -> bytes:
    """A MobileNetV2 (52 convs, 53 BNs, 3.5M weights) in QAT form with an activation quantizer at every layer
    input, BN statistics and quantizer scales calibrated on random inputs so activations stay O(1)."""
    feeds = {"input": np.random.default_rng(100).standard_normal((4, 3, 32, 32)).astype(np.float32)}
    stats: dict[str, tuple] = {}
    for _ in range(3):  # each pass normalises the layers whose inputs the previous pass settled
        model, net = _mbv2_graph(np.random.default_rng(7), False, None, stats)
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
        convs = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
        values = _run_exposing(model, convs + net.layer_inputs, feeds)
        stats = {c: (values[c].mean(axis=(0, 2, 3)), values[c].var(axis=(0, 2, 3)) + 1e-3) for c in convs}
    scales = {x: float(np.abs(values[x]).max() / 127 or 0.05) for x in net.layer_inputs}
    model, _ = _mbv2_graph(np.random.default_rng(7), True, scales, stats)
    return model.SerializeToString()


@lru_cache(maxsize=1)
def mobilenet_v2_int8() -> bytes:
    """The same network in onnxruntime's quantizer's int8 layout: int8 weights -> DequantizeLinear (the QAT
    form's QuantizeLinear applied ahead of time), activation quantizers as before."""
    model = onnx.load_from_string(mobilenet_v2_qdq())
    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    rewired = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in inits:
            w = numpy_helper.to_array(inits[node.input[0]])
            scale = numpy_helper.to_array(inits[node.input[1]])
            shape = [-1] + [1] * (w.ndim - 1)
            q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
            name = node.input[0] + "_int8"
            model.graph.initializer.append(numpy_helper.from_array(q, name))
            rewired[node.output[0]] = name
            continue
        keep.append(node)
    for node in keep:
        node.input[:] = [rewired.get(i, i) for i in node.input]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    used = {i for n in model.graph.node for i in n.input}
    kept_inits = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_inits)
    return model.SerializeToString()


@lru_cache(maxsize=1)
def mobilenet_v2_int8_no_fc_bias() -> bytes:
    """The int8 network with no float bias anywhere: every folded conv gains an int32 bias behind
    DequantizeLinear (onnxruntime's convention), re-quantized on s_x * s'_w: 52 "bias-rounded" folds."""
    model = onnx.load_from_string(mobilenet_v2_int8())
    fc = next(n for n in model.graph.node if n.op_type == "Gemm")
    del fc.input[2]
    return model.SerializeToString()


def _network(name):
    if name == "mbv2":
        return mobilenet_v2_qdq()
    if name == "mbv2-int8":
        return mobilenet_v2_int8()
    if name == "mbv2-int32-bias":
        return mobilenet_v2_int8_no_fc_bias()
    return _sample(name).read_bytes()


# ------------------------------------------------------------------------------------------ mutations

def _init(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def _set(model, name, values):
    _init(model, name).CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values), name))


def _producer(model, value):
    return next((n for n in model.graph.node if value in n.output), None)


def _layer_weight(model, layer):
    """(kind, tensor name): 'float' W of a plain layer, 'qat' float W before Q -> DQ, 'int' integers before DQ
    (with the DQ's scale name)."""
    names = {t.name for t in model.graph.initializer}
    w = layer.input[1]
    if w in names:
        return "float", w, None
    dq = _producer(model, w)
    if dq.input[0] in names:
        return "int", dq.input[0], dq.input[1]
    q = _producer(model, dq.input[0])
    return "qat", q.input[0], q.input[1]


def _bias_values(model, layer):
    """(setter, values) of the layer's bias in float terms; int32 behind DQ is changed in integers."""
    b = layer.input[2]
    names = {t.name for t in model.graph.initializer}
    if b in names:
        values = numpy_helper.to_array(_init(model, b)).astype(np.float64)
        return values, lambda v: _set(model, b, v.astype(numpy_helper.to_array(_init(model, b)).dtype))
    dq = _producer(model, b)
    ints = numpy_helper.to_array(_init(model, dq.input[0])).astype(np.float64)
    scale = numpy_helper.to_array(_init(model, dq.input[1])).astype(np.float64)
    return ints * scale, lambda v: _set(model, dq.input[0], np.round(v / scale).astype(np.int32))


def mutate(folded: bytes, report, kind: str, which: int = -1) -> bytes:
    """A deliberately wrong copy of a fold: one channel of one backward-folded layer."""
    model = onnx.load_from_string(folded)
    entries = [e for e in report["batchnorms"] if e["folded"] and e["direction"] == "backward"]
    entry = entries[which]
    layer = next(n for n in model.graph.node if n.name == entry["into"][0])
    form, w_name, s_name = _layer_weight(model, layer)
    w = numpy_helper.to_array(_init(model, w_name)).copy()
    channel = 1 % w.shape[0]
    if kind in ("bias", "bias-sign"):
        values, store = _bias_values(model, layer)
        span = float(values.max() - values.min()) or float(np.abs(values).max()) or 1.0
        channel = int(np.argmax(np.abs(values))) if kind == "bias-sign" else channel
        if kind == "bias":
            values[channel] += 0.01 * span
        else:
            values[channel] = -values[channel]
        store(values)
    elif kind == "scale":
        if form == "int":
            s = numpy_helper.to_array(_init(model, s_name)).copy()
            s[channel] *= 1.01
            _set(model, s_name, s)
        else:
            w[channel] *= 1.01
            _set(model, w_name, w)
    elif kind == "unmirrored":
        w[channel] = -w[channel] if form != "int" else np.clip(-w[channel].astype(np.int32), -127, 127).astype(w.dtype)
        _set(model, w_name, w)
    return model.SerializeToString()


# ---------------------------------------------------------------------------------------------- tests

def _sample(name):
    path = MODELS / name
    return path if path.exists() else SHARED / name


@pytest.mark.parametrize("name", QDQ_SAMPLES + ["mbv2", "mbv2-int8", "mbv2-int32-bias"])
def test_correct_folds_verify_exact(name):
    data = _network(name)
    folded, report = qdqfold_native.fold_with_report(data)
    assert any(e["folded"] for e in report["batchnorms"])
    result = verify(data, folded, report=report, count_units=False)
    assert result.verdict == "exact", result.failure_message()
    assert result.certificates and all(c.passed for c in result.certificates)
    assert set(result.levels) == {"off", "default"}


@pytest.mark.parametrize("kind", ["scale", "bias", "bias-sign", "unmirrored"])
@pytest.mark.parametrize("name", QDQ_SAMPLES + ["mbv2", "mbv2-int8", "mbv2-int32-bias"])
def test_wrong_folds_verify_differs(name, kind):
    data = _network(name)
    folded, report = qdqfold_native.fold_with_report(data)
    wrong = mutate(folded, report, kind, which=len([e for e in report["batchnorms"] if e["folded"]]) // 2)
    result = verify(data, wrong, report=report, count_units=False, levels=("off",))
    assert result.verdict == "differs"
    assert not result.worst_fold.passed


def test_mbv2_end_to_end_hides_a_one_percent_bias_error_but_the_certificate_does_not():
    """The issue's point: end to end, a 1% bias error in one channel is inside the rounding floor of a deep QDQ
    network; the certificate of that fold is not."""
    data = mobilenet_v2_qdq()
    folded, report = qdqfold_native.fold_with_report(data)
    wrong = mutate(folded, report, "bias", which=10)
    result = verify(data, wrong, report=report, count_units=False, levels=("off",))
    [out] = result.outputs
    assert out.verdict == "exact"  # end to end: within the floor
    assert result.verdict == "differs" and not result.worst_fold.passed


def test_an_approximate_fold_verifies_approximate_not_differs():
    data = _sample("ortq_seed_prebn_pc.onnx").read_bytes()
    folded, report = qdqfold_native.fold_with_report(data, drop_activation_quantizers=True)
    assert any(e["folded"] and e["exact"] is False for e in report["batchnorms"])
    result = verify(data, folded, report=report, count_units=False)
    assert result.verdict == "approximate" and result.passed
    assert any(not c.exact_fold for c in result.certificates)


def test_an_embedded_model_file_is_verified_by_path_its_weights_referred_to_in_place(tmp_path):
    import importlib

    v = importlib.import_module("qdqfold.verify")
    src, dst = tmp_path / "mbv2.onnx", tmp_path / "mbv2.folded.onnx"
    src.write_bytes(mobilenet_v2_qdq())
    report = qdqfold_native.fold_file(str(src), str(dst))
    proto = v._Model(src).proto()
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(e.value == "mbv2.onnx" for t in external for e in t.external_data if e.key == "location")
    result = verify(src, dst, report=report, count_units=False)
    assert result.verdict == "exact" and len(result.certificates) == 52


@pytest.mark.parametrize("seed", [0, 10, 20])
def test_bias_rounded_folds_stay_within_a_twin_that_rounds_the_bias_too(seed):
    """52 int32 biases re-quantized: the outputs move by quantizer flips the 1-ulp twin alone may not show on a
    given input; the twin also moves each BN's beta by up to the reported rounding, so it does."""
    data = mobilenet_v2_int8_no_fc_bias()
    folded, report = qdqfold_native.fold_with_report(data)
    assert all(e["exact"] == "bias-rounded" for e in report["batchnorms"])
    result = verify(data, folded, report=report, count_units=False, seed=seed)
    assert result.verdict == "exact", result.failure_message()
