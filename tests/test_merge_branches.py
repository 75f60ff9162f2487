"""Merging parallel conv + BN branches into one conv (issue 17, option merge_branches): RepVGG blocks
(3x3 + 1x1 + identity BN), MobileOne blocks (depthwise and pointwise, k > 1 over-parameterised branches, a
1x1 scale branch), ACNet (1x3 + 3x1 + 3x3 through Sum), FastViT's RepMixer (x + (mixer(x) - BN(x))).

Each merge is judged by onnxruntime (graph optimisations off) running the original and the merged model:
outputs within 1e-5 of the output range. Each kept case asserts its reason code, and that the model is what
the ordinary folds alone give (byte for byte).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


from helpers.build import op_types
from helpers.folding import fold
from helpers.onnxrt import assert_same_outputs

F32 = TensorProto.FLOAT
RNG = np.random.default_rng(17)


class Block:
    """A graph under construction: input x [1, C, H, W], branches added one by one."""

    def __init__(self, c: int = 8, hw: int = 7) -> None:
        self.c, self.hw = c, hw
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs = [helper.make_tensor_value_info("x", F32, [1, c, hw, hw])]
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def bn(self, x: str, c: int | None = None) -> str:
        c = c or self.c
        p = self.name("bn")
        gamma = RNG.uniform(0.5, 2.0, c) * np.where(RNG.random(c) < 0.3, -1.0, 1.0)
        values = [gamma, RNG.standard_normal(c), RNG.standard_normal(c), RNG.uniform(0.05, 3.0, c)]
        for n, v in zip(["scale", "bias", "mean", "var"], values):
            self.inits.append(numpy_helper.from_array(v.astype(np.float32), f"{p}_{n}"))
        self.nodes.append(helper.make_node("BatchNormalization", [x] + [f"{p}_{n}" for n in ["scale", "bias", "mean", "var"]],
                                           [p + "_y"], name=p))
        return p + "_y"

    def conv(self, x: str, k=(3, 3), pads=None, *, group: int = 1, stride: int = 1, dilation: int = 1,
             cout: int | None = None, bias: bool = False, bn: bool = True, quantized: bool | str = False) -> str:
        """Conv (-> BN): a re-parameterisable branch. pads default: 'same' for odd kernels."""
        cout = cout or self.c
        p = self.name("conv")
        if pads is None:
            pads = [(k[0] - 1) // 2 * dilation, (k[1] - 1) // 2 * dilation] * 2
        w = RNG.standard_normal((cout, self.c // group, *k)).astype(np.float32)
        inputs = [x, p + "_W"]
        if quantized == "qat":  # float W -> QuantizeLinear -> DequantizeLinear
            scale = np.float32(np.abs(w).max() / 127)
            self.inits += [numpy_helper.from_array(w, p + "_Wf"), numpy_helper.from_array(np.array(scale, np.float32), p + "_s"),
                           numpy_helper.from_array(np.array(0, np.int8), p + "_z")]
            self.nodes += [helper.make_node("QuantizeLinear", [p + "_Wf", p + "_s", p + "_z"], [p + "_Wq"], name=p + "_q"),
                           helper.make_node("DequantizeLinear", [p + "_Wq", p + "_s", p + "_z"], [p + "_W"], name=p + "_dq")]
        elif quantized:
            scale = np.float32(0.02)
            self.inits += [numpy_helper.from_array(np.clip(np.round(w / scale), -127, 127).astype(np.int8), p + "_Wq"),
                           numpy_helper.from_array(np.array(scale, np.float32), p + "_s")]
            self.nodes.append(helper.make_node("DequantizeLinear", [p + "_Wq", p + "_s"], [p + "_W"], name=p + "_dq"))
        else:
            self.inits.append(numpy_helper.from_array(w, p + "_W"))
        if bias:
            self.inits.append(numpy_helper.from_array(RNG.standard_normal(cout).astype(np.float32), p + "_B"))
            inputs.append(p + "_B")
        self.nodes.append(helper.make_node("Conv", inputs, [p + "_y"], name=p, kernel_shape=list(k), pads=list(pads),
                                           group=group, strides=[stride, stride], dilations=[dilation, dilation]))
        return self.bn(p + "_y", cout) if bn else p + "_y"

    def op(self, op: str, inputs: list[str]) -> str:
        p = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [p + "_y"], name=p))
        return p + "_y"

    def add_chain(self, terms: list[str]) -> str:
        """Add(Add(a, b), c) ...: what `a + b + c` in PyTorch exports."""
        out = terms[0]
        for t in terms[1:]:
            out = self.op("Add", [out, t])
        return out

    def model(self, out: str, extra_outputs: tuple[str, ...] = ()) -> onnx.ModelProto:
        y = self.op("Relu", [out])
        outputs = [helper.make_tensor_value_info(y, F32, None)]
        outputs += [helper.make_tensor_value_info(v, F32, None) for v in extra_outputs]
        g = helper.make_graph(self.nodes, "block", self.inputs, outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        m.ir_version = 8
        return m


def merged(model: onnx.ModelProto, convs_after: int = 1, identity_bns: int = 0) -> dict:
    """Folds with merge_branches, checks the result against onnxruntime and the counts; returns the report."""
    result = fold(model, merge_branches=True)
    assert_same_outputs(model, result.bytes)
    assert_same_outputs(model, result.bytes, seed=1)
    ops = op_types(result.bytes)
    assert ops.count("Conv") == convs_after, ops
    assert "BatchNormalization" not in ops and "Add" not in ops and "Sum" not in ops and "Sub" not in ops, ops
    merges = result.report["merges"]
    assert [m["code"] for m in merges] == ["merge-branches"] * len(merges)
    assert all(m["folded"] and m["exact"] is True and m["direction"] == "merge" for m in merges)
    by_merge = [b for b in result.report["batchnorms"] if b["code"] == "merge-branches"]
    assert len(by_merge) == identity_bns
    assert all(b["folded"] and b["direction"] == "merge" for b in by_merge)
    assert all(b["folded"] for b in result.report["batchnorms"]), [b for b in result.report["batchnorms"] if not b["folded"]]
    # Nothing left behind: every initializer is read.
    m = onnx.load_from_string(result.bytes)
    read = {i for n in m.graph.node for i in n.input}
    assert {t.name for t in m.graph.initializer} <= read
    return result.report


# ---------------------------------------------------------------- merges


@pytest.mark.parametrize("identity", ["bn", "x", "none"])
def test_repvgg_block(identity):
    b = Block()
    terms = [b.conv("x", (3, 3)), b.conv("x", (1, 1))]
    if identity == "bn":
        terms.append(b.bn("x"))
    elif identity == "x":
        terms.append("x")
    report = merged(b.model(b.add_chain(terms)), identity_bns=int(identity == "bn"))
    (m,) = report["merges"]
    assert m["metrics"]["branches"] == len(terms) and m["metrics"]["convs_removed"] == 1
    assert "zero-padded to 3x3" in m["message"]
    if identity == "bn":
        assert "identity BatchNormalization 'bn5'" in m["message"]


def test_repvgg_block_default_off_keeps_identity_bn():
    b = Block()
    model = b.model(b.add_chain([b.conv("x", (3, 3)), b.conv("x", (1, 1)), b.bn("x")]))
    result = fold(model)
    assert "merges" not in result.report
    assert op_types(result.bytes).count("BatchNormalization") == 1 and op_types(result.bytes).count("Conv") == 2


@pytest.mark.parametrize("k", [1, 2, 4])
def test_mobileone_depthwise_block(k):
    """k over-parameterised depthwise 3x3 branches + a 1x1 scale branch + identity BN."""
    b = Block(c=8)
    terms = [b.conv("x", (3, 3), group=8) for _ in range(k)] + [b.conv("x", (1, 1), group=8), b.bn("x")]
    merged(b.model(b.add_chain([terms[-2], terms[-1]] + terms[:-2])), identity_bns=1)


@pytest.mark.parametrize("k", [2, 3])
def test_mobileone_pointwise_block(k):
    b = Block(c=8)
    terms = [b.conv("x", (1, 1)) for _ in range(k)] + [b.bn("x")]
    merged(b.model(b.add_chain(terms)), identity_bns=1)


def test_grouped_block_with_identity():
    b = Block(c=8)
    terms = [b.conv("x", (3, 3), group=2), b.conv("x", (1, 1), group=2), b.bn("x")]
    merged(b.model(b.add_chain(terms)), identity_bns=1)


def test_acnet_asymmetric_through_sum():
    b = Block()
    terms = [b.conv("x", (3, 3)), b.conv("x", (1, 3)), b.conv("x", (3, 1), bias=True)]
    report = merged(b.model(b.op("Sum", terms)))
    assert report["merges"][0]["metrics"]["convs_removed"] == 2


def test_cross_without_square_kernel_grows_the_kept_conv():
    """1x3 + 3x1 alone: the kept conv becomes 3x3, its kernel_shape and pads rewritten."""
    b = Block()
    model = b.model(b.add_chain([b.conv("x", (1, 3)), b.conv("x", (3, 1))]))
    merged(model)
    result = fold(model, merge_branches=True)
    conv = next(n for n in onnx.load_from_string(result.bytes).graph.node if n.op_type == "Conv")
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert list(attrs["kernel_shape"]) == [3, 3] and list(attrs["pads"]) == [1, 1, 1, 1]
    assert list(next(t for t in onnx.load_from_string(result.bytes).graph.initializer if t.name == conv.input[1]).dims) == [8, 8, 3, 3]


def test_repmixer_subtraction():
    """FastViT RepMixer: x + (mixer(x) - norm(x)), mixer a depthwise conv + BN, norm a BN."""
    b = Block(c=8)
    mixer = b.op("Add", [b.conv("x", (3, 3), group=8), b.conv("x", (1, 1), group=8)])
    inner = b.op("Sub", [mixer, b.bn("x")])
    report = merged(b.model(b.op("Add", ["x", inner])), identity_bns=1)
    assert "minus identity BatchNormalization" in report["merges"][0]["message"]


def test_subtracted_conv():
    b = Block()
    merged(b.model(b.op("Sub", [b.conv("x", (3, 3), bias=True), b.conv("x", (1, 1))])))


@pytest.mark.parametrize("stride,dilation", [(2, 1), (1, 2), (2, 2)])
def test_strided_and_dilated_without_identity(stride, dilation):
    b = Block(hw=9)
    terms = [b.conv("x", (3, 3), stride=stride, dilation=dilation), b.conv("x", (1, 1), stride=stride, pads=[0] * 4)]
    merged(b.model(b.add_chain(terms)))


def test_two_blocks_in_a_row():
    b = Block()
    y = b.op("Relu", [b.add_chain([b.conv("x", (3, 3)), b.conv("x", (1, 1)), b.bn("x")])])
    report = merged(b.model(b.add_chain([b.conv(y, (3, 3)), b.conv(y, (1, 1)), b.bn(y)])), convs_after=2,
                    identity_bns=2)
    assert len(report["merges"]) == 2


# ---------------------------------------------------------------- kept


def kept(model: onnx.ModelProto, code: str) -> dict:
    result = fold(model, merge_branches=True)
    result2 = fold(model)
    assert result.bytes == result2.bytes  # nothing edited by the merge
    (m,) = result.report["merges"]
    assert not m["folded"] and m["code"] == code, m
    return result.report


def test_kept_pads_misaligned():
    b = Block(hw=7)
    terms = [b.conv("x", (3, 3), stride=2), b.conv("x", (1, 1), stride=2, pads=[1, 1, 0, 0])]
    kept(b.model(b.add_chain(terms)), "pads-misaligned")


def test_kept_dilation_mismatch():
    b = Block(hw=9)
    kept(b.model(b.add_chain([b.conv("x", (3, 3), dilation=2), b.conv("x", (5, 5))])), "dilation-mismatch")


def test_cross_with_dilation_on_the_long_side():
    """1x3 dilated 2 + 3x1 with dilation 1 along its size-1 side: the merged 3x3 takes dilation 2 there too."""
    b = Block(hw=9)
    one_three = b.conv("x", (1, 3), dilation=2, pads=[0, 2, 0, 2])
    three_one = b.conv("x", (3, 1), pads=[1, 0, 1, 0])
    model = b.model(b.add_chain([one_three, three_one]))
    merged(model)
    result = fold(model, merge_branches=True)
    conv = next(n for n in onnx.load_from_string(result.bytes).graph.node if n.op_type == "Conv")
    attrs = {a.name: list(helper.get_attribute_value(a)) for a in conv.attribute if a.name in ("dilations", "pads")}
    assert attrs == {"dilations": [1, 2], "pads": [1, 2, 1, 2]}


def test_kept_group_mismatch():
    b = Block()
    kept(b.model(b.add_chain([b.conv("x", (3, 3), group=2), b.conv("x", (1, 1))])), "group-mismatch")


def test_kept_branch_output_shared():
    b = Block()
    one = b.conv("x", (1, 1), bn=False)
    kept(b.model(b.add_chain([b.conv("x", (3, 3)), one]), extra_outputs=(one,)), "branch-output-shared")


def test_kept_different_input_and_identity_bn_gets_the_reason():
    b = Block()
    b.inputs.append(helper.make_tensor_value_info("z", F32, [1, 8, 7, 7]))
    report = kept(b.model(b.op("Sum", [b.conv("x", (3, 3)), b.bn("x"), b.conv("z", (1, 1))])), "different-input")
    identity = next(e for e in report["batchnorms"] if e["node"] == "bn3")
    assert not identity["folded"] and identity["code"] == "different-input"


def test_kept_not_a_branch():
    b = Block()
    kept(b.model(b.op("Sum", [b.conv("x", (3, 3)), b.conv("x", (1, 1)), b.op("Relu", ["x"])])), "not-a-branch")


def test_kept_quantized_weight():
    b = Block()
    terms = [b.conv("x", (3, 3), bn=False, quantized=True), b.conv("x", (1, 1), bn=False, quantized=True), b.bn("x")]
    report = kept(b.model(b.add_chain(terms)), "quantized-weight")
    (bn,) = report["batchnorms"]
    assert not bn["folded"] and bn["code"] == "quantized-weight"


def test_nothing_to_merge_is_byte_identical():
    """A residual block (the Add's terms read different tensors) and no BN: the model comes back as it was."""
    b = Block()
    y = b.op("Relu", [b.conv("x", (3, 3), bn=False)])
    model = b.model(b.op("Add", [b.conv(y, (3, 3), bn=False), "x"]))
    result = fold(model, merge_branches=True)
    assert result.bytes == model.SerializeToString()
    assert "merges" not in result.report


# ---------------------------------------------------------------- Python report and CLI


def test_python_report_and_cli_json(tmp_path):
    import json
    import subprocess
    import sys

    import qdqfold.api

    b = Block()
    model = b.model(b.add_chain([b.conv("x", (3, 3)), b.conv("x", (1, 3)), b.bn("x")]))
    _, report = qdqfold.api.fold_bytes(model.SerializeToString(), merge_branches=True)
    (m,) = report.merges
    assert m.folded and m.code == "merge-branches" and m.into == ["conv1"]
    assert report.find("bn5").code == "merge-branches"
    assert "merges" not in qdqfold.api.fold_bytes(model.SerializeToString())[1].to_dict()
    src = tmp_path / "block.onnx"
    src.write_bytes(model.SerializeToString())
    out = subprocess.run([sys.executable, "-m", "qdqfold", str(src), "-o", str(tmp_path / "out.onnx"),
                          "--merge-branches", "--json"], capture_output=True, text=True, check=True)
    document = json.loads(out.stdout)
    document = document["models"][0] if "models" in document else document
    assert [e["code"] for e in document["merges"]] == ["merge-branches"]
    assert document["op_types"]["after"].get("Conv") == 1


# ---------------------------------------------------------------- requantize_merged (approximate)


@pytest.mark.parametrize("form", ["int", "qat"])
def test_requantize_merged(form):
    b = Block()
    terms = [b.conv("x", (3, 3), quantized=form), b.conv("x", (1, 1), quantized=form), b.bn("x")]
    model = b.model(b.add_chain(terms))
    result = fold(model, merge_branches=True, requantize_merged=True)
    (m,) = result.report["merges"]
    assert m["folded"] and m["exact"] is False and m["code"] == "merge-branches"
    assert 0 < m["metrics"]["max_requantization_change"] <= 0.5 + 1e-9
    assert "APPROXIMATE" in m["message"]
    ops = op_types(result.bytes)
    assert ops.count("Conv") == 1 and ops.count("DequantizeLinear") == 1 and "BatchNormalization" not in ops
    assert ops.count("QuantizeLinear") == (1 if form == "qat" else 0)
    # The merged integers: int8, symmetric, one scale per output channel.
    g = onnx.load_from_string(result.bytes).graph
    dq = next(n for n in g.node if n.op_type == "DequantizeLinear")
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    assert inits[dq.input[1]].shape == (8,) and (len(dq.input) < 3 or not inits[dq.input[2]].any())
    assert next(a.i for a in dq.attribute if a.name == "axis") == 0
    if form == "int":
        assert inits[dq.input[0]].dtype == np.int8 and np.abs(inits[dq.input[0]]).max() == 127
    # Approximate: the outputs move by a fraction of the output range, never more than the weight rounding
    # allows (half a step of the new scale on every tap).
    from helpers.onnxrt import random_inputs, run
    feeds = random_inputs(model)
    expected, actual = run(model, feeds)[0], run(result.bytes, feeds)[0]
    span = float(expected.max() - expected.min())
    assert float(np.abs(expected - actual).max()) <= 0.02 * span
    result2 = fold(model, merge_branches=True, requantize_merged=False)
    assert op_types(result2.bytes).count("Conv") == 2  # without the option: kept


def test_block_inside_an_if_branch():
    """The branches live in an If body and read the outer graph's x."""
    b = Block()
    y = b.op("Relu", [b.add_chain([b.conv("x", (3, 3)), b.conv("x", (1, 1)), b.bn("x")])])
    then_branch = helper.make_graph(b.nodes, "then", [], [helper.make_tensor_value_info(y, F32, None)], b.inits)
    else_branch = helper.make_graph([helper.make_node("Relu", ["x"], ["x_relu"])], "else", [],
                                    [helper.make_tensor_value_info("x_relu", F32, None)])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)
    g = helper.make_graph([node], "outer", [b.inputs[0], cond], [helper.make_tensor_value_info("y", F32, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    result = fold(model, merge_branches=True)
    (m,) = result.report["merges"]
    assert m["folded"] and m["graph"].startswith("main/")
    feeds = {"x": RNG.standard_normal((1, 8, 7, 7)).astype(np.float32), "cond": np.array(True)}
    assert_same_outputs(model, result.bytes, feeds=feeds)
    body = next(a.g for a in onnx.load_from_string(result.bytes).graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in body.node] == ["Conv", "Relu"]


def test_inner_sum_merges_when_the_whole_sum_cannot():
    """Add(Add(conv3x3(x), conv1x1(x)), y): y is no branch of x, but the inner Add merges on its own."""
    b = Block()
    b.inputs.append(helper.make_tensor_value_info("y", F32, [1, 8, 7, 7]))
    inner = b.op("Add", [b.conv("x", (3, 3)), b.conv("x", (1, 1))])
    model = b.model(b.op("Add", [inner, "y"]))
    result = fold(model, merge_branches=True)
    assert [(m["node"], m["code"]) for m in result.report["merges"]] == [("add5", "merge-branches")]
    assert op_types(result.bytes) == ["Conv", "Add", "Relu"]
    assert_same_outputs(model, result.bytes)
