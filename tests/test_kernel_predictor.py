"""The one predictor of onnxruntime's integer kernels (cpp/predict/onnxruntime_kernels.h), against onnxruntime.

Each graph of tests/helpers/kernel_graphs.py exercises one rule (Gemm with and without an output quantizer, Relu /
Clip before a quantizer at zero points on and off the boundary, a quantizer read by two DequantizeLinear nodes or
that is a graph output, MatMul, Add / Mul / Concat, per-channel weights, an integer Clip between Q and DQ). The
prediction (report["target_kernels"]["before"]: the model as read) must equal the count of each kernel in the model
onnxruntime saves at ORT_ENABLE_ALL on the CPU provider, and the static saturation check
(qdqfold_native.integer_kernels) must list every Conv / MatMul / Gemm the predictor says becomes a kernel. The same
on the generated ModelOpt-style nets, before and after the target (with and without requantize_residuals).
"""

from __future__ import annotations

import collections
import platform

import onnxruntime as ort
import pytest

import qdqfold_native
from helpers.exporters.modelopt_qat import mobilenet_v2_qat, resnet_qat
from helpers.kernel_graphs import CASES
from helpers.qdq import ort_op_counts

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the prediction is x86-64's (int8 activation pairs run as uint8)")

KERNELS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "QLinearAdd", "QLinearMul",
           "QLinearConcat")
GEMMS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm")  # the layers the saturation check bounds

# What onnxruntime 1.32 forms, case by case (the claim each graph makes; the test checks it against onnxruntime
# itself, so a case whose rule does not fire shows up as a mismatch here, not as a silent agreement).
EXPECTED = {
    "conv-no-output-q": {}, "relu-int8-zp0": {}, "clip-int8-zp-128-narrower": {}, "clip-int8-zp0-relu6": {},
    "clip-uint8-zp10-inside": {}, "clip-int8-zp-128-min-beyond-half-step": {},
    "two-output-q-identical": {}, "two-output-q-same": {}, "two-output-q-different": {},
    "gemm-shared-q-int8": {}, "add-shared-q-int8": {}, "concat-shared-q-int8": {},
    "add-shared-q-uint8": {"QLinearAdd": 1},
    "shared-q-int8": {}, "shared-q-uint8": {"QLinearConv": 2}, "shared-dq-int8": {}, "shared-dq-uint8": {"QLinearConv": 2},
    "q-graph-output-int8": {}, "output-q-shared-int8": {},
    "gemm-no-q-float-bias": {}, "gemm-q-int32-bias-beta2": {}, "gemm-relu-q-kept": {}, "matmul-relu-q-kept": {},
    "add-no-output-q": {}, "integer-clip-int8": {}, "integer-clip-uint8": {"QLinearConv": 2},
}


def _expected(case: str) -> dict[str, int]:
    if case in EXPECTED:
        return EXPECTED[case]
    for prefix, kernel in (("gemm", "QGemm"), ("add", "QLinearAdd"), ("mul", "QLinearMul"),
                           ("concat", "QLinearConcat")):
        if case.startswith(prefix):
            return {kernel: 1}
    if case.startswith("matmul"):
        return {"QLinearMatMul" if case == "matmul-q" else "MatMulIntegerToFloat": 1}
    return {"QLinearConv": 1}


def real(data: bytes) -> dict[str, int]:
    counts = ort_op_counts(data, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    return {k: counts[k] for k in KERNELS if counts[k]}


def predicted(data: bytes, **options) -> tuple[dict[str, int], dict[str, int], bytes]:
    out, report = qdqfold_native.fold_with_report(data, target="onnxruntime", **options)
    k = report["target_kernels"]
    return ({op: n for op, n in k["before"].items() if n}, {op: n for op, n in k["after"].items() if n}, out)


def checked_layers(data: bytes) -> dict[str, int]:
    return dict(collections.Counter(lay["kernel"] for lay in qdqfold_native.integer_kernels(data)))


@pytest.mark.parametrize("case", list(CASES))
def test_the_prediction_is_what_onnxruntime_forms(case):
    data = CASES[case]().SerializeToString()
    before, _, _ = predicted(data)
    assert real(data) == _expected(case), "the case no longer exercises its rule"
    assert before == real(data)
    # The saturation check bounds every integer GEMM the predictor names, and nothing else.
    assert checked_layers(data) == {k: n for k, n in before.items() if k in GEMMS}


def test_a_shared_int8_quantizer_is_not_counted_where_the_old_rule_counted_it():
    """The predictor this one replaced took every int8 Q -> DQ pair as uint8 (two QLinearConv here)."""
    data = CASES["shared-dq-int8"]().SerializeToString()
    assert predicted(data)[0] == {} == real(data)
    assert predicted(CASES["shared-dq-uint8"]().SerializeToString())[0] == {"QLinearConv": 2}


@pytest.fixture(scope="module")
def nets():
    return {"mobilenet_v2": mobilenet_v2_qat(width=0.25, size=16).SerializeToString(),
            "resnet": resnet_qat(width=0.125, size=16, blocks=(1, 1)).SerializeToString()}


@pytest.mark.parametrize("requantize", [False, True])
@pytest.mark.parametrize("net", ["mobilenet_v2", "resnet"])
def test_modelopt_nets_before_and_after_the_target(nets, net, requantize):
    data = nets[net]
    before, after, out = predicted(data, requantize_residuals=requantize)
    assert before == real(data)
    assert after == real(out)
    assert after.get("QLinearConv", 0) > before.get("QLinearConv", 0)
    for model, kernels in ((data, before), (out, after)):
        assert checked_layers(model) == {k: n for k, n in kernels.items() if k in GEMMS}


def test_an_integer_clip_before_the_dequantizer_narrows_the_checked_activation_range():
    """Q -> Clip(uint8 128..255) -> DQ -> Conv: the kernel reads only bytes 128..255 (the Relu of the lead's
    integer-activation rewrite at zero point 128), so the pair bound uses that range."""
    layers = qdqfold_native.integer_kernels(CASES["integer-clip-uint8"]().SerializeToString())
    assert [lay["activation_range"] for lay in layers] == [(0, 255), (128, 255)]
