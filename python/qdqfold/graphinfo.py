"""A light look at a serialized model: its nodes (op type, name, inputs, outputs), in every graph.

Reads the protobuf wire format directly and skips tensors without copying them, so counting op types of a
large model costs a walk over its node list, not a parse of its weights (``onnx.load`` would copy every
initializer into Python). Field numbers are those of ``onnx.proto`` (the same as ``cpp/wire/fields.h``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Union

BytesLike = Union[bytes, bytearray, memoryview]

# onnx.proto field numbers used here.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_NAME, _GRAPH_INITIALIZER = 1, 2, 5
_TENSOR_EXTERNAL_DATA, _ENTRY_KEY, _ENTRY_VALUE = 13, 1, 2
_TENSOR_NAME, _GRAPH_INPUT = 8, 11
_VALUE_INFO_NAME, _VALUE_INFO_TYPE, _TYPE_TENSOR, _TENSOR_TYPE_SHAPE, _SHAPE_DIM, _DIM_PARAM = 1, 2, 1, 2, 1, 2
_FUNCTION_NAME, _FUNCTION_NODE, _FUNCTION_DOMAIN = 1, 7, 10
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP_TYPE, _NODE_ATTRIBUTE, _NODE_DOMAIN = 1, 2, 3, 4, 5, 7
_ATTRIBUTE_NAME, _ATTRIBUTE_G, _ATTRIBUTE_GRAPHS = 1, 6, 11

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class WireFormatError(ValueError):
    """The bytes are not a protobuf message of the expected shape."""


def _fields(buf: memoryview, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of each field in buf[start:end]; a length-delimited value is the
    (start, end) pair of its payload, so nothing is copied."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _varint(buf, pos, end)
        elif wire_type == _LENGTH:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise WireFormatError(f"field {number} runs past the end of its message at byte {pos}")
            value, pos = (pos, pos + length), pos + length
        elif wire_type == _FIXED64:
            value, pos = None, pos + 8
        elif wire_type == _FIXED32:
            value, pos = None, pos + 4
        else:
            raise WireFormatError(f"unsupported wire type {wire_type} at byte {pos}")
        if pos > end:
            raise WireFormatError("truncated message")
        yield number, wire_type, value


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireFormatError(f"bad varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _text(buf: memoryview, span: tuple[int, int]) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", "replace")


@dataclass(frozen=True)
class NodeInfo:
    op_type: str
    domain: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    graph: str  # "main", "main/<node>:<attribute>" for subgraphs, "function:<domain>.<name>"


@dataclass
class ModelInfo:
    """Every node of a model, in the order of its graphs (main graph first, then subgraphs and functions)."""

    nodes: list[NodeInfo] = field(default_factory=list)
    #: The external-data locations its initializers name (relative to the model's directory), each once.
    external_locations: set[str] = field(default_factory=set)
    #: The symbolic dimensions (dim_param) of the main graph's inputs that are not initializers: what a
    #: ``--dim NAME=SIZE`` of --verify can name.
    input_dim_params: set[str] = field(default_factory=set)

    def op_counts(self) -> Counter:
        """How many nodes of each op type (custom domains as ``domain.OpType``)."""
        return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in self.nodes)

    def producer(self, tensor: str, graph: str = "main") -> NodeInfo | None:
        return next((n for n in self.nodes if n.graph == graph and tensor in n.outputs), None)

    def readers(self, tensor: str, graph: str = "main") -> list[NodeInfo]:
        return [n for n in self.nodes if n.graph == graph and tensor in n.inputs]

    def find(self, name: str) -> NodeInfo | None:
        return next((n for n in self.nodes if n.name == name), None)


def read_model_info(data: BytesLike) -> ModelInfo:
    """The nodes of the serialized model ``data``. Raises :class:`WireFormatError` for malformed bytes."""
    # Views released on the way out, even on error, so a caller may close the mmap they point into.
    with memoryview(data) as raw, raw.cast("B") as buf:
        return _read_model(buf)


def _read_model(buf: memoryview) -> ModelInfo:
    info = ModelInfo()
    functions = []
    for number, wire_type, value in _fields(buf):
        if wire_type != _LENGTH:
            continue
        if number == _MODEL_GRAPH:
            _read_graph(buf, value, "main", info)
            info.input_dim_params = _input_dim_params(buf, value)
        elif number == _MODEL_FUNCTIONS:
            functions.append(value)
    for span in functions:
        name = domain = ""
        node_spans = []
        for number, wire_type, value in _fields(buf, *span):
            if wire_type != _LENGTH:
                continue
            if number == _FUNCTION_NAME:
                name = _text(buf, value)
            elif number == _FUNCTION_DOMAIN:
                domain = _text(buf, value)
            elif number == _FUNCTION_NODE:
                node_spans.append(value)
        for node_span in node_spans:
            for sub_span, sub_path in _read_node(buf, node_span, f"function:{domain}.{name}", info):
                _read_graph(buf, sub_span, sub_path, info)
    return info


def _input_dim_params(buf: memoryview, span: tuple[int, int]) -> set[str]:
    """The dim_params of the tensor inputs of the graph at ``span`` that are not also initializers."""
    inputs: dict[str, set[str]] = {}
    initializers = set()
    for number, wire_type, value in _fields(buf, *span):
        if wire_type != _LENGTH:
            continue
        if number == _GRAPH_INITIALIZER:
            initializers.update(_text(buf, v) for n, t, v in _fields(buf, *value) if n == _TENSOR_NAME and t == _LENGTH)
        elif number == _GRAPH_INPUT:
            name, params = "", set()
            for n, t, v in _fields(buf, *value):
                if t != _LENGTH:
                    continue
                if n == _VALUE_INFO_NAME:
                    name = _text(buf, v)
                elif n == _VALUE_INFO_TYPE:
                    for shape in _nested(buf, v, _TYPE_TENSOR, _TENSOR_TYPE_SHAPE):
                        for dim in _nested(buf, shape, _SHAPE_DIM):
                            params.update(_text(buf, p) for k, pt, p in _fields(buf, *dim)
                                          if k == _DIM_PARAM and pt == _LENGTH)
            inputs[name] = params
    return set().union(*(params for name, params in inputs.items() if name not in initializers))


def _nested(buf: memoryview, span: tuple[int, int], *numbers: int) -> Iterator[tuple[int, int]]:
    """The spans of the length-delimited fields reached from ``span`` by the field numbers in turn."""
    spans = [span]
    for number in numbers:
        spans = [v for s in spans for n, t, v in _fields(buf, *s) if n == number and t == _LENGTH]
    return iter(spans)


def _node_spans(buf: memoryview, span: tuple[int, int], info: ModelInfo) -> list[tuple[int, int]]:
    """The node payloads of the graph at ``span``; the external-data locations of its initializers go to
    ``info`` (only the small external_data entries are read, never a tensor's data)."""
    nodes = []
    for number, wire_type, value in _fields(buf, *span):
        if wire_type != _LENGTH:
            continue
        if number == _GRAPH_NODE:
            nodes.append(value)
        elif number == _GRAPH_INITIALIZER:
            for tensor_field, tensor_type, entry in _fields(buf, *value):
                if tensor_field == _TENSOR_EXTERNAL_DATA and tensor_type == _LENGTH:
                    pairs = {k: _text(buf, v) for k, t, v in _fields(buf, *entry) if t == _LENGTH}
                    if pairs.get(_ENTRY_KEY) == "location" and _ENTRY_VALUE in pairs:
                        info.external_locations.add(pairs[_ENTRY_VALUE])
    return nodes


def _read_graph(buf: memoryview, span: tuple[int, int], path: str, info: ModelInfo) -> None:
    """The nodes of a graph in order, each node's subgraphs right after it (as the native report lists them).
    Iterative, with an explicit stack: a model may nest If branches deeper than Python's recursion limit."""
    stack: list[tuple[Iterator[tuple[int, int]], str]] = [(iter(_node_spans(buf, span, info)), path)]
    while stack:
        nodes, graph = stack[-1]
        node = next(nodes, None)
        if node is None:
            stack.pop()
            continue
        subgraphs = _read_node(buf, node, graph, info)
        for sub_span, sub_path in reversed(subgraphs):
            stack.append((iter(_node_spans(buf, sub_span, info)), sub_path))


def _read_node(buf: memoryview, span: tuple[int, int], graph: str, info: ModelInfo) -> list[tuple[tuple[int, int], str]]:
    """Appends the node at ``span`` to ``info``; returns its subgraphs (span, path), not yet read."""
    op_type = domain = name = ""
    inputs: list[str] = []
    outputs: list[str] = []
    attributes = []
    for number, wire_type, value in _fields(buf, *span):
        if wire_type != _LENGTH:
            continue
        if number == _NODE_OP_TYPE:
            op_type = _text(buf, value)
        elif number == _NODE_DOMAIN:
            domain = _text(buf, value)
        elif number == _NODE_NAME:
            name = _text(buf, value)
        elif number == _NODE_INPUT:
            inputs.append(_text(buf, value))
        elif number == _NODE_OUTPUT:
            outputs.append(_text(buf, value))
        elif number == _NODE_ATTRIBUTE:
            attributes.append(value)
    info.nodes.append(NodeInfo(op_type=op_type, domain=domain, name=name, inputs=tuple(inputs), outputs=tuple(outputs),
                               graph=graph))
    subgraphs = []
    for attribute in attributes:  # subgraphs (If/Loop/Scan bodies) after their node
        attribute_name = ""
        graphs = []
        for number, wire_type, value in _fields(buf, *attribute):
            if wire_type != _LENGTH:
                continue
            if number == _ATTRIBUTE_NAME:
                attribute_name = _text(buf, value)
            elif number in (_ATTRIBUTE_G, _ATTRIBUTE_GRAPHS):
                graphs.append(value)
        subgraphs += [(g, f"{graph}/{name}:{attribute_name}") for g in graphs]
    return subgraphs
