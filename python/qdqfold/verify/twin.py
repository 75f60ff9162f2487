"""The rounding twin: the original, unfolded, with every parameter a fold touched nudged by a few ulps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from .folds import _array, _folded_entries

if TYPE_CHECKING:
    import numpy as np
    import onnx


#: The twin moves each parameter by 1 to this many ulps (at random, either way): a fold rounds every folded
#: weight, scale and bias once, a few ulps in all; a twin moved by one ulp only flips too rarely to be seen on a
#: few input sets where the fold's flips are.
TWIN_ULPS = 4


def _next_ulp(values: np.ndarray, rng) -> np.ndarray:
    """Every element moved by 1 to ``TWIN_ULPS`` ulps of its own type, up or down at random (zeros stay)."""
    import numpy as np

    direction = np.where(rng.random(values.shape) < 0.5, -np.inf, np.inf).astype(values.dtype)
    steps = rng.integers(1, TWIN_ULPS + 1, size=values.shape)
    moved = values.copy()
    for k in range(1, TWIN_ULPS + 1):
        moved = np.where(steps >= k, np.nextafter(moved, direction), moved).astype(values.dtype)
    return np.where(values == 0, values, moved).astype(values.dtype)


def rounding_twin(model: onnx.ModelProto, report: Any, seed: int = 0, folder: str | None = None) -> onnx.ModelProto:
    """A copy of ``model`` (external tensors stay references) where, for every BN a fold took: its gamma, beta,
    mean and variance, and the scale of the DequantizeLinear of the layer's weight and int32 bias, are nudged by
    one ulp in private copies (a QuantizeLinear that shares the scale keeps reading the original, so its
    integers do not change); where the fold re-quantized an int32 bias, beta also moves by up to the reported
    rounding at the output (uniform per channel)."""
    import onnx

    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    edits, tensors = _twin_edits(twin, report, seed, folder)
    for node, slot, name in edits:
        node.input[slot] = name
    twin.graph.initializer.extend(tensors)
    return twin


def _twin_bytes(model: onnx.ModelProto, report: Any, seed: int, folder: str | None,
                spreads: Mapping[str, Any] | None = None) -> bytes:
    """``rounding_twin(model, ...)`` serialised, without a second copy of the model's weights in memory: the
    edits are made on ``model`` itself for the serialisation and undone."""
    edits, tensors = _twin_edits(model, report, seed, folder, spreads)
    before = [(node, slot, node.input[slot]) for node, slot, _ in edits]
    count = len(model.graph.initializer)
    try:
        for node, slot, name in edits:
            node.input[slot] = name
        model.graph.initializer.extend(tensors)
        return model.SerializeToString()
    finally:
        for node, slot, name in reversed(before):
            node.input[slot] = name
        del model.graph.initializer[count:]


def _twin_edits(model: onnx.ModelProto, report: Any, seed: int, folder: str | None,
                spreads: Mapping[str, Any] | None = None):
    """The twin as edits: (node, input slot, new tensor name) and the new (nudged) tensors. ``spreads``: per BN,
    a further per-channel range its beta moves in (see :func:`_ort_bias_rounding`)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    rng = np.random.default_rng(seed + 7919)
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node if n.name}
    producers = {o: n for n in graph.node for o in n.output}
    edits, tensors = [], []
    done: set[tuple[int, int]] = set()

    def nudge(node: onnx.NodeProto, slot: int, spread: Any = 0.0) -> None:
        if slot >= len(node.input) or node.input[slot] not in inits or (id(node), slot) in done:
            return
        done.add((id(node), slot))
        tensor = inits[node.input[slot]]
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            return
        values = _array(tensor, folder)  # small (BN parameters, scales): the copy lives in the twin's proto
        moved = _next_ulp(values, rng)
        spread = np.broadcast_to(np.asarray(spread, np.float64), moved.shape) if np.size(spread) in (1, moved.size) \
            else np.zeros(moved.shape)
        if np.any(spread > 0):
            moved = (moved.astype(np.float64) + rng.uniform(-1, 1, moved.shape) * spread).astype(values.dtype)
        name = f"{tensor.name}__twin{len(tensors)}"
        tensors.append(numpy_helper.from_array(moved, name))
        edits.append((node, slot, name))

    for entry in _folded_entries(report):
        bn = nodes.get(entry["node"])
        if bn is None:
            continue
        # A fold whose int32 bias is re-quantized moves BN's output by up to the reported rounding: the twin's
        # BN beta moves by as much (uniformly, per channel), the same rounding without the fold.
        bias_error = float(entry["metrics"].get("bias_error_at_output", 0.0))
        extra = (spreads or {}).get(entry["node"])
        for slot in (1, 2, 3, 4):
            nudge(bn, slot, (bias_error if extra is None else np.maximum(bias_error, extra)) if slot == 2 else 0.0)
        for name in entry["into"]:
            layer = nodes.get(name)
            if layer is None:
                continue
            for slot in (1, 2):
                dq = producers.get(layer.input[slot]) if slot < len(layer.input) else None
                if dq is not None and dq.op_type == "DequantizeLinear":
                    nudge(dq, 1)
    return edits, tensors


def _ort_bias_rounding(folded: onnx.ModelProto, report: Any, folder: str | None) -> dict[str, Any]:
    """Per folded BN, per channel: the rounding onnxruntime's BiasQuantization (graph optimisations BASIC and
    above) applies to the folded layer's float bias, ``0.5 * s_x * s'_w * |beta|``, when the layer is a Conv or
    Gemm fed by DequantizeLinear on both inputs with a float bias initializer (its conditions). The original's
    BN shift is not rounded so; the twin run with optimisations on moves beta by as much."""
    import numpy as np

    graph = folded.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node if n.name}
    producers = {o: n for n in graph.node for o in n.output}
    last: dict[str, str] = {}
    for entry in _folded_entries(report):
        if entry["direction"] == "backward" and entry["into"]:
            last[entry["into"][0]] = entry["node"]  # a chain: the layer's last BN carries it
    spreads = {}
    for layer_name, bn_name in last.items():
        layer = nodes.get(layer_name)
        if layer is None or layer.op_type not in ("Conv", "Gemm") or len(layer.input) < 3 or layer.input[2] not in inits:
            continue
        dq_x, dq_w = producers.get(layer.input[0]), producers.get(layer.input[1])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        try:
            s_x = _array(inits[dq_x.input[1]], folder).astype(np.float64)
            s_w = _array(inits[dq_w.input[1]], folder).astype(np.float64).ravel()
        except (KeyError, IndexError, ValueError):
            continue
        if s_x.size != 1:
            continue
        beta = next((a.f for a in layer.attribute if a.name == "beta"), 1.0) if layer.op_type == "Gemm" else 1.0
        spreads[bn_name] = 0.5 * abs(float(s_x.ravel()[0])) * np.abs(s_w) * abs(beta)
    return spreads
