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
from helpers.exporters.torchscript import vgg_like
from helpers.folding import fold
from helpers.onnxrt import assert_same_outputs
from helpers.qdq import Case, assert_folded_weight, assert_same

def test_biases_and_bn_parameters_behind_identity_fold():
    model = vgg_like()
    folded = fold(model)
    assert [r["folded"] for r in folded.records.values()] == [True, True], folded.records
    assert all(r["code"] == "conv-bn" for r in folded.records.values())
    assert "BatchNormalization" not in [n.op_type for n in folded.model.graph.node]
    # Nothing reads the shared sources or their Identity copies any more: gone.
    assert "Identity" not in [n.op_type for n in folded.model.graph.node]
    onnx.checker.check_model(folded.model, full_check=True)
    assert_same_outputs(model, folded.model)


def test_a_source_still_read_elsewhere_is_not_edited():
    model = vgg_like(shared_source_reader=True)
    folded = fold(model)
    assert all(r["folded"] for r in folded.records.values()), folded.records
    inits = {i.name: nh.to_array(i) for i in folded.model.graph.initializer}
    np.testing.assert_array_equal(inits["onnx::Conv_101"], np.zeros(4, np.float32))
    # The folded convs read new tensors, not the shared zero bias.
    convs = [n for n in folded.model.graph.node if n.op_type == "Conv"]
    assert all(c.input[2] != "onnx::Conv_101" for c in convs)
    onnx.checker.check_model(folded.model, full_check=True)
    assert_same_outputs(model, folded.model)


def test_identity_of_a_graph_input_is_not_a_constant():
    model = vgg_like()
    # The second BN's gamma now comes from an overridable graph input through Identity.
    model.graph.input.append(h.make_tensor_value_info("features.1.weight", T.FLOAT, [4]))
    folded = fold(model, fold_forward=False)
    r = folded.records["/features.4/BatchNormalization"]
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
        result = fold(model, fold_forward=False)
    except qdqfold_native.FoldError:
        return
    r = result.records["/features.4/BatchNormalization"]
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
