"""Issue 14, pattern 10: AIMET's full-range int8 weights.

AIMET quantizes weights over the full int8 range [-128, 127]: a channel with a negative BN factor that holds
-128 cannot be negated within int8. The BN is kept (`negation-overflow`) with a message that names the option that
folds it (`--allow-nonzero-zero-point`) and what it costs (a nonzero weight zero point, which TensorRT rejects);
with the option the fold is exact through the complement form q' = -1 - q, z' = -1 - z.
"""

from __future__ import annotations

import numpy as np
import onnx

import qdqfold_native
from helpers.exporters.aimet import aimet_case
from helpers.qdq import assert_same, folded_weight


def test_full_range_int8_is_kept_with_the_option_and_its_cost_named():
    case = aimet_case()
    out, report = qdqfold_native.fold_with_report(case.bytes)
    r = report["batchnorms"][0]
    assert not r["folded"] and r["code"] == "negation-overflow", r
    # The CLI shows the keyword as its flag, --allow-nonzero-zero-point.
    assert "allow_nonzero_zero_point=True" in r["message"] and "TensorRT" in r["message"], r["message"]
    assert out == case.bytes


def test_allow_nonzero_zero_point_folds_it_exactly():
    case = aimet_case()
    out, report = qdqfold_native.fold_with_report(case.bytes, allow_nonzero_zero_point=True)
    r = report["batchnorms"][0]
    assert r["folded"] and "complement" in r["message"], r
    onnx.checker.check_model(onnx.load_from_string(out), full_check=True)
    f = folded_weight(out)
    neg = case.a < 0
    expected_q = np.where(neg[:, None, None, None], -1 - case.q0, case.q0)
    np.testing.assert_array_equal(f["q"], expected_q)
    np.testing.assert_array_equal(f["zero"].astype(np.int64), np.where(neg, -1, 0))
    np.testing.assert_array_equal(f["scale"], (case.scale0.astype(np.float64) * np.abs(case.a)).astype(np.float32))
    assert_same(case, out, r)
