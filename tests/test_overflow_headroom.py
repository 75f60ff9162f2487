"""A BN factor so large that folding moves overflow keeps the BN as `overflow` (issue 21, item 6).

gamma 3e38, var 1: a = gamma / sqrt(var + eps) is finite, and so are the folded scale s * a and the weights.
But the original sums the layer at its own size and multiplies by a once (a too large product is +-Inf),
while the folded layer sums values a times larger: partial sums overflow to +Inf and -Inf, which add up to
NaN. Main folded the int-form QDQ conv as `bias-rounded`, and onnxruntime gave NaN in every element where
the original has +-Inf and no NaN. Now every fold reads BN through one check (|a| <= 2^32) and keeps it.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from helpers.folding import fold
from helpers.forward_models import bn_node, make_model, tensor, vi
from helpers.onnxrt import random_inputs, run
from helpers.qdq import Case

HUGE = [3e38, 1.0, -3e38, 1.0, 1.0, 1.0]
# For float weights: W * a stays finite (|W| < 3.4), only the folded layer's sums overflow.
LARGE = [1e38, 1.0, -1e38, 1.0, 1.0, 1.0]


def set_initializer(model, name, values):
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(np.asarray(values, np.float32), name))
            return
    raise KeyError(name)


def assert_kept_with_the_same_non_finite_pattern(model, feeds, nan_free=True):
    folded = fold(model)
    record = folded.records["bn"]
    assert not record["folded"] and record["code"] == "overflow", record
    assert "2^32" in record["message"]
    assert folded.unchanged
    expected, actual = run(folded.input, feeds)[0], run(folded.bytes, feeds)[0]
    # The premise: the original overflows (to +-Inf only, when BN is the last op).
    assert np.isinf(expected).any() if nan_free else not np.isfinite(expected).all()
    assert not (nan_free and np.isnan(expected).any())
    np.testing.assert_array_equal(actual, expected)  # NaN/Inf positions and every finite value


@pytest.mark.parametrize("bias", [None, "int32"])
@pytest.mark.parametrize("form", ["int", "qdq"])
def test_qdq_conv_with_a_huge_bn_factor_is_kept_as_overflow(form, bias):
    case = Case(form=form, bias=bias, cout=6, gamma=HUGE)
    set_initializer(case.model, "var", np.ones(6))
    assert_kept_with_the_same_non_finite_pattern(case.model, random_inputs(case.model))


def float_model(layer: str, gamma):
    c = len(gamma)
    bn = [numpy_helper.from_array(np.asarray(v, np.float32), f"bn_{n}")
          for n, v in (("scale", gamma), ("bias", np.linspace(-1, 1, c)), ("mean", np.linspace(0.5, -0.5, c)),
                       ("var", np.ones(c)))]
    if layer == "Conv":  # Conv -> BN (backward)
        inits = [tensor("w", [c, 3, 3, 3]), tensor("b", [c]), *bn]
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]), bn_node("y", "out")]
        x = [2, 3, 6, 6]
    elif layer == "Gemm":  # Gemm -> BN (backward)
        inits = [tensor("w", [c, 16]), tensor("b", [c]), *bn]
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1), bn_node("y", "out")]
        x = [50, 16]
    else:  # Relu -> BN -> Conv (forward)
        inits = [*bn, tensor("w", [5, c, 3, 3])]
        nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"), helper.make_node("Conv", ["n", "w"], ["out"])]
        x = [2, c, 6, 6]
    return make_model(nodes, [vi("x", x)], [vi("out", None)], inits), x


@pytest.mark.parametrize("layer", ["Conv", "Gemm", "forward-Conv"])
def test_float_layers_with_a_huge_bn_factor_are_kept_as_overflow(layer):
    model, x = float_model(layer, LARGE)
    feeds = {"x": (np.random.default_rng(6).standard_normal(x) * 50).astype(np.float32)}
    # Forward, the original's BN output is +-Inf and the Conv after it mixes them into NaN itself.
    assert_kept_with_the_same_non_finite_pattern(model, feeds, nan_free=layer != "forward-Conv")


def test_a_large_but_ordinary_factor_still_folds():
    # gamma 1e3 with var 1e-9 (a ~ 3e5, a dead channel's typical size) is far inside the headroom.
    model, _ = float_model("Conv", [1e3, 1.0, -2.0, 1.0, 0.5, 1.0])
    set_initializer(model, "bn_var", [1e-9, 1, 1, 1, 1, 1])
    folded = fold(model)
    assert folded.records["bn"]["folded"], folded.records["bn"]
