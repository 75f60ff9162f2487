"""Protobuf written by hand, for models protobuf itself refuses to build (too deep, malformed)."""

from __future__ import annotations

def varint(v: int) -> bytes:
    """A protobuf varint, encoded by hand (for messages protobuf refuses to build)."""
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (tag, length, payload), encoded by hand."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def nested_if_model(depth: int) -> bytes:
    """A model whose graph nests `depth` If bodies. Built on the wire: protobuf refuses to build it that deep."""
    graph = length_delimited(1, length_delimited(4, b"Identity") + length_delimited(1, b"x") + length_delimited(2, b"y"))  # GraphProto.node
    for _ in range(depth):
        attribute = length_delimited(1, b"then_branch") + bytes([0xA0, 0x01, 5]) + length_delimited(6, graph)  # name, type=GRAPH, g
        graph = length_delimited(1, length_delimited(1, b"c") + length_delimited(2, b"y") + length_delimited(4, b"If") + length_delimited(5, attribute))
    inputs = length_delimited(11, length_delimited(1, b"c")) + length_delimited(11, length_delimited(1, b"x"))  # GraphProto.input: what the If nodes read
    opset = length_delimited(8, bytes([0x10, 17]))  # OperatorSetIdProto{version: 17}
    return bytes([0x08, 0x08]) + length_delimited(7, graph + inputs) + opset  # ir_version 8, graph, opset_import
