"""Quantization steps of the outputs, and onnxruntime's quantized node units before and after."""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from .loading import ModelLike, _Model, _session

if TYPE_CHECKING:
    import numpy as np
    import onnx

#: onnxruntime's quantized node units besides the QLinear* family.
QUANTIZED_UNIT_OPS = frozenset({
    "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention",
    "DynamicQuantizeLSTM", "QEmbedLayerNormalization", "QOrderedMatMul", "QOrderedGelu", "QOrderedLayerNormalization",
    "MatMulNBits", "NhwcQLinearConv",
})


def is_quantized_unit(op_type: str) -> bool:
    return op_type.startswith("QLinear") or op_type in QUANTIZED_UNIT_OPS

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
        tensor = constants[node.input[1]]
        if tensor.data_location == onnx_external():
            return None
        scale = np.abs(numpy_helper.to_array(tensor).astype(np.float64)).ravel()
        scale = scale[scale > 0]
        return float(scale.min()) if scale.size else None

    steps = {}
    for output in graph.output:
        smallest = None
        for node in _upstream(producers, output.name):
            if node.op_type == "QuantizeLinear" and node.input and not is_constant(node.input[0]):
                scale = smallest_scale(node)
                if scale is not None:
                    smallest = scale if smallest is None else min(smallest, scale)
        if smallest is not None:
            steps[output.name] = smallest
    return steps


def _upstream(producers: Mapping[str, Any], value: str, stop: Any = None) -> Iterator[Any]:
    """The nodes ``value`` depends on, each once, depth first from it; the walk does not go past a node for
    which ``stop(node)`` is true (it is still yielded)."""
    seen, stack = set(), [value]
    while stack:
        name = stack.pop()
        if name in seen or name not in producers:
            continue
        seen.add(name)
        node = producers[name]
        yield node
        if stop is None or not stop(node):
            stack.extend(node.input)


def last_quantizer_steps(model: onnx.ModelProto) -> dict[str, float]:
    """For each main-graph output: the largest scale of the activation quantizers nearest to it (the last ones
    its values pass through). One flip of such a quantizer moves the output by that step; a fold that rounds
    differently (an int32 bias re-quantized, float weights rounded once) may cause one."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    def nearest(node: onnx.NodeProto) -> bool:  # an activation quantizer with a constant scale ends a path
        return node.op_type == "QuantizeLinear" and bool(node.input) and node.input[0] not in inits and \
            len(node.input) > 1 and node.input[1] in inits and inits[node.input[1]].data_location != onnx_external()

    steps = {}
    for output in graph.output:
        largest = None
        for node in _upstream(producers, output.name, stop=nearest):
            if nearest(node):
                scale = np.abs(numpy_helper.to_array(inits[node.input[1]]).astype(np.float64))
                if scale.size:
                    largest = max(largest or 0.0, float(scale.max()))
        if largest:
            steps[output.name] = largest
    return steps


def onnx_external() -> int:
    from onnx import TensorProto

    return TensorProto.EXTERNAL


def quantized_units(model: ModelLike | _Model) -> dict[str, int]:
    """onnxruntime's quantized node units, by op type, in the model it builds at ORT_ENABLE_EXTENDED."""
    import onnxruntime as ort

    m = model if isinstance(model, _Model) else _Model(model)
    with tempfile.TemporaryDirectory(prefix="qdqfold-verify-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        _session(m.source(), ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, path, external_folder=m.folder)
        return _units_in(path)


def _units_in(path: str) -> dict[str, int]:
    """The quantized node units, by op type, in the (optimized) model file ``path``."""
    import mmap

    from ..graphinfo import read_model_info

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            counts = read_model_info(view).op_counts()
        finally:
            view.release()
    return dict(sorted((op.rsplit(".", 1)[-1], n) for op, n in counts.items() if is_quantized_unit(op.rsplit(".", 1)[-1])))
