"""Verify runs the models as they will be deployed: optimisations off and at onnxruntime's default level; a
difference that shows only with optimisations on is reported as such (the float16 bias class, issue 13)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qdqfold_native
from qdqfold.verify import verify

from helpers.qdq import modelopt_f16_layer


def _float16_bias_variant(folded: bytes) -> bytes:
    """The fold as it was written before: the same bias as a float16 initializer (onnxruntime's BiasQuantization
    then re-quantizes it in float16 at BASIC and above)."""
    model = onnx.load_from_string(folded)
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    dq = next(n for n in model.graph.node if conv.input[2] in n.output)
    values = (init[dq.input[0]].astype(np.float64) * init[dq.input[1]].astype(np.float64)).astype(np.float16)
    model.graph.initializer.append(numpy_helper.from_array(values, "float16_bias"))
    conv.input[2] = "float16_bias"
    model.graph.node.remove(dq)
    return model.SerializeToString()


@pytest.mark.parametrize("bias", [False, True])
def test_float16_qdq_fold_verifies_exact_at_every_level(bias):
    data = modelopt_f16_layer(bias).SerializeToString()
    folded, report = qdqfold_native.fold_with_report(data)
    result = verify(data, folded, report=report, count_units=False)
    assert result.verdict == "exact", result.failure_message()
    assert set(result.levels) == {"off", "default"}
    every = verify(data, folded, report=report, count_units=False, levels=("off", "basic", "extended", "default"))
    assert every.verdict == "exact" and list(every.levels) == ["off", "basic", "extended", "default"]
    assert result.certificates and result.certificates[0].passed


def test_a_difference_only_with_optimisations_is_reported_as_such():
    data = modelopt_f16_layer(False).SerializeToString()
    folded, report = qdqfold_native.fold_with_report(data)
    broken = _float16_bias_variant(folded)
    result = verify(data, broken, report=report, count_units=False)
    assert [o.verdict for o in result.levels["off"]] == ["exact"]
    assert [o.verdict for o in result.levels["default"]] == ["differs"]
    assert result.verdict == "differs" and result.only_with_optimisations()
    assert "only with onnxruntime's optimisations on" in result.failure_message()
    assert result.to_dict()["differs_only_with_optimisations"] is True
    # Optimisations off only: the hazard is not seen (what --verify ran before).
    assert verify(data, broken, report=report, count_units=False, levels=("off",)).verdict == "exact"


def test_unknown_level_is_an_error():
    data = modelopt_f16_layer(False).SerializeToString()
    with pytest.raises(ValueError, match="optimisation level"):
        verify(data, data, levels=("fast",), count_units=False)
