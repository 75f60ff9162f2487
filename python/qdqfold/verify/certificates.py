"""The certificates: each folded layer run alone on the original's activations, against a float-rounding bound."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from .folds import _array, _folded_entries
from .result import FoldCertificate

if TYPE_CHECKING:
    import numpy as np
    import onnx


_UNIT_ROUNDOFF = {1: 2.0**-23, 10: 2.0**-10, 16: 2.0**-7, 11: 2.0**-52}  # by TensorProto element type
_LAYERS = tuple(k["op"] for k in __import__("qdqfold_native").layer_kinds())  # the core's table (layer_kinds.h)


@dataclass
class _CertPlan:
    node: str
    into: list[str]
    x: str  # the activation fed from the original
    y: str  # the value compared
    abs_out: str | None  # |W'| * |x| for the bound
    terms: int  # products accumulated per output element
    bias: float
    exact: bool
    unit: float
    shift: Any = None  # per channel: |a * mean| + |beta|, the magnitudes the BN's own shift is rounded at
    forward_shift: Any = None  # forward folds: (|a * mean| + |beta|) / |a| per channel of x
    #: The folded model's value compared with the original's ``y``: ``y`` itself, or where a deployment target
    #: put an output quantizer after the layer (layer -> Q -> DQ -> y), the layer's own output before it.
    y_folded: str = ""

    @property
    def compared(self) -> str:
        return self.y_folded or self.y


def _producer_closure(graph, targets: Sequence[str], stops: set[str]) -> list | None:
    """The nodes of ``graph`` that compute ``targets`` from ``stops``, constants and graph inputs, in order."""
    producers = {o: (i, n) for i, n in enumerate(graph.node) for o in n.output}
    keep: set[int] = set()
    stack = list(targets)
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or name in stops or name == "":
            continue
        seen.add(name)
        if name not in producers:
            continue
        index, node = producers[name]
        if index in keep:
            continue
        keep.add(index)
        stack.extend(node.input)
        for attribute in node.attribute:
            if attribute.type == attribute.GRAPH or attribute.type == attribute.GRAPHS:
                return None  # a subgraph reading outer values: not isolated here
    return [graph.node[i] for i in sorted(keep)]


def _plan_certificates(original: onnx.ModelProto, folded: onnx.ModelProto, report: Any, folder: str | None = None):
    """Which value to feed and which to compare for every folded BN of the main graph."""
    import numpy as np

    o_nodes = _nodes_by_report_name(original.graph.node)
    f_nodes = _nodes_by_report_name(folded.graph.node)
    f_producer = {o: n for n in folded.graph.node for o in n.output}
    f_produced = set(f_producer) | {i.name for i in folded.graph.input}
    f_inits = {t.name: t for t in folded.graph.initializer}
    o_inits = {t.name: t for t in original.graph.initializer}
    plans, skipped, chained = [], [], []
    forward_bns = {e["node"] for e in _folded_entries(report) if e["direction"] == "forward"}
    merged = {}  # layer -> last plan (a chain Conv -> BN -> BN: the later BN's output is what the layer makes)
    for entry in _folded_entries(report):
        bn = o_nodes.get(entry["node"])
        originals = [o_nodes.get(name) for name in entry["into"]]
        layers = [_folded_layer(f_nodes, folded, name, o, bn, entry["direction"])
                  for name, o in zip(entry["into"], originals)]
        if bn is None or any(n is None for n in layers) or any(n is None for n in originals):
            skipped.append(entry["node"])
            continue
        backward = entry["direction"] == "backward"
        if backward and sum(n.op_type in _LAYERS for n in layers) > 1:  # concat-bn: parallel layers, no one input
            skipped.append(entry["node"])
            continue
        layer = next((n for n in layers if n.op_type in _LAYERS), None)
        if backward:
            x, ys = _before_forward_folds(originals[0].input[0], original, forward_bns), [bn.output[0]]
        else:
            x, ys = bn.input[0], [n.output[0] for n in originals]
            # A later BN of a chain BN -> (shape ops) -> BN -> layer, all folded forwards into the layer: the
            # original's value at its input already holds the earlier BN, which the folded layer applies too,
            # so the chain's first BN's certificate covers it.
            feeder = next((n for n in original.graph.node if x in n.output), None)
            while feeder is not None and feeder.op_type in _SHAPE_OPS and feeder.input:
                feeder = next((n for n in original.graph.node if feeder.input[0] in n.output), None)
            if feeder is not None and feeder.op_type == "BatchNormalization" and feeder.name in forward_bns:
                continue
        dtype = o_inits[bn.input[1]].data_type if bn.input[1] in o_inits else 1
        for y in ys:
            # The target's integer activations (cpp/targets/onnxruntime_integer_activations.cpp) remove the
            # DequantizeLinear that carried y after the output quantizer: the layer's own output remains.
            renamed = _renamed_by_target(f_produced, layer, y)
            if y not in f_produced and not renamed:
                # A chain (Conv -> BN -> BN): a later BN's fold into the same layer covers this one.
                chained.append((entry["node"], layer.output[0] if layer is not None else None))
                continue
            terms = 1
            if layer is not None and len(layer.input) > 1:
                w = f_inits.get(layer.input[1])
                dims = list(w.dims) if w is not None else None
                if dims is None:  # through a DequantizeLinear: its integer (or QAT float) input
                    for n in folded.graph.node:
                        if layer.input[1] in n.output and n.input and n.input[0] in f_inits:
                            dims = list(f_inits[n.input[0]].dims)
                        elif layer.input[1] in n.output and n.input:
                            for m in folded.graph.node:  # QAT: W -> Q -> DQ
                                if n.input[0] in m.output and m.input and m.input[0] in f_inits:
                                    dims = list(f_inits[m.input[0]].dims)
                if dims:
                    if layer.op_type in ("Conv", "ConvTranspose"):
                        terms = int(np.prod(dims[1:])) if layer.op_type == "Conv" else int(np.prod(dims)) // max(dims[1], 1)
                    elif layer.op_type == "Gemm":
                        trans_b = next((a.i for a in layer.attribute if a.name == "transB"), 0)
                        terms = dims[1] if trans_b else dims[0]
                    else:
                        terms = dims[0]
            plan = _CertPlan(node=entry["node"], into=list(entry["into"]), x=x, y=y, abs_out=None,
                             terms=max(terms, 1), bias=float(entry["metrics"].get("bias_error_at_output", 0.0)),
                             exact=entry["exact"] is not False, unit=_UNIT_ROUNDOFF.get(dtype, 2.0**-23))
            plan.abs_out = f"qdqfold_cert_abs::{y}" if layer is not None else None
            plan.y_folded = renamed or _before_output_quantizer(f_producer, y)
            plan.layer = layer  # type: ignore[attr-defined]
            scale_shift = _bn_magnitudes(bn, o_inits, folder)
            if scale_shift is not None and backward:
                plan.shift = scale_shift[1]
            elif scale_shift is not None and np.all(scale_shift[0] > 0):
                plan.forward_shift = scale_shift[1] / scale_shift[0]
                # A chain BN -> BN -> layer folded forwards: the original rounds at every BN of it; in x's
                # units each later BN's shift counts divided by the factors before it.
                factor, value = scale_shift[0], bn.output[0]
                while True:
                    readers = [n for n in original.graph.node if value in n.input]
                    while len(readers) == 1 and readers[0].op_type in _SHAPE_OPS:
                        readers = [n for n in original.graph.node if readers[0].output[0] in n.input]
                    if len(readers) != 1 or readers[0].op_type != "BatchNormalization" or \
                            readers[0].name not in forward_bns:
                        break
                    later = _bn_magnitudes(readers[0], o_inits, folder)
                    if later is None or len(later[0]) != len(factor) or not np.all(later[0] > 0):
                        break
                    plan.forward_shift = plan.forward_shift + later[1] / (factor * later[0])
                    factor, value = factor * later[0], readers[0].output[0]
                    plan.terms += 1  # one more rounding per element on the way
                scale_shift = None
            if backward and layer is not None:
                previous = merged.get(layer.output[0])
                if previous is not None and previous in plans:
                    plans.remove(previous)  # its output no longer exists; this one covers the layer
                    if previous.shift is not None and scale_shift is not None and len(previous.shift) == len(plan.shift):
                        plan.shift = plan.shift + scale_shift[0] * previous.shift
                merged[layer.output[0]] = plan
            plans.append(plan)
    skipped += [node for node, layer in chained if layer is None or layer not in merged]
    return plans, skipped


def _renamed_by_target(produced, layer, y: str) -> str:
    """The layer's output when a deployment target renamed it ``y + "_unquantized"`` (an output quantizer after
    it) and ``y`` itself is gone; else ""."""
    if layer is None or not layer.output or y in produced:
        return ""
    out = layer.output[0]
    return out if out in produced and out.startswith(y + "_unquantized") else ""


def _before_output_quantizer(producer: Mapping[str, Any], y: str) -> str:
    """The layer's own output when a deployment target (``target="onnxruntime"``) put an output quantizer after
    it, keeping the BN's output name on the DequantizeLinear: ``layer -> u -> Q -> DQ -> y`` gives ``u``, the value
    the fold made (the quantizer's rounding is the target's, judged end to end); else "" (``y`` itself). A fold
    alone never makes a DequantizeLinear produce a folded BN's output."""
    dq = producer.get(y)
    if dq is None or dq.op_type != "DequantizeLinear" or not dq.input:
        return ""
    q = producer.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear" or not q.input:
        return ""
    layer = producer.get(q.input[0])
    return q.input[0] if layer is not None and layer.op_type in _LAYERS else ""


def _nodes_by_report_name(nodes) -> dict[str, Any]:
    """Nodes by the name the core's report gives them: their own, or ``<op type>#<position>`` when unnamed
    (graph::Node::display_name), so that certificates do not depend on an exporter naming its nodes."""
    named: dict[str, Any] = {}
    for position, n in enumerate(nodes):
        named.setdefault(n.name or f"{n.op_type}#{position}", n)
    return named


def _folded_layer(f_nodes: Mapping[str, Any], folded, name: str, original_layer, bn, direction: str):
    """The folded model's node for the layer the report calls ``name``. A named layer keeps its name; an
    unnamed one (reported by its position in the original) is found by what it reads and makes: backwards,
    the node that now produces the BN's output from the layer's input; forwards, the node of that op type
    that makes the layer's output. None when that is not one node."""
    if original_layer is None or bn is None:
        return None
    if original_layer.name:
        return f_nodes.get(name)
    want = bn.output[0] if direction == "backward" else original_layer.output[0]
    same = [n for n in folded.graph.node if n.op_type == original_layer.op_type and not n.name and n.output]
    found = [n for n in same if n.output[0] == want]
    if not found and original_layer.input:  # a chain of BNs folded into it: it makes the last one's output
        found = [n for n in same if n.input and n.input[0] == original_layer.input[0]]
    return found[0] if len(found) == 1 else None


def _before_forward_folds(x: str, original, forward_bns: set[str]) -> str:
    """The value to feed for activation ``x`` of the original so that it means the same in the folded model: BNs
    folded forwards upstream of ``x`` (through shape-only ops) are gone there, so the first one's input is fed."""
    producers = {o: n for n in original.graph.node for o in n.output}
    value = result = x
    for _ in range(32):  # a chain of them (BN -> Flatten -> BN -> layer): the first one's input
        node = producers.get(value)
        if node is None:
            break
        if node.op_type == "BatchNormalization":
            if node.name not in forward_bns:
                break
            value = result = node.input[0]
            continue
        if node.op_type not in _SHAPE_OPS or not node.input:
            break
        value = node.input[0]
    return result


def _bn_magnitudes(bn, inits, folder: str | None) -> tuple | None:
    """(|a|, |a * mean| + |beta|) per channel of a BN with constant parameters (initializers)."""
    import numpy as np

    try:
        g, beta, mean, var = (_array(inits[n], folder).astype(np.float64).ravel() for n in bn.input[1:5])
    except (KeyError, ValueError):
        return None
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    a = np.abs(g / np.sqrt(var + eps))
    return a, a * np.abs(mean) + np.abs(beta)


_SHAPE_OPS = ("Flatten", "Reshape", "Identity", "Transpose", "Squeeze", "Unsqueeze")


def _forward_magnitude(graph, plan: _CertPlan, layer_input: str, out: str, x_info: Mapping[str, tuple]) -> list | None:
    """For a BN folded forwards: the magnitudes the original's layer input was rounded at, |x| + (|a mean| +
    |beta|) / |a| per channel of x (so that |W'| times it is |W| times |a x| + |a mean| + |beta|), carried to
    the layer's input through the same shape-only ops. None when there is no such path."""
    import numpy as np
    from onnx import helper, numpy_helper

    if plan.forward_shift is None or plan.x not in x_info:
        return None
    elem, rank = x_info[plan.x]
    producers = {o: n for n in graph.node for o in n.output}
    path, value = [], layer_input
    while value != plan.x:
        node = producers.get(value)
        if node is None or node.op_type not in _SHAPE_OPS or len(path) > 8:
            return None
        path.append(node)
        value = node.input[0]
    tag = f"{out}::m"
    const = numpy_helper.from_array(np.asarray(plan.forward_shift, helper.tensor_dtype_to_np_dtype(elem)), tag + "_c")
    nodes = [helper.make_node("Constant", [], [tag + "_c0"], value=const),
             helper.make_node("Abs", [plan.x], [tag + "_abs"])]
    shape = numpy_helper.from_array(np.asarray([1, -1] + [1] * (rank - 2), np.int64), tag + "_s")
    nodes += [helper.make_node("Constant", [], [tag + "_s0"], value=shape),
              helper.make_node("Reshape", [tag + "_c0", tag + "_s0"], [tag + "_cr"]),
              helper.make_node("Add", [tag + "_abs", tag + "_cr"], [tag + "_0"])]
    current = tag + "_0"
    for k, node in enumerate(reversed(path)):
        clone = helper.make_node(node.op_type, [current] + list(node.input[1:]), [f"{tag}_{k + 1}"])
        clone.attribute.extend(node.attribute)
        nodes.append(clone)
        current = clone.output[0]
    nodes[-1].output[0] = out
    return nodes


def _certificate_model(folded: onnx.ModelProto, plans: list[_CertPlan], x_types: Mapping[str, tuple]) -> onnx.ModelProto | None:
    """The folded layers alone: each plan's x is a graph input, its y (and |W'| * |x|) an output."""
    import onnx
    from onnx import helper

    graph = folded.graph
    stops = {p.x for p in plans}
    extra: list[onnx.NodeProto] = []
    for p in plans:
        layer = getattr(p, "layer", None)
        if layer is None or p.abs_out is None:
            continue
        ax, aw = f"{p.abs_out}::x", f"{p.abs_out}::w"
        attrs = {a.name: helper.get_attribute_value(a) for a in layer.attribute if a.name not in ("beta",)}
        if "alpha" in attrs:
            attrs["alpha"] = abs(attrs["alpha"])
        extra += _forward_magnitude(graph, p, layer.input[0], ax, x_types) or [helper.make_node("Abs", [layer.input[0]], [ax])]
        extra += [helper.make_node("Abs", [layer.input[1]], [aw]),
                  helper.make_node(layer.op_type, [ax, aw], [p.abs_out], **attrs)]
    targets = [p.compared for p in plans] + [p.abs_out for p in plans if p.abs_out]
    base = onnx.GraphProto()
    base.node.extend(list(graph.node) + extra)
    nodes = _producer_closure(base, targets, stops)
    if nodes is None:
        return None
    needed = {i for n in nodes for i in n.input} | set(targets)
    cert = onnx.ModelProto()  # not a copy of the folded model: only the folded layers' tensors
    cert.ir_version = folded.ir_version
    cert.opset_import.extend(folded.opset_import)
    cert.functions.extend(folded.functions)
    g = cert.graph
    g.name = "qdqfold_certificate"
    g.node.extend(nodes)
    g.initializer.extend(t for t in graph.initializer if t.name in needed)
    g.input.extend(i for i in graph.input if i.name in needed and i.name not in stops)
    for x in sorted(stops):
        if x in needed:
            g.input.append(helper.make_tensor_value_info(x, x_types.get(x, (onnx.TensorProto.FLOAT, 0))[0], None))
    del g.output[:]
    for t in dict.fromkeys(targets):
        g.output.append(helper.make_empty_tensor_value_info(t))
    return cert


def _exposed_bytes(original: onnx.ModelProto, names: Iterable[str]) -> bytes:
    """``original`` serialised with the given values also as graph outputs (after its own outputs), without a
    second copy of its weights in memory."""
    from onnx import helper

    outputs = original.graph.output
    count = len(outputs)
    have = {o.name for o in outputs} | {i.name for i in original.graph.input}
    try:
        for name in dict.fromkeys(names):
            if name not in have:
                outputs.append(helper.make_empty_tensor_value_info(name))
        return original.SerializeToString()
    finally:
        del outputs[count:]


def _certify(plan: _CertPlan, expected: np.ndarray, actual: np.ndarray, magnitude: np.ndarray | None) -> FoldCertificate:
    import numpy as np

    e = np.asarray(expected, np.float64)
    a = np.asarray(actual, np.float64)
    if e.shape != a.shape:
        return _certificate(plan, max_abs=math.inf, ratio=math.inf, channel=None, passed=False)
    diff = np.abs(a - e)
    diff[np.isnan(a) & np.isnan(e)] = 0.0
    diff[np.isnan(diff)] = np.inf
    k = 2.0 * math.sqrt(plan.terms) + 8.0
    mag = np.zeros_like(e)
    if magnitude is not None and np.size(magnitude) == e.size:
        # The layer's |W'| |x| in the layer's shape; a Reshape or Flatten between the layer and the BN (LeViT's
        # MatMul -> Reshape -> BN) is a row-major view, element for element the BN's value.
        mag = np.abs(np.asarray(magnitude, np.float64)).reshape(e.shape)
    shift = 0.0
    if plan.shift is not None and e.ndim >= 2 and e.shape[1] == len(plan.shift):
        shift = np.asarray(plan.shift).reshape([1, -1] + [1] * (e.ndim - 2))
    bound = plan.unit * (k * mag + 8.0 * (np.abs(e) + np.abs(np.nan_to_num(a)) + shift)) + plan.bias * 1.0001 + 1e-30
    ratio = diff / bound
    if ratio.size == 0:
        return _certificate(plan, max_abs=0.0, ratio=0.0, channel=None, passed=True)
    worst = int(np.argmax(ratio))
    channel = int(np.unravel_index(worst, ratio.shape)[1]) if ratio.ndim >= 2 else None
    r = float(ratio.flat[worst])
    return _certificate(plan, max_abs=float(diff.max()), ratio=r, channel=channel, passed=r <= 1.0 or not plan.exact)


def _certificate(plan: _CertPlan, *, max_abs: float, ratio: float, channel: int | None,
                 passed: bool) -> FoldCertificate:
    """The certificate of ``plan``'s fold with these figures."""
    return FoldCertificate(node=plan.node, into=plan.into, compared=plan.y, max_abs=max_abs, ratio=ratio,
                           channel=channel, bound_bias=plan.bias, exact_fold=plan.exact, passed=passed)
