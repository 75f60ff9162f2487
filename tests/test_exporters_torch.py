"""Issue 14, pattern 1: constants behind Identity, as torch's TorchScript exporter writes them.

torch de-duplicates equal initializers and reads the copies through `Identity` nodes placed at the top of the
graph (`onnx::Conv_104 = Identity(onnx::Conv_101)`): all-zero conv biases, BN statistics, zero-initialised
heads, and after `nncf.strip` the weight zero points. Every constant a fold reads (weights, biases, BN
parameters, Q/DQ scales and zero points) is resolved through such chains; the shared source is never edited.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native
from conftest import assert_same_outputs
from test_fold_qdq import Case, assert_folded_weight, assert_same

RNG = np.random.default_rng(14)


def _fold(model: onnx.ModelProto, **options):
    data = model.SerializeToString()
    out, report = qdqfold_native.fold_with_report(data, **options)
    return onnx.load_from_string(out), {r["node"]: r for r in report["batchnorms"]}, data, out


def _bn_inits(prefix, c, zero_mean=False):
    gamma = RNG.uniform(0.5, 1.5, c) * np.where(np.arange(c) % 3 == 1, -1, 1)
    mean = np.zeros(c) if zero_mean else RNG.standard_normal(c)
    return [nh.from_array(v.astype(np.float32), f"{prefix}.{n}") for n, v in
            (("weight", gamma), ("bias", RNG.standard_normal(c)), ("running_mean", mean),
             ("running_var", RNG.uniform(0.5, 2.0, c)))]


def vgg_like(shared_source_reader=False):
    """Two Conv -> BN -> Relu blocks in torch's naming; the second conv's zero bias, the second BN's zero mean and
    its gamma are Identity copies (one a chain of two) of the first block's equal tensors."""
    c = 4
    zero_bias = nh.from_array(np.zeros(c, np.float32), "onnx::Conv_101")
    bn1 = _bn_inits("features.1", c, zero_mean=True)
    inits = [zero_bias, nh.from_array((RNG.standard_normal((c, 3, 3, 3)) * 0.3).astype(np.float32), "onnx::Conv_100"),
             nh.from_array((RNG.standard_normal((c, c, 3, 3)) * 0.3).astype(np.float32), "onnx::Conv_103"), *bn1,
             nh.from_array(RNG.standard_normal(c).astype(np.float32), "features.4.bias"),
             nh.from_array(RNG.uniform(0.5, 2.0, c).astype(np.float32), "features.4.running_var")]
    nodes = [
        # torch puts the dedup Identity nodes first.
        h.make_node("Identity", ["onnx::Conv_101"], ["onnx::Conv_104"], name="Identity_0"),
        h.make_node("Identity", ["features.1.running_mean"], ["onnx::BN_mean_a"], name="Identity_1"),
        h.make_node("Identity", ["onnx::BN_mean_a"], ["onnx::BN_mean_b"], name="Identity_2"),
        h.make_node("Identity", ["features.1.weight"], ["onnx::BN_gamma"], name="Identity_3"),
        h.make_node("Conv", ["input", "onnx::Conv_100", "onnx::Conv_101"], ["/features.0/Conv_output_0"],
                    name="/features.0/Conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        h.make_node("BatchNormalization", ["/features.0/Conv_output_0", "features.1.weight", "features.1.bias",
                                           "features.1.running_mean", "features.1.running_var"],
                    ["/features.1/BatchNormalization_output_0"], name="/features.1/BatchNormalization", epsilon=1e-5),
        h.make_node("Relu", ["/features.1/BatchNormalization_output_0"], ["/features.2/Relu_output_0"],
                    name="/features.2/Relu"),
        h.make_node("Conv", ["/features.2/Relu_output_0", "onnx::Conv_103", "onnx::Conv_104"],
                    ["/features.3/Conv_output_0"], name="/features.3/Conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        h.make_node("BatchNormalization", ["/features.3/Conv_output_0", "onnx::BN_gamma", "features.4.bias",
                                           "onnx::BN_mean_b", "features.4.running_var"],
                    ["output"], name="/features.4/BatchNormalization", epsilon=1e-5),
    ]
    outputs = [h.make_tensor_value_info("output", T.FLOAT, [1, c, 6, 6])]
    if shared_source_reader:  # the zero bias is also read by a node nothing folds
        nodes.append(h.make_node("Neg", ["onnx::Conv_101"], ["extra"], name="extra_neg"))
        outputs.append(h.make_tensor_value_info("extra", T.FLOAT, [c]))
    graph = h.make_graph(nodes, "main_graph", [h.make_tensor_value_info("input", T.FLOAT, [1, 3, 6, 6])], outputs,
                         inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], producer_name="pytorch")
    model.ir_version = 8
    return model


def test_biases_and_bn_parameters_behind_identity_fold():
    model = vgg_like()
    folded, records, _, _ = _fold(model)
    assert [r["folded"] for r in records.values()] == [True, True], records
    assert all(r["code"] == "conv-bn" for r in records.values())
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    # Nothing reads the shared sources or their Identity copies any more: gone.
    assert "Identity" not in [n.op_type for n in folded.graph.node]
    onnx.checker.check_model(folded, full_check=True)
    assert_same_outputs(model, folded)


def test_a_source_still_read_elsewhere_is_not_edited():
    model = vgg_like(shared_source_reader=True)
    folded, records, _, _ = _fold(model)
    assert all(r["folded"] for r in records.values()), records
    inits = {i.name: nh.to_array(i) for i in folded.graph.initializer}
    np.testing.assert_array_equal(inits["onnx::Conv_101"], np.zeros(4, np.float32))
    # The folded convs read new tensors, not the shared zero bias.
    convs = [n for n in folded.graph.node if n.op_type == "Conv"]
    assert all(c.input[2] != "onnx::Conv_101" for c in convs)
    onnx.checker.check_model(folded, full_check=True)
    assert_same_outputs(model, folded)


def test_identity_of_a_graph_input_is_not_a_constant():
    model = vgg_like()
    # The second BN's gamma now comes from an overridable graph input through Identity.
    model.graph.input.append(h.make_tensor_value_info("features.1.weight", T.FLOAT, [4]))
    folded, records, data, out = _fold(model, fold_forward=False)
    r = records["/features.4/BatchNormalization"]
    assert not r["folded"] and r["code"] == "non-constant-parameters", r


def test_identity_cycle_is_not_followed_forever():
    model = vgg_like()
    nodes = list(model.graph.node)
    # gamma of the second BN read through a cycle of Identity nodes (malformed; must not hang or crash).
    nodes[3] = h.make_node("Identity", ["cyc_b"], ["onnx::BN_gamma"], name="Identity_3")
    nodes.insert(4, h.make_node("Identity", ["onnx::BN_gamma"], ["cyc_b"], name="Identity_cyc"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    try:
        _, records, _, _ = _fold(model, fold_forward=False)
    except qdqfold_native.FoldError:
        return
    r = records["/features.4/BatchNormalization"]
    assert not r["folded"] and r["code"] == "non-constant-parameters", r


# ------------------------------------------------------------------------------ quantized (nncf.strip + export)


def _through_identity(case: Case, names_by_reader: dict[str, list[str]]):
    """Rewrites `case.model` so that the given node inputs read their constant through (chains of) Identity,
    in torch's layout: the Identity nodes first."""
    model = case.model
    nodes = list(model.graph.node)
    identities = []
    for node in nodes:
        for slot, name in enumerate(node.input):
            if name in names_by_reader.get(node.name, []):
                first = f"onnx::{name}_{node.name}_a"
                second = f"onnx::{name}_{node.name}_b"
                identities += [h.make_node("Identity", [name], [first], name=f"Identity_{len(identities)}"),
                               h.make_node("Identity", [first], [second], name=f"Identity_{len(identities) + 1}")]
                node.input[slot] = second
    del model.graph.node[:]
    model.graph.node.extend(identities + nodes)
    return case


def _resolved(out_bytes):
    """The folded model with every Identity of a constant replaced by a copy of that constant (so the weight
    helpers of test_fold_qdq can read it by name)."""
    m = onnx.load_from_string(out_bytes)
    inits = {i.name: i for i in m.graph.initializer}
    keep = []
    for n in m.graph.node:
        if n.op_type == "Identity" and n.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[n.input[0]])
            copy.name = n.output[0]
            m.graph.initializer.append(copy)
            inits[copy.name] = copy
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m.SerializeToString()


@pytest.mark.parametrize("form", ["int", "qat"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_quantized_weight_with_scales_and_zero_points_behind_identity(form, per_channel):
    case = Case(form=form, qtype=T.INT8, per_channel=per_channel, bias="float", opset=13)
    # nncf.strip then torch export: the DequantizeLinear's zero point (and here its scale and the bias and BN
    # statistics too) are Identity copies of the QuantizeLinear's.
    _through_identity(case, {"w_DQ": ["w_zero", "w_scale"], "layer": ["b"], "bn": ["mean", "var"]})
    out, records = qdqfold_native.fold_with_report(case.bytes)
    r = {x["node"]: x for x in records["batchnorms"]}["bn"]
    assert r["folded"] and r["code"] == "qdq-layer-bn", r
    folded = onnx.load_from_string(out)
    onnx.checker.check_model(folded, full_check=True)
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    assert_folded_weight(case, _resolved(out))
    assert_same(case, out, r)
    # The sources the QuantizeLinear reads are untouched.
    inits = {i.name: nh.to_array(i) for i in folded.graph.initializer}
    if form == "qat":
        np.testing.assert_array_equal(inits["w_zero"], np.asarray(case.zero0).astype(np.int8))
