"""Float folds inside subgraphs (If / Loop / Scan bodies) and local functions (issue 3).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from helpers.build import RNG, bn_count, bn_node, bn_params, make_model, vi, weight
from helpers.folding import fold
from helpers.onnxrt import assert_same_outputs, random_inputs


# ---------------------------------------------------------------- subgraphs and functions


def _branch(tag: str, weight_name: str, bias_name: str | None):
    """A branch graph: Conv (weights possibly from the outer scope) -> BN (parameters local) -> output."""
    inits = bn_params(f"{tag}_bn", 6)
    inputs = ["x", weight_name] + ([bias_name] if bias_name else [])
    nodes = [helper.make_node("Conv", inputs, [f"{tag}_y"], name=f"{tag}_conv", pads=[1, 1, 1, 1]),
             bn_node(f"{tag}_y", f"{tag}_z", f"{tag}_bn")]
    return helper.make_graph(nodes, tag, [], [vi(f"{tag}_z", [1, 6, 5, 5])], initializer=inits)


def test_if_branches_fold_with_outer_weights_left_untouched():
    then_g = _branch("then", "W", "B")
    else_inits = [weight("We", [6, 4, 3, 3])]
    else_g = _branch("else", "We", None)
    else_g.initializer.extend(else_inits)
    outer = [weight("W", [6, 4, 3, 3]), weight("B", [6])]
    nodes = [helper.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g, name="if"),
             # the outer W is also read in the main graph
             helper.make_node("Conv", ["x", "W", "B"], ["main_y"], name="main_conv", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vi("x", [1, 4, 5, 5]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                       [vi("out", [1, 6, 5, 5]), vi("main_y", [1, 6, 5, 5])], outer)
    folded = fold(model)
    assert [e["graph"] for e in folded.report["batchnorms"]] == ["main/if:then_branch", "main/if:else_branch"] or all(
        e["graph"].startswith("main/") for e in folded.report["batchnorms"])
    assert all(e["folded"] for e in folded.report["batchnorms"])
    assert bn_count(folded.model) == 0
    onnx.checker.check_model(folded.model, full_check=True)
    outer_after = {i.name: numpy_helper.to_array(i) for i in folded.model.graph.initializer}
    for init in outer:
        np.testing.assert_array_equal(outer_after[init.name], numpy_helper.to_array(init))
    for cond in (True, False):
        feeds = random_inputs(model)
        feeds["cond"] = np.array(cond)
        assert_same_outputs(model, folded.model, feeds=feeds)


def test_outer_weight_read_only_by_the_branches_is_dropped_once_both_folded():
    # Both branches read the outer W and B; each fold writes new tensors in its branch, after which nothing
    # reads the outer ones, so they go (an unused initializer would only bloat the model).
    model = make_model(
        [helper.make_node("If", ["cond"], ["out"], then_branch=_branch("then", "W", "B"),
                          else_branch=_branch("else", "W", "B"), name="if")],
        [vi("x", [1, 4, 5, 5]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [vi("out", [1, 6, 5, 5])], [weight("W", [6, 4, 3, 3]), weight("B", [6])])
    folded = fold(model)
    assert [e["folded"] for e in folded.report["batchnorms"]] == [True, True]
    assert [i.name for i in folded.model.graph.initializer] == []
    onnx.checker.check_model(folded.model, full_check=True)
    for cond in (True, False):
        feeds = random_inputs(model)
        feeds["cond"] = np.array(cond)
        assert_same_outputs(model, folded.model, feeds=feeds)


def test_outer_weight_still_read_by_one_branch_stays():
    then_g = _branch("then", "W", None)
    else_g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["else_z"], pads=[1, 1, 1, 1])], "else", [],
                               [vi("else_z", [1, 6, 5, 5])])
    model = make_model(
        [helper.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g, name="if")],
        [vi("x", [1, 4, 5, 5]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [vi("out", [1, 6, 5, 5])], [weight("W", [6, 4, 3, 3])])
    folded = fold(model)
    assert [e["folded"] for e in folded.report["batchnorms"]] == [True]
    assert [i.name for i in folded.model.graph.initializer] == ["W"]
    for cond in (True, False):
        feeds = random_inputs(model)
        feeds["cond"] = np.array(cond)
        assert_same_outputs(model, folded.model, feeds=feeds)


def test_loop_and_scan_bodies_fold():
    # Loop body: (iter, cond, carried) -> Conv -> BN -> carried
    body_inits = [weight("Wl", [4, 4, 3, 3])] + bn_params("lbn", 4)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Conv", ["carried", "Wl"], ["ly"], pads=[1, 1, 1, 1], name="loop_conv"),
         bn_node("ly", "carried_out", "lbn")],
        "loop_body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                      helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), vi("carried", [1, 4, 5, 5])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), vi("carried_out", [1, 4, 5, 5])],
        initializer=body_inits)
    # Scan body: one [4] row at a time through MatMul -> BN? BN needs [N, C]: use a Gemm on [1, 4] rows
    scan_inits = [weight("Ws", [4, 4])] + bn_params("sbn", 4)
    scan_body = helper.make_graph(
        [helper.make_node("Gemm", ["row", "Ws"], ["sy"], name="scan_gemm"), bn_node("sy", "srow", "sbn")],
        "scan_body", [vi("row", [1, 4])], [vi("srow", [1, 4])], initializer=scan_inits)
    nodes = [helper.make_node("Loop", ["trip", "", "x"], ["looped"], body=body, name="loop"),
             helper.make_node("Scan", ["rows"], ["scanned"], body=scan_body, num_scan_inputs=1, name="scan")]
    model = make_model(nodes, [helper.make_tensor_value_info("trip", TensorProto.INT64, []), vi("x", [1, 4, 5, 5]),
                               vi("rows", [3, 1, 4])], [vi("looped", [1, 4, 5, 5]), vi("scanned", [3, 1, 4])], [], opset=17)
    folded = fold(model)
    assert len(folded.report["batchnorms"]) == 2 and all(e["folded"] for e in folded.report["batchnorms"]), folded.report
    assert bn_count(folded.model) == 0
    onnx.checker.check_model(folded.model, full_check=True)
    feeds = random_inputs(model)
    feeds["trip"] = np.array(3, dtype=np.int64)
    assert_same_outputs(model, folded.model, feeds=feeds)


def test_model_local_function_with_constant_nodes_folds_including_a_chain():
    w = numpy_helper.from_array((RNG.standard_normal([6, 4, 3, 3]) * 0.5).astype(np.float32), "w")
    params = bn_params("f1", 6) + bn_params("f2", 6)
    consts = [helper.make_node("Constant", [], ["fw"], value=w)]
    for p in params:
        consts.append(helper.make_node("Constant", [], [p.name], value=p))
    fn_nodes = consts + [helper.make_node("Conv", ["fx", "fw"], ["fy"], pads=[1, 1, 1, 1], name="fconv"),
                         bn_node("fy", "fz", "f1"), bn_node("fz", "fout", "f2")]
    fn = helper.make_function("local", "ConvBN", ["fx"], ["fout"], fn_nodes, [helper.make_opsetid("", 17)])
    model = make_model([helper.make_node("ConvBN", ["x"], ["out"], domain="local", name="call")],
                       [vi("x", [1, 4, 5, 5])], [vi("out", None)], [],
                       functions=[fn], extra_opsets=[helper.make_opsetid("local", 1)])
    folded = fold(model)
    assert [e["graph"].startswith("function:") for e in folded.report["batchnorms"]] == [True, True]
    assert all(e["folded"] for e in folded.report["batchnorms"]), folded.report
    assert bn_count(folded.model) == 0
    f = folded.model.functions[0]
    assert [n.op_type for n in f.node].count("Constant") == 2  # the folded W and B; the BN parameters are gone
    onnx.checker.check_model(folded.model, full_check=True)
    assert_same_outputs(model, folded.model)
