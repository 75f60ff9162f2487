"""The checks of the quantized fold tests (test_fold_qdq*.py): a Case folded and checked, or kept unchanged."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper as nh

from helpers import folding
from helpers.folding import fold
from helpers.qdq import EPS, assert_same


# ------------------------------------------------------------------------------------------------ checks


def fold_and_check(case, **options):
    result = fold(case.bytes, **options)
    r = result.records["bn"]
    assert r["folded"], r
    assert r["code"] == "qdq-layer-bn"
    assert r["direction"] == "backward"
    assert r["into"] == ["layer"]
    assert "BatchNormalization" not in [n.op_type for n in onnx.load_from_string(result.bytes).graph.node]
    onnx.checker.check_model(onnx.load_from_string(result.bytes), full_check=True)
    assert_same(case, result.bytes, r)
    return result.bytes, r


def assert_kept(case, code, *words, **options):
    return folding.assert_kept(case.bytes, code, *words, node="bn", **options)


def with_unit_variance(case):
    """``case`` with every BN variance 1 (in the model too), so that equal gammas give equal factors exactly."""
    case.var[:] = 1.0
    for init in case.model.graph.initializer:
        if init.name == "var":
            init.CopyFrom(nh.from_array(case.var, "var"))
    case.a = case.gamma.astype(np.float64) / np.sqrt(1.0 + np.float64(np.float32(EPS)))
    case.t = case.beta.astype(np.float64) - case.mean.astype(np.float64) * case.a
    return case
