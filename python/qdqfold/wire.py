"""The protobuf wire format of an ONNX model, read in place: fields as spans of the buffer, nothing copied.

The one Python module that names ``onnx.proto``'s field numbers (the C++ core's are in ``cpp/wire/fields.h``);
:mod:`qdqfold.graphinfo` (the node list), :mod:`qdqfold.passes` (the onnx_ir pass's skeleton) and
:mod:`qdqfold.verify` (weights referred to in place) read models through it.
"""

from __future__ import annotations

from typing import Iterator, Union

BytesLike = Union[bytes, bytearray, memoryview]

#: Wire types.
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5

# onnx.proto field numbers.
MODEL_GRAPH, MODEL_FUNCTIONS = 7, 25
GRAPH_NODE, GRAPH_NAME, GRAPH_INITIALIZER, GRAPH_INPUT = 1, 2, 5, 11
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_NAME, TENSOR_RAW_DATA = 1, 2, 8, 9
TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 13, 14
ENTRY_KEY, ENTRY_VALUE = 1, 2  # StringStringEntryProto
VALUE_INFO_NAME, VALUE_INFO_TYPE, TYPE_TENSOR, TENSOR_TYPE_SHAPE, SHAPE_DIM, DIM_PARAM = 1, 2, 1, 2, 1, 2
FUNCTION_NAME, FUNCTION_NODE, FUNCTION_DOMAIN = 1, 7, 10
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_OP_TYPE, NODE_ATTRIBUTE, NODE_DOMAIN = 1, 2, 3, 4, 5, 7
ATTRIBUTE_NAME, ATTRIBUTE_G, ATTRIBUTE_GRAPHS = 1, 6, 11


class WireFormatError(ValueError):
    """The bytes are not a protobuf message of the expected shape."""


def varint(buf: BytesLike, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` (not past ``end``) and the position after it."""
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


def spans(buf: BytesLike, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, value end) of each field in buf[start:end]: the
    field's own bytes are buf[field start:value end], a length-delimited field's payload buf[value start:value end]."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        field_start = pos
        key, pos = varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == VARINT:
            value_start = pos
            _, pos = varint(buf, pos, end)
        elif wire_type == LENGTH:
            length, value_start = varint(buf, pos, end)
            if value_start + length > end:
                raise WireFormatError(f"field {number} runs past the end of its message at byte {value_start}")
            pos = value_start + length
        elif wire_type == FIXED64:
            value_start, pos = pos, pos + 8
        elif wire_type == FIXED32:
            value_start, pos = pos, pos + 4
        else:
            raise WireFormatError(f"unsupported wire type {wire_type} at byte {pos}")
        if pos > end:
            raise WireFormatError("truncated message")
        yield number, wire_type, field_start, value_start, pos


def fields(buf: BytesLike, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of each field in buf[start:end]: a length-delimited value is the
    (start, end) pair of its payload, a varint its value, a fixed-size one None."""
    for number, wire_type, _, value_start, value_end in spans(buf, start, end):
        if wire_type == LENGTH:
            yield number, wire_type, (value_start, value_end)
        elif wire_type == VARINT:
            yield number, wire_type, varint(buf, value_start, value_end)[0]
        else:
            yield number, wire_type, None


def nested(buf: BytesLike, span: tuple[int, int], *numbers: int) -> Iterator[tuple[int, int]]:
    """The spans of the length-delimited fields reached from ``span`` by the field numbers in turn."""
    found = [span]
    for number in numbers:
        found = [v for s in found for n, t, v in fields(buf, *s) if n == number and t == LENGTH]
    return iter(found)


def text(buf: BytesLike, span: tuple[int, int]) -> str:
    """The string at ``span`` (invalid UTF-8 replaced)."""
    return bytes(buf[span[0]:span[1]]).decode("utf-8", "replace")


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_field(number: int, length: int) -> bytes:
    """The key and length of a length-delimited field (its payload follows)."""
    return encode_varint(number << 3 | LENGTH) + encode_varint(length)
