"""The onnxruntime target's integer activations (issue 22): after the output quantizers and the uint8 pairs are in,
a uint8 ``DequantizeLinear -> Relu | Clip -> QuantizeLinear`` chain whose two quantizers agree becomes one integer
``Clip(q, Q(lo), Q(hi))`` (cpp/targets/onnxruntime_integer_activations.cpp, the proof there). At ModelOpt's
symmetric zero point onnxruntime cannot drop these activations itself, so without this every Relu / Relu6 of a
QAT export runs as three float passes between two integer kernels.

Each case is checked on a model without BN, so the target is the only change: outputs with onnxruntime's
optimisations off equal the original's bit for bit. Integer bounds are checked against numpy's own quantizer.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native
from helpers.exporters.modelopt_qat import mobilenet_v2_qat
from helpers.onnxrt import run
from test_target_onnxruntime import feeds, layer_model, relu


def clip(lo=None, hi=None, name="clip"):
    return h.make_node("Clip", ["c", "lo" if lo is not None else "", "hi" if hi is not None else ""], ["r"], name=name)


def bounds(lo=None, hi=None):
    return [nh.from_array(np.array(v, np.float32), n) for n, v in (("lo", lo), ("hi", hi)) if v is not None]


def q_uint8(v: float, s: float, z: int) -> int:
    """The ONNX QuantizeLinear of one float to uint8: round half to even of v / s (float32), + z, saturated."""
    if np.isinf(v):
        return 0 if v < 0 else 255
    return int(np.clip(np.rint(np.float32(v) / np.float32(s)) + z, 0, 255))


# name: (chain, its bounds, out_scale, out_zero as written (int8), the float bounds the chain clips to)
CASES = {
    "relu-zp0": ([relu()], [], 0.04, 0, (0.0, np.inf)),
    "relu-zp-minus-20": ([relu()], [], 0.04, -20, (0.0, np.inf)),
    "relu6": ([clip(0, 6)], bounds(0, 6), 6 / 127, 0, (0.0, 6.0)),
    "relu6-wider-scale": ([clip(0, 6)], bounds(0, 6), 0.031, 0, (0.0, 6.0)),
    "clip-off-grid": ([clip(-0.337, 2.971)], bounds(-0.337, 2.971), 0.04, 3, (-0.337, 2.971)),
    "clip-min-only": ([clip(lo=0.21)], bounds(lo=0.21), 0.04, 0, (0.21, np.inf)),
    "clip-max-only": ([clip(hi=1.13)], bounds(hi=1.13), 0.04, 0, (-np.inf, 1.13)),
    "clip-beyond-range": ([clip(-100, 100)], bounds(-100, 100), 0.04, 0, (-100.0, 100.0)),
    "clip-min-above-max": ([clip(1.0, 0.53)], bounds(1.0, 0.53), 0.04, 0, (1.0, 0.53)),
}


def integer_clips(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = {t.name: t for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "Clip" and n.input[1] in inits
            and inits[n.input[1]].data_type == T.UINT8]


@pytest.mark.parametrize("case", list(CASES))
def test_an_activation_between_equal_quantizers_runs_on_the_integers(case):
    chain, inits, scale, zero, (lo, hi) = CASES[case]
    model = layer_model(chain, out_scale=scale, out_zero=zero, extra_inits=inits)
    out, report = qdqfold_native.fold_with_report(model.SerializeToString(), target="onnxruntime")
    (layer,) = report["target_layers"]
    assert layer["code"] == "output-quantizer" and layer["metrics"].get("activation_on_integers") == 1.0, layer
    targeted = onnx.load_from_string(out)
    onnx.checker.check_model(targeted)
    assert not [n for n in targeted.graph.node if n.op_type == "Relu"]
    (node,) = integer_clips(targeted)
    assert len([n for n in targeted.graph.node if n.op_type == "Clip"]) == 1  # the float one is gone
    inits_out = {t.name: int(nh.to_array(t)) for t in targeted.graph.initializer if t.name in node.input[1:]}
    z = zero + 128  # the uint8 pair (onnxruntime_uint8.cpp)
    assert (inits_out[node.input[1]], inits_out[node.input[2]]) == (q_uint8(lo, scale, z), q_uint8(hi, scale, z))
    assert f"[{q_uint8(lo, scale, z)}, {q_uint8(hi, scale, z)}]" in layer["message"]
    for seed in range(4):
        np.testing.assert_array_equal(run(out, feeds(seed))[0], run(model, feeds(seed))[0])


@pytest.mark.parametrize("case", ["bound-at-a-tie", "opset-11"])
def test_an_activation_the_rewrite_cannot_prove_stays_in_float(case):
    if case == "bound-at-a-tie":  # 1.25 / 0.5 = 2.5: a runtime dividing by the reciprocal could round either way
        model = layer_model([clip(0, 1.25)], out_scale=0.5, extra_inits=bounds(0, 1.25))
    else:  # Clip takes integer tensors from opset 12 (the weight quantizer made per-tensor: axis needs 13)
        model = layer_model([relu()])
        model.opset_import[0].version = 11
        inits = {t.name: t for t in model.graph.initializer}
        inits["sw"].CopyFrom(nh.from_array(np.array(0.003, np.float32), "sw"))
        inits["zw"].CopyFrom(nh.from_array(np.array(0, np.int8), "zw"))
        wdq = next(n for n in model.graph.node if n.name == "wdq")
        del wdq.attribute[:]
    out, report = qdqfold_native.fold_with_report(model.SerializeToString(), target="onnxruntime")
    targeted = onnx.load_from_string(out)
    assert not integer_clips(targeted)
    assert not any(e.get("metrics", {}).get("activation_on_integers") for e in report["target_layers"])
    for seed in range(3):
        np.testing.assert_array_equal(run(out, feeds(seed))[0], run(model, feeds(seed))[0])


def test_mobilenet_v2_relu6_chains_stay_integer_in_onnxruntime():
    """Every Relu6 of the generated QAT MobileNetV2 whose conv got an output quantizer runs on the integers, and
    in the model onnxruntime builds at its default level each integer Clip reads a QLinearConv's integers (no
    DequantizeLinear -> float Clip -> QuantizeLinear left after it)."""
    data = mobilenet_v2_qat(width=0.25, size=32, classes=10).SerializeToString()
    folded = qdqfold_native.fold(data)
    out, report = qdqfold_native.fold_with_report(data, target="onnxruntime")
    given = [e for e in report["target_layers"] if e["code"] == "output-quantizer"]
    on_integers = [e for e in given if e["metrics"].get("activation_on_integers")]
    assert len(on_integers) == len(given) >= 30  # each of those convs feeds a Relu6
    targeted = onnx.load_from_string(out)
    own = [e for e in report["target_layers"] if e["code"] == "integer-activation"]
    assert len(integer_clips(targeted)) == len(on_integers) + len(own)  # one record tells of each
    # The float Clips left follow a conv left in float (a residual Add or the pooling reads the Relu6's output).
    producer = {o: n for n in targeted.graph.node for o in n.output}
    in_float = {e["node"] for e in report["target_layers"] if not e["folded"]}
    left = [n for n in targeted.graph.node if n.op_type == "Clip" and n not in integer_clips(targeted)]
    assert left and all(producer[n.input[0]].name in in_float for n in left)
    for seed in range(2):
        x = {"input": np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype(np.float32)}
        np.testing.assert_array_equal(run(out, x)[0], run(folded, x)[0])
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(out, so, providers=["CPUExecutionProvider"])
        built = onnx.load(so.optimized_model_filepath).graph
    producer = {o: n for n in built.node for o in n.output}
    clips = [n for n in built.node if n.op_type == "Clip"]
    assert len(clips) == len(integer_clips(targeted))

    def source(value):  # through the layout Transposes onnxruntime puts where an NHWC integer kernel meets a float one
        n = producer[value]
        return source(n.input[0]) if n.op_type == "Transpose" else n.op_type

    assert all(source(n.input[0]) == "QLinearConv" for n in clips), [source(n.input[0]) for n in clips]


def test_a_relu_before_a_grid_input_stays_sorted_and_exact():
    """A Relu between a DequantizeLinear and the Q -> DQ the residual rewrite added (grid-input) is a chain too,
    whose QuantizeLinear the target itself created: the written graph must still be topologically sorted (found
    by review: the Clip used to be written after the DequantizeLinear that reads it)."""
    inits = [nh.from_array(np.array(0.05, np.float32), "s"), nh.from_array(np.array(128, np.uint8), "z"),
             nh.from_array(np.array(0.07, np.float32), "s2"), nh.from_array(np.array(128, np.uint8), "z2")]
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q0"),
             h.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq0"),
             h.make_node("Relu", ["xd"], ["v"], name="relu"),
             h.make_node("QuantizeLinear", ["u", "s2", "z2"], ["uq"], name="qu"),
             h.make_node("DequantizeLinear", ["uq", "s2", "z2"], ["ud"], name="dqu"),
             h.make_node("Add", ["v", "ud"], ["y"], name="add")]
    shape = [1, 4, 3, 3]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, T.FLOAT, shape) for n in "xu"],
                         [h.make_tensor_value_info("y", T.FLOAT, shape)], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    out, report = qdqfold_native.fold_with_report(model.SerializeToString(), target="onnxruntime")
    records = {t["node"]: t for t in report["target_layers"]}
    assert records["add"]["code"] == "grid-input" and records["relu"]["code"] == "integer-activation"
    targeted = onnx.load_from_string(out)
    onnx.checker.check_model(targeted, full_check=True)  # sorted, and every attribute valid for its op
    (node,) = integer_clips(targeted)
    assert [int(nh.to_array(t)) for n in node.input[1:] for t in targeted.graph.initializer if t.name == n] == [128, 255]
    rng = np.random.default_rng(7)
    for _ in range(3):
        x = {"x": (rng.standard_normal(shape) * 5).astype(np.float32), "u": rng.standard_normal(shape).astype(np.float32)}
        np.testing.assert_array_equal(run(out, x)[0], run(model, x)[0])
