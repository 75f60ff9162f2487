"""Cuts small test fixtures out of real exports (tools/make_real_exports.py): the graph from the model's input to
the output of its N-th BatchNormalization in node order (or of the activation that is that BN's only reader): the
nodes that value depends on, in their order, with the initializers they read. Nodes, initializers, attributes,
opsets and the producer are the exporter's own; nothing is re-created. (By hand rather than with
onnx.utils.Extractor, which needs a value_info for every cut value and TorchScript exports have none.)

    python tools/cut_real_fixtures.py /work/exports/modelopt_int8/mobilenet_v2.onnx 3 tests/models/real/x.onnx

A cut that would not fit in about 200 KB is refused (pick a smaller N or another model).
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
from onnx import helper

ACTIVATIONS = {"Relu", "Clip", "HardSwish", "Relu6", "LeakyRelu", "Sigmoid"}
LIMIT = 210_000


def cut(source: Path, n: int, out: Path, end: str | None = None, start: list[str] | None = None) -> onnx.ModelProto:
    """``end``: cut at this value instead of the N-th BN's; ``start``: values that become the cut's inputs (their
    producers are left out; type and shape from onnx shape inference)."""
    model = onnx.load(str(source))
    bns = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    if end is None:
        bn = bns[n - 1]
        end = bn.output[0]
        readers = [node for node in model.graph.node if end in node.input]
        if len(readers) == 1 and readers[0].op_type in ACTIVATIONS:
            end = readers[0].output[0]
    small = _extract(model, end, start or [])
    data = small.SerializeToString()
    if len(data) > LIMIT:
        raise SystemExit(f"{out}: the cut is {len(data)} bytes, over {LIMIT}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    print(f"{out}: {len(data)} bytes, {len(small.graph.node)} nodes, "
          f"{sum(x.op_type == 'BatchNormalization' for x in small.graph.node)} BN, output {end!r}")
    return small


def _start_inputs(model: onnx.ModelProto, start: list[str], inferred: dict) -> list:
    """The cut's new inputs, with the shapes they have when the source runs (onnxruntime, on a random input
    of the source's own input shape) where shape inference left a dimension symbolic."""
    infos = [inferred[v] for v in start]
    if all(d.HasField("dim_value") for i in infos for d in i.type.tensor_type.shape.dim):
        return infos
    import numpy as np
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(infos)
    (x,) = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    shape = [d.dim_value or 1 for d in x.type.tensor_type.shape.dim]
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(start, {x.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)})
    return [helper.make_tensor_value_info(i.name, i.type.tensor_type.elem_type, list(v.shape))
            for i, v in zip(infos, values)]


def _extract(model: onnx.ModelProto, end: str, start: list[str]) -> onnx.ModelProto:
    graph = model.graph
    try:
        inferred = {i.name: i for i in onnx.shape_inference.infer_shapes(model).graph.value_info}
    except Exception:  # noqa: BLE001
        inferred = {}
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output}
    keep, todo = set(), [end]
    while todo:
        value = todo.pop()
        i = producer.get(value)
        if i is None or i in keep or value in start:
            continue
        keep.add(i)
        todo.extend(graph.node[i].input)
    nodes = [graph.node[i] for i in sorted(keep)]
    read = {name for node in nodes for name in node.input}
    inits = [t for t in graph.initializer if t.name in read]
    # Initializers the exporter also lists as graph inputs (Brevitas, TorchScript keep_initializers_as_inputs) stay so.
    inputs = [i for i in graph.input if i.name in read] + _start_inputs(model, start, inferred)
    elem = inferred[end].type.tensor_type.elem_type if end in inferred else onnx.TensorProto.FLOAT
    out = helper.make_graph(nodes, graph.name, inputs, [helper.make_tensor_value_info(end, elem, None)], inits)
    small = helper.make_model(out, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                              producer_name=model.producer_name, producer_version=model.producer_version)
    return small


if __name__ == "__main__":
    # python tools/cut_real_fixtures.py SOURCE N OUT [END [START ...]]
    cut(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None,
        sys.argv[5:])
