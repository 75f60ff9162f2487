"""A light look at a serialized model: its nodes (op type, name, inputs, outputs), in every graph.

Reads the protobuf wire format directly and skips tensors without copying them, so counting op types of a
large model costs a walk over its node list, not a parse of its weights (``onnx.load`` would copy every
initializer into Python). The wire format and its field numbers: :mod:`qdqfold.wire`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from . import wire
from .wire import BytesLike, WireFormatError  # noqa: F401 - WireFormatError: named here too


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
    for number, wire_type, value in wire.fields(buf):
        if wire_type != wire.LENGTH:
            continue
        if number == wire.MODEL_GRAPH:
            _read_graph(buf, value, "main", info)
            info.input_dim_params = _input_dim_params(buf, value)
        elif number == wire.MODEL_FUNCTIONS:
            functions.append(value)
    for span in functions:
        name = domain = ""
        node_spans = []
        for number, wire_type, value in wire.fields(buf, *span):
            if wire_type != wire.LENGTH:
                continue
            if number == wire.FUNCTION_NAME:
                name = wire.text(buf, value)
            elif number == wire.FUNCTION_DOMAIN:
                domain = wire.text(buf, value)
            elif number == wire.FUNCTION_NODE:
                node_spans.append(value)
        for node_span in node_spans:
            for sub_span, sub_path in _read_node(buf, node_span, f"function:{domain}.{name}", info):
                _read_graph(buf, sub_span, sub_path, info)
    return info


def _input_dim_params(buf: memoryview, span: tuple[int, int]) -> set[str]:
    """The dim_params of the tensor inputs of the graph at ``span`` that are not also initializers."""
    inputs: dict[str, set[str]] = {}
    initializers = set()
    for number, wire_type, value in wire.fields(buf, *span):
        if wire_type != wire.LENGTH:
            continue
        if number == wire.GRAPH_INITIALIZER:
            initializers.update(wire.text(buf, v) for n, t, v in wire.fields(buf, *value)
                                if n == wire.TENSOR_NAME and t == wire.LENGTH)
        elif number == wire.GRAPH_INPUT:
            name, params = "", set()
            for n, t, v in wire.fields(buf, *value):
                if t != wire.LENGTH:
                    continue
                if n == wire.VALUE_INFO_NAME:
                    name = wire.text(buf, v)
                elif n == wire.VALUE_INFO_TYPE:
                    for shape in wire.nested(buf, v, wire.TYPE_TENSOR, wire.TENSOR_TYPE_SHAPE):
                        for dim in wire.nested(buf, shape, wire.SHAPE_DIM):
                            params.update(wire.text(buf, p) for k, pt, p in wire.fields(buf, *dim)
                                          if k == wire.DIM_PARAM and pt == wire.LENGTH)
            inputs[name] = params
    return set().union(*(params for name, params in inputs.items() if name not in initializers))


def _node_spans(buf: memoryview, span: tuple[int, int], info: ModelInfo) -> list[tuple[int, int]]:
    """The node payloads of the graph at ``span``; the external-data locations of its initializers go to
    ``info`` (only the small external_data entries are read, never a tensor's data)."""
    nodes = []
    for number, wire_type, value in wire.fields(buf, *span):
        if wire_type != wire.LENGTH:
            continue
        if number == wire.GRAPH_NODE:
            nodes.append(value)
        elif number == wire.GRAPH_INITIALIZER:
            for tensor_field, tensor_type, entry in wire.fields(buf, *value):
                if tensor_field == wire.TENSOR_EXTERNAL_DATA and tensor_type == wire.LENGTH:
                    pairs = {k: wire.text(buf, v) for k, t, v in wire.fields(buf, *entry) if t == wire.LENGTH}
                    if pairs.get(wire.ENTRY_KEY) == "location" and wire.ENTRY_VALUE in pairs:
                        info.external_locations.add(pairs[wire.ENTRY_VALUE])
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
    for number, wire_type, value in wire.fields(buf, *span):
        if wire_type != wire.LENGTH:
            continue
        if number == wire.NODE_OP_TYPE:
            op_type = wire.text(buf, value)
        elif number == wire.NODE_DOMAIN:
            domain = wire.text(buf, value)
        elif number == wire.NODE_NAME:
            name = wire.text(buf, value)
        elif number == wire.NODE_INPUT:
            inputs.append(wire.text(buf, value))
        elif number == wire.NODE_OUTPUT:
            outputs.append(wire.text(buf, value))
        elif number == wire.NODE_ATTRIBUTE:
            attributes.append(value)
    info.nodes.append(NodeInfo(op_type=op_type, domain=domain, name=name, inputs=tuple(inputs), outputs=tuple(outputs),
                               graph=graph))
    subgraphs = []
    for attribute in attributes:  # subgraphs (If/Loop/Scan bodies) after their node
        attribute_name = ""
        graphs = []
        for number, wire_type, value in wire.fields(buf, *attribute):
            if wire_type != wire.LENGTH:
                continue
            if number == wire.ATTRIBUTE_NAME:
                attribute_name = wire.text(buf, value)
            elif number in (wire.ATTRIBUTE_G, wire.ATTRIBUTE_GRAPHS):
                graphs.append(value)
        subgraphs += [(g, f"{graph}/{name}:{attribute_name}") for g in graphs]
    return subgraphs
