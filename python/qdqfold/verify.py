"""Verification: run the original and the folded model in onnxruntime on the same seeded random inputs.

Per output it reports the largest absolute difference, the largest relative difference, the difference as a
share of the original output's range (what the tolerance is checked against) and, for outputs that a
quantizer feeds, how many elements moved by a quantization step:

    step  = the smallest scale of the activation quantizers (QuantizeLinear nodes whose input is not a
            constant) that the output depends on, in the main graph; for an integer output, 1.
    moved = the elements whose absolute difference is at least half that step.

A fold that keeps every quantizer's integers moves none. Both runs use graph optimisations off, so the
figures judge our graph, not onnxruntime's rewrites.

It also counts onnxruntime's quantized node units (QLinearConv, QGemm, ConvInteger, ...) in the model
onnxruntime builds at ORT_ENABLE_EXTENDED, before and after: a fold must not stop onnxruntime from forming
the integer kernels it formed before.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import numpy as np
    import onnx

# numpy, onnx and onnxruntime are imported where they are used: folding without --verify never loads them.
ModelLike = Union["onnx.ModelProto", bytes, bytearray, memoryview, str, os.PathLike]

#: Default tolerance: the largest difference allowed, as a share of each output's range.
DEFAULT_TOLERANCE = 1e-5

#: onnxruntime's quantized node units besides the QLinear* family.
QUANTIZED_UNIT_OPS = frozenset({
    "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention",
    "DynamicQuantizeLSTM", "QEmbedLayerNormalization", "QOrderedMatMul", "QOrderedGelu", "QOrderedLayerNormalization",
    "MatMulNBits", "NhwcQLinearConv",
})


def is_quantized_unit(op_type: str) -> bool:
    return op_type.startswith("QLinear") or op_type in QUANTIZED_UNIT_OPS


@dataclass
class OutputCheck:
    """The comparison of one output."""

    name: str
    shape: list[int]
    max_abs: float
    max_rel: float  # max |folded - original| / |original| over elements where original != 0
    range: float  # max - min of the original output
    of_range: float  # max_abs / range (the tolerance is checked against this)
    step: float | None  # quantization step (see the module doc); None when no quantizer feeds the output
    moved: int | None  # elements that moved by at least half a step
    elements: int
    passed: bool

    @property
    def moved_share(self) -> float | None:
        return None if self.moved is None else self.moved / max(self.elements, 1)


@dataclass
class VerifyResult:
    outputs: list[OutputCheck]
    tolerance: float
    seed: int
    input_shapes: dict[str, list[int]]
    quantized_units_before: dict[str, int] = field(default_factory=dict)
    quantized_units_after: dict[str, int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def moved(self) -> int:
        """Elements that moved by a quantization step, over all quantized outputs."""
        return sum(o.moved or 0 for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for out, check in zip(data["outputs"], self.outputs):
            out["moved_share"] = check.moved_share
        data["passed"] = self.passed
        data["quantized_units"] = {"before": sum(self.quantized_units_before.values()),
                                   "after": sum(self.quantized_units_after.values())}
        return data


class VerifyError(ValueError):
    """A model cannot be run (e.g. onnxruntime rejects it, or an input type cannot be generated)."""


def _as_bytes(model: ModelLike) -> bytes:
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model)
    from .api import load_model_bytes  # a path; external data is loaded beside it

    return load_model_bytes(model)


def _session(data: bytes, level: Any = None, optimized_path: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = level if level is not None else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = 1  # deterministic, and fair to other models verified in parallel
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise VerifyError(f"onnxruntime cannot load the model: {str(e).strip().splitlines()[0]}") from e


_NUMPY_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(int64)": "int64",
    "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16", "tensor(bool)": "bool",
}


def random_inputs(session, seed: int = 0, symbolic_size: int = 1,
                  dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Seeded random inputs shaped from the session's inputs. A symbolic dimension takes ``dims[name]`` when
    given, else ``symbolic_size``; floats are standard normal, integers small non-negative values (safe as
    indices), 8-bit integers span their whole range."""
    import numpy as np

    dims = dims or {}
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d >= 0 else dims.get(d, symbolic_size) if isinstance(d, str)
                 else symbolic_size for d in i.shape]
        if i.type not in _NUMPY_TYPES:
            raise VerifyError(f"cannot generate random values for input {i.name!r} of type {i.type}")
        dtype = np.dtype(_NUMPY_TYPES[i.type]).type
        if dtype == np.bool_:
            feeds[i.name] = rng.random(shape) > 0.5
        elif dtype in (np.int8, np.uint8):
            limits = np.iinfo(dtype)
            feeds[i.name] = rng.integers(limits.min, limits.max, size=shape, endpoint=True).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[i.name] = rng.integers(0, 3, size=shape).astype(dtype)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def quantization_steps(model: onnx.ModelProto) -> dict[str, float]:
    """For each main-graph output fed by an activation quantizer: the smallest scale among those quantizers."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    constants[node.output[0]] = attribute.t
    producers = {out: node for node in graph.node for out in node.output}
    graph_inputs = {i.name for i in graph.input} - set(constants)

    def is_constant(tensor: str) -> bool:
        """True when the tensor is computed from constants only (a weight quantizer's input)."""
        seen, stack = set(), [tensor]
        while stack:
            name = stack.pop()
            if name in seen or name == "" or name in constants:
                continue
            seen.add(name)
            if name in graph_inputs or name not in producers:
                return False
            stack.extend(producers[name].input)
        return True

    def smallest_scale(node: onnx.NodeProto) -> float | None:
        if len(node.input) < 2 or node.input[1] not in constants:
            return None
        scale = np.abs(numpy_helper.to_array(constants[node.input[1]]).astype(np.float64)).ravel()
        scale = scale[scale > 0]
        return float(scale.min()) if scale.size else None

    steps = {}
    for output in graph.output:
        seen, stack, smallest = set(), [output.name], None
        while stack:
            name = stack.pop()
            if name in seen or name not in producers:
                continue
            seen.add(name)
            node = producers[name]
            if node.op_type == "QuantizeLinear" and node.input and not is_constant(node.input[0]):
                scale = smallest_scale(node)
                if scale is not None:
                    smallest = scale if smallest is None else min(smallest, scale)
            stack.extend(node.input)
        if smallest is not None:
            steps[output.name] = smallest
    return steps


def quantized_units(data: bytes) -> dict[str, int]:
    """onnxruntime's quantized node units, by op type, in the model it builds at ORT_ENABLE_EXTENDED."""
    import onnxruntime as ort

    from .graphinfo import read_model_info

    with tempfile.TemporaryDirectory(prefix="qdqfold-verify-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        _session(data, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, path)
        counts = read_model_info(Path(path).read_bytes()).op_counts()
    return dict(sorted((op.rsplit(".", 1)[-1], n) for op, n in counts.items() if is_quantized_unit(op.rsplit(".", 1)[-1])))


def verify(original: ModelLike, folded: ModelLike, *, tolerance: float = DEFAULT_TOLERANCE, seed: int = 0,
           symbolic_size: int = 1, dims: dict[str, int] | None = None, count_units: bool = True) -> VerifyResult:
    """Runs ``original`` and ``folded`` (ModelProto, bytes or path) in onnxruntime on the same seeded random
    inputs and compares every output. An output passes when its largest absolute difference is at most
    ``tolerance`` times its range in the original (a constant output: at most ``tolerance``).
    Raises :class:`VerifyError` when a model cannot be run."""
    import numpy as np
    import onnx

    original_bytes, folded_bytes = _as_bytes(original), _as_bytes(folded)
    before, after = _session(original_bytes), _session(folded_bytes)
    feeds = random_inputs(before, seed, symbolic_size, dims)
    names = [o.name for o in before.get_outputs()]
    if [o.name for o in after.get_outputs()] != names:
        raise VerifyError("the folded model's outputs are not the original's")
    expected = before.run(None, feeds)
    actual = after.run(None, feeds)
    steps = quantization_steps(onnx.load_from_string(original_bytes)) if "QuantizeLinear" in _op_set(original_bytes) \
        else {}
    checks = [_compare(name, np.asarray(e), np.asarray(a), steps.get(name), tolerance)
              for name, e, a in zip(names, expected, actual)]
    result = VerifyResult(checks, tolerance, seed, {k: list(v.shape) for k, v in feeds.items()})
    if count_units:
        result.quantized_units_before = quantized_units(original_bytes)
        result.quantized_units_after = quantized_units(folded_bytes)
    return result


def _op_set(data: bytes) -> set[str]:
    from .graphinfo import read_model_info

    return {n.op_type for n in read_model_info(data).nodes}


def _compare(name: str, expected: np.ndarray, actual: np.ndarray, step: float | None, tolerance: float) -> OutputCheck:
    import numpy as np

    if expected.shape != actual.shape:
        return OutputCheck(name, list(expected.shape), float("inf"), float("inf"), 0.0, float("inf"), step, None,
                           int(expected.size), False)
    e = expected.astype(np.float64)
    a = actual.astype(np.float64)
    if np.issubdtype(expected.dtype, np.integer):
        step = 1.0  # a quantized output counts in integer steps
    if e.size == 0:
        return OutputCheck(name, list(e.shape), 0.0, 0.0, 0.0, 0.0, step, 0 if step else None, 0, True)
    diff = np.abs(a - e)
    diff[np.isnan(a) & np.isnan(e)] = 0.0  # NaN where the original has NaN is no difference
    diff[np.isnan(diff)] = np.inf
    max_abs = float(diff.max())
    nonzero = e != 0
    max_rel = float((diff[nonzero] / np.abs(e[nonzero])).max()) if nonzero.any() else (0.0 if max_abs == 0 else np.inf)
    finite = e[np.isfinite(e)]
    span = float(finite.max() - finite.min()) if finite.size else 0.0
    of_range = max_abs / span if span > 0 else max_abs
    moved = int(np.count_nonzero(diff >= step / 2)) if step else None
    return OutputCheck(name, list(e.shape), max_abs, max_rel, span, of_range, step, moved, int(e.size),
                       of_range <= tolerance)
