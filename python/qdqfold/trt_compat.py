"""TensorRT's custom quantizers (domain ``trt``), rewritten so that onnxruntime can run the model.

ModelOpt writes its FP8 and INT4 exports for TensorRT with ops onnxruntime does not have:
``trt::TRT_FP8QuantizeLinear -> trt::TRT_FP8DequantizeLinear`` and ``trt::DequantizeLinear`` of a float weight
(TensorRT quantizes it to int4 and dequantizes it in that one node). To compare such a model with its folded form
in onnxruntime, :func:`standard_qdq` replaces each of them, *for the comparison only*:

- on a constant (a weight), by the constant the node computes, in float32 as TensorRT and onnxruntime do
  (``round_half_to_even(W / s)`` saturated to int4 [-8, 7] or to float8 e4m3fn's [-448, 448], times ``s``);
- on an activation, by the standard QuantizeLinear -> DequantizeLinear of the same grid when the model's opset
  is 19 or later (float8) / 21 or later (int4); otherwise :class:`TrtCompatError`, since raising the opset would
  change other ops.

The rewritten model is never a fold result: the folded model keeps its trt ops.
"""

from __future__ import annotations

from typing import Any


class TrtCompatError(ValueError):
    """A trt:: node that cannot be expressed with standard ops at the model's opset."""


TRT_OPS = ("TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear", "DequantizeLinear")


def has_trt_quantizers(data: bytes) -> bool:
    """True when the model has a node of domain ``trt`` that :func:`standard_qdq` rewrites."""
    import onnx

    m = onnx.load_from_string(data)
    return any(n.domain == "trt" and n.op_type in TRT_OPS for n in m.graph.node)


def _expand(scale, shape, axis: int, block_size: int):
    import numpy as np

    scale = np.asarray(scale, np.float32)
    if scale.size == 1:
        return np.broadcast_to(scale.reshape([]), shape)
    axis = axis % len(shape)
    if block_size:
        scale = np.repeat(scale, block_size, axis=axis).take(range(shape[axis]), axis=axis)
        return np.broadcast_to(scale, shape)
    view = [1] * len(shape)
    view[axis] = -1
    return np.broadcast_to(scale.reshape(view), shape)


def standard_qdq(data: bytes) -> bytes:
    """``data`` with every trt:: quantizer replaced by standard ops (see the module doc)."""
    import ml_dtypes
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load_from_string(data)
    g = m.graph
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    consts: dict[str, Any] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    attrs = lambda n: {a.name: helper.get_attribute_value(a) for a in n.attribute}  # noqa: E731
    nodes, fp8_values = [], {}
    for n in g.node:
        if n.domain != "trt" or n.op_type not in TRT_OPS:
            nodes.append(n)
            continue
        x = consts.get(n.input[0])
        s = consts.get(n.input[1])
        a = attrs(n)
        if s is None:
            raise TrtCompatError(f"the scale of trt::{n.op_type} '{n.name}' is not a constant")
        if n.op_type == "DequantizeLinear" and x is not None:  # int4 weight: quantize and dequantize in one node
            x32 = np.asarray(x, np.float32)
            s32 = _expand(s, x32.shape, int(a.get("axis", 1)), int(a.get("block_size", 0)))
            q = np.clip(np.round(x32 / s32), -8, 7)
            g.initializer.append(numpy_helper.from_array((q * s32).astype(x.dtype), n.output[0]))
            continue
        if n.op_type == "TRT_FP8QuantizeLinear" and x is not None:  # an fp8 weight: its float8 values, kept
            x32 = np.asarray(x, np.float32)
            s32 = np.float32(np.asarray(s, np.float32).reshape(-1)[0])
            fp8_values[n.output[0]] = np.clip(x32 / s32, -448, 448).astype(ml_dtypes.float8_e4m3fn)
            continue
        if n.op_type == "TRT_FP8DequantizeLinear" and n.input[0] in fp8_values:
            s32 = np.float32(np.asarray(s, np.float32).reshape(-1)[0])
            y = fp8_values[n.input[0]].astype(np.float32) * s32
            g.initializer.append(numpy_helper.from_array(y.astype(np.float32), n.output[0]))
            continue
        # On an activation: the standard op, where the model's opset has it.
        fp8 = n.op_type.startswith("TRT_FP8")
        if opset < (19 if fp8 else 21):
            raise TrtCompatError(f"trt::{n.op_type} '{n.name}' quantizes an activation; its standard form needs opset "
                                 f"{19 if fp8 else 21}, the model has {opset}")
        zp = n.name + "_standard_zero_point"
        count = int(np.asarray(s).size)
        zp_type = onnx.TensorProto.FLOAT8E4M3FN if fp8 else onnx.TensorProto.INT4
        g.initializer.append(helper.make_tensor(zp, zp_type, [count] if count > 1 else [], [0] * count))
        std = {k: v for k, v in a.items() if k in ("axis", "block_size")}
        if n.op_type == "DequantizeLinear":
            q = n.output[0] + "_standard_q"
            nodes += [helper.make_node("QuantizeLinear", [n.input[0], n.input[1], zp], [q], **std),
                      helper.make_node("DequantizeLinear", [q, n.input[1], zp], list(n.output), **std)]
        else:
            op = "QuantizeLinear" if n.op_type == "TRT_FP8QuantizeLinear" else "DequantizeLinear"
            nodes.append(helper.make_node(op, [n.input[0], n.input[1], zp], list(n.output), **std))
    del g.node[:]
    g.node.extend(nodes)
    # Outputs of the replaced nodes lost their producers' shape information: drop stale value_info entries.
    kept = [v for v in g.value_info if v.name not in fp8_values]
    del g.value_info[:]
    g.value_info.extend(kept)
    if not any(n.domain == "trt" for n in g.node):
        keep = [o for o in m.opset_import if o.domain != "trt"]
        del m.opset_import[:]
        m.opset_import.extend(keep)
    return m.SerializeToString()
