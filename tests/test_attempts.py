"""Issue 24, item 3: every rule's outcome per BN, in order, in the report ("attempts"), --json and --explain.

Conv1 -> BN -> padded Conv2, Conv1's output also a graph output: the backward fold keeps the BN with
`layer-output-is-graph-output` (nothing a user can change), and the forward fold with `padding` (pad_correction
changes it), or `dynamic-shape` under pad_correction (shapes changes it). The report used to show only the first;
it now lists both, each with its verdict, the node or value at fault and the option that changes it, while the
record's code (and the summary) is still the deciding one, the first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qdqfold_native
from helpers.onnxrt import assert_same_outputs
from qdqfold.report import SCHEMA, FoldReport

C = 4


def model(dynamic=True) -> onnx.ModelProto:
    rng = np.random.default_rng(243)
    inits = [nh.from_array(v.astype(np.float32), n) for n, v in
             (("w1", rng.standard_normal((C, 3, 3, 3)) * 0.3), ("w2", rng.standard_normal((5, C, 3, 3)) * 0.3),
              ("gamma", rng.uniform(0.5, 1.5, C)), ("beta", rng.standard_normal(C)), ("mean", rng.standard_normal(C)),
              ("var", rng.uniform(0.5, 2, C)))]
    nodes = [h.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["z"], name="bn"),
             h.make_node("Conv", ["z", "w2"], ["out"], name="conv2", pads=[1, 1, 1, 1])]
    size = ["h", "w"] if dynamic else [6, 6]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, *size])],
                         [h.make_tensor_value_info("out", T.FLOAT, [1, 5, *size]),
                          h.make_tensor_value_info("c1", T.FLOAT, [1, C, *size])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def attempts(report):
    return [(a["rule"], a["verdict"], a["code"], a["at"], a["option"]) for a in report["batchnorms"][0]["attempts"]]


BACKWARD = ("conv-bn", "kept", "layer-output-is-graph-output", "c1", None)


def test_every_rule_that_looked_is_listed_in_order_the_first_reason_decides():
    data = model().SerializeToString()
    out, report = qdqfold_native.fold_with_report(data)
    r = report["batchnorms"][0]
    assert not r["folded"] and r["code"] == "layer-output-is-graph-output", r
    assert attempts(report) == [BACKWARD, ("bn-layers", "kept", "padding", "conv2", "pad_correction")]
    assert "pad_correction=True" in r["attempts"][1]["message"]
    assert r["attempts"][0]["message"] == r["message"]
    assert FoldReport.from_native(report).kept_by_reason() == {"layer-output-is-graph-output": 1}
    assert out == data


def test_pad_correction_without_a_static_size_says_dynamic_shape_and_names_shapes():
    _, report = qdqfold_native.fold_with_report(model().SerializeToString(), pad_correction=True)
    assert attempts(report) == [BACKWARD, ("bn-layers", "kept", "dynamic-shape", "conv2", "shapes")]
    assert report["batchnorms"][0]["code"] == "layer-output-is-graph-output"


def test_a_fold_after_a_kept_rule_lists_both():
    m = model(dynamic=False)
    out, report = qdqfold_native.fold_with_report(m.SerializeToString(), pad_correction=True)
    r = report["batchnorms"][0]
    assert r["folded"] and r["code"] == "bn-conv", r
    assert attempts(report) == [BACKWARD, ("bn-layers", "folded", "bn-conv", None, None)]
    assert_same_outputs(m, onnx.load_from_string(out))


def test_a_backward_fold_is_one_attempt():
    m = model(dynamic=False)
    m.graph.output.pop()  # c1 no longer a graph output
    _, report = qdqfold_native.fold_with_report(m.SerializeToString())
    assert attempts(report) == [("conv-bn", "folded", "conv-bn", None, None)]


def qdqfold_cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    return subprocess.run([sys.executable, "-m", "qdqfold", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_json_and_explain_show_the_attempts(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(model(), path)
    result = qdqfold_cli(path, "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["schema"] == SCHEMA == "qdqfold.report/2"
    (bn,) = document["batchnorms"]
    assert [a["code"] for a in bn["attempts"]] == ["layer-output-is-graph-output", "padding"]
    assert "--pad-correction" in bn["attempts"][1]["message"]  # the CLI's words
    assert document["kept_by_reason"] == {"layer-output-is-graph-output": 1}
    result = qdqfold_cli(path, "--explain", "bn")
    assert result.returncode == 0, result.stderr
    assert "rules that looked at it, in order:" in result.stdout
    assert "1. conv-bn: kept [layer-output-is-graph-output] at c1" in result.stdout
    assert "2. bn-layers: kept [padding] at conv2 (option: pad_correction)" in result.stdout
