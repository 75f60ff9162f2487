"""Issue 14, pattern 2: a per-channel affine written as Mul / Add / Sub / Div by a constant.

torchvision's FrozenBatchNorm2d (every detection backbone) exports as `Conv -> Mul([1,C,1,1]) -> Add([1,C,1,1])`
(`x * scale + bias`, both constant-folded by the exporter); layer scale as `Conv -> Mul(gamma[C,1,1])`; branch sums
leave `Conv -> Add(0)`. Each node is read as BN's map (a, t) and folded by the BN folds, backwards into float and
quantized weights and forwards where exact, under a fold name of its own (conv-mul, qdq-layer-add, mul-conv ...).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native
from helpers.exporters.affine import RNG, C, constant, conv_layer, frozen_bn, make_model
from helpers.folding import fold
from helpers.onnxrt import assert_same_outputs
from helpers.qdq import Case, assert_folded_weight, assert_same
from qdqfold.report import FoldReport

def _check_folded(model, codes, left_alone=(), **options):
    folded = fold(model, **options)
    assert {k: (r["folded"], r["code"]) for k, r in folded.records.items()} == {k: (True, c) for k, c in codes.items()}, \
        folded.records
    left = [n.op_type for n in folded.model.graph.node if n.name not in left_alone]
    assert not {"Mul", "Add", "Sub", "Div"} & set(left), left
    onnx.checker.check_model(folded.model, full_check=True)
    assert_same_outputs(model, folded.model)
    return folded.model, folded.records


@pytest.mark.parametrize("shape", [(1, C, 1, 1), (C, 1, 1)], ids=["1C11", "C11"])
@pytest.mark.parametrize("scale_first", [False, True])
def test_frozen_batchnorm_folds_into_the_conv(shape, scale_first):
    folded, _ = _check_folded(frozen_bn(shape, scale_first),
                              {"/backbone/bn1/Mul": "conv-mul", "/backbone/bn1/Add": "conv-add"})
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert conv.output[0] == "/backbone/bn1/Add_output_0"  # the chain's output name is kept


def test_the_report_counts_them_next_to_batchnorms():
    _, report = qdqfold_native.fold_with_report(frozen_bn().SerializeToString())
    r = FoldReport.from_native(report)
    assert [e.op_type for e in r.batchnorms] == ["Mul", "Add"]
    assert r.totals()["batchnorms"] == 0 and r.totals()["elementwise"] == 2 and r.totals()["folded"] == 2
    assert "Per-channel Mul/Add/Sub/Div: 2 found, 2 folded, 0 kept" in r.summary()


def test_fold_affine_false_leaves_the_model_alone():
    model = frozen_bn()
    result = fold(model, fold_affine=False)
    assert result.records == {} and result.bytes == result.input


def test_layer_scale_scalar_zero_add_sub_and_div():
    conv, w = conv_layer("input", "c")
    gamma = constant("layer_scale", RNG.uniform(0.1, 0.2, C), (C, 1, 1))
    consts = [w, gamma, constant("zero", [0.0], []), constant("mean", RNG.standard_normal(C), (1, C, 1, 1)),
              constant("std", RNG.uniform(0.5, 2, C), (1, C, 1, 1)), constant("half", [0.5], [1]),
              constant("offset", RNG.standard_normal(C), (1, C, 1, 1))]
    nodes = [conv, h.make_node("Mul", ["c", "layer_scale"], ["m"], name="ls"),
             h.make_node("Add", ["zero", "m"], ["a"], name="add0"),
             h.make_node("Sub", ["a", "mean"], ["s"], name="sub"),
             h.make_node("Div", ["s", "std"], ["d"], name="div"),
             h.make_node("Mul", ["d", "half"], ["e"], name="half_mul"),
             h.make_node("Sub", ["offset", "e"], ["output"], name="rsub")]
    model = make_model(nodes, consts, [2, 3, 8, 8], [2, C, 8, 8])
    _check_folded(model, {"ls": "conv-mul", "add0": "conv-add", "sub": "conv-sub", "div": "conv-div",
                          "half_mul": "conv-mul", "rsub": "conv-sub"})


def test_gemm_and_2d_matmul_with_bias():
    wg = nh.from_array(RNG.standard_normal((C, 5)).astype(np.float32), "fc.weight")
    bg = nh.from_array(RNG.standard_normal(C).astype(np.float32), "fc.bias")
    wm = nh.from_array(RNG.standard_normal((C, 4)).astype(np.float32), "head.weight")
    bm = nh.from_array(RNG.standard_normal(4).astype(np.float32), "head.bias")
    s1, s2 = constant("s1", RNG.uniform(-2, 2, C), (C,)), constant("s2", RNG.uniform(-2, 2, 4), (1, 4))
    nodes = [h.make_node("Gemm", ["input", "fc.weight", "fc.bias"], ["g"], name="fc", transB=1),
             h.make_node("Mul", ["g", "s1"], ["g1"], name="fc_scale"),
             h.make_node("MatMul", ["g1", "head.weight"], ["mm"], name="head"),
             h.make_node("Add", ["mm", "head.bias"], ["mb"], name="head_bias"),
             h.make_node("Mul", ["mb", "s2"], ["output"], name="head_scale")]
    model = make_model(nodes, [wg, bg, wm, bm, s1, s2], [3, 5], [3, 4])
    folded, records = _check_folded(model, {"fc_scale": "gemm-mul", "head_scale": "gemm-mul"}, ["head_bias"])
    assert "head_bias" not in records  # MatMul + Add(bias) is the plain linear layer: not a fold of its own


def test_matmul_plus_bias_alone_passes_through():
    wm = nh.from_array(RNG.standard_normal((5, 4)).astype(np.float32), "w")
    bm = nh.from_array(RNG.standard_normal(4).astype(np.float32), "b")
    nodes = [h.make_node("MatMul", ["input", "w"], ["mm"], name="mm"),
             h.make_node("Add", ["mm", "b"], ["output"], name="bias")]
    result = fold(make_model(nodes, [wm, bm], [3, 5], [3, 4]))
    assert result.records == {} and result.bytes == result.input


def test_forward_mul_into_a_padded_conv_and_add_into_an_unpadded_one():
    conv, w = conv_layer("x1", "output", pads=0)
    s = constant("s", RNG.uniform(0.5, 2, 3) * np.array([1, -1, 1]), (1, 3, 1, 1))
    o = constant("o", RNG.standard_normal(3), (1, 3, 1, 1))
    nodes = [h.make_node("Mul", ["input", "s"], ["x0"], name="scale"),
             h.make_node("Add", ["x0", "o"], ["x1"], name="shift"), conv]
    model = make_model(nodes, [w, s, o], [1, 3, 8, 8], [1, C, 6, 6])
    _check_folded(model, {"scale": "mul-conv", "shift": "add-conv"})
    # Scaling alone is exact through zero padding too.
    conv_p, w_p = conv_layer("x0", "output", pads=1)
    model = make_model([nodes[0], conv_p], [w_p, s], [1, 3, 8, 8], [1, C, 8, 8])
    _check_folded(model, {"scale": "mul-conv"})


def test_kept_cases_give_their_reason_and_change_nothing():
    conv, w = conv_layer("input", "c")
    # [C] on a rank-4 output runs along the width, not the channels.
    bad = constant("per_width", RNG.standard_normal(8), (8,))
    model = make_model([conv, h.make_node("Mul", ["c", "per_width"], ["output"], name="mul")], [w, bad],
                   [1, 3, 8, 8], [1, C, 8, 8])
    result = fold(model)
    assert result.records["mul"]["code"] == "channel-axis-mismatch" and not result.records["mul"]["folded"]
    assert result.bytes == result.input
    # The conv's output also read elsewhere.
    s = constant("s", RNG.standard_normal(C), (1, C, 1, 1))
    nodes = [conv, h.make_node("Mul", ["c", "s"], ["m"], name="mul"), h.make_node("Add", ["m", "c"], ["output"])]
    result = fold(make_model(nodes, [w, s], [1, 3, 8, 8], [1, C, 8, 8]))
    assert result.records["mul"]["code"] == "layer-output-read-elsewhere" and result.bytes == result.input
    # A Mul by a non-constant, or between two activations, is not a candidate at all.
    nodes = [conv, h.make_node("Mul", ["c", "c"], ["output"], name="sq")]
    result = fold(make_model(nodes, [w], [1, 3, 8, 8], [1, C, 8, 8]))
    assert result.records == {} and result.bytes == result.input


# ------------------------------------------------------------------------------------------------- quantized


def as_frozen_bn(case: Case, layer_scale_only=False):
    """Replaces the case's BN by FrozenBatchNorm2d's Mul(a) -> Add(t) with float32 constants; the case's a and t
    become the float32 values, which are what the fold reads."""
    a32, t32 = case.a.astype(np.float32), case.t.astype(np.float32)
    case.a, case.t = a32.astype(np.float64), (np.zeros_like(t32) if layer_scale_only else t32).astype(np.float64)
    shape = [1, len(a32), 1, 1][:len(case.wdims)] if case.layer in ("Conv", "ConvTranspose") else [len(a32)]
    if case.layer in ("Conv", "ConvTranspose"):
        shape = [1, len(a32)] + [1] * (len(case.wdims) - 2)
    model = case.model
    inits = [i for i in model.graph.initializer if i.name not in ("gamma", "beta", "mean", "var")]
    inits += [nh.from_array(a32.reshape(shape), "fbn_scale"), nh.from_array(t32.reshape(shape), "fbn_bias")]
    nodes = []
    for n in model.graph.node:
        if n.op_type != "BatchNormalization":
            nodes.append(n)
            continue
        if layer_scale_only:
            nodes.append(h.make_node("Mul", [n.input[0], "fbn_scale"], [n.output[0]], name="fbn_mul"))
            inits = inits[:-1]
        else:
            nodes += [h.make_node("Mul", [n.input[0], "fbn_scale"], ["fbn_m"], name="fbn_mul"),
                      h.make_node("Add", ["fbn_m", "fbn_bias"], [n.output[0]], name="fbn_add")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    return case


@pytest.mark.parametrize("layer", ["Conv", "Gemm"])
@pytest.mark.parametrize("form", ["int", "qat"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_frozen_batchnorm_folds_into_quantized_weights(layer, form, per_channel):
    case = as_frozen_bn(Case(layer=layer, form=form, qtype=T.INT8, per_channel=per_channel, bias="float"))
    assert (case.a < 0).any()  # the sign handling is exercised
    out, report = qdqfold_native.fold_with_report(case.bytes)
    records = {r["node"]: r for r in report["batchnorms"]}
    assert records["fbn_mul"]["folded"] and records["fbn_mul"]["code"] == "qdq-layer-mul", records
    assert records["fbn_add"]["folded"] and records["fbn_add"]["code"] == "qdq-layer-add", records
    folded = onnx.load_from_string(out)
    onnx.checker.check_model(folded, full_check=True)
    assert not {"Mul", "Add"} & {n.op_type for n in folded.graph.node}
    # Integers mirrored where a < 0 and scales s * |a| exactly (the Add leaves the weight alone).
    assert_folded_weight(case, out)
    assert_same(case, out, records["fbn_add"])


def test_layer_scale_on_an_int32_bias_requantizes_it():
    case = as_frozen_bn(Case(layer="Conv", form="int", qtype=T.INT8, bias="int32"), layer_scale_only=True)
    out, report = qdqfold_native.fold_with_report(case.bytes)
    r = report["batchnorms"][0]
    assert r["folded"] and r["code"] == "qdq-layer-mul", r
    assert_folded_weight(case, out)
    assert_same(case, out, r)


@pytest.mark.parametrize("dims", [[0], [1, 0, 1, 1], [2, 1, 1]], ids=["empty", "empty-c", "wrong-count"])
def test_odd_constants_are_kept_or_ignored_never_a_crash(dims):
    conv, w = conv_layer("input", "c")
    n = int(np.prod(dims))
    const = nh.from_array(np.ones(n, np.float32).reshape(dims), "odd")
    model = make_model([conv, h.make_node("Mul", ["c", "odd"], ["output"], name="mul")], [w, const], [1, 3, 8, 8], None)
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data)
    assert all(not r["folded"] for r in report["batchnorms"]) and out == data


def _vit_layer_scale(bias=True, shift=False):
    """timm ViT / ConvNeXt (NHWC) layer scale: Linear on a rank-3 [B, T, C] input, then x * gamma [C]."""
    inits = [nh.from_array((RNG.standard_normal((5, C)) * 0.3).astype(np.float32), "blocks.0.mlp.fc2.weight"),
             nh.from_array((RNG.uniform(0.1, 0.2, C) * np.where(np.arange(C) == 2, -1, 1)).astype(np.float32),
                           "blocks.0.ls2.gamma")]
    nodes = [h.make_node("MatMul", ["input", "blocks.0.mlp.fc2.weight"], ["/mlp/fc2/MatMul_output_0"],
                         name="/mlp/fc2/MatMul")]
    x = "/mlp/fc2/MatMul_output_0"
    if bias:
        inits.append(nh.from_array(RNG.standard_normal(C).astype(np.float32), "blocks.0.mlp.fc2.bias"))
        nodes.append(h.make_node("Add", ["blocks.0.mlp.fc2.bias", x], ["/mlp/fc2/Add_output_0"], name="/mlp/fc2/Add"))
        x = "/mlp/fc2/Add_output_0"
    nodes.append(h.make_node("Mul", [x, "blocks.0.ls2.gamma"], ["m"], name="/ls2/Mul"))
    if shift:
        inits.append(nh.from_array(RNG.standard_normal(C).astype(np.float32), "shift"))
        nodes.append(h.make_node("Add", ["m", "shift"], ["output"], name="/ls2/Add"))
    else:
        nodes[-1].output[0] = "output"
    return make_model(nodes, inits, [2, 7, 5], [2, 7, C])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shift", [False, True])
def test_layer_scale_after_a_rank3_linear_folds_into_its_features(bias, shift):
    model = _vit_layer_scale(bias, shift)
    # Without a bias, the shift after the folded Mul is then the MatMul's own bias Add: left as it is.
    codes = {"/ls2/Mul": "gemm-mul"} | ({"/ls2/Add": "gemm-add"} if shift and bias else {})
    folded, _ = _check_folded(model, codes, left_alone=["/mlp/fc2/Add", "/ls2/Add"])
    # The MatMul keeps its rank-3 input (no Gemm); a shift lands in its bias Add.
    assert [n.op_type for n in folded.graph.node] == (["MatMul", "Add"] if bias or shift else ["MatMul"])


def test_reversed_sub_after_a_rank3_matmul_adds_its_shift():
    w = nh.from_array((RNG.standard_normal((5, C)) * 0.3).astype(np.float32), "w")
    c = constant("c", RNG.standard_normal(C), (C,))
    nodes = [h.make_node("MatMul", ["input", "w"], ["m"], name="mm"),
             h.make_node("Sub", ["c", "m"], ["output"], name="rsub")]
    model = make_model(nodes, [w, c], [2, 7, 5], [2, 7, C])
    folded, _ = _check_folded(model, {"rsub": "gemm-sub"}, left_alone=["mm_shift", "mm_shift_1"])
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]


def test_frozen_batchnorm_behind_an_activation_quantizer_is_reported_kept():
    """Conv -> Q -> DQ -> Mul -> Add (a QDQ detection backbone): kept for the quantizer, and said so."""
    case = as_frozen_bn(Case(layer="Conv", form="int", qtype=T.INT8, act_between=True))
    out, report = qdqfold_native.fold_with_report(case.bytes)
    records = {r["node"]: r for r in report["batchnorms"]}
    assert records["fbn_mul"]["code"] == "activation-quantizer" and not records["fbn_mul"]["folded"], records
    assert out == case.bytes


def test_cli_summary_counts_them_apart(tmp_path):
    import subprocess
    import sys

    onnx.save(frozen_bn(), tmp_path / "m.onnx")
    result = subprocess.run([sys.executable, "-m", "qdqfold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "BatchNormalization: 0 found, per-channel Mul/Add/Sub/Div: 2 found; 2 folded, 0 kept" in result.stdout
