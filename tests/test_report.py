"""The report (FoldReport): totals, JSON round trip, one BN's story; and the light node walker behind it."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdqfold
from qdqfold.graphinfo import WireFormatError, read_model_info
from qdqfold.report import BatchNormEntry, FoldReport

from helpers.samples import MODELS, SAMPLE_MODELS


def _entry(node, folded, *, direction=None, code="conv-bn", exact=True, new_tensors=()):
    return BatchNormEntry(graph="main", node=node, folded=folded, direction=direction if folded else None,
                          into=["conv"] if folded else [], into_op="Conv" if folded else None, code=code,
                          message="" if folded else "blocked by node q", exact=exact, new_tensors=list(new_tensors))


def test_totals_count_each_kind_of_outcome():
    report = FoldReport([
        _entry("a", True, direction="backward", new_tensors=["w1", "b1"]),
        _entry("b", True, direction="forward", code="bn-conv"),
        _entry("c", True, direction="backward", exact=False, code="conv-qdq-bn"),
        _entry("d", False, code="activation-quantizer"),
        _entry("e", False, code="activation-quantizer"),
        _entry("f", False, code="shared-weight"),
    ])
    assert report.totals() == {"batchnorms": 6, "folded": 3, "kept": 3, "exact": 2, "approximate": 1,
                               "backward": 2, "forward": 1, "new_tensors": 2}
    assert report.kept_by_reason() == Counter({"activation-quantizer": 2, "shared-weight": 1})
    assert report.folded_by_fold() == Counter({"conv-bn": 1, "bn-conv": 1, "conv-qdq-bn": 1})
    assert "APPROXIMATELY" in report.find("c").describe()
    assert "[shared-weight]" in report.find("f").describe()
    assert "1 folded approximately" in report.summary()


def test_json_round_trip_keeps_every_entry():
    report = FoldReport([_entry("a", True, direction="backward", new_tensors=["w"]), _entry("b", False, code="x")])
    data = json.loads(report.to_json())
    assert data["totals"]["folded"] == 1 and data["kept_by_reason"] == {"x": 1}
    assert FoldReport.from_dict(data) == report


def test_report_of_every_sample_model_is_consistent(sample_model_path):
    model = onnx.load(sample_model_path)
    _, report = qdqfold.fold_model(model, report=True)
    bn_names = [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert sorted(b.node for b in report.batchnorms) == sorted(bn_names)
    totals = report.totals()
    assert totals["folded"] + totals["kept"] == totals["batchnorms"] == len(bn_names)
    assert sum(report.kept_by_reason().values()) == totals["kept"]
    for entry in report.kept:
        assert entry.code and entry.message  # a kept BN always says why
    for entry in report.folded:
        assert entry.direction in ("backward", "forward") and entry.into and entry.into_op
    json.dumps(report.to_dict())  # JSON-serializable as is


def test_explain_tells_where_the_bn_sits_and_why():
    data = (MODELS / "qat_seed_prebn.onnx").read_bytes()
    model = onnx.load_from_string(data)
    _, report = qdqfold.fold_model(data, report=True)
    bn = next(n for n in model.graph.node if n.name == "/bn2/BatchNormalization")
    producer = next(n for n in model.graph.node if bn.input[0] in n.output)
    readers = [n for n in model.graph.node if bn.output[0] in n.input]
    story = report.explain(bn.name, read_model_info(data))
    assert story.splitlines()[0] == f"BatchNormalization {bn.name}"
    assert f"from {producer.op_type} {producer.name}" in story
    for reader in readers:
        assert f"{reader.op_type} {reader.name}" in story
    entry = report.find(bn.name)
    assert (f"[{entry.code}]" in story) != entry.folded
    if entry.message:
        assert entry.message in story


def test_explain_an_unknown_node_lists_the_names():
    report = FoldReport([_entry("bn_one", False, code="x")])
    with pytest.raises(KeyError, match="bn_one"):
        report.explain("nope")


# ------------------------------------------------------------------------------------------- graphinfo

def test_node_walker_matches_onnx_on_every_sample(sample_model_path):
    data = sample_model_path.read_bytes()
    model = onnx.load_from_string(data)
    info = read_model_info(data)
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in model.graph.node] == \
           [(n.op_type, n.name, list(n.inputs), list(n.outputs)) for n in info.nodes]


def test_node_walker_sees_subgraphs_functions_and_domains():
    body = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="inner")], "body", [],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    nodes = [
        helper.make_node("If", ["c"], ["o"], name="branch", then_branch=body, else_branch=body),
        helper.make_node("MyFn", ["o"], ["p"], domain="my.domain", name="call"),
    ]
    fn = helper.make_function("my.domain", "MyFn", ["a"], ["b"], [helper.make_node("Neg", ["a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.zeros(1000, np.float32), "big")])
    model = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 17),
                                                                     helper.make_opsetid("my.domain", 1)])
    info = read_model_info(model.SerializeToString())
    assert info.op_counts() == Counter({"If": 1, "Relu": 2, "my.domain.MyFn": 1, "Neg": 1})
    graphs = {n.graph for n in info.nodes}
    assert graphs == {"main", "main/branch:then_branch", "main/branch:else_branch", "function:my.domain.MyFn"}


@pytest.mark.parametrize("data", [b"\x0a\xff", b"\x3a\x05abc", b"\x07"])
def test_node_walker_rejects_malformed_bytes(data):
    with pytest.raises(WireFormatError):
        read_model_info(data)


def test_sample_models_exist():
    assert SAMPLE_MODELS, "tests/models holds the shared sample models"
