"""Bad input gets FoldError with a message naming the problem: never a crash, a hang or a read past the end."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qdqfold_native
from helpers.wire import length_delimited, nested_if_model
from qdqfold_native import FoldError


def _small_model() -> bytes:
    w = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])], initializer=[w])
    # One opset_import, last on the wire: cutting anywhere leaves a model that is invalid, not a shorter valid one.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_truncation_at_every_byte_offset_raises_fold_error():
    data = _small_model()
    for cut in range(len(data)):
        with pytest.raises(FoldError):
            qdqfold_native.fold(data[:cut])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_byte_corruption_gives_an_error_or_a_valid_model(data):
    model = bytearray(_small_model())
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(model) - 1))
        model[position] = data.draw(st.integers(0, 255))
    try:
        out = qdqfold_native.fold(bytes(model))
    except FoldError as e:
        assert str(e)
    else:
        assert out == bytes(model)  # nothing to fold in it: it must come back unchanged


@pytest.mark.parametrize("payload, message", [
    (b"", "empty"),
    (b"this is a text file, not an onnx model\n", "wire type"),
    (b"\x08\x07", "no graph"),
    (bytes([0x0F]), "wire type 7"),
    (bytes([0x3A, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]), "declares"),
    (bytes([0x08] + [0xFF] * 10 + [0x01]), "varint"),
])
def test_garbage_raises_fold_error(payload, message):
    with pytest.raises(FoldError, match=message):
        qdqfold_native.fold(payload)


def _model_with_initializer(tensor: onnx.TensorProto) -> bytes:
    graph = helper.make_graph([helper.make_node("Identity", [tensor.name], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[tensor])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_raw_data_size_disagreeing_with_dims_names_the_tensor():
    t = numpy_helper.from_array(np.zeros((2, 3), dtype=np.float32), "w_bad")
    t.raw_data = t.raw_data[:-4]
    with pytest.raises(FoldError, match="w_bad.*raw_data holds 20 bytes.*need 24"):
        qdqfold_native.fold(_model_with_initializer(t))


def test_negative_dims_and_overflowing_dims():
    t = numpy_helper.from_array(np.zeros(1, dtype=np.float32), "neg")
    t.dims[:] = [-1]
    with pytest.raises(FoldError, match="negative dimension"):
        qdqfold_native.fold(_model_with_initializer(t))
    t = numpy_helper.from_array(np.zeros(1, dtype=np.float32), "huge")
    t.dims[:] = [2**40, 2**40]
    with pytest.raises(FoldError, match="overflows"):
        qdqfold_native.fold(_model_with_initializer(t))


def test_wrong_wire_type_for_a_known_field():
    model = onnx.load_from_string(_small_model())
    data = bytearray(model.SerializeToString())
    # ir_version is field 1 as a varint (tag 0x08); make it a fixed64 (tag 0x09) of the same position.
    assert data[0] == 0x08
    data[0:2] = bytes([0x09]) + bytes(8)
    with pytest.raises(FoldError):
        qdqfold_native.fold(bytes(data))


def test_nesting_deeper_than_any_real_model():
    with pytest.raises(FoldError, match="nested more than"):
        qdqfold_native.fold(nested_if_model(200))
    deep_but_fine = nested_if_model(100)
    assert qdqfold_native.fold(deep_but_fine) == deep_but_fine


def test_error_quoting_a_name_that_is_not_utf8_is_still_a_fold_error():
    t = numpy_helper.from_array(np.zeros(3, dtype=np.float32), "w_bad")
    t.raw_data = t.raw_data[:-4]
    data = _model_with_initializer(t).replace(b"w_bad", b"w\xff\xfe\x80d")  # same length: the framing holds
    with pytest.raises(FoldError, match="raw_data holds 8 bytes"):
        qdqfold_native.fold(data)


def test_names_that_are_not_utf8_reach_the_report():
    """Node names are bytes on the wire: a BN named with invalid UTF-8 is reported (with replacement
    characters), not a UnicodeDecodeError."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w")] + [
        numpy_helper.from_array(v.astype(np.float32), n)
        for n, v in (("g", np.ones(4)), ("b", np.zeros(4)), ("m", np.zeros(4)), ("v", np.ones(4)))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="BNMARK")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])], inits)
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    data = data.replace(b"BNMARK", b"\x84BNMRK")  # same length: every length prefix stays right
    _, report = qdqfold_native.fold_with_report(data)
    assert report["batchnorms"][0]["node"] == "\ufffdBNMRK" and report["batchnorms"][0]["folded"]
