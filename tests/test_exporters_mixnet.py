"""Issue 14, pattern 6: BN after a channel Concat of convolutions (MixNet's mixed depthwise convs, timm).

timm's MixedConv2d splits the channels, runs one depthwise conv per kernel size and concatenates: torch exports
Split -> Conv_k (one per kernel size) -> Concat(axis=1) -> BatchNormalization. When every Concat input is a conv
read only by the Concat, the BN folds slice by slice into each conv (`concat-bn`).
"""

from __future__ import annotations

import onnx

import qdqfold_native
from helpers.exporters.mixnet import mixed_conv_bn
from helpers.onnxrt import assert_same_outputs

def test_bn_after_concat_folds_slice_by_slice():
    model = mixed_conv_bn()
    out, report = qdqfold_native.fold_with_report(model.SerializeToString())
    r = report["batchnorms"][0]
    assert r["folded"] and r["code"] == "concat-bn", r
    assert r["into"] == ["/conv_dw/0/Conv", "/conv_dw/1/Conv", "/conv_dw/2/Conv"]
    folded = onnx.load_from_string(out)
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    onnx.checker.check_model(folded, full_check=True)
    assert_same_outputs(model, folded)


def test_a_conv_output_read_elsewhere_keeps_the_bn_and_changes_nothing():
    model = mixed_conv_bn(extra_reader=True)
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, fold_forward=False)
    r = report["batchnorms"][0]
    assert not r["folded"] and r["code"] == "layer-output-is-graph-output", r
    assert out == data


def test_verify_judges_the_concat_fold_without_certifying_it():
    """verify's certificates feed one layer's input: a fold into parallel layers is listed as not isolable."""
    from qdqfold.verify import verify

    model = mixed_conv_bn()
    out, report = qdqfold_native.fold_with_report(model.SerializeToString())
    result = verify(model, out, report=report, input_sets=1, levels=("off",))
    # No certificate, no "exact": the outputs agree, and the verdict says the fold was not isolated.
    assert result.verdict == "uncertified" and result.passed
