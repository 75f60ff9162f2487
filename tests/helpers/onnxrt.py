"""Running models in onnxruntime (graph optimisations off): sessions, seeded random inputs, and the
output comparison most fold tests end with."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort


def session(model: onnx.ModelProto | bytes) -> ort.InferenceSession:
    """An onnxruntime session with graph optimisations off, so a test judges our graph, not ORT's."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    data = model if isinstance(model, (bytes, bytearray)) else model.SerializeToString()
    return ort.InferenceSession(bytes(data), options, providers=["CPUExecutionProvider"])


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


def random_inputs(model: onnx.ModelProto | bytes, seed: int = 0, symbolic_size: int = 2) -> dict[str, np.ndarray]:
    """Seeded random inputs shaped from the graph's inputs (symbolic dims take `symbolic_size`)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session(model).get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else symbolic_size for d in i.shape]
        dtype = _ORT_TYPES[i.type]
        if dtype == np.bool_:
            feeds[i.name] = rng.random(shape) > 0.5
        elif np.issubdtype(dtype, np.integer):
            feeds[i.name] = rng.integers(0, 3, size=shape).astype(dtype)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run(model: onnx.ModelProto | bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def assert_same_outputs(original, folded, rtol_of_range: float = 1e-5, seed: int = 0, feeds=None) -> None:
    """Outputs of `folded` equal those of `original` within `rtol_of_range` of each output's range."""
    feeds = feeds if feeds is not None else random_inputs(original, seed)
    expected = run(original, feeds)
    actual = run(folded, feeds)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape
        e64, a64 = e.astype(np.float64), a.astype(np.float64)
        span = float(np.max(e64) - np.min(e64)) if e.size else 0.0
        err = float(np.max(np.abs(e64 - a64))) if e.size else 0.0
        assert err <= rtol_of_range * max(span, 1e-12), f"max abs error {err} exceeds {rtol_of_range} of range {span}"
