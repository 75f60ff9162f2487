"""Issue 14, pattern 4: initializers listed as graph inputs.

Brevitas exports with `keep_initializers_as_inputs=True` by default: every weight and BN parameter is also a
graph input, an overridable default, so not a constant. `freeze_initializer_inputs=True`
(`--freeze-initializer-inputs`) reads them as constants and drops the folded ones from the graph inputs; under IR
version < 4 (every initializer had to be an input) they are constants without being asked, and stay inputs.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native
from conftest import assert_same_outputs

RNG = np.random.default_rng(144)
C = 4


def keep_initializers_as_inputs_model(ir_version=8, opset=13):
    w = nh.from_array((RNG.standard_normal((C, 3, 3, 3)) * 0.3).astype(np.float32), "conv.weight")
    b = nh.from_array(RNG.standard_normal(C).astype(np.float32), "conv.bias")
    gamma = RNG.uniform(0.5, 1.5, C) * np.array([1, -1, 1, 1])
    bn = [nh.from_array(v.astype(np.float32), f"bn.{n}") for n, v in
          (("weight", gamma), ("bias", RNG.standard_normal(C)), ("running_mean", RNG.standard_normal(C)),
           ("running_var", RNG.uniform(0.5, 2, C)))]
    inits = [w, b, *bn]
    nodes = [h.make_node("Conv", ["inp.1", "conv.weight", "conv.bias"], ["5"], name="Conv_0", pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["5", *[t.name for t in bn]], ["6"], name="BatchNormalization_1",
                         epsilon=1e-5),
             h.make_node("Relu", ["6"], ["7"], name="Relu_2")]
    # torch.onnx.export(..., keep_initializers_as_inputs=True): the data input first, then every initializer.
    inputs = [h.make_tensor_value_info("inp.1", T.FLOAT, [1, 3, 6, 6])] + [
        h.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = h.make_graph(nodes, "torch_jit", inputs, [h.make_tensor_value_info("7", T.FLOAT, [1, C, 6, 6])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], producer_name="pytorch")
    model.ir_version = ir_version
    return model


def _fold(model, **options):
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, **options)
    return onnx.load_from_string(out), report["batchnorms"], data, out


def test_overridable_initializers_are_kept_and_the_message_names_the_option():
    _, records, data, out = _fold(keep_initializers_as_inputs_model())
    assert len(records) == 1 and not records[0]["folded"]
    assert records[0]["code"].startswith("non-constant"), records[0]
    assert "freeze_initializer_inputs=True" in records[0]["message"]  # --freeze-initializer-inputs in the CLI
    assert out == data


def test_freeze_initializer_inputs_folds_and_drops_the_folded_inputs():
    model = keep_initializers_as_inputs_model()
    folded, records, _, _ = _fold(model, freeze_initializer_inputs=True)
    assert records[0]["folded"] and records[0]["code"] == "conv-bn", records[0]
    assert [i.name for i in folded.graph.input] == ["inp.1"]
    assert {i.name for i in folded.graph.initializer} == {"conv.weight", "conv.bias"}
    onnx.checker.check_model(folded, full_check=True)
    assert_same_outputs(model, folded)


def test_ir_version_3_reads_them_as_constants_and_keeps_every_initializer_an_input():
    model = keep_initializers_as_inputs_model(ir_version=3, opset=8)
    # A fold that writes a new tensor (a bias-free conv gets one) must list it as an input too.
    conv = model.graph.node[0]
    del conv.input[2]
    folded, records, _, _ = _fold(model)
    assert records[0]["folded"], records[0]
    inputs = {i.name for i in folded.graph.input}
    assert {i.name for i in folded.graph.initializer} <= inputs
    assert not any(i.name.startswith("bn.") for i in [*folded.graph.initializer, *folded.graph.input])
    onnx.checker.check_model(folded)
    assert_same_outputs(model, folded)


def test_cli_flag(tmp_path):
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(keep_initializers_as_inputs_model(), src)
    result = subprocess.run([sys.executable, "-m", "qdqfold", str(src), "-o", str(dst), "--freeze-initializer-inputs"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert [i.name for i in onnx.load(dst).graph.input] == ["inp.1"]


# --------------------------------------------------------------------------------------- pattern 3: QCDQ Clip

from test_fold_qdq import Case, assert_same  # noqa: E402


def with_clip(case: Case, lo=-127, hi=127, container=T.INT8):
    """Brevitas QCDQ: int W -> Clip(lo, hi) -> DequantizeLinear (TorchScript export), or
    W -> QuantizeLinear -> Clip -> DequantizeLinear (dynamo export); the bounds are scalars of the integer type."""
    m = case.model
    dtype = np.int8 if container == T.INT8 else np.uint8
    m.graph.initializer.extend([nh.from_array(np.array(lo, dtype), "clip_min"),
                                nh.from_array(np.array(hi, dtype), "clip_max")])
    nodes = []
    for n in m.graph.node:
        if n.name == "w_DQ":
            nodes.append(h.make_node("Clip", [n.input[0], "clip_min", "clip_max"], ["w_clipped"], name="w_Clip"))
            n.input[0] = "w_clipped"
        nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return case


def _clip_ints(out):
    m = onnx.load_from_string(out)
    clip = next(n for n in m.graph.node if n.op_type == "Clip")
    inits = {i.name: nh.to_array(i) for i in m.graph.initializer}
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == clip.output[0])
    return clip, inits, dq


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
@pytest.mark.parametrize("bits", [8, 4])
def test_qcdq_int_weight_behind_clip_folds(per_channel, bits):
    hi = 127 if bits == 8 else 7
    rng = np.random.default_rng(143)
    ints = rng.integers(-hi, hi + 1, size=(6, 8, 3, 3))
    case = with_clip(Case(form="int", qtype=T.INT8, per_channel=per_channel, zero=0, ints=ints, opset=13), -hi, hi)
    assert (case.a < 0).any()
    out, report = qdqfold_native.fold_with_report(case.bytes)
    r = report["batchnorms"][0]
    assert r["folded"] and r["code"] == "qdq-layer-bn", r
    folded = onnx.load_from_string(out)
    onnx.checker.check_model(folded, full_check=True)
    clip, inits, dq = _clip_ints(out)
    assert [inits[clip.input[1]].item(), inits[clip.input[2]].item()] == [-hi, hi]  # the Clip stays
    neg = (case.a < 0)[:, None, None, None]
    np.testing.assert_array_equal(inits[clip.input[0]].astype(np.int64), np.where(neg, -case.q0, case.q0))
    scale = np.broadcast_to(np.asarray(case.scale0, np.float64), [6]) * np.abs(case.a)
    np.testing.assert_array_equal(inits[dq.input[1]], scale.astype(np.float32))
    assert_same(case, out, r)


@pytest.mark.parametrize("hi", [127, 7], ids=["int8", "int4-in-int8"])
def test_qcdq_qat_weight_quantizer_then_clip_folds(hi):
    # With [-7, 7] most of the weight lies beyond the Clip: the QuantizeLinear's integers saturate there.
    case = with_clip(Case(form="qat", qtype=T.INT8, zero=0, opset=13), -hi, hi)
    out, report = qdqfold_native.fold_with_report(case.bytes)
    r = report["batchnorms"][0]
    assert r["folded"] and r["code"] == "qdq-layer-bn", r
    onnx.checker.check_model(onnx.load_from_string(out), full_check=True)
    assert "Clip" in [n.op_type for n in onnx.load_from_string(out).graph.node]
    assert_same(case, out, r)


def test_qcdq_asymmetric_clip_keeps_a_value_whose_mirror_leaves_it():
    ints = np.random.default_rng(3).integers(-7, 8, size=(6, 8, 3, 3))
    ints[1, 0, 0, 0] = -8  # channel 1 has a negative factor (Case's gammas)
    case = with_clip(Case(form="int", qtype=T.INT8, zero=0, ints=ints, opset=13), -8, 7)
    assert case.a[1] < 0
    out, report = qdqfold_native.fold_with_report(case.bytes)
    r = report["batchnorms"][0]
    assert not r["folded"] and r["code"] == "negation-overflow", r
    assert out == case.bytes
