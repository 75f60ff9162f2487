"""The float layer -> BN folds on the exporter-made sample models (tests/models, see its README)."""

from __future__ import annotations

import onnx
import pytest

import qdqfold_native

from helpers.onnxrt import assert_same_outputs
from helpers.samples import MODELS

# model -> (BNs folded backwards into their producer, {kept BN: reason code with the backward folds only})
EXPECTED = {
    "unet_up.onnx": (
        {"/enc/enc.1/BatchNormalization": ("conv-bn", "/enc/enc.0/Conv"),
         "/bn/BatchNormalization": ("conv-bn", "/up/ConvTranspose"),
         "/bn2/BatchNormalization": ("conv-bn", "/up2/ConvTranspose")},  # groups=4, no bias
        {}),
    "arcface_head.onnx": (
        {"/stem/stem.1/BatchNormalization": ("conv-bn", "/stem/stem.0/Conv"),
         "/stem/stem.4/BatchNormalization": ("conv-bn", "/stem/stem.3/Conv"),
         "/bn2/BatchNormalization": ("conv-bn", "/stem/stem.3/Conv"),  # Conv -> BN -> BN chain
         "/features/BatchNormalization": ("gemm-bn", "/fc/Gemm")},  # BatchNorm1d after Linear
        {}),
    "input_bn_net.onnx": (
        {"/b1/BatchNormalization": ("conv-bn", "/c1/Conv"),
         "/b2/BatchNormalization": ("conv-bn", "/pw/Conv"),
         "/b3/BatchNormalization": ("conv-bn", "/dw/Conv")},
        # BN on the graph input: nothing produces its input; only a forward fold could take it
        {"/data_bn/BatchNormalization": "no-foldable-layer"}),
    "seed_prebn.onnx": (
        {"/bn1/BatchNormalization": ("conv-bn", "/conv1/Conv")},
        # relu -> bn2 -> conv2 (pad 1): a forward matter
        {"/bn2/BatchNormalization": "no-foldable-layer"}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_backward_folds_on_sample_models(name):
    data = (MODELS / name).read_bytes()
    folded_expected, kept_expected = EXPECTED[name]
    out, report = qdqfold_native.fold_with_report(data, fold_forward=False)
    entries = {e["node"]: e for e in report["batchnorms"]}
    assert set(entries) == set(folded_expected) | set(kept_expected)
    for bn, (code, layer) in folded_expected.items():
        e = entries[bn]
        assert e["folded"] and e["direction"] == "backward", (bn, e["code"], e["message"])
        assert e["code"] == code and e["into"][0] == layer
    for bn, code in kept_expected.items():
        e = entries[bn]
        assert not e["folded"] and e["code"] == code and e["message"], (bn, e)
    folded = onnx.load_from_string(out)
    onnx.checker.check_model(folded, full_check=True)
    remaining = [n.name for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert sorted(remaining) == sorted(kept_expected)
    # graph outputs keep their names; nothing but the folded BNs' parameters left the initializers
    original = onnx.load_from_string(data)
    assert [o.name for o in folded.graph.output] == [o.name for o in original.graph.output]
    assert_same_outputs(data, out)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_backward_folds_win_with_default_options(name):
    """With every fold on, each BN that can fold backwards still folds backwards, into its producer."""
    data = (MODELS / name).read_bytes()
    folded_expected, _ = EXPECTED[name]
    out, report = qdqfold_native.fold_with_report(data)
    entries = {e["node"]: e for e in report["batchnorms"]}
    for bn, (code, layer) in folded_expected.items():
        assert entries[bn]["folded"] and entries[bn]["direction"] == "backward" and entries[bn]["code"] == code
    onnx.checker.check_model(onnx.load_from_string(out), full_check=True)
    assert_same_outputs(data, out)


def test_unet_up_and_arcface_head_keep_no_batchnorm():
    for name in ["unet_up.onnx", "arcface_head.onnx"]:
        out = qdqfold_native.fold((MODELS / name).read_bytes())
        assert not [n for n in onnx.load_from_string(out).graph.node if n.op_type == "BatchNormalization"]
