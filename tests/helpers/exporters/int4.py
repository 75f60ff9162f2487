"""Pattern 9 (tests/test_exporters_int4.py): 4-bit tensors in int32_data, as onnx.helper.make_tensor writes them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper as h
from onnx import numpy_helper as nh


def as_int32_data(tensor: onnx.TensorProto, packed=True) -> onnx.TensorProto:
    """The same 4-bit tensor written by onnx.helper.make_tensor(raw=False): int32_data."""
    values = nh.to_array(tensor).astype(np.int64).reshape(-1)
    out = h.make_tensor(tensor.name, tensor.data_type, list(tensor.dims), values.tolist())
    assert not out.raw_data and len(out.int32_data) == (values.size + 1) // 2
    if not packed:  # one varint field per entry (a reader must accept the unpacked encoding too)
        entries = list(out.int32_data)
        del out.int32_data[:]
        body = out.SerializeToString() + b"".join(b"\x28" + bytes([v]) if v < 0x80 else b"\x28" + bytes(
            [v & 0x7F | 0x80, v >> 7]) for v in entries)
        out = onnx.TensorProto()
        out.ParseFromString(body)
    return out


def rewrite_as_int32_data(model, names, packed=True):
    inits = [(as_int32_data(i, packed) if i.name in names else i) for i in model.graph.initializer]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
