"""The deployment target in verify (``--target onnxruntime --verify``, issue 22 item 5).

A model folded with a target is the fold plus the target's rewrites (output quantizers, integer weights, uint8
activations, QLinearAdd / QLinearConcat inputs). Verify judges them as it judges a fold, and adds a ``target``
section to its result:

- **Kernels, measured.** The integer kernels onnxruntime's CPU provider forms at its default level
  (ORT_ENABLE_ALL), counted in the model it saves (``SessionOptions.optimized_model_filepath``) for the original
  and for the output, beside the report's prediction (``report.target_kernels``); each op where the two disagree
  is named (a visible line, not a failure).
- **Exactness.** The exact rewrites are judged with the fold: the output against onnxruntime running the
  original, with the rounding twin and the certificates (the rows of the verify table). An approximate rewrite
  (``requantize_residuals``: a target layer reported ``exact: false``) rounds values the original does not round;
  then the rows compare the output with a *reference*: the original given the same new roundings, each a copy of
  the Q -> DQ pair the output puts at that input (its scale checked against the quantizer the report names and
  against the reported ``new_rounding_step``). Everything else the target and the fold did is judged exactly
  against that reference, with its own rounding twin. How far the approximate rounding moves the network is
  measured separately (:func:`.target_figures.deviation`), against the QAT export with optimisations off, in
  units of the output (max abs, steps of the last quantizer before it, share of its range, SNR, top-1 changes)
  beside the rounding twin's own figures. The verdict is then APPROXIMATE (exit 0), or DIFFERS (exit 3) when the
  exact part is beyond the floor, a certificate fails, or a new rounding is not the one reported.
- **Saturation.** The static integer-kernel check (``cpp/analysis/integer_kernels.h``) of the output, and
  whether it covers every layer onnxruntime runs as an integer GEMM kernel (matched by name in the saved model).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .certificates import _nodes_by_report_name
from .folds import _array
from .loading import _Model

if TYPE_CHECKING:
    import onnx

#: Prefix of the names verify gives the Q -> DQ pairs it adds to the reference.
_REFERENCE_TAG = "qdqfold_verify_reference"


class _DerivedModel(_Model):
    """A model derived from a file model: a ModelProto whose external tensors still name that file's folder."""

    def __init__(self, proto: onnx.ModelProto, folder: str | None):
        super().__init__(proto)
        self._folder = folder

    @property
    def folder(self) -> str | None:
        return self._folder


@dataclass
class TargetPlan:
    """What verify needs to know of the target before it runs: from the fold report and the two models."""

    name: str
    layers: list[dict[str, Any]]
    predicted: dict[str, dict[str, int]]
    approximate: list[dict[str, Any]] = field(default_factory=list)  # target layers reported exact: false
    #: The original with the approximate roundings of the output (None: no approximate layer, or not built).
    reference: _Model | None = None
    rounded: list[dict[str, Any]] = field(default_factory=list)  # per new rounding: node, input, scale, step
    #: Why the approximate part could not be separated or is not what the report says (each a sentence).
    problems: list[str] = field(default_factory=list)
    not_separated: str | None = None  # why no reference could be built (the rows then compare with the original)
    #: The quantizer checks: activation quantizers of the original whose grid the output keeps, and the copies
    #: the target made, each on the grid of a quantizer the report names for it (``into``).
    quantizers: dict[str, Any] = field(default_factory=dict)


def target_of(report: Any) -> tuple[str, list[dict[str, Any]], dict[str, dict[str, int]]]:
    """(target name, target layers as dicts, predicted kernels) of a FoldReport or the native dict."""
    if report is None:
        return "", [], {}
    if isinstance(report, dict):
        return (str(report.get("target", "") or ""), [dict(e) for e in report.get("target_layers", [])],
                {k: dict(v) for k, v in report.get("target_kernels", {}).items()})
    return (getattr(report, "target", "") or "", [asdict(e) for e in getattr(report, "target_layers", [])],
            {k: dict(v) for k, v in getattr(report, "target_kernels", {}).items()})


def plan_target(base: _Model, fold: _Model, report: Any) -> TargetPlan | None:
    """The target's plan, or None when the fold had no target."""
    name, layers, predicted = target_of(report)
    if not name:
        return None
    plan = TargetPlan(name=name, layers=layers, predicted=predicted,
                      approximate=[e for e in layers if e.get("folded") and e.get("exact") is False])
    check_quantizers(plan, base, fold)
    if plan.approximate:
        _build_reference(plan, base, fold)
    return plan


def _grid(index: dict[str, Any], node, folder: str | None) -> tuple[Any, float, float] | None:
    """(scale, lowest, highest) of the floats a QuantizeLinear / DequantizeLinear pair gives: ``s * (q - z)`` for
    q over its integer type; None when its parameters are not constants."""
    import numpy as np
    from onnx import helper

    try:
        scale = _array(index[node.input[1]], folder).astype(np.float64)
        if len(node.input) > 2 and node.input[2]:
            zero = _array(index[node.input[2]], folder)
            kind = zero.dtype
        else:
            zero, kind = np.zeros_like(scale, np.uint8), np.dtype(np.uint8)
        out_type = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
        if out_type:
            kind = np.dtype(helper.tensor_dtype_to_np_dtype(out_type))
    except (KeyError, IndexError, ValueError, TypeError):
        return None
    info = np.iinfo(kind)
    zero = zero.astype(np.float64)
    return scale, float(np.max(scale * (info.min - zero))), float(np.max(scale * (info.max - zero)))


def _same_grid(a: tuple | None, b: tuple | None) -> bool:
    import numpy as np

    return a is not None and b is not None and np.shape(a[0]) == np.shape(b[0]) and \
        bool(np.all(a[0].astype(np.float32) == b[0].astype(np.float32))) and \
        abs(a[1] - b[1]) <= 1e-6 * max(1.0, abs(b[1])) and abs(a[2] - b[2]) <= 1e-6 * max(1.0, abs(b[2]))


def _build_reference(plan: TargetPlan, base: _Model, fold: _Model) -> None:
    """``plan.reference``: the original where every input the output rounds anew (an input of an approximate
    target layer that is ``DQ(Q(x))`` in the output and ``x`` in the original) reads a copy of that Q -> DQ pair.
    Each copy is checked: the grid of the quantizer the report names for it (``into``, in the original), and a
    step of at most the reported ``new_rounding_step``."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    original, folded = base.proto(), fold.proto()
    f_producer = {o: n for n in folded.graph.node for o in n.output}
    f_nodes, f_index = _nodes_by_report_name(folded.graph.node), {t.name: t for t in folded.graph.initializer}
    reference = onnx.ModelProto()
    reference.CopyFrom(original)
    r_nodes = _nodes_by_report_name(reference.graph.node)
    r_position: dict[str, int] = {}
    for position, n in enumerate(reference.graph.node):
        r_position.setdefault(n.name or f"{n.op_type}#{position}", position)
    before: dict[int, list] = {}  # position of a reference node -> the Q / DQ copies to insert before it
    tensors: list = []
    for entry in plan.approximate:
        node = entry["node"]
        fn, rn = f_nodes.get(node), r_nodes.get(node)
        if fn is None or rn is None or fn.op_type != rn.op_type or len(fn.input) != len(rn.input):
            plan.not_separated = f"{node} is not the same node in the output and the original"
            break
        step = float(dict(entry.get("metrics") or {}).get("new_rounding_step", 0.0))
        for slot, (f_in, r_in) in enumerate(zip(fn.input, rn.input)):
            if f_in == r_in:
                continue
            dq = f_producer.get(f_in)
            q = f_producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear" or q.input[0] != r_in:
                plan.not_separated = f"input {slot} of {node} is not a rounding of the original's {r_in!r}"
                break
            grid = _grid(f_index, q, fold.folder)
            if grid is None:
                plan.not_separated = f"the rounding of {r_in!r} at {node} has no constant scale"
                break
            scale = float(np.max(np.abs(grid[0])))
            if step and scale > step * (1 + 1e-6):
                plan.problems.append(f"{node} rounds {r_in!r} with step {scale:.6g}, over the reported "
                                     f"new_rounding_step {step:.6g}")
            tag = f"{_REFERENCE_TAG}::{node}::{slot}"
            inputs = []
            for k, name in enumerate(q.input[1:3], start=1):
                if not name:
                    inputs.append("")
                    continue
                if name not in f_index:
                    plan.not_separated = f"the rounding of {r_in!r} at {node} has no constant parameters"
                    break
                tensors.append(numpy_helper.from_array(_array(f_index[name], fold.folder), f"{tag}::{k}"))
                inputs.append(f"{tag}::{k}")
            if plan.not_separated:
                break
            qn = onnx.helper.make_node("QuantizeLinear", [r_in, *inputs], [f"{tag}::q"], name=f"{tag}::Q")
            dqn = onnx.helper.make_node("DequantizeLinear", [f"{tag}::q", *inputs], [f"{tag}::dq"], name=f"{tag}::DQ")
            qn.attribute.extend(a for a in q.attribute if a.name in ("axis", "block_size", "saturate", "output_dtype"))
            dqn.attribute.extend(a for a in dq.attribute if a.name in ("axis", "block_size"))
            before.setdefault(r_position[node], []).extend([qn, dqn])
            rn.input[slot] = f"{tag}::dq"
            plan.rounded.append({"node": node, "input": r_in, "scale": scale, "reported_step": step})
        if plan.not_separated:
            break
    if plan.not_separated:
        plan.rounded = []
        return
    nodes = []
    for position, n in enumerate(reference.graph.node):
        nodes.extend(before.get(position, []))
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        nodes.append(copy)
    del reference.graph.node[:]
    reference.graph.node.extend(nodes)
    reference.graph.initializer.extend(tensors)
    plan.reference = _DerivedModel(reference, base.folder)


def check_quantizers(plan: TargetPlan, base: _Model, fold: _Model) -> None:
    """Static checks of the target's quantizers, what a certificate is to a fold: every activation quantizer of
    the original that the output still has gives the same floats (the uint8 rewrite: zero point + 128), and every
    activation QuantizeLinear the output adds at a target layer (after it, or on one of its inputs) is on the grid
    of a quantizer the report names for that layer (``into``). A failure is a problem (verdict differs)."""
    original, folded = base.proto(), fold.proto()
    o_index, f_index = {t.name: t for t in original.graph.initializer}, {t.name: t for t in folded.graph.initializer}
    o_nodes, f_nodes = _nodes_by_report_name(original.graph.node), _nodes_by_report_name(folded.graph.node)
    o_named = {n.name: n for n in original.graph.node if n.name}
    f_producer = {o: n for n in folded.graph.node for o in n.output}
    f_readers: dict[str, list] = {}
    for n in folded.graph.node:
        for value in n.input:
            f_readers.setdefault(value, []).append(n)
    kept = copies = 0
    unchecked: list[str] = []

    def activation(n, index) -> bool:
        return n.op_type in ("QuantizeLinear", "DequantizeLinear") and bool(n.input) and n.input[0] not in index

    for n in folded.graph.node:  # the original's activation quantizers, kept
        o = o_named.get(n.name) if n.name else None
        if o is None or o.op_type != n.op_type or not activation(n, f_index) or not activation(o, o_index):
            continue
        grid_f, grid_o = _grid(f_index, n, fold.folder), _grid(o_index, o, base.folder)
        if grid_f is None or grid_o is None:
            continue
        kept += 1
        if not _same_grid(grid_f, grid_o):
            plan.problems.append(f"{n.op_type} {n.name} gives other floats than in the original (scale or zero "
                                 f"point changed: range {grid_f[1]:.6g}..{grid_f[2]:.6g}, was "
                                 f"{grid_o[1]:.6g}..{grid_o[2]:.6g})")
    new_qs: dict[int, tuple[Any, str]] = {}  # the output's added activation quantizers, by the target layer
    for entry in plan.layers:
        layer = f_nodes.get(entry["node"]) if entry.get("folded") else None
        if layer is None:
            continue
        for n in (r for value in layer.output for r in f_readers.get(value, [])):
            if n.op_type == "QuantizeLinear" and n.name not in o_named and activation(n, f_index):
                new_qs[id(n)] = (n, entry["node"])
        for value in layer.input:
            dq = f_producer.get(value)
            q = f_producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear" and q.name not in o_named and activation(q, f_index):
                new_qs[id(q)] = (q, entry["node"])
    into = {e["node"]: e.get("into", []) for e in plan.layers}
    for q, layer_name in new_qs.values():
        named = [_grid(o_index, o_nodes[name], base.folder) for name in into.get(layer_name, []) if name in o_nodes]
        named = [g for g in named if g is not None]
        grid = _grid(f_index, q, fold.folder)
        if not named or grid is None:
            unchecked.append(q.name or q.output[0])
            continue
        copies += 1
        if not any(_same_grid(grid, g) for g in named):
            plan.problems.append(f"the quantizer {q.name or q.output[0]} the target added at {layer_name} is on "
                                 f"none of the grids of the quantizers the report names for it "
                                 f"({', '.join(into.get(layer_name, []))})")
    plan.quantizers = {"kept": kept, "copies": copies, "unchecked": unchecked}
