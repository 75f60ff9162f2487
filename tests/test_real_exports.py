"""Issue 24, item 5: fixtures cut from the real exporters' output (tests/models/real/, see its README: exporter,
version, configuration and how each was cut), folded and checked with qdqfold's own verification against
onnxruntime running the original (a certificate per fold on the original's activations, and the outputs against
a rounding twin of the original). The counts are what the current main gives; a layout main keeps but should
fold carries that expectation under xfail(strict=True), so the test flips when the fix lands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

import qdqfold

REAL = Path(__file__).parent / "models" / "real"


@dataclass
class Case:
    file: str
    found: int
    folded: int
    kept: dict[str, int] = field(default_factory=dict)
    options: dict[str, bool] = field(default_factory=dict)
    xfail: str | None = None  # why main does not give this expectation yet

    @property
    def id(self) -> str:
        return self.file.removesuffix(".onnx") + "".join(f"-{k}" for k in self.options)


CASES = [
    Case("float_torchscript_mobilenet_v2_3bn.onnx", 3, 3),
    Case("modelopt_int8_mobilenet_v2_3bn.onnx", 3, 3),
    Case("modelopt_int8_resnet18_1bn.onnx", 1, 1),
    # A whole inverted residual block with its Add (tests/test_target_real.py runs the onnxruntime target on it).
    Case("modelopt_int8_mobilenet_v2_block3_residual.onnx", 3, 3),
    Case("nncf_onnx_mobilenet_v2_3bn.onnx", 3, 3),
    Case("nncf_torch_qdq_mobilenet_v2_3bn.onnx", 3, 3),
    Case("brevitas_qcdq_mobilenet_v2_3bn.onnx", 3, 0, {"non-constant-parameters": 3}),
    Case("brevitas_qcdq_mobilenet_v2_3bn.onnx", 3, 3, options={"freeze_initializer_inputs": True}),
    # An activation quantizer between the Conv and its BN: no exact fold can cross it.
    Case("ortq_pc_mobilenet_v2_3bn.onnx", 3, 0, {"activation-quantizer": 3}),
    Case("ortq_pt_mobilenet_v2_3bn.onnx", 3, 0, {"activation-quantizer": 3}),
    Case("aimet_onnx_mobilenet_v2_3bn.onnx", 3, 0, {"activation-quantizer": 3}),
    # TensorRT's FP8 quantizers are kept by design; NNCF's torch export writes OpenVINO FakeQuantize ops.
    Case("modelopt_fp8_mobilenet_v2_3bn.onnx", 3, 0, {"tensorrt-quantizer": 3}),
    Case("nncf_torch_mobilenet_v2_3bn.onnx", 3, 0, {"non-constant-weight": 3}),
    # Folded since issue 24 item 1 (the trt::DequantizeLinear scale is [C_out, 1, 1, 1], broadcast per channel).
    Case("modelopt_int4_mobilenet_v2_3bn.onnx", 3, 3),
    # Folded since issue 24 item 2 (the MatMul's output is also read by a Shape node, which reads only its shape).
    Case("levit_torchscript_qkv_1bn.onnx", 1, 1),
    # Folded since the core proves ranks through Shape -> Slice -> Concat -> Reshape (main: unknown-rank).
    Case("levit_torchscript_flatten_qkv_1bn.onnx", 1, 1),
]

def _param(case: Case):
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.id, marks=marks)


def _fold(case: Case):
    return qdqfold.fold_model(str(REAL / case.file), report=True, **case.options)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_counts_and_verification(case: Case) -> None:
    folded, report = _fold(case)
    totals = report.totals()
    assert (totals["batchnorms"], totals["folded"], dict(report.kept_by_reason())) == \
        (case.found, case.folded, case.kept), report.summary()
    if not case.folded:
        # Nothing folded: the model passes through byte for byte.
        data = (REAL / case.file).read_bytes()
        out, _ = qdqfold.fold_bytes(data, **case.options)
        assert out == data
        return
    result = qdqfold.verify(str(REAL / case.file), folded, report=report)
    assert result.verdict == "exact", result.failure_message()
    # Every fold is certified where it sits, not only end to end.
    assert sorted(c.node for c in result.certificates) == sorted(b.node for b in report.folded)
    assert not result.uncertified
    assert all(c.passed and c.ratio <= 1 for c in result.certificates)


def test_levit_dynamo_folds() -> None:
    """torch's dynamo export of LeViT (MatMul -> Reshape -> BN, no Shape reader): main folds it."""
    _, report = qdqfold.fold_model(str(REAL / "levit_dynamo_mlp_ln1_1bn.onnx"), report=True)
    assert report.totals()["folded"] == 1
    assert report.folded_by_fold() == {"matmul-reshape-bn": 1}


def test_levit_dynamo_verifies() -> None:
    """The certificate of a MatMul -> Reshape -> BN fold takes the layer's |W'| |x| through the Reshape (main
    dropped it for the shape mismatch and called this right fold 13x its bound, in channel 63)."""
    path = str(REAL / "levit_dynamo_mlp_ln1_1bn.onnx")
    folded, report = qdqfold.fold_model(path, report=True)
    result = qdqfold.verify(path, folded, report=report)
    assert result.verdict == "exact", result.failure_message()
    assert [c.node for c in result.certificates] == [report.folded[0].node]


def test_levit_dynamo_certificate_sees_a_wrong_channel() -> None:
    """The bound is not loose: one channel of the fold's shift off by 1e-4 (outputs of magnitude about 1, a
    float-rounding bound of about 1e-5 there) fails the certificate, in that channel."""
    from onnx import numpy_helper

    path = str(REAL / "levit_dynamo_mlp_ln1_1bn.onnx")
    folded, report = qdqfold.fold_model(path, report=True)
    (name,) = report.folded[0].new_tensors
    tensor = next(t for t in folded.graph.initializer if t.name == name)
    shift = numpy_helper.to_array(tensor).copy()
    shift[63] += 1e-4
    tensor.CopyFrom(numpy_helper.from_array(shift, name))
    result = qdqfold.verify(path, folded, report=report)
    assert result.verdict == "differs"
    worst = result.worst_fold
    assert (worst.channel, worst.passed) == (63, False) and worst.ratio > 2, worst


def test_every_fixture_is_listed() -> None:
    """Each committed cut has a case here and a line in the README."""
    files = sorted(p.name for p in REAL.glob("*.onnx"))
    listed = {c.file for c in CASES} | {"levit_dynamo_mlp_ln1_1bn.onnx"}
    assert set(files) == listed
    readme = (REAL / "README.md").read_text()
    assert all(f in readme for f in files)


def test_real_exports_tool(tmp_path) -> None:
    """tools/real_exports.py on two of the cuts laid out as exports: one row each, counts and verdict."""
    import importlib.util
    import json
    import shutil

    spec = importlib.util.spec_from_file_location("real_exports", Path(__file__).parents[1] / "tools" / "real_exports.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for exporter, cut in (("modelopt_int8", "modelopt_int8_resnet18_1bn.onnx"),
                          ("ortq_pc", "ortq_pc_mobilenet_v2_3bn.onnx")):
        (tmp_path / exporter).mkdir()
        shutil.copy(REAL / cut, tmp_path / exporter / "cut.onnx")
    out, rows = tmp_path / "table.md", tmp_path / "rows.json"
    assert tool.main([str(tmp_path), "--out", str(out), "--json", str(rows), "--input-sets", "1"]) == 0
    by = {r["exporter"]: r for r in json.loads(rows.read_text())}
    assert (by["modelopt_int8"]["found"], by["modelopt_int8"]["folded"], by["modelopt_int8"]["verdict"]) == (1, 1, "exact")
    assert by["ortq_pc"]["kept_by_reason"] == {"activation-quantizer": 3} and "verdict" not in by["ortq_pc"]
    text = out.read_text()
    assert "| modelopt_int8 | cut | 1 | 1 | - | exact |" in text
    assert "| ortq_pc | cut | 3 | 0 | 3 activation-quantizer |" in text
    # --before adds the earlier run's counts.
    assert tool.main([str(tmp_path), "--only", "ortq_pc", "--before", str(rows), "--out", str(out)]) == 0
    assert out.read_text().splitlines()[-1].endswith("| 0 folded; 3 activation-quantizer |")
