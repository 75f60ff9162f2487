"""Folds rest only on shapes the core proves (issue 21, item 5).

A value_info entry (or a graph output's type) is a claim: onnxruntime does not check it and runs the model
anyway. pad_correction needs the spatial size of the padded Conv's input; a claim of 1x1 or 5x5 on a model
fed 8x8 made the fold add a wrong border correction (outputs off by 0.36 of range) or one onnxruntime cannot
broadcast. The core now infers sizes itself from the graph inputs' declared shapes through the ops it
knows; where it cannot, the BN is kept as dynamic-shape and the model passes through byte for byte.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from helpers.folding import fold_api
from helpers.forward_models import bn_conv_model, bn_node, bn_params, make_model, tensor, vi
from helpers.onnxrt import assert_same_outputs, run

RNG = np.random.default_rng(21)
FEED = {"x": RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)}


def with_claim(model, claim, input_shape="static"):
    """`model` (x [1, 4, 8, 8] -> Relu -> r -> BN -> padded Conv -> y) with value_info claiming r's shape,
    the graph input made symbolic or shapeless, and y declared without a shape (so no claim reaches it)."""
    if input_shape == "symbolic":
        dims = model.graph.input[0].type.tensor_type.shape.dim
        for k, name in ((0, "n"), (2, "h"), (3, "w")):
            dims[k].dim_param = name
    elif input_shape == "none":
        model.graph.input[0].type.tensor_type.ClearField("shape")
    model.graph.output[0].type.tensor_type.ClearField("shape")
    model.graph.value_info.append(vi("r", claim))
    return model


CLAIMS = [[1, 4, 1, 1], [1, 4, 5, 5]]


@pytest.mark.parametrize("claim", CLAIMS)
@pytest.mark.parametrize("input_shape", ["symbolic", "none"])
def test_a_wrong_value_info_claim_on_a_dynamic_input_keeps_the_bn(claim, input_shape):
    model = with_claim(bn_conv_model([1, 4, 8, 8], pads=[1, 1, 1, 1]), claim, input_shape)
    folded = fold_api(model, pad_correction=True)
    entry = folded.report.batchnorms[0]
    assert not entry.folded and entry.code == "dynamic-shape", entry.describe()
    assert "value_info" in entry.message and "static spatial size" in entry.message
    assert folded.unchanged
    # The output still runs in onnxruntime at the size actually fed, and equals the original.
    np.testing.assert_array_equal(run(folded.bytes, FEED)[0], run(folded.input, FEED)[0])


@pytest.mark.parametrize("claim", CLAIMS)
def test_a_static_input_folds_at_its_own_size_whatever_value_info_claims(claim):
    model = with_claim(bn_conv_model([1, 4, 8, 8], pads=[1, 1, 1, 1]), claim)
    folded = fold_api(model, pad_correction=True)
    entry = folded.report.batchnorms[0]
    assert entry.folded and entry.exact and entry.code == "bn-conv", entry.describe()
    # The correction is built for the 8 x 8 input the model declares, not the claimed size.
    assert entry.metrics["correction_elements"] == 6 * 8 * 8
    assert_same_outputs(folded.input, folded.bytes, feeds=FEED)


def test_sizes_are_inferred_through_conv_pool_and_concat():
    # x [2, 3, 17, 17] -> Conv(stride 2, pad 1) [2, 4, 9, 9] -> MaxPool(3, stride 2) [2, 4, 4, 4]
    #   -> Concat with itself [2, 8, 4, 4] -> Relu -> BN -> Conv(pad 1): the correction needs 4 x 4.
    c = 8
    inits = [tensor("w0", [4, 3, 3, 3]), *bn_params("bn", c), tensor("w", [5, c, 3, 3]), tensor("b", [5])]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c0"], ["p"], kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("Concat", ["p", "p"], ["cat"], axis=1),
             helper.make_node("Relu", ["cat"], ["r"]), bn_node("r", "n"),
             helper.make_node("Conv", ["n", "w", "b"], ["y"], name="layer", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vi("x", [2, 3, 17, 17])], [vi("y", None)], inits)
    model.graph.output[0].type.tensor_type.ClearField("shape")
    model.graph.value_info.append(vi("r", [2, c, 7, 7]))  # a wrong claim, not used
    folded = fold_api(model, pad_correction=True)
    entry = folded.records["bn"]
    assert entry.folded and entry.metrics["correction_elements"] == 5 * 4 * 4, entry.describe()
    assert_same_outputs(folded.input, folded.bytes)


def test_a_symbolic_batch_is_fine_but_a_claimed_spatial_size_is_not():
    # Only the spatial dims matter to the correction: a symbolic batch with static H x W folds.
    model = bn_conv_model([3, 4, 8, 8], pads=[1, 1, 1, 1], input_shape=["n", 4, 8, 8])
    model.graph.value_info.append(vi("r", ["n", 4, 5, 5]))
    model.graph.output[0].type.tensor_type.ClearField("shape")
    folded = fold_api(model, pad_correction=True)
    assert folded.report.batchnorms[0].folded
    assert_same_outputs(folded.input, folded.bytes, feeds={"x": RNG.standard_normal((3, 4, 8, 8)).astype(np.float32)})


@pytest.mark.parametrize("x_shape", [[2, 6, 6], None])
def test_a_matmul_output_claimed_2d_but_3d_is_not_folded_as_features(x_shape):
    # MatMul([2, 6, 6], W [6, 6]) is 3-D: BN normalizes its axis 1, not the features. A value_info claiming
    # [2, 6] made gemm-bn write a Gemm onnxruntime refuses ("expected to have rank 2 but has rank 3").
    inits = [tensor("w", [6, 6]), *bn_params("bn", 6)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), bn_node("y", "out")]
    model = make_model(nodes, [vi("x", x_shape)], [vi("out", None)], inits, value_info=[vi("y", [2, 6])])
    model.graph.output[0].type.tensor_type.ClearField("shape")
    folded = fold_api(model)
    entry = folded.records["bn"]
    assert not entry.folded and entry.code == ("channel-axis-mismatch" if x_shape else "unknown-rank"), entry.describe()
    assert folded.unchanged
    feeds = {"x": RNG.standard_normal((2, 6, 6)).astype(np.float32)}
    np.testing.assert_array_equal(run(folded.bytes, feeds)[0], run(folded.input, feeds)[0])
