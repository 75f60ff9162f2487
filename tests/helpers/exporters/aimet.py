"""Pattern 10 (tests/test_exporters_aimet.py): AIMET's full-range int8 weights."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto as T

from helpers.qdq import Case

def aimet_case():
    rng = np.random.default_rng(1410)
    cout, cin = 6, 8
    ints = rng.integers(-128, 128, size=(cout, cin, 3, 3))
    ints[:, 0, 0, 0] = -128  # the full range is used in every channel
    case = Case(form="int", qtype=T.INT8, ints=ints, cout=cout, cin=cin, zero=0)
    assert (case.a < 0).any()
    return case
