"""--verify knows the deployment target (issue 22, item 5; python/qdqfold/verify/target.py).

- the kernels it reports as measured are those of the model onnxruntime saves at ORT_ENABLE_ALL (counted here
  independently), beside the report's prediction; the static saturation check covers every integer GEMM kernel;
- an exact target output verifies exact (certificates included: they compare the layer before its new output
  quantizer), a requantize_residuals output APPROXIMATE (exit 0) with a measured, nonzero and bounded deviation
  against the QAT export; a wrong inserted quantizer fails (exit 3), in exact and in approximate mode.
Numeric checks run with onnxruntime's optimisations off only: at its default level the u8s8 kernels of CPUs
without VNNI can saturate (issue 21), so outputs there are never compared here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native
from helpers.exporters.modelopt_qat import mobilenet_v2_qat, resnet_qat
from helpers.qdq import ort_op_counts
from qdqfold.verify import verify
from qdqfold.verify.steps import is_quantized_unit
from test_target_residuals import conv_residual  # x -> Q -> DQ -> Conv -> c; Add(c, x) -> Q -> DQ -> y

OFF = ("off",)
SHAPE = [1, 4, 6, 6]


def fold(model: onnx.ModelProto, **options):
    out, report = qdqfold_native.fold_with_report(model.SerializeToString(), target="onnxruntime", **options)
    return bytes(out), report


def units_at_default_level(data: bytes) -> dict[str, int]:
    counts = ort_op_counts(data, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    return {op: n for op, n in counts.items() if is_quantized_unit(op)}


@pytest.fixture(scope="module")
def resnet():
    return resnet_qat(width=0.125, size=32)


def with_scale(data: bytes, q_name: str, factor: float) -> bytes:
    """``data`` with the QuantizeLinear ``q_name`` and the DequantizeLinear reading it on a scale ``factor``
    times theirs (a private copy)."""
    model = onnx.load_from_string(data)
    inits = {t.name: t for t in model.graph.initializer}
    q = next(n for n in model.graph.node if n.name == q_name)
    # Its DequantizeLinear, unless the target's integer activation (an integer Clip) reads it instead.
    dq = next((n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]), None)
    scale = nh.to_array(inits[q.input[1]]) * np.float32(factor)
    model.graph.initializer.append(nh.from_array(scale.astype(np.float32), "broken_scale"))
    q.input[1] = "broken_scale"
    if dq is not None:
        dq.input[1] = "broken_scale"
    return model.SerializeToString()


def test_measured_kernels_are_those_of_onnxruntimes_saved_model_beside_the_prediction():
    model = mobilenet_v2_qat(width=0.25, size=32)
    data = model.SerializeToString()
    out, report = fold(model)
    result = verify(data, out, report=report, levels=OFF, input_sets=1)
    t = result.target
    assert t is not None and t["name"] == "onnxruntime" and t["measured_at"]["level"] == "ORT_ENABLE_ALL"
    before, after = units_at_default_level(data), units_at_default_level(out)
    assert t["kernels"]["measured"] == {"before": before, "after": after}
    assert after.get("QLinearConv", 0) > before.get("QLinearConv", 0)  # the target's point, measured
    assert t["kernels"]["predicted"] == report["target_kernels"]
    rows = {r["op"]: r for r in t["kernels"]["rows"]}
    assert rows["QLinearConv"]["measured_after"] == after["QLinearConv"]
    assert rows["QLinearConv"]["predicted_after"] == report["target_kernels"]["after"]["QLinearConv"]
    # Every disagreement listed is one, and every one is listed.
    expected = [(op, side) for op in report["target_kernels"]["after"] for side, counts, key in
                (("original", before, "before"), ("output", after, "after"))
                if report["target_kernels"][key][op] != counts.get(op, 0)]
    assert sorted((d["op"], d["model"]) for d in t["kernels"]["disagreements"]) == sorted(expected)
    # The saturation check covers every integer GEMM kernel onnxruntime formed.
    s = t["saturation"]
    formed = sum(after.get(op, 0) for op in ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat"))
    assert s["formed"] == formed > 0 and s["covered"] and s["uncovered"] == [] and s["checked"] >= formed


def test_a_prediction_that_misses_is_a_visible_disagreement_not_a_failure(resnet):
    out, report = fold(resnet)
    report["target_kernels"]["after"]["QLinearConv"] += 3  # as if the predictor were wrong
    result = verify(resnet.SerializeToString(), out, report=report, levels=OFF, input_sets=1)
    (d,) = result.target["kernels"]["disagreements"]
    assert d["op"] == "QLinearConv" and d["model"] == "output" and d["predicted"] == d["measured"] + 3
    assert result.passed


def test_an_exact_target_output_verifies_exact_with_every_certificate(resnet):
    out, report = fold(resnet)
    result = verify(resnet.SerializeToString(), out, report=report, levels=OFF)
    assert result.verdict == "exact", result.failure_message()
    assert result.target["rewrites"] == "exact" and result.target["approximate"] is None
    assert len(result.certificates) == sum(b["folded"] for b in report["batchnorms"])
    assert all(c.passed and c.ratio <= 1 for c in result.certificates)


def test_a_wrong_output_quantizer_fails_verify(resnet):
    out, report = fold(resnet)
    inserted = [n.name for n in onnx.load_from_string(out).graph.node if "output_quantizer/QuantizeLinear" in n.name]
    assert inserted
    result = verify(resnet.SerializeToString(), with_scale(out, inserted[0], 1.5), report=report, levels=OFF)
    assert result.verdict == "differs" and not result.passed
    # Named either first (the outputs still within the twin) or among the target's problems (the outputs moved too).
    named = [p for p in [result.failure_message(), *result.target["problems"]] if inserted[0] in p and "grids" in p]
    assert named, (result.failure_message(), result.target["problems"])


def test_requantize_residuals_is_approximate_with_a_measured_bounded_deviation():
    model = conv_residual()
    out, report = fold(model, requantize_residuals=True)
    (add,) = [t for t in report["target_layers"] if t["node"] == "add"]
    step = dict(add["metrics"])["new_rounding_step"]
    result = verify(model.SerializeToString(), out, report=report, levels=OFF, input_sets=4)
    assert result.verdict == "approximate" and result.passed
    t = result.target
    assert t["rewrites"] == "approximate" and t["approximate"]["separated"] and not t["problems"]
    # The rows compare with the original given the same rounding: everything else is exact against it.
    assert all(o.verdict == "exact" for o in result.levels["off"])
    assert {r["input"] for r in t["approximate"]["rounded_inputs"]} == {"c", "x"}
    (o,) = t["approximate"]["outputs"]
    # Measured against the QAT export: each Add input moves by at most step / 2, their sum by at most step, and
    # the output quantizer (0.08) adds at most one of its steps.
    assert 0 < o["max_abs"] <= step + 0.08 * (1 + 1e-6)
    assert o["step"] == pytest.approx(0.08) and o["steps"] == pytest.approx(o["max_abs"] / 0.08)
    assert o["floor_of_range"] is not None and o["of_range"] > o["floor_of_range"]


def test_resnet_requantize_residuals_on_the_command_line_is_approximate_exit_0(resnet, tmp_path, capsys):
    from qdqfold.cli import main

    src = tmp_path / "resnet.onnx"
    onnx.save(resnet, src)
    code = main([str(src), "-o", str(tmp_path / "out.onnx"), "--target", "onnxruntime", "--requantize-residuals",
                 "--verify", "--ort-level", "off", "--json"])
    assert code == 0
    v = json.loads(capsys.readouterr().out)["verify"]
    assert v["verdict"] == "approximate" and v["passed"]
    a = v["target"]["approximate"]
    assert a["option"] == "requantize_residuals" and len(a["layers"]) == 8 and a["separated"]
    (o,) = a["outputs"]
    assert o["max_abs"] > 0 and o["top1_rows"] == v["input_sets"]
    assert v["target"]["saturation"]["covered"] and v["target"]["saturation"]["formed"] == 20
    # The text report says it in a few lines.
    main([str(src), "-o", str(tmp_path / "out.onnx"), "--target", "onnxruntime", "--requantize-residuals",
          "--verify", "--ort-level", "off"])
    text = capsys.readouterr().out
    assert "rewrites: APPROXIMATE (requantize_residuals" in text and "against the QAT export" in text
    assert "saturation check: 20 integer layer(s) checked" in text and "every one checked" in text


def test_approximate_mode_still_fails_a_wrong_exact_rewrite(resnet):
    out, report = fold(resnet, requantize_residuals=True)
    inserted = [n.name for n in onnx.load_from_string(out).graph.node if "output_quantizer/QuantizeLinear" in n.name]
    result = verify(resnet.SerializeToString(), with_scale(out, inserted[0], 1.5), report=report, levels=OFF)
    assert result.verdict == "differs" and not result.passed


def test_a_new_rounding_that_is_not_the_reported_one_fails(resnet):
    out, report = fold(resnet, requantize_residuals=True)
    rounding = next(n.name for n in onnx.load_from_string(out).graph.node
                    if n.op_type == "QuantizeLinear" and "/Add/input_quantizer" in n.name)
    result = verify(resnet.SerializeToString(), with_scale(out, rounding, 2.0), report=report, levels=OFF,
                    input_sets=1)
    assert result.verdict == "differs" and result.target["problems"]
    assert "new_rounding_step" in result.failure_message() or "grid" in result.failure_message()


def test_exit_3_for_a_broken_target_output_on_the_command_line(resnet, tmp_path, monkeypatch, capsys):
    from qdqfold.cli import main

    real = qdqfold_native.fold_file

    def fold_then_break(src, dst, **options):
        native = real(src, dst, **options)
        data = Path(dst).read_bytes()
        name = next(n.name for n in onnx.load_from_string(data).graph.node
                    if "output_quantizer/QuantizeLinear" in n.name)
        Path(dst).write_bytes(with_scale(data, name, 1.5))
        return native

    monkeypatch.setattr(qdqfold_native, "fold_file", fold_then_break)
    src = tmp_path / "resnet.onnx"
    onnx.save(resnet, src)
    code = main([str(src), "-o", str(tmp_path / "out.onnx"), "--target", "onnxruntime", "--verify", "--ort-level",
                 "off", "-q"])
    assert code == 3 and "verification failed" in capsys.readouterr().err


def test_without_a_target_there_is_no_target_section(resnet):
    out, report = qdqfold_native.fold_with_report(resnet.SerializeToString())
    assert verify(resnet.SerializeToString(), bytes(out), report=report, levels=OFF, input_sets=1).target is None
