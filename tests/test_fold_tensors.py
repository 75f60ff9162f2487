"""fold(..., tensors=): external-data locations resolved to buffers the caller holds (the onnx_ir pass's way of
handing over in-memory tensors without copying them into the model's bytes)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper as nh

import qdqfold_native
from helpers.onnxrt import assert_same_outputs
from helpers.samples import MODELS


def split(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, bytes]]:
    """The model with every initializer's data moved to a buffer named `mem/<k>`."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    buffers = {}
    for k, t in enumerate(skeleton.graph.initializer):
        if not t.HasField("raw_data"):
            t.CopyFrom(nh.from_array(nh.to_array(t), t.name))
        location = f"mem/{k}"
        buffers[location] = t.raw_data
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", str(len(buffers[location])))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    return skeleton, buffers


def resolved(model: onnx.ModelProto, buffers: dict[str, bytes]) -> onnx.ModelProto:
    """The model with every reference to a buffer replaced by the buffer's bytes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            refs = {e.key: e.value for e in t.external_data}
            t.raw_data = buffers[refs["location"]]
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    return out


@pytest.mark.parametrize("name", ["qat_input_bn_net.onnx", "unet_up.onnx", "qat_seed_prebn.onnx"])
def test_buffers_fold_like_the_same_tensors_inline(name):
    model = onnx.load(MODELS / name)
    skeleton, buffers = split(model)
    arrays = {k: np.frombuffer(v, np.uint8).copy() for k, v in buffers.items()}  # NumPy buffers, read in place
    out, report = qdqfold_native.fold_with_report(skeleton.SerializeToString(), tensors=arrays)
    inline, inline_report = qdqfold_native.fold_with_report(model.SerializeToString())
    assert [b["folded"] for b in report["batchnorms"]] == [b["folded"] for b in inline_report["batchnorms"]]
    assert any(b["folded"] for b in report["batchnorms"])
    folded = onnx.load_from_string(out)
    expected = onnx.load_from_string(inline)
    got = resolved(folded, buffers)
    assert {t.name: nh.to_array(t).tobytes() for t in got.graph.initializer} == \
        {t.name: nh.to_array(t).tobytes() for t in expected.graph.initializer}
    assert_same_outputs(model, got)
    # Tensors the fold did not change keep their references: the output carries no copy of them.
    kept = [t for t in folded.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(out) < len(inline) or not kept
    assert report["input_bytes"] == len(skeleton.SerializeToString()) + sum(len(v) for v in buffers.values())


def test_the_buffers_are_not_changed():
    model = onnx.load(MODELS / "qat_input_bn_net.onnx")
    skeleton, buffers = split(model)
    arrays = {k: bytearray(v) for k, v in buffers.items()}
    qdqfold_native.fold(skeleton.SerializeToString(), tensors=arrays)
    assert {k: bytes(v) for k, v in arrays.items()} == buffers


def test_other_locations_go_to_base_directory(tmp_path):
    model = onnx.load(MODELS / "qat_input_bn_net.onnx")
    skeleton, buffers = split(model)
    on_disk = sorted(buffers)[:3]
    for location in on_disk:
        (tmp_path / location).parent.mkdir(exist_ok=True)
        (tmp_path / location).write_bytes(buffers.pop(location))
    out, report = qdqfold_native.fold_with_report(skeleton.SerializeToString(), tensors=buffers,
                                                  base_directory=tmp_path)
    assert sum(b["folded"] for b in report["batchnorms"]) == 3
    assert sorted(report["input_files"]) == sorted(str(tmp_path / loc) for loc in on_disk)


@pytest.mark.parametrize("tensors, error, message", [
    ([("mem/0", b"")], TypeError, "option 'tensors' takes a dict"),
    ({0: b""}, TypeError, "every key is a location"),
    ({"mem/0": "text"}, TypeError, "option 'tensors' takes bytes-like buffers"),
    ({"mem/0": 3}, TypeError, None),
])
def test_bad_tensors_are_type_errors(tensors, error, message):
    skeleton, _ = split(onnx.load(MODELS / "qat_seed_prebn.onnx"))
    with pytest.raises(error, match=message):
        qdqfold_native.fold(skeleton.SerializeToString(), tensors=tensors)


def test_a_location_not_given_is_an_error_naming_the_tensor():
    model = onnx.load(MODELS / "qat_seed_prebn.onnx")
    skeleton, buffers = split(model)
    missing = sorted(buffers)[0]
    name = model.graph.initializer[int(missing.split("/")[1])].name
    del buffers[missing]
    with pytest.raises(qdqfold_native.FileError, match=f"the model in memory: tensor '{name}' keeps its data at "
                       f"'{missing}', which is not one of the buffers given in `tensors`"):
        qdqfold_native.fold(skeleton.SerializeToString(), tensors=buffers)


def test_a_reference_past_the_end_of_its_buffer_is_an_error():
    skeleton, buffers = split(onnx.load(MODELS / "qat_seed_prebn.onnx"))
    location = max(buffers, key=lambda k: len(buffers[k]))
    buffers[location] = buffers[location][:-4]
    with pytest.raises(qdqfold_native.FileError, match="runs past the end of its buffer"):
        qdqfold_native.fold(skeleton.SerializeToString(), tensors=buffers)
