"""BN -> layer folds on the exporter-made sample models (tests/models/README.md): what folds forwards, what is
kept and why, and onnxruntime outputs (optimisations off) of original and folded within 1e-5 of the range."""

from __future__ import annotations

import pytest

from helpers.build import op_types
from helpers.folding import fold_api
from helpers.onnxrt import assert_same_outputs
from helpers.samples import MODELS


def fold_sample(name: str, **options):
    """Folds the sample (helpers.folding.fold_api), checks its outputs; the model and the entries by layer name."""
    folded = fold_api((MODELS / name).read_bytes(), **options)
    assert_same_outputs(folded.input, folded.bytes)
    return folded.model, {entry.node.split("/")[1]: entry for entry in folded.report.batchnorms}


def test_bn_conv_cases_fold_where_exact_and_keep_the_padded_ones():
    folded, bns = fold_sample("bn_conv_cases.onnx")
    # input -> BN -> 1x1, relu -> BN -> depthwise pad 0, relu -> BN -> Flatten -> Gemm
    for name, into, code in [("bn_in", "/pw/Conv", "bn-conv"), ("bn_b", "/dw/Conv", "bn-conv"),
                             ("bn_d", "/fc/Gemm", "bn-gemm")]:
        assert bns[name].folded and bns[name].direction == "forward", bns[name].describe()
        assert bns[name].into == [into] and bns[name].code == code
    for name in ["bn_a", "bn_c"]:  # 3x3 pad 1 and grouped pad 1
        assert not bns[name].folded and bns[name].code == "padding"
        assert "pad_correction" in bns[name].message
    assert op_types(folded).count("BatchNormalization") == 2


def test_bn_conv_cases_fold_completely_with_the_border_correction():
    folded, bns = fold_sample("bn_conv_cases.onnx", pad_correction=True)
    assert all(b.folded and b.exact for b in bns.values()), [b.describe() for b in bns.values()]
    assert "BatchNormalization" not in op_types(folded)
    assert op_types(folded).count("Add") == 2  # one correction per padded conv
    for name in ["bn_a", "bn_c"]:
        assert bns[name].metrics["max_abs_correction"] > 0


def test_bn_conv_cases_are_kept_without_forward_folds():
    _, bns = fold_sample("bn_conv_cases.onnx", fold_forward=False)
    assert not any(b.folded for b in bns.values())


def test_input_bn_net_data_bn_needs_the_correction():
    _, bns = fold_sample("input_bn_net.onnx")
    assert not bns["data_bn"].folded and bns["data_bn"].code == "padding"
    assert all(bns[n].folded for n in ["b1", "b2", "b3"])
    folded, bns = fold_sample("input_bn_net.onnx", pad_correction=True)
    assert bns["data_bn"].folded and bns["data_bn"].direction == "forward" and bns["data_bn"].into == ["/c1/Conv"]
    assert "BatchNormalization" not in op_types(folded)


def test_seed_prebn_bn2_needs_the_correction():
    _, bns = fold_sample("seed_prebn.onnx")
    assert bns["bn1"].folded and bns["bn1"].direction == "backward"
    assert not bns["bn2"].folded and bns["bn2"].code == "padding"
    folded, bns = fold_sample("seed_prebn.onnx", pad_correction=True)
    assert bns["bn2"].folded and bns["bn2"].into == ["/conv2/Conv"]
    assert "BatchNormalization" not in op_types(folded)


@pytest.mark.parametrize("options", [{}, {"pad_correction": True}])
def test_qat_bn_conv_cases_keep_every_bn_for_its_activation_quantizer(options):
    _, bns = fold_sample("qat_bn_conv_cases.onnx", **options)
    layer = {"bn_in": "pw", "bn_a": "c3", "bn_b": "dw", "bn_c": "gc", "bn_d": "fc"}
    for name, entry in bns.items():
        assert not entry.folded and entry.code == "activation-quantizer", entry.describe()
        assert f"'/{layer[name]}/iq/QuantizeLinear'" in entry.message
        assert "quantized activations" in entry.message


def test_qat_seed_prebn_bn2_is_kept_for_its_activation_quantizer():
    _, bns = fold_sample("qat_seed_prebn.onnx", pad_correction=True)
    assert not bns["bn2"].folded and bns["bn2"].code == "activation-quantizer"
    assert "'/conv2/iq/QuantizeLinear'" in bns["bn2"].message
