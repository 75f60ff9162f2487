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
from onnx import numpy_helper as nh

import qdqfold_native
from helpers.exporters.brevitas import keep_initializers_as_inputs_model, with_clip
from helpers.folding import fold
from helpers.onnxrt import assert_same_outputs
from helpers.qdq import Case, assert_same

def test_overridable_initializers_are_kept_and_the_message_names_the_option():
    result = fold(keep_initializers_as_inputs_model())
    records = result.report["batchnorms"]
    assert len(records) == 1 and not records[0]["folded"]
    assert records[0]["code"].startswith("non-constant"), records[0]
    assert "freeze_initializer_inputs=True" in records[0]["message"]  # --freeze-initializer-inputs in the CLI
    assert result.bytes == result.input


def test_freeze_initializer_inputs_folds_and_drops_the_folded_inputs():
    model = keep_initializers_as_inputs_model()
    folded = fold(model, freeze_initializer_inputs=True)
    record = folded.report["batchnorms"][0]
    assert record["folded"] and record["code"] == "conv-bn", record
    assert [i.name for i in folded.model.graph.input] == ["inp.1"]
    assert {i.name for i in folded.model.graph.initializer} == {"conv.weight", "conv.bias"}
    onnx.checker.check_model(folded.model, full_check=True)
    assert_same_outputs(model, folded.model)


def test_ir_version_3_reads_them_as_constants_and_keeps_every_initializer_an_input():
    model = keep_initializers_as_inputs_model(ir_version=3, opset=8)
    # A fold that writes a new tensor (a bias-free conv gets one) must list it as an input too.
    conv = model.graph.node[0]
    del conv.input[2]
    folded = fold(model)
    assert folded.report["batchnorms"][0]["folded"], folded.report["batchnorms"][0]
    inputs = {i.name for i in folded.model.graph.input}
    assert {i.name for i in folded.model.graph.initializer} <= inputs
    assert not any(i.name.startswith("bn.") for i in [*folded.model.graph.initializer, *folded.model.graph.input])
    onnx.checker.check_model(folded.model)
    assert_same_outputs(model, folded.model)


def test_cli_flag(tmp_path):
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(keep_initializers_as_inputs_model(), src)
    result = subprocess.run([sys.executable, "-m", "qdqfold", str(src), "-o", str(dst), "--freeze-initializer-inputs"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert [i.name for i in onnx.load(dst).graph.input] == ["inp.1"]


# --------------------------------------------------------------------------------------- pattern 3: QCDQ Clip


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


def test_qcdq_integers_beyond_the_clip_are_kept():
    """Found by fuzzing: integers the Clip changes would be mirrored unclipped. Brevitas never writes them, but a
    model that does is kept with a reason, not folded wrongly."""
    ints = np.random.default_rng(4).integers(-7, 8, size=(6, 8, 3, 3))
    ints[1, 0, 0, 0] = 100  # beyond [-7, 7], in a channel with a negative factor
    case = with_clip(Case(form="int", qtype=T.INT8, zero=0, ints=ints, opset=13), -7, 7)
    out, report = qdqfold_native.fold_with_report(case.bytes, allow_nonzero_zero_point=True)
    r = report["batchnorms"][0]
    assert not r["folded"] and r["code"] == "clipped-weight", r
    assert out == case.bytes
