"""onnxruntime's integer kernels after a fold: which layers become one, whether their 16-bit pair sums can
saturate on x86-64 CPUs without VNNI, and what they do on this CPU.

- The static check is the native core's (``qdqfold_native.integer_kernels``; the rules, the arithmetic and why
  it is a bound are in ``cpp/analysis/integer_kernels.h``): :func:`check_bytes`, :func:`check_file`,
  :func:`integer_layers` give its layers as :class:`KernelLayer`.
- :func:`measure` runs each integer layer alone on this CPU, its kernel against the same kernel with
  ``session.x64quantprecision=1`` (16-bit products, never saturating): what verify reports per layer and what
  ``bench/saturation.py`` compares the static check with.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

#: The session option that makes onnxruntime's x86-64 integer kernels promote to 16 bits (never saturating).
PRECISION_OPTION = "session.x64quantprecision"

_INT8, _UINT8 = 3, 2  # TensorProto.INT8, UINT8


@dataclass
class KernelLayer:
    """One layer onnxruntime will run as an integer kernel, and the static saturation bound of its pair sums."""

    node: str  # the layer node's name (or "<op>#<index>" when unnamed)
    op: str  # Conv / MatMul / Gemm
    kernel: str  # QLinearConv / QLinearMatMul / MatMulIntegerToFloat / QGemm
    activation: str  # "uint8" or "int8" (run as uint8 on x86-64)
    weight: str  # "int8" or "uint8"
    activation_range: list[int]  # the activation bytes the kernel can see, after the x86-64 shift to uint8
    pair_max: int  # the largest / smallest pair sum over every output channel and both pairings
    pair_min: int
    can_saturate: bool  # some pair sum leaves int16's range (x86-64 without VNNI)
    channels: int  # output channels with such a pair
    why_not: str | None = None  # when it cannot: the kernel that runs instead (depthwise, uint8 weights)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Index:
    def __init__(self, graph: onnx.GraphProto, folder: str | None):
        self.graph, self.folder = graph, folder
        self.producer = {o: n for n in graph.node for o in n.output}
        self.readers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        self.outputs = {o.name for o in graph.output}
        self._arrays: dict[str, Any] = {}

    def constant(self, name: str):
        """The value of an initializer or Constant node (through Identity), else None."""
        import numpy as np
        from onnx import numpy_helper

        if name in self._arrays:
            return self._arrays[name]
        value = None
        node = self.producer.get(name)
        if name in self.inits and name not in self.inputs:
            value = numpy_helper.to_array(self.inits[name], base_dir=self.folder or "")
        elif node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    value = numpy_helper.to_array(a.t, base_dir=self.folder or "")
                elif a.name in ("value_float", "value_int"):
                    value = np.array(a.f if a.name == "value_float" else a.i)
        elif node is not None and node.op_type == "Identity":
            value = self.constant(node.input[0])
        self._arrays[name] = value
        return value

    def produced_by(self, name: str, op: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op and node.domain in ("", "ai.onnx") else None


def _zero_point_type(index: _Index, node) -> int | None:
    """The integer type of a Q/DQ node's quantized side: its zero point's type, uint8 when it has none."""
    if len(node.input) < 3 or not node.input[2]:
        return _UINT8
    zp = node.input[2]
    if zp in index.inits:
        return index.inits[zp].data_type
    value = index.constant(zp)
    if value is None:
        return None
    return {"int8": _INT8, "uint8": _UINT8}.get(str(value.dtype))


def _layer_name(node, position: int) -> str:
    return node.name or f"{node.op_type}#{position}"


def _layers(found: list[dict[str, Any]]) -> list[KernelLayer]:
    return [KernelLayer(**{**d, "activation_range": list(d["activation_range"])}) for d in found]


def check_bytes(data: Any, folder: str | os.PathLike | None = None) -> list[KernelLayer]:
    """The integer layers of a serialized model (any bytes-like object, read in place), by the native core
    (``qdqfold_native.integer_kernels``). ``folder``: where its external data lives."""
    import qdqfold_native

    return _layers(qdqfold_native.integer_kernels(data, base_directory=os.fspath(folder) if folder else None))


def check_file(path: str | os.PathLike) -> list[KernelLayer]:
    """:func:`check_bytes` of the model file ``path`` (mapped, not read; external data beside it)."""
    import mmap

    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return check_bytes(view, os.path.dirname(os.path.abspath(path)))
            finally:
                view.release()


def integer_layers(model: onnx.ModelProto, folder: str | os.PathLike | None = None) -> list[KernelLayer]:
    """:func:`check_bytes` of a ModelProto."""
    return check_bytes(model.SerializeToString(), folder)


def summary(layers: list[KernelLayer]) -> dict[str, Any]:
    """The JSON section ``integer_kernels``: the layers and how many can saturate."""
    by_kernel: dict[str, int] = {}
    for layer in layers:
        by_kernel[layer.kernel] = by_kernel.get(layer.kernel, 0) + 1
    return {"expected": dict(sorted(by_kernel.items())), "can_saturate": sum(lay.can_saturate for lay in layers),
            "cpus": "x86-64 without VNNI (AVX2, or AVX-512 without VNNI)", "remedy": f"{PRECISION_OPTION}=1",
            "layers": [lay.to_dict() for lay in layers]}


# ------------------------------------------------------------------------- measured, on this machine's CPU

def _closure(index: _Index, names: list[str]) -> list | None:
    """The nodes that compute ``names`` from constants alone, in graph order; None when one needs an input."""
    needed: dict[int, Any] = {}
    stack = list(names)
    while stack:
        name = stack.pop()
        if not name or name in index.inits:
            if name in index.inputs:
                return None
            continue
        node = index.producer.get(name)
        if node is None:
            return None  # a graph input
        if id(node) in needed:
            continue
        needed[id(node)] = node
        stack.extend(node.input)
    order = {id(n): k for k, n in enumerate(index.graph.node)}
    return sorted(needed.values(), key=lambda n: order[id(n)])


def _isolated(model: onnx.ModelProto, index: _Index, layers: list[KernelLayer]) -> tuple[Any, dict, dict]:
    """One model holding each integer layer alone: its integer input activation as a graph input, then its
    activation DequantizeLinear, the layer with its constant weight and bias paths, and its first output
    QuantizeLinear, dequantized again as an output. Returns the model, per layer input the original value it
    takes (the activation as its DequantizeLinear gives it), and per output its quantization step."""
    from onnx import helper

    by_name = {_layer_name(n, k): n for k, n in enumerate(model.graph.node)}
    nodes, inputs, outputs, used_inits, feeds_from, steps = [], [], [], set(), {}, {}
    for k, layer in enumerate(layers):
        node = by_name[layer.node]
        dq_x = index.producer.get(node.input[0])
        if dq_x is None or dq_x.op_type != "DequantizeLinear":
            continue  # its DequantizeLinear is behind a MaxPool / Reshape onnxruntime crosses: not isolated here
        readers = index.readers.get(node.output[0], [])
        q_out = readers[0] if readers else None
        between = None
        if q_out is not None and q_out.op_type in ("Relu", "Clip"):  # absorbed by onnxruntime (integer_kernels.h)
            between = q_out
            q_out = (index.readers.get(q_out.output[0]) or [None])[0]
        if q_out is None or q_out.op_type != "QuantizeLinear":
            continue  # a float-output kernel (MatMulIntegerToFloat, QGemm): not isolated here
        constants = _closure(index, list(node.input[1:]) + list(dq_x.input[1:]) + list(q_out.input[1:]) +
                             (list(between.input[1:]) if between is not None else []))
        if constants is None:
            continue
        prefix = f"iso{k}_"
        rename = {}
        for n in constants:
            for o in n.output:
                rename[o] = prefix + o
        for n in constants:
            copy = helper.make_node(n.op_type, [rename.get(i, i) for i in n.input], [rename[o] for o in n.output],
                                    domain=n.domain)
            copy.attribute.extend(n.attribute)
            nodes.append(copy)
        used = [i for n in constants for i in n.input] + list(node.input[1:]) + list(dq_x.input[1:]) + \
            list(q_out.input[1:]) + (list(between.input[1:]) if between is not None else [])
        used_inits.update(i for i in used if i in index.inits)
        x_in, x_q, x_dq, y, y_q = prefix + "x", prefix + "x_q", prefix + "x_dq", prefix + "y", layer.node
        # The input is the activation as the model dequantized it; quantized again with the same parameters it
        # gives the same integers, through the same Q -> DQ pair onnxruntime fuses (and shifts to uint8).
        inputs.append(helper.make_tensor_value_info(x_in, 1, None))
        requant = helper.make_node("QuantizeLinear", [x_in] + [rename.get(i, i) for i in dq_x.input[1:]], [x_q])
        requant.attribute.extend(dq_x.attribute)
        dq = helper.make_node("DequantizeLinear", [x_q] + [rename.get(i, i) for i in dq_x.input[1:]], [x_dq])
        dq.attribute.extend(dq_x.attribute)
        nodes.append(requant)
        layer_node = helper.make_node(node.op_type, [x_dq] + [rename.get(i, i) for i in node.input[1:]], [y])
        layer_node.attribute.extend(node.attribute)
        acts = []
        if between is not None:
            act = helper.make_node(between.op_type, [y] + [rename.get(i, i) for i in between.input[1:]],
                                   [prefix + "y_act"])
            act.attribute.extend(between.attribute)
            acts.append(act)
            y = prefix + "y_act"
        q = helper.make_node("QuantizeLinear", [y] + [rename.get(i, i) for i in q_out.input[1:]], [prefix + "y_q"])
        q.attribute.extend(q_out.attribute)
        # Dequantized again: onnxruntime does not fuse a layer whose QuantizeLinear output is a graph output.
        dq_y = helper.make_node("DequantizeLinear", [prefix + "y_q"] + [rename.get(i, i) for i in q_out.input[1:]],
                                [y_q])
        dq_y.attribute.extend(q_out.attribute)
        nodes += [dq, layer_node, *acts, q, dq_y]
        outputs.append(helper.make_empty_tensor_value_info(y_q))
        steps[y_q] = index.constant(q_out.input[1])
        feeds_from[x_in] = dq_x.output[0]
    graph = helper.make_graph(nodes, "integer_layers", inputs, outputs,
                              [t for t in model.graph.initializer if t.name in used_inits])
    iso = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return iso, feeds_from, steps


def measure(model: onnx.ModelProto, folder: str | None, feed_sets: list[dict[str, Any]],
            layers: list[KernelLayer] | None = None) -> list[dict[str, Any]]:
    """Each integer layer alone, on the integer activations the model gives it (optimisations off: the float
    path, exact), run by onnxruntime at its default level as this CPU's integer kernel and again with
    ``session.x64quantprecision=1`` (the same kernel in 16-bit precision, which cannot saturate): per layer, the
    output integers that differ between the two (``moved``, of ``elements``) and by how many steps at most.
    On a CPU with VNNI nothing moves."""
    import numpy as np
    import onnxruntime as ort

    layers = integer_layers(model, folder) if layers is None else layers
    if not layers:
        return []
    index = _Index(model.graph, folder)
    iso, feeds_from, steps = _isolated(model, index, layers)
    if not feeds_from:
        return []
    exposed = [v for v in dict.fromkeys(feeds_from.values()) if v not in index.inputs]

    def session(data: bytes, level, config: dict[str, str]):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.intra_op_num_threads = 1
        options.log_severity_level = 4
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        if folder:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    from onnx import helper

    count = len(model.graph.output)
    try:
        for name in exposed:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
        full = session(model.SerializeToString(), ort.GraphOptimizationLevel.ORT_DISABLE_ALL, {})
    finally:
        del model.graph.output[count:]
    iso_bytes = iso.SerializeToString()
    deployed = session(iso_bytes, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, {})
    promoted = session(iso_bytes, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, {PRECISION_OPTION: "1"})
    wanted = {i.name for i in full.get_inputs()}
    names = [o.name for o in full.get_outputs()]
    out_names = [o.name for o in deployed.get_outputs()]
    figures = {name: {"moved": 0, "elements": 0, "max_steps": 0} for name in out_names}
    for feeds in feed_sets:
        values = dict(zip(names, full.run(None, {k: v for k, v in feeds.items() if k in wanted})))
        values.update({k: v for k, v in feeds.items()})
        iso_feeds = {x: values[src] for x, src in feeds_from.items()}
        for name, a, b in zip(out_names, deployed.run(None, iso_feeds), promoted.run(None, iso_feeds)):
            step = steps[name]
            diff = np.rint(np.abs(a.astype(np.float64) - b.astype(np.float64)) /
                           (float(np.max(step)) if step is not None and np.size(step) == 1 else 1.0))
            f = figures[name]
            f["moved"] += int((diff > 0).sum())
            f["elements"] += int(diff.size)
            f["max_steps"] = max(f["max_steps"], int(diff.max(initial=0)))
    by_layer = {lay.node: lay for lay in layers}
    return [{"node": name, "kernel": by_layer[name].kernel, "can_saturate": by_layer[name].can_saturate, **f}
            for name, f in figures.items()]
